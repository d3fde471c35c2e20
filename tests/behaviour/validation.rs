//! Every validation error: INVALID_ARGUMENT with a google.rpc.BadRequest naming the field.

use std::collections::HashMap;

use keygate::proto::*;
use prost_types::{Duration, FieldMask, Timestamp};
use tonic::Code;

use crate::support::*;

crate::trials!(
    every_backend: [
        tenant_and_site_requests_are_validated,
        create_key_requests_are_validated,
        key_management_requests_are_validated,
        check_requests_are_validated,
        the_scope_catalogue_rejects_unlisted_scopes,
        invisible_and_reordering_names_are_refused_like_blank_ones,
    ],
    once: [],
);

async fn tenant_and_site_requests_are_validated(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let mut admin = app.admin.clone();
    put_tenant(&app, "acme").await;
    for bad_id in ["", "has space", "slash/y", &"x".repeat(65), "ümlaut"] {
        let request = PutTenantRequest { tenant_id: bad_id.into(), ..Default::default() };
        assert_status(admin.put_tenant(request).await, Code::InvalidArgument, Some("tenant_id"));
        assert_status(
            admin.get_tenant(GetTenantRequest { tenant_id: bad_id.into() }).await,
            Code::InvalidArgument,
            Some("tenant_id"),
        );
        assert_status(put_site(&app, "acme", bad_id).await, Code::InvalidArgument, Some("site_id"));
        let delete = DeleteSiteRequest { tenant_id: "acme".into(), site_id: bad_id.into() };
        assert_status(admin.delete_site(delete).await, Code::InvalidArgument, Some("site_id"));
    }
    let long_name =
        PutTenantRequest { tenant_id: "acme".into(), display_name: Some("n".repeat(201)), ..Default::default() };
    assert_status(admin.put_tenant(long_name).await, Code::InvalidArgument, Some("display_name"));
    let long_site = PutSiteRequest { tenant_id: "acme".into(), site_id: "s".into(), display_name: "n".repeat(201) };
    assert_status(admin.put_site(long_site).await, Code::InvalidArgument, Some("display_name"));
    let negative = ListSitesRequest { tenant_id: "acme".into(), page_size: -1, page_token: String::new() };
    assert_status(admin.list_sites(negative).await, Code::InvalidArgument, Some("page_size"));
    let forged = ListSitesRequest { tenant_id: "acme".into(), page_size: 0, page_token: "00zz".into() };
    assert_status(admin.list_sites(forged).await, Code::InvalidArgument, Some("page_token"));
    // Nothing was stored by the rejected calls.
    let sites = admin.list_sites(ListSitesRequest { tenant_id: "acme".into(), ..Default::default() }).await.unwrap();
    assert!(sites.into_inner().sites.is_empty());
}

