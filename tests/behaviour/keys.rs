//! CreateKey, GetKey, ListKeys, UpdateKey, RevokeKey and the active-key limit.

use std::collections::{HashMap, HashSet};

use keygate::proto::*;
use prost_types::{Duration, FieldMask, Timestamp};
use tonic::Code;

use crate::support::*;

crate::trials!(
    every_backend: [
        a_created_key_has_the_documented_format_and_is_shown_once,
        create_key_keeps_every_setting,
        expires_in_and_expires_at_set_the_expiry,
        the_active_key_limit_holds_under_concurrent_creates,
        revoked_and_expired_keys_do_not_count_against_the_limit,
        create_key_is_refused_when_the_plan_has_no_api_access,
        list_keys_pages_through_250_keys,
        list_keys_filters_revoked_keys_and_sites,
        update_key_changes_only_the_masked_fields,
        update_key_refuses_keys_that_are_not_active_and_unknown_fields,
        concurrent_updates_of_different_fields_all_land,
        revoke_key_is_immediate_and_idempotent,
        key_names_can_be_optional_per_deployment,
    ],
    once: [],
);

async fn a_created_key_has_the_documented_format_and_is_shown_once(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (key, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();

    assert_eq!(secret.len(), "kg_live_".len() + 64);
    assert!(secret.starts_with("kg_live_"));
    let (head, checksum) = secret.split_at(secret.len() - 8);
    assert_eq!(checksum, format!("{:08x}", crc32fast::hash(head.as_bytes())));
    assert_eq!(key.display_prefix, &secret[..12]);
    assert!(key.key_id.starts_with("key_"));
    assert_eq!(key.state(), KeyState::Active);

    assert_eq!(get_key(&app, "acme", &key.key_id).await, key);
    let listing =
        format!("{:?}", list_keys(&app, ListKeysRequest { tenant_id: "acme".into(), ..Default::default() }).await);
    assert!(!listing.contains(&secret[12..]), "ListKeys must never show the secret");
}

async fn create_key_keeps_every_setting(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    put_site(&app, "acme", "site-a").await.unwrap();
    let request = CreateKeyRequest {
        tenant_id: "acme".into(),
        name: "Data warehouse sync ✓".into(),
        scopes: vec!["goals:write".into(), "events:read".into(), "events:read".into()],
        site_ids: vec!["site-a".into()],
        environment: KeyEnvironment::Test.into(),
        metadata: HashMap::from([("team".into(), "data".into()), ("ticket".into(), "OPS-1".into())]),
        rate_limit_per_minute: 600,
        ..Default::default()
    };
    let (key, secret) = create_key(&app, request).await.unwrap();
    assert!(secret.starts_with("kg_test_"));
    assert_eq!(key.name, "Data warehouse sync ✓");
    assert_eq!(key.scopes, ["events:read", "goals:write"]);
    assert_eq!(key.site_ids, ["site-a"]);
    assert_eq!(key.environment(), KeyEnvironment::Test);
    assert_eq!(key.metadata.get("team").map(String::as_str), Some("data"));
    assert_eq!(key.rate_limit_per_minute, 600);
    assert_eq!(key.expires_at, None);
    assert_eq!(get_key(&app, "acme", &key.key_id).await, key);
}

async fn expires_in_and_expires_at_set_the_expiry(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let now = chrono::Utc::now().timestamp();
    let mut request = key_request("acme", &["events:read"]);
    request.expiry = Some(create_key_request::Expiry::ExpiresIn(Duration { seconds: 86_400, nanos: 0 }));
    let (key, _) = create_key(&app, request).await.unwrap();
    let expires = key.expires_at.unwrap().seconds;
    assert!((now + 86_400 - 5..=now + 86_400 + 5).contains(&expires), "{expires} vs {now}");

    let mut request = key_request("acme", &["events:read"]);
    request.expiry = Some(create_key_request::Expiry::ExpiresAt(Timestamp { seconds: now + 3600, nanos: 0 }));
    let (key, _) = create_key(&app, request).await.unwrap();
    assert_eq!(key.expires_at.unwrap().seconds, now + 3600);

    let mut request = key_request("acme", &["events:read"]);
    request.expiry = Some(create_key_request::Expiry::ExpiresAt(Timestamp { seconds: now - 60, nanos: 0 }));
    assert_status(create_key(&app, request).await, Code::InvalidArgument, Some("expires_at"));
}

async fn the_active_key_limit_holds_under_concurrent_creates(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let request = PutTenantRequest { tenant_id: "acme".into(), max_keys: Some(5), ..Default::default() };
    put_tenant_with(&app, request).await;
    let attempts = (0..20).map(|_| {
        let mut admin = app.admin.clone();
        tokio::spawn(async move { admin.create_key(key_request("acme", &["events:read"])).await.map(|_| ()) })
    });
    let results: Vec<_> = futures_join(attempts).await;
    let created = results.iter().filter(|result| result.is_ok()).count();
    assert_eq!(created, 5, "{results:?}");
    for result in results.iter().filter_map(|result| result.as_ref().err()) {
        assert_eq!(result.code(), Code::ResourceExhausted, "{result:?}");
    }
    let keys = list_keys(&app, ListKeysRequest { tenant_id: "acme".into(), ..Default::default() }).await.0;
    assert_eq!(keys.len(), 5);
}

async fn revoked_and_expired_keys_do_not_count_against_the_limit(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let request = PutTenantRequest { tenant_id: "acme".into(), max_keys: Some(2), ..Default::default() };
    put_tenant_with(&app, request).await;
    let (first, _) = create_key(&app, key_request("acme", &["a:read"])).await.unwrap();
    let mut expiring = key_request("acme", &["a:read"]);
    expiring.expiry = Some(create_key_request::Expiry::ExpiresIn(Duration { seconds: 60, nanos: 0 }));
    create_key(&app, expiring).await.unwrap();
    assert_status(create_key(&app, key_request("acme", &["a:read"])).await, Code::ResourceExhausted, None);

    revoke(&app, "acme", &first.key_id).await.unwrap();
    create_key(&app, key_request("acme", &["a:read"])).await.unwrap();
    app.clock.advance(chrono::Duration::seconds(61));
    create_key(&app, key_request("acme", &["a:read"])).await.unwrap();
    assert_status(create_key(&app, key_request("acme", &["a:read"])).await, Code::ResourceExhausted, None);
}

async fn create_key_is_refused_when_the_plan_has_no_api_access(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let request = PutTenantRequest { tenant_id: "free".into(), api_access_enabled: Some(false), ..Default::default() };
    put_tenant_with(&app, request).await;
    assert_status(create_key(&app, key_request("free", &["events:read"])).await, Code::FailedPrecondition, None);
}

async fn list_keys_pages_through_250_keys(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let request = PutTenantRequest { tenant_id: "acme".into(), max_keys: Some(300), ..Default::default() };
    put_tenant_with(&app, request).await;
    let mut created = HashSet::new();
    for _ in 0..250 {
        created.insert(create_key(&app, key_request("acme", &["events:read"])).await.unwrap().0.key_id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let request =
            ListKeysRequest { tenant_id: "acme".into(), page_size: 100, page_token: token, ..Default::default() };
        let (keys, next) = list_keys(&app, request).await;
        pages += 1;
        assert!(keys.len() <= 100);
        seen.extend(keys.into_iter().map(|key| key.key_id));
        if next.is_empty() {
            break;
        }
        token = next;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 250);
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), created);
    let forged = ListKeysRequest { tenant_id: "acme".into(), page_token: "not-a-token".into(), ..Default::default() };
    assert_status(app.admin.clone().list_keys(forged).await, Code::InvalidArgument, Some("page_token"));
}

