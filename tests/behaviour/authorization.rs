//! Callers of keygate itself: KeyAdmin never runs open; Authorize requires tokens when configured.

use keygate::proto::*;
use tonic::Code;

use crate::support::*;

crate::trials!(
    every_backend: [
        key_admin_requires_a_configured_admin_token,
        authorize_requires_a_caller_token_when_configured,
    ],
    once: [],
);

async fn key_admin_requires_a_configured_admin_token(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let request = || PutTenantRequest { tenant_id: "acme".into(), ..Default::default() };
    for token in [None, Some("wrong-token-0123456789"), Some(""), Some(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1])] {
        let status = app.admin_with(token).put_tenant(request()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
        if let Some(token) = token.filter(|token| !token.is_empty()) {
            assert!(!status.message().contains(token), "the token is never echoed");
        }
    }
    let tenant = app.admin.clone().get_tenant(GetTenantRequest { tenant_id: "acme".into() }).await;
    assert_status(tenant, Code::NotFound, None);
    // The scheme is case-insensitive, as HTTP says.
    let mut lower = app.admin_with(None);
    let mut request = tonic::Request::new(request());
    request.metadata_mut().insert("authorization", format!("bearer {ADMIN_TOKEN}").parse().unwrap());
    lower.put_tenant(request).await.unwrap();
}

async fn authorize_requires_a_caller_token_when_configured(backend: Backend) {
    let caller_tokens = "gateway=gateway-token-0123456789";
    let Some(app) = spawn_app_with(backend, &["--authorize-tokens", caller_tokens]).await else {
        return;
    };
    let request = || CheckRequest {
        key: String::new(),
        scope: "events:read".into(),
        site_id: String::new(),
        ..Default::default()
    };
    let status = app.authorize_with(None).check(request()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = app.authorize_with(Some(ADMIN_TOKEN)).check(request()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "admin tokens are not caller tokens");
    let response = app.authorize_with(Some("gateway-token-0123456789")).check(request()).await.unwrap();
    assert_eq!(response.into_inner().reason(), DenyReason::KeyMissing);
}