async fn create_key_requests_are_validated(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let now = chrono::Utc::now().timestamp();
    let base = || key_request("acme", &["events:read"]);
    let cases: Vec<(CreateKeyRequest, &str)> = vec![
        (CreateKeyRequest { tenant_id: String::new(), ..base() }, "tenant_id"),
        (CreateKeyRequest { name: String::new(), ..base() }, "name"),
        (CreateKeyRequest { name: "n".repeat(101), ..base() }, "name"),
        (CreateKeyRequest { name: "tab\there".into(), ..base() }, "name"),
        (CreateKeyRequest { scopes: vec![], ..base() }, "scopes"),
        (CreateKeyRequest { scopes: vec!["events".into()], ..base() }, "scopes[0]"),
        (CreateKeyRequest { scopes: vec!["a:read".into(), "Events:Read".into()], ..base() }, "scopes[1]"),
        (CreateKeyRequest { scopes: (0..65).map(|i| format!("r{i}:read")).collect(), ..base() }, "scopes"),
        (CreateKeyRequest { site_ids: vec!["bad site".into()], ..base() }, "site_ids[0]"),
        (CreateKeyRequest { site_ids: vec!["no-such-site".into()], ..base() }, "site_ids[0]"),
        (CreateKeyRequest { site_ids: (0..101).map(|i| format!("s{i}")).collect(), ..base() }, "site_ids"),
        (CreateKeyRequest { environment: 99, ..base() }, "environment"),
        (CreateKeyRequest { metadata: (0..17).map(|i| (format!("k{i}"), "v".into())).collect(), ..base() }, "metadata"),
        (CreateKeyRequest { metadata: HashMap::from([("k".repeat(65), "v".into())]), ..base() }, "metadata"),
        (CreateKeyRequest { metadata: HashMap::from([("k".into(), "v".repeat(513))]), ..base() }, "metadata[k]"),
        (
            CreateKeyRequest {
                expiry: Some(create_key_request::Expiry::ExpiresIn(Duration { seconds: 0, nanos: 0 })),
                ..base()
            },
            "expires_in",
        ),
        (
            CreateKeyRequest {
                expiry: Some(create_key_request::Expiry::ExpiresIn(Duration { seconds: -5, nanos: 0 })),
                ..base()
            },
            "expires_in",
        ),
        (
            CreateKeyRequest {
                expiry: Some(create_key_request::Expiry::ExpiresIn(Duration { seconds: i64::MAX, nanos: 0 })),
                ..base()
            },
            "expires_in",
        ),
        (
            CreateKeyRequest {
                expiry: Some(create_key_request::Expiry::ExpiresAt(Timestamp { seconds: now - 1, nanos: 0 })),
                ..base()
            },
            "expires_at",
        ),
        (
            CreateKeyRequest {
                expiry: Some(create_key_request::Expiry::ExpiresAt(Timestamp { seconds: now + 60, nanos: -1 })),
                ..base()
            },
            "expires_at",
        ),
        (
            CreateKeyRequest {
                expiry: Some(create_key_request::Expiry::ExpiresAt(Timestamp { seconds: i64::MAX, nanos: 0 })),
                ..base()
            },
            "expires_at",
        ),
    ];
    for (request, field) in cases {
        assert_status(create_key(&app, request).await, Code::InvalidArgument, Some(field));
    }
    let keys =
        app.admin.clone().list_keys(ListKeysRequest { tenant_id: "acme".into(), ..Default::default() }).await.unwrap();
    assert!(keys.into_inner().keys.is_empty(), "no rejected request created a key");

    // "Within 100 years" means calendar years, leap days included.
    use keygate::domain::clock::Clock;
    let hundred_years = app.clock.now().checked_add_months(chrono::Months::new(1200)).unwrap();
    let at = |time: chrono::DateTime<chrono::Utc>| {
        let expiry = create_key_request::Expiry::ExpiresAt(Timestamp { seconds: time.timestamp(), nanos: 0 });
        CreateKeyRequest { expiry: Some(expiry), ..base() }
    };
    create_key(&app, at(hundred_years - chrono::Duration::seconds(1))).await.unwrap();
    let beyond = create_key(&app, at(hundred_years + chrono::Duration::days(1))).await;
    assert_status(beyond, Code::InvalidArgument, Some("expires_at"));
    let days = |days: i64| CreateKeyRequest {
        expiry: Some(create_key_request::Expiry::ExpiresIn(Duration { seconds: days * 86_400, nanos: 0 })),
        ..base()
    };
    create_key(&app, days(36_524)).await.unwrap();
    assert_status(create_key(&app, days(36_530)).await, Code::InvalidArgument, Some("expires_in"));
}

