//! Several replicas on one database: admin changes on one reach every other's cache through the
//! change feed within a second.

use std::time::{Duration, Instant};

use keygate::proto::*;

use crate::support::*;

crate::trials!(
    every_backend: [
        a_revocation_on_one_replica_is_denied_by_another_within_a_second,
        every_change_that_can_deny_reaches_the_other_replica,
        keys_minted_on_one_replica_pass_on_another_at_the_first_check_and_made_up_keys_cost_no_query,
        a_key_whose_creation_reached_no_feed_passes_within_a_reconciliation,
    ],
    once: [],
);

/// Polls `check` on `replica` until `done` holds; returns how long it took.
async fn time_until(replica: &TestApp, secret: &str, done: impl Fn(&CheckResponse) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let response = check(replica, secret, "events:read", "").await;
        if done(&response) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "the change never reached the replica: {response:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn a_revocation_on_one_replica_is_denied_by_another_within_a_second(backend: Backend) {
    let Some(a) = spawn_app(backend).await else { return };
    let b = spawn_replica(&a, &[]).await;
    put_tenant(&a, "acme").await;
    let mut delays = Vec::new();
    for _ in 0..50 {
        let (key, secret) = create_key(&a, key_request("acme", &["events:read"])).await.unwrap();
        assert!(check(&a, &secret, "events:read", "").await.allowed);
        assert!(check(&b, &secret, "events:read", "").await.allowed, "cached on B now");
        crate::keys::revoke(&a, "acme", &key.key_id).await.unwrap();
        assert_eq!(check(&a, &secret, "events:read", "").await.reason(), DenyReason::KeyRevoked);
        delays.push(time_until(&b, &secret, |response| response.reason() == DenyReason::KeyRevoked).await);
    }
    delays.sort();
    let (median, max) = (delays[delays.len() / 2], delays[delays.len() - 1]);
    eprintln!("{backend:?}: revocation reached the other replica in median {median:?}, max {max:?} over 50");
    assert!(max < Duration::from_secs(1), "{backend:?}: slowest propagation {max:?}");
}

async fn every_change_that_can_deny_reaches_the_other_replica(backend: Backend) {
    let Some(a) = spawn_app(backend).await else { return };
    let b = spawn_replica(&a, &[]).await;
    put_tenant(&a, "acme").await;
    put_site(&a, "acme", "site-a").await.unwrap();
    let (key, secret) = create_key(&a, key_request("acme", &["events:read"])).await.unwrap();
    assert!(check(&b, &secret, "events:read", "site-a").await.allowed);

    // The tenant loses API access, then gets it back.
    let plan = |enabled| PutTenantRequest {
        tenant_id: "acme".into(),
        api_access_enabled: Some(enabled),
        ..Default::default()
    };
    put_tenant_with(&a, plan(false)).await;
    time_until(&b, &secret, |response| response.reason() == DenyReason::PlanRequired).await;
    put_tenant_with(&a, plan(true)).await;
    time_until(&b, &secret, |response| response.allowed).await;

    // The site is deleted.
    assert!(check(&b, &secret, "events:read", "site-a").await.allowed);
    let delete = DeleteSiteRequest { tenant_id: "acme".into(), site_id: "site-a".into() };
    a.admin.clone().delete_site(delete).await.unwrap();
    let started = Instant::now();
    while check(&b, &secret, "events:read", "site-a").await.allowed {
        assert!(started.elapsed() < Duration::from_secs(1), "site deletion did not reach the replica");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The key loses its scope, and then its expiry is moved into the past.
    let update = |paths: &[&str], request: UpdateKeyRequest| UpdateKeyRequest {
        tenant_id: "acme".into(),
        key_id: key.key_id.clone(),
        update_mask: Some(prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() }),
        ..request
    };
    let narrow = update(&["scopes"], UpdateKeyRequest { scopes: vec!["goals:read".into()], ..Default::default() });
    a.admin.clone().update_key(narrow).await.unwrap();
    time_until(&b, &secret, |response| response.reason() == DenyReason::ScopeMissing).await;
    let widen = update(&["scopes"], UpdateKeyRequest { scopes: vec!["events:read".into()], ..Default::default() });
    a.admin.clone().update_key(widen).await.unwrap();
    time_until(&b, &secret, |response| response.allowed).await;
    let soon = prost_types::Timestamp { seconds: a_now(&a) + 10, nanos: 0 };
    let expire_soon = update(&["expires_at"], UpdateKeyRequest { expires_at: Some(soon), ..Default::default() });
    a.admin.clone().update_key(expire_soon).await.unwrap();
    a.clock.advance(chrono::Duration::seconds(11));
    time_until(&b, &secret, |response| response.reason() == DenyReason::KeyExpired).await;

    // A rotation without grace revokes the old key everywhere.
    let (other, other_secret) = create_key(&a, key_request("acme", &["events:read"])).await.unwrap();
    assert!(check(&b, &other_secret, "events:read", "").await.allowed);
    let rotate = RotateKeyRequest { tenant_id: "acme".into(), key_id: other.key_id, grace_period: None };
    a.admin.clone().rotate_key(rotate).await.unwrap();
    time_until(&b, &other_secret, |response| response.reason() == DenyReason::KeyRevoked).await;
}

fn a_now(app: &TestApp) -> i64 {
    use keygate::domain::clock::Clock;
    app.clock.now().timestamp()
}