async fn list_keys_filters_revoked_keys_and_sites(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    put_site(&app, "acme", "site-a").await.unwrap();
    put_site(&app, "acme", "site-b").await.unwrap();
    let (everywhere, _) = create_key(&app, key_request("acme", &["a:read"])).await.unwrap();
    let mut on_a = key_request("acme", &["a:read"]);
    on_a.site_ids = vec!["site-a".into()];
    let (on_a, _) = create_key(&app, on_a).await.unwrap();
    let mut on_both = key_request("acme", &["a:read"]);
    on_both.site_ids = vec!["site-a".into(), "site-b".into()];
    let (on_both, _) = create_key(&app, on_both).await.unwrap();
    revoke(&app, "acme", &on_both.key_id).await.unwrap();

    let ids = |keys: Vec<ApiKey>| keys.into_iter().map(|key| key.key_id).collect::<HashSet<_>>();
    let all = ListKeysRequest { tenant_id: "acme".into(), ..Default::default() };
    assert_eq!(
        ids(list_keys(&app, all.clone()).await.0),
        HashSet::from([everywhere.key_id.clone(), on_a.key_id.clone()])
    );
    let with_revoked = ListKeysRequest { include_revoked: true, ..all.clone() };
    assert_eq!(list_keys(&app, with_revoked).await.0.len(), 3);
    let site_a = ListKeysRequest { site_id: "site-a".into(), include_revoked: true, ..all.clone() };
    assert_eq!(ids(list_keys(&app, site_a).await.0), HashSet::from([on_a.key_id.clone(), on_both.key_id.clone()]));
    let site_b = ListKeysRequest { site_id: "site-b".into(), ..all };
    assert!(list_keys(&app, site_b).await.0.is_empty());
}

