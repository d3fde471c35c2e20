//! RotateKey: a successor with the same settings, the old key in grace or revoked.

use keygate::proto::*;
use prost_types::Duration;
use tonic::Code;

use crate::support::*;

crate::trials!(
    every_backend: [
        rotation_with_grace_keeps_the_old_key_until_the_grace_ends,
        rotation_without_grace_revokes_the_old_key_at_once,
        only_an_active_key_that_was_not_rotated_can_be_rotated,
        rotation_chains_cannot_get_round_the_key_limit,
    ],
    once: [],
);

fn rotate_request(key_id: &str, grace_seconds: Option<i64>) -> RotateKeyRequest {
    RotateKeyRequest {
        tenant_id: "acme".into(),
        key_id: key_id.into(),
        grace_period: grace_seconds.map(|seconds| Duration { seconds, nanos: 0 }),
    }
}

async fn rotation_with_grace_keeps_the_old_key_until_the_grace_ends(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    put_site(&app, "acme", "site-a").await.unwrap();
    let mut request = key_request("acme", &["events:read"]);
    request.site_ids = vec!["site-a".into()];
    request.rate_limit_per_minute = 30;
    let (old, old_secret) = create_key(&app, request).await.unwrap();
    assert!(check(&app, &old_secret, "events:read", "site-a").await.allowed);

    let rotation = app.admin.clone().rotate_key(rotate_request(&old.key_id, Some(3600))).await.unwrap().into_inner();
    let (new, previous) = (rotation.key.unwrap(), rotation.previous_key.unwrap());
    assert_ne!(rotation.secret, old_secret);
    assert_ne!(new.key_id, old.key_id);
    assert_eq!(new.rotated_from_key_id, old.key_id);
    assert_eq!((new.name.as_str(), &new.scopes, &new.site_ids), (old.name.as_str(), &old.scopes, &old.site_ids));
    assert_eq!(new.rate_limit_per_minute, 30);
    assert_eq!(previous.state(), KeyState::Active, "in its grace period");
    assert!(previous.expires_at.is_some());

    assert!(check(&app, &rotation.secret, "events:read", "site-a").await.allowed);
    app.clock.advance(chrono::Duration::seconds(3599));
    assert!(check(&app, &old_secret, "events:read", "site-a").await.allowed, "inside the grace");
    app.clock.advance(chrono::Duration::seconds(1));
    let response = check(&app, &old_secret, "events:read", "site-a").await;
    assert_denied(&response, DenyReason::KeyExpired, 401, "API key has expired");
    assert!(check(&app, &rotation.secret, "events:read", "site-a").await.allowed);
    assert_eq!(get_key(&app, "acme", &old.key_id).await.state(), KeyState::Expired);
}

async fn rotation_without_grace_revokes_the_old_key_at_once(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (old, old_secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    assert!(check(&app, &old_secret, "events:read", "").await.allowed);
    let rotation = app.admin.clone().rotate_key(rotate_request(&old.key_id, None)).await.unwrap().into_inner();
    assert_eq!(rotation.previous_key.unwrap().state(), KeyState::Revoked);
    assert_eq!(check(&app, &old_secret, "events:read", "").await.reason(), DenyReason::KeyRevoked);
    assert!(check(&app, &rotation.secret, "events:read", "").await.allowed);
}

async fn only_an_active_key_that_was_not_rotated_can_be_rotated(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (key, _) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    app.admin.clone().rotate_key(rotate_request(&key.key_id, Some(60))).await.unwrap();
    let again = app.admin.clone().rotate_key(rotate_request(&key.key_id, Some(60))).await;
    assert_status(again, Code::FailedPrecondition, None);

    let (revoked, _) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    crate::keys::revoke(&app, "acme", &revoked.key_id).await.unwrap();
    assert_status(
        app.admin.clone().rotate_key(rotate_request(&revoked.key_id, None)).await,
        Code::FailedPrecondition,
        None,
    );
    assert_status(app.admin.clone().rotate_key(rotate_request("key_unknown", None)).await, Code::NotFound, None);
    let too_long = rotate_request(&key.key_id, Some(31 * 86_400));
    assert_status(app.admin.clone().rotate_key(too_long).await, Code::InvalidArgument, Some("grace_period"));
}

async fn rotation_chains_cannot_get_round_the_key_limit(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant_with(&app, PutTenantRequest { tenant_id: "acme".into(), max_keys: Some(1), ..Default::default() }).await;
    let (first, first_secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let mut admin = app.admin.clone();
    // At the limit, one rotation with a grace period is allowed: the old key is on its way out.
    let second = admin.rotate_key(rotate_request(&first.key_id, Some(86_400))).await.unwrap().into_inner();
    let second_key = second.key.unwrap();
    // Rotating again with a grace period would leave three keys working: refused.
    let status = admin.rotate_key(rotate_request(&second_key.key_id, Some(86_400))).await;
    assert_status(status, Code::ResourceExhausted, None);
    assert_status(create_key(&app, key_request("acme", &["events:read"])).await, Code::ResourceExhausted, None);
    // Without a grace period the number of working keys does not grow: allowed.
    let third = admin.rotate_key(rotate_request(&second_key.key_id, None)).await.unwrap().into_inner();
    let mut allowed = 0;
    for secret in [&first_secret, &second.secret, &third.secret] {
        allowed += usize::from(check(&app, secret, "events:read", "").await.allowed);
    }
    assert_eq!(allowed, 2, "the key in grace and the newest one: the limit plus the one on its way out");
    // Once the grace period is over, rotation with a grace period is possible again.
    app.clock.advance(chrono::Duration::days(1) + chrono::Duration::seconds(1));
    let third_key = third.key.unwrap();
    admin.rotate_key(rotate_request(&third_key.key_id, Some(3600))).await.unwrap();
}
