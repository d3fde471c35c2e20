//! Authorize.Check: the allow path with its tenant context, and every deny reason.

use std::collections::HashMap;

use keygate::proto::*;
use prost_types::Duration;

use crate::support::*;

crate::trials!(
    every_backend: [
        an_allowed_check_returns_the_tenant_context,
        an_empty_key_is_missing,
        malformed_keys_are_denied_without_touching_the_store,
        an_unknown_key_is_denied,
        a_revoked_key_is_denied_on_the_next_check,
        an_expired_key_is_denied,
        a_key_without_the_scope_is_denied,
        wildcard_scopes_grant_and_write_does_not_imply_read,
        a_site_outside_the_tenant_or_the_key_list_is_forbidden,
        a_plan_without_api_access_denies_until_it_is_enabled,
        deleting_a_site_denies_it_on_the_next_check,
        updating_a_key_takes_effect_on_the_next_check,
        a_configured_prefix_and_scope_implications_apply,
    ],
    once: [],
);

async fn an_allowed_check_returns_the_tenant_context(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    put_site(&app, "acme", "site-a").await.unwrap();
    let mut request = key_request("acme", &["events:read", "goals:write"]);
    request.metadata = HashMap::from([("plan".into(), "startup".into())]);
    request.expiry = Some(create_key_request::Expiry::ExpiresIn(Duration { seconds: 3600, nanos: 0 }));
    let (key, secret) = create_key(&app, request).await.unwrap();

    let response = check(&app, &secret, "events:read", "site-a").await;
    assert!(response.allowed, "{response:?}");
    assert_eq!(response.reason(), DenyReason::Unspecified);
    assert_eq!((response.http_status, response.message.as_str()), (200, ""));
    assert_eq!(response.tenant_id, "acme");
    assert_eq!(response.key_id, key.key_id);
    assert_eq!(response.key_name, "test key");
    assert_eq!(response.scopes, ["events:read", "goals:write"]);
    assert_eq!(response.environment(), KeyEnvironment::Live);
    assert_eq!(response.metadata.get("plan").map(String::as_str), Some("startup"));
    assert_eq!(response.expires_at, key.expires_at);
    assert_eq!(response.rate_limit, None, "no limit applies");
    // An endpoint that touches no single site.
    assert!(check(&app, &secret, "events:read", "").await.allowed);
}

async fn an_empty_key_is_missing(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let response = check(&app, "", "events:read", "").await;
    assert_denied(&response, DenyReason::KeyMissing, 401, "API key is required");
    assert!(response.tenant_id.is_empty());
}