async fn update_key_changes_only_the_masked_fields(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    put_site(&app, "acme", "site-a").await.unwrap();
    let mut request = key_request("acme", &["events:read"]);
    request.metadata = HashMap::from([("team".into(), "data".into())]);
    let (key, _) = create_key(&app, request).await.unwrap();
    let expires_at = Timestamp { seconds: chrono::Utc::now().timestamp() + 7200, nanos: 0 };
    let update = UpdateKeyRequest {
        tenant_id: "acme".into(),
        key_id: key.key_id.clone(),
        name: "renamed".into(),
        scopes: vec!["events:write".into()],
        site_ids: vec!["site-a".into()],
        expires_at: Some(expires_at),
        rate_limit_per_minute: 99,
        metadata: HashMap::new(),
        update_mask: Some(FieldMask {
            paths: vec!["name".into(), "scopes".into(), "site_ids".into(), "expires_at".into()],
        }),
    };
    let updated = app.admin.clone().update_key(update).await.unwrap().into_inner().key.unwrap();
    assert_eq!(updated.name, "renamed");
    assert_eq!(updated.scopes, ["events:write"]);
    assert_eq!(updated.site_ids, ["site-a"]);
    assert_eq!(updated.expires_at, Some(expires_at));
    assert_eq!(updated.rate_limit_per_minute, 0, "not in the mask");
    assert_eq!(updated.metadata.get("team").map(String::as_str), Some("data"), "not in the mask");

    let clear = UpdateKeyRequest {
        tenant_id: "acme".into(),
        key_id: key.key_id.clone(),
        update_mask: Some(FieldMask { paths: vec!["expires_at".into(), "metadata".into(), "site_ids".into()] }),
        ..Default::default()
    };
    let cleared = app.admin.clone().update_key(clear).await.unwrap().into_inner().key.unwrap();
    assert_eq!(cleared.expires_at, None);
    assert!(cleared.metadata.is_empty());
    assert!(cleared.site_ids.is_empty());
    assert_eq!(cleared.name, "renamed");
}

/// An UpdateKey request that changes `paths` of `key_id` (name "x", no expiry, limit 7).
fn update_request(key_id: &str, paths: &[&str]) -> UpdateKeyRequest {
    UpdateKeyRequest {
        tenant_id: "acme".into(),
        key_id: key_id.into(),
        name: "x".into(),
        rate_limit_per_minute: 7,
        update_mask: Some(FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() }),
        ..Default::default()
    }
}

async fn update_key_refuses_keys_that_are_not_active_and_unknown_fields(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (key, _) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let mut admin = app.admin.clone();
    assert_status(admin.update_key(update_request(&key.key_id, &[])).await, Code::InvalidArgument, Some("update_mask"));
    let read_only = update_request(&key.key_id, &["state"]);
    assert_status(admin.update_key(read_only).await, Code::InvalidArgument, Some("update_mask"));
    let renamed = admin.update_key(update_request(&key.key_id, &["name"])).await.unwrap().into_inner().key.unwrap();
    assert_eq!(renamed.name, "x");
    revoke(&app, "acme", &key.key_id).await.unwrap();
    let revoked = admin.update_key(update_request(&key.key_id, &["name"])).await;
    assert_status(revoked, Code::FailedPrecondition, None);

    // An expired key cannot be revived by removing its expiry: that would undo the active-key limit.
    let mut expiring = key_request("acme", &["events:read"]);
    expiring.expiry = Some(create_key_request::Expiry::ExpiresIn(Duration { seconds: 60, nanos: 0 }));
    let (expiring, _) = create_key(&app, expiring).await.unwrap();
    app.clock.advance(chrono::Duration::seconds(61));
    let revive = admin.update_key(update_request(&expiring.key_id, &["expires_at"])).await;
    assert_status(revive, Code::FailedPrecondition, None);
    assert_eq!(get_key(&app, "acme", &expiring.key_id).await.state(), KeyState::Expired);

    // A rotated key in its grace period is on its way out: its successor is the one to change.
    let (old, _) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let rotate = RotateKeyRequest {
        tenant_id: "acme".into(),
        key_id: old.key_id.clone(),
        grace_period: Some(Duration { seconds: 3600, nanos: 0 }),
    };
    admin.rotate_key(rotate).await.unwrap();
    let extend = admin.update_key(update_request(&old.key_id, &["expires_at"])).await;
    assert_status(extend, Code::FailedPrecondition, None);
    assert!(get_key(&app, "acme", &old.key_id).await.expires_at.is_some());
}