async fn key_management_requests_are_validated(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (key, _) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let mut admin = app.admin.clone();
    let long_id = "k".repeat(65);
    assert_status(
        admin.get_key(GetKeyRequest { tenant_id: "acme".into(), key_id: long_id.clone() }).await,
        Code::InvalidArgument,
        Some("key_id"),
    );
    assert_status(
        admin.revoke_key(RevokeKeyRequest { tenant_id: "acme".into(), key_id: String::new() }).await,
        Code::InvalidArgument,
        Some("key_id"),
    );
    let list = |page_size, site_id: &str| ListKeysRequest {
        tenant_id: "acme".into(),
        page_size,
        site_id: site_id.into(),
        ..Default::default()
    };
    assert_status(admin.list_keys(list(-3, "")).await, Code::InvalidArgument, Some("page_size"));
    assert_status(admin.list_keys(list(10, "a b")).await, Code::InvalidArgument, Some("site_id"));
    let update = |paths: &[&str], request: UpdateKeyRequest| UpdateKeyRequest {
        tenant_id: "acme".into(),
        key_id: key.key_id.clone(),
        update_mask: Some(FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() }),
        ..request
    };
    let cases = [
        (update(&["name"], UpdateKeyRequest { name: String::new(), ..Default::default() }), "name"),
        (update(&["scopes"], UpdateKeyRequest { scopes: vec![], ..Default::default() }), "scopes"),
        (update(&["scopes"], UpdateKeyRequest { scopes: vec!["x".into()], ..Default::default() }), "scopes[0]"),
        (
            update(&["site_ids"], UpdateKeyRequest { site_ids: vec!["ghost".into()], ..Default::default() }),
            "site_ids[0]",
        ),
        (
            update(
                &["expires_at"],
                UpdateKeyRequest { expires_at: Some(Timestamp { seconds: 1, nanos: 0 }), ..Default::default() },
            ),
            "expires_at",
        ),
        (
            update(
                &["metadata"],
                UpdateKeyRequest { metadata: HashMap::from([(String::new(), "v".into())]), ..Default::default() },
            ),
            "metadata",
        ),
        (update(&["key_hash"], UpdateKeyRequest::default()), "update_mask"),
        (
            UpdateKeyRequest { tenant_id: "acme".into(), key_id: key.key_id.clone(), ..Default::default() },
            "update_mask",
        ),
    ];
    for (request, field) in cases {
        assert_status(admin.update_key(request).await, Code::InvalidArgument, Some(field));
    }
    for seconds in [-1, 31 * 86_400] {
        let rotate = RotateKeyRequest {
            tenant_id: "acme".into(),
            key_id: key.key_id.clone(),
            grace_period: Some(Duration { seconds, nanos: 0 }),
        };
        assert_status(admin.rotate_key(rotate).await, Code::InvalidArgument, Some("grace_period"));
    }
    // The key is untouched.
    let fetched = admin.get_key(GetKeyRequest { tenant_id: "acme".into(), key_id: key.key_id.clone() }).await.unwrap();
    assert_eq!(fetched.into_inner().key.unwrap(), key);
}

async fn check_requests_are_validated(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let key = crate::checks::well_formed_unknown_key();
    let huge = "k".repeat(513);
    assert_status(try_check(&app, &huge, "events:read", "").await, Code::InvalidArgument, Some("key"));
    assert_status(try_check(&app, &key, "", "").await, Code::InvalidArgument, Some("scope"));
    assert_status(try_check(&app, &key, "events", "").await, Code::InvalidArgument, Some("scope"));
    assert_status(try_check(&app, &key, "events:read", "bad site").await, Code::InvalidArgument, Some("site_id"));
    let status = try_check(&app, &huge, "events:read", "").await.unwrap_err();
    assert!(!status.message().contains(&huge[..64]), "the key is never echoed");
}

async fn the_scope_catalogue_rejects_unlisted_scopes(backend: Backend) {
    let Some(app) = spawn_app_with(backend, &["--scope-catalogue", "events:read,events:write,goals:read"]).await else {
        return;
    };
    put_tenant(&app, "acme").await;
    create_key(&app, key_request("acme", &["events:read", "events:write"])).await.unwrap();
    let request = key_request("acme", &["events:read", "billing:read"]);
    assert_status(create_key(&app, request).await, Code::InvalidArgument, Some("scopes[1]"));
    // Wildcards grant scopes outside the catalogue: refused unless listed themselves.
    for wildcard in ["events:*", "*"] {
        let request = key_request("acme", &["events:read", wildcard]);
        assert_status(create_key(&app, request).await, Code::InvalidArgument, Some("scopes[1]"));
    }
    let (key, _) = create_key(&app, key_request("acme", &["goals:read"])).await.unwrap();
    let update = UpdateKeyRequest {
        tenant_id: "acme".into(),
        key_id: key.key_id.clone(),
        scopes: vec!["goals:read".into(), "goals:read".into(), "billing:*".into()],
        update_mask: Some(FieldMask { paths: vec!["scopes".into()] }),
        ..Default::default()
    };
    assert_status(app.admin.clone().update_key(update).await, Code::InvalidArgument, Some("scopes[2]"));
    assert_eq!(get_key(&app, "acme", &key.key_id).await.scopes, ["goals:read"]);
}

async fn invisible_and_reordering_names_are_refused_like_blank_ones(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    for name in ["   ", "\u{200B}", "\u{FEFF}\u{200D}", "invoice\u{202E}fdp.exe", "\u{2066}acme\u{2069}"] {
        let mut request = key_request("acme", &["events:read"]);
        request.name = name.into();
        assert_status(create_key(&app, request).await, Code::InvalidArgument, Some("name"));
        let tenant =
            PutTenantRequest { tenant_id: "acme".into(), display_name: Some(name.into()), ..Default::default() };
        assert_status(app.admin.clone().put_tenant(tenant).await, Code::InvalidArgument, Some("display_name"));
    }
}