async fn malformed_keys_are_denied_without_touching_the_store(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (_, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let mut typo = secret.clone().into_bytes();
    typo[30] = if typo[30] == b'0' { b'1' } else { b'0' };
    let typo = String::from_utf8(typo).unwrap();
    let queries_before = app.store.query_count();
    for bad in [
        typo.as_str(),
        &secret.to_uppercase(),
        &secret.replacen("kg_", "et_", 1),
        &secret[..secret.len() - 1],
        &format!("{secret}0"),
        "kg_live_0123",
        "Bearer something",
        "🔑🔑🔑",
    ] {
        let response = check(&app, bad, "events:read", "").await;
        assert_denied(&response, DenyReason::KeyMalformed, 401, "Invalid API key");
    }
    assert_eq!(app.store.query_count(), queries_before, "malformed keys must cost no query");
}

async fn an_unknown_key_is_denied(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let response = check(&app, &well_formed_unknown_key(), "events:read", "").await;
    assert_denied(&response, DenyReason::KeyUnknown, 401, "Invalid API key");
    assert!(response.key_id.is_empty());
}

async fn a_revoked_key_is_denied_on_the_next_check(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (key, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    assert!(check(&app, &secret, "events:read", "").await.allowed);
    assert!(check(&app, &secret, "events:read", "").await.allowed, "cached now");
    crate::keys::revoke(&app, "acme", &key.key_id).await.unwrap();
    let response = check(&app, &secret, "events:read", "").await;
    assert_denied(&response, DenyReason::KeyRevoked, 401, "Invalid API key");
    assert_eq!(response.key_id, key.key_id);
    // A retried revoke changes nothing and the key stays denied.
    crate::keys::revoke(&app, "acme", &key.key_id).await.unwrap();
    assert_eq!(check(&app, &secret, "events:read", "").await.reason(), DenyReason::KeyRevoked);
}

async fn an_expired_key_is_denied(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let mut request = key_request("acme", &["events:read"]);
    request.expiry = Some(create_key_request::Expiry::ExpiresIn(Duration { seconds: 60, nanos: 0 }));
    let (_, secret) = create_key(&app, request).await.unwrap();
    assert!(check(&app, &secret, "events:read", "").await.allowed);
    app.clock.advance(chrono::Duration::seconds(60));
    let response = check(&app, &secret, "events:read", "").await;
    assert_denied(&response, DenyReason::KeyExpired, 401, "API key has expired");
}

async fn a_key_without_the_scope_is_denied(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (_, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let response = check(&app, &secret, "goals:read", "").await;
    assert_denied(&response, DenyReason::ScopeMissing, 403, "API key missing required scope: goals:read");
    assert_eq!(response.tenant_id, "acme");
}

async fn wildcard_scopes_grant_and_write_does_not_imply_read(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (_, writer) = create_key(&app, key_request("acme", &["goals:write"])).await.unwrap();
    let (_, all_events) = create_key(&app, key_request("acme", &["events:*"])).await.unwrap();
    let (_, everything) = create_key(&app, key_request("acme", &["*"])).await.unwrap();
    assert_eq!(check(&app, &writer, "goals:read", "").await.reason(), DenyReason::ScopeMissing);
    assert!(check(&app, &all_events, "events:delete", "").await.allowed);
    assert_eq!(check(&app, &all_events, "goals:read", "").await.reason(), DenyReason::ScopeMissing);
    assert!(check(&app, &everything, "billing:admin", "").await.allowed);
}

async fn a_site_outside_the_tenant_or_the_key_list_is_forbidden(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    put_tenant(&app, "globex").await;
    put_site(&app, "acme", "site-a").await.unwrap();
    put_site(&app, "acme", "site-b").await.unwrap();
    put_site(&app, "globex", "site-g").await.unwrap();
    let (_, any_site) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let mut only_a = key_request("acme", &["events:read"]);
    only_a.site_ids = vec!["site-a".into()];
    let (_, only_a) = create_key(&app, only_a).await.unwrap();

    assert!(check(&app, &any_site, "events:read", "site-b").await.allowed);
    let response = check(&app, &any_site, "events:read", "site-g").await;
    assert_denied(&response, DenyReason::SiteForbidden, 403, "This API key cannot access site-g");
    let response = check(&app, &any_site, "events:read", "no-such-site").await;
    assert_denied(&response, DenyReason::SiteForbidden, 403, "This API key cannot access no-such-site");
    assert!(check(&app, &only_a, "events:read", "site-a").await.allowed);
    let response = check(&app, &only_a, "events:read", "site-b").await;
    assert_denied(&response, DenyReason::SiteForbidden, 403, "This API key cannot access site-b");
    let response = check(&app, &only_a, "events:read", "").await;
    assert_eq!(response.reason(), DenyReason::SiteForbidden, "a site-restricted key cannot use tenant-wide endpoints");
}

async fn a_plan_without_api_access_denies_until_it_is_enabled(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (_, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    assert!(check(&app, &secret, "events:read", "").await.allowed);
    let downgrade =
        PutTenantRequest { tenant_id: "acme".into(), api_access_enabled: Some(false), ..Default::default() };
    put_tenant_with(&app, downgrade).await;
    let response = check(&app, &secret, "events:read", "").await;
    assert_denied(&response, DenyReason::PlanRequired, 402, "API key access is not included in this plan");
    let upgrade = PutTenantRequest { tenant_id: "acme".into(), api_access_enabled: Some(true), ..Default::default() };
    put_tenant_with(&app, upgrade).await;
    assert!(check(&app, &secret, "events:read", "").await.allowed);
}

async fn deleting_a_site_denies_it_on_the_next_check(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    put_site(&app, "acme", "site-a").await.unwrap();
    let mut request = key_request("acme", &["events:read"]);
    request.site_ids = vec!["site-a".into()];
    let (key, secret) = create_key(&app, request).await.unwrap();
    assert!(check(&app, &secret, "events:read", "site-a").await.allowed);
    let delete = DeleteSiteRequest { tenant_id: "acme".into(), site_id: "site-a".into() };
    app.admin.clone().delete_site(delete).await.unwrap();
    assert_eq!(check(&app, &secret, "events:read", "site-a").await.reason(), DenyReason::SiteForbidden);
    // The restriction stays: the key did not become valid for every site.
    put_site(&app, "acme", "site-b").await.unwrap();
    assert_eq!(check(&app, &secret, "events:read", "site-b").await.reason(), DenyReason::SiteForbidden);
    assert_eq!(get_key(&app, "acme", &key.key_id).await.site_ids, ["site-a"]);
}

async fn updating_a_key_takes_effect_on_the_next_check(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (key, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    assert!(check(&app, &secret, "events:read", "").await.allowed);
    let update = UpdateKeyRequest {
        tenant_id: "acme".into(),
        key_id: key.key_id.clone(),
        scopes: vec!["goals:read".into()],
        update_mask: Some(prost_types::FieldMask { paths: vec!["scopes".into()] }),
        ..Default::default()
    };
    app.admin.clone().update_key(update).await.unwrap();
    assert_eq!(check(&app, &secret, "events:read", "").await.reason(), DenyReason::ScopeMissing);
    assert!(check(&app, &secret, "goals:read", "").await.allowed);
}

async fn a_configured_prefix_and_scope_implications_apply(backend: Backend) {
    let flags = ["--key-prefix", "et", "--scope-implies", "admin>write,write>read"];
    let Some(app) = spawn_app_with(backend, &flags).await else { return };
    put_tenant(&app, "acme").await;
    let (_, secret) = create_key(&app, key_request("acme", &["goals:admin"])).await.unwrap();
    assert!(secret.starts_with("et_live_"), "{}", &secret[..8]);
    assert!(check(&app, &secret, "goals:write", "").await.allowed);
    assert!(check(&app, &secret, "goals:read", "").await.allowed, "admin > write > read");
    assert_eq!(check(&app, &secret, "sites:read", "").await.reason(), DenyReason::ScopeMissing);
    let foreign = check(&app, &well_formed_unknown_key(), "goals:read", "").await;
    assert_eq!(foreign.reason(), DenyReason::KeyMalformed, "a kg_ key is not a key of this deployment");
}

/// A key with a valid checksum that keygate never minted.
pub fn well_formed_unknown_key() -> String {
    let head = format!("kg_live_{}", "ab".repeat(28));
    format!("{head}{:08x}", crc32fast::hash(head.as_bytes()))
}