async fn concurrent_updates_of_different_fields_all_land(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (key, _) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    for _ in 0..5 {
        let (mut first, mut second) = (app.admin.clone(), app.admin.clone());
        let rename = update_request(&key.key_id, &["name"]);
        let limit = update_request(&key.key_id, &["rate_limit_per_minute"]);
        let (renamed, limited) = tokio::join!(first.update_key(rename), second.update_key(limit));
        renamed.unwrap();
        limited.unwrap();
    }
    let key = get_key(&app, "acme", &key.key_id).await;
    assert_eq!((key.name.as_str(), key.rate_limit_per_minute), ("x", 7));
}

async fn revoke_key_is_immediate_and_idempotent(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (key, _) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let revoked = revoke(&app, "acme", &key.key_id).await.unwrap();
    assert_eq!(revoked.state(), KeyState::Revoked);
    assert!(revoked.revoked_at.is_some());
    app.clock.advance(chrono::Duration::seconds(5));
    let again = revoke(&app, "acme", &key.key_id).await.unwrap();
    assert_eq!(again.revoked_at, revoked.revoked_at);
    assert_status(revoke(&app, "acme", "key_doesnotexist").await, Code::NotFound, None);
}

pub async fn list_keys(app: &TestApp, request: ListKeysRequest) -> (Vec<ApiKey>, String) {
    let response = app.admin.clone().list_keys(request).await.unwrap().into_inner();
    (response.keys, response.next_page_token)
}

pub async fn revoke(app: &TestApp, tenant_id: &str, key_id: &str) -> Result<ApiKey, tonic::Status> {
    let request = RevokeKeyRequest { tenant_id: tenant_id.into(), key_id: key_id.into() };
    Ok(app.admin.clone().revoke_key(request).await?.into_inner().key.unwrap())
}

async fn futures_join<T: Send + 'static>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut results = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        results.push(handle.await.expect("task"));
    }
    results
}

async fn key_names_can_be_optional_per_deployment(backend: Backend) {
    // Required by default: an empty name is INVALID_ARGUMENT on CreateKey.
    let Some(strict) = spawn_app(backend).await else { return };
    put_tenant(&strict, "acme").await;
    let mut unnamed = key_request("acme", &["events:read"]);
    unnamed.name = String::new();
    assert_status(create_key(&strict, unnamed.clone()).await, Code::InvalidArgument, Some("name"));
    drop(strict);

    let Some(app) = spawn_app_with(backend, &["--key-name-required", "false"]).await else { return };
    put_tenant(&app, "acme").await;
    let (key, secret) = create_key(&app, unnamed).await.unwrap();
    assert_eq!(key.name, "");
    assert!(check(&app, &secret, "events:read", "").await.allowed);
    // A name of blanks is still no name, and a name can be cleared again.
    let mut blank = key_request("acme", &["events:read"]);
    blank.name = " \u{200B} ".into();
    assert_status(create_key(&app, blank).await, Code::InvalidArgument, Some("name"));
    let (named, _) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let clear = UpdateKeyRequest {
        tenant_id: "acme".into(),
        key_id: named.key_id.clone(),
        update_mask: Some(FieldMask { paths: vec!["name".into()] }),
        ..Default::default()
    };
    let cleared = app.admin.clone().update_key(clear).await.unwrap().into_inner();
    assert_eq!(cleared.key.unwrap().name, "");
    assert_eq!(get_key(&app, "acme", &key.key_id).await.name, "", "stored and read back empty");
}
