//! The decision cache: repeated Checks do no database work, made-up keys are answered by the
//! known-keys filter without a query, and concurrent misses for one key make one query.

use crate::checks::well_formed_unknown_key;
use crate::support::*;

crate::trials!(
    every_backend: [
        a_repeated_check_is_served_from_the_cache,
        a_made_up_key_costs_no_store_query,
        concurrent_checks_of_an_uncached_key_make_one_lookup,
        a_flood_of_unknown_keys_costs_no_lookup_and_cached_keys_keep_working,
    ],
    once: [],
);

async fn a_repeated_check_is_served_from_the_cache(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    put_site(&app, "acme", "site-a").await.unwrap();
    let (_, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    assert!(check(&app, &secret, "events:read", "site-a").await.allowed);
    let after_first = app.store.query_count();
    for _ in 0..20 {
        assert!(check(&app, &secret, "events:read", "site-a").await.allowed);
        assert_eq!(
            check(&app, &secret, "goals:read", "site-a").await.reason(),
            keygate::proto::DenyReason::ScopeMissing
        );
    }
    assert_eq!(app.store.query_count(), after_first, "repeated checks must not query the store");
}

async fn a_made_up_key_costs_no_store_query(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (_, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let shape = keygate::domain::key_format::KeyShapes::default().minting;
    known_keys_built(&app).await;
    let before = app.store.query_count();
    for _ in 0..10 {
        let made_up = shape.mint(keygate::domain::key::Environment::Live).unwrap();
        assert_eq!(check(&app, &made_up, "events:read", "").await.reason(), keygate::proto::DenyReason::KeyUnknown);
        let repeated = check(&app, &well_formed_unknown_key(), "events:read", "").await;
        assert_eq!(repeated.reason(), keygate::proto::DenyReason::KeyUnknown);
    }
    assert_eq!(app.store.query_count(), before, "made-up keys are answered by the known-keys filter");
    // A key created here passes at once (it went into the filter with its creation).
    assert!(check(&app, &secret, "events:read", "").await.allowed);
}

async fn concurrent_checks_of_an_uncached_key_make_one_lookup(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (_, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let before = app.store.query_count();
    let checks: Vec<_> = (0..32)
        .map(|_| {
            let mut authorize = app.authorize.clone();
            let request = keygate::proto::CheckRequest {
                key: secret.clone(),
                scope: "events:read".into(),
                site_id: String::new(),
                ..Default::default()
            };
            tokio::spawn(async move { authorize.check(request).await.map(|response| response.into_inner().allowed) })
        })
        .collect();
    for check in checks {
        assert!(check.await.unwrap().unwrap());
    }
    // One lookup for the key, one for its tenant.
    assert_eq!(app.store.query_count(), before + 2);
}

async fn a_flood_of_unknown_keys_costs_no_lookup_and_cached_keys_keep_working(backend: Backend) {
    let flags = ["--db-max-connections", "4", "--max-lookups-in-flight", "2"];
    let Some(app) = spawn_app_with(backend, &flags).await else { return };
    put_tenant(&app, "acme").await;
    let (_, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    assert!(check(&app, &secret, "events:read", "").await.allowed);
    let shape = keygate::domain::key_format::KeyShapes::default().minting;
    let environment = keygate::domain::key::Environment::Live;
    let unknown: Vec<String> = (0..400).map(|_| shape.mint(environment).unwrap()).collect();
    known_keys_built(&app).await;
    let before = app.store.query_count();

    let flood: Vec<_> = unknown
        .chunks(50)
        .map(|chunk| {
            let (mut authorize, chunk) = (app.authorize.clone(), chunk.to_vec());
            tokio::spawn(async move {
                // Every unknown key twice.
                for key in chunk.iter().chain(chunk.iter()) {
                    let request = keygate::proto::CheckRequest {
                        key: key.clone(),
                        scope: "events:read".into(),
                        site_id: String::new(),
                        ..Default::default()
                    };
                    let response = authorize.check(request).await.expect("check during the flood").into_inner();
                    assert_eq!(response.reason(), keygate::proto::DenyReason::KeyUnknown);
                }
            })
        })
        .collect();
    for _ in 0..200 {
        assert!(check(&app, &secret, "events:read", "").await.allowed, "a cached key keeps passing during the flood");
    }
    let tenant = app.admin.clone().get_tenant(keygate::proto::GetTenantRequest { tenant_id: "acme".into() }).await;
    assert!(tenant.is_ok(), "admin calls still get a connection during the flood: {tenant:?}");
    for task in flood {
        task.await.unwrap();
    }
    assert!(app.core.lookups.peak() <= 2, "at most 2 lookups ran at once, saw {}", app.core.lookups.peak());
    let lookups = app.store.query_count() - before;
    // No lookup for the 800 Checks of unknown keys: the query of GetTenant, and the usage
    // recorder's writes of the cached key's counts.
    assert!(lookups <= 5, "{lookups} queries for {} distinct unknown keys", unknown.len());
}