/// The known-keys filter answers made-up keys without a query; a key minted, rotated in or
/// imported on another replica must still pass at its very first Check (the Check waits for a
/// feed poll that began after it arrived).
async fn keys_minted_on_one_replica_pass_on_another_at_the_first_check_and_made_up_keys_cost_no_query(
    backend: Backend,
) {
    let imported_shape = ["--imported-key-formats", "tga_{hex:64}"];
    let Some(a) = spawn_app_with(backend, &imported_shape).await else { return };
    let b = spawn_replica(&a, &imported_shape).await;
    put_tenant(&a, "acme").await;
    known_keys_built(&b).await;
    let shape = keygate::domain::key_format::KeyShapes::default().minting;
    let made_up = || shape.mint(keygate::domain::key::Environment::Live).unwrap();
    for round in 0..20 {
        let before = b.store.query_count();
        let unknown = check(&b, &made_up(), "events:read", "").await;
        assert_eq!(unknown.reason(), DenyReason::KeyUnknown, "round {round}");
        assert_eq!(b.store.query_count(), before, "round {round}: a made-up key made a store query");

        let (key, secret) = create_key(&a, key_request("acme", &["events:read"])).await.unwrap();
        let first = check(&b, &secret, "events:read", "").await;
        assert!(first.allowed, "round {round}: a key created on A, first Check on B: {first:?}");

        let rotate = RotateKeyRequest { tenant_id: "acme".into(), key_id: key.key_id, grace_period: None };
        let rotated = a.admin.clone().rotate_key(rotate).await.unwrap().into_inner();
        let first = check(&b, &rotated.secret, "events:read", "").await;
        assert!(first.allowed, "round {round}: a successor rotated in on A, first Check on B: {first:?}");
        // Under the tenant's limit of 10 working keys.
        crate::keys::revoke(&a, "acme", &rotated.key.unwrap().key_id).await.unwrap();
    }
    let imported = format!("tga_{}", "5e".repeat(32));
    let request = ImportKeysRequest {
        tenant_id: "acme".into(),
        keys: vec![ImportedKey {
            credential: Some(imported_key::Credential::Secret(imported.clone())),
            name: "imported".into(),
            scopes: vec!["events:read".into()],
            ..Default::default()
        }],
        validate_only: false,
    };
    a.admin.clone().import_keys(request).await.unwrap();
    let first = check(&b, &imported, "events:read", "").await;
    assert!(first.allowed, "a key imported on A, first Check on B: {first:?}");
}

/// A replica of an earlier version (during a rolling upgrade) creates keys without recording
/// them in the change feed: the known-keys filter of a newer replica reads the keys created
/// since its last look (30 s back, for clock skew) every 10 s, so such a key passes there
/// within that, and a restart is not needed.
async fn a_key_whose_creation_reached_no_feed_passes_within_a_reconciliation(backend: Backend) {
    let Some(a) = spawn_app(backend).await else { return };
    put_tenant(&a, "acme").await;
    let (key, _) = create_key(&a, key_request("acme", &["events:read"])).await.unwrap();
    known_keys_built(&a).await;
    // What CreateKey of the earlier version commits: the row, and nothing in the feed.
    let secret = keygate::domain::key_format::KeyShapes::default()
        .minting
        .mint(keygate::domain::key::Environment::Live)
        .unwrap();
    // And one from a replica whose clock is 20 s behind.
    let late = keygate::domain::key_format::KeyShapes::default()
        .minting
        .mint(keygate::domain::key::Environment::Live)
        .unwrap();
    let mut connection = <sqlx::AnyConnection as sqlx::Connection>::connect(&a.database_url).await.unwrap();
    for (secret, behind) in [(&secret, 0), (&late, 20)] {
        insert_without_feed_entry(&mut connection, secret, a_now(&a) - behind, &key.key_id).await;
    }
    for secret in [&secret, &late] {
        let started = Instant::now();
        loop {
            let response = check(&a, secret, "events:read", "").await;
            if response.allowed {
                break;
            }
            assert_eq!(response.reason(), DenyReason::KeyUnknown, "{response:?}");
            assert!(started.elapsed() < Duration::from_secs(15), "not known after 15 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!("{backend:?}: a key that reached no feed passed after {:?}", started.elapsed());
    }
}

/// Inserts a key as CreateKey of an earlier version commits it (a copy of `like`, with the
/// secret's hash and a key id minted at `created_at` seconds): the row, and nothing in the feed.
async fn insert_without_feed_entry(connection: &mut sqlx::AnyConnection, secret: &str, created_at: i64, like: &str) {
    let hash = keygate::domain::key::KeyHash::of(secret);
    let key_id = format!("{}{}", keygate::domain::key::key_id_floor(created_at * 1000), &hash.as_str()[..12]);
    let insert = format!(
        "INSERT INTO api_keys (key_id, tenant_id, key_hash, display_prefix, name, scopes, site_ids, environment, \
         metadata, rate_limit_per_minute, created_at, expires_at, revoked_at, last_used_at, rotated_from_key_id) \
         SELECT '{key_id}', tenant_id, '{}', display_prefix, 'by an earlier version', scopes, site_ids, environment, \
         metadata, rate_limit_per_minute, created_at, expires_at, revoked_at, last_used_at, rotated_from_key_id \
         FROM api_keys WHERE key_id = '{}'",
        hash.as_str(),
        like
    );
    sqlx::query(sqlx::AssertSqlSafe(insert)).execute(connection).await.unwrap();
}
