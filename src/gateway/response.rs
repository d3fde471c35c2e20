//! Envoy's answer: an OkHttpResponse that adds tenant headers and strips credentials, or a
//! DeniedHttpResponse with the reason's status, a JSON body and the right headers.

use chrono::{DateTime, Utc};
use envoy_types::ext_authz::v3::pb::{
    CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption, HttpResponse, HttpStatus,
    OkHttpResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tonic::Code;

use super::extract::ExtractedKey;
use crate::domain::decision::DenyReason;
use crate::service::{CheckOutcome, RateLimitState};

/// Headers keygate sets on allowed requests for the upstream; always overwritten, so a client
/// cannot forge them.
pub const TENANT_HEADER: &str = "x-keygate-tenant-id";
pub const KEY_ID_HEADER: &str = "x-keygate-key-id";
pub const SCOPES_HEADER: &str = "x-keygate-scopes";

/// A deny that is not a key decision: the route itself is wrong or the request names no site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatewayDeny {
    /// The route has no valid `scope` context extension (fail closed).
    RouteMisconfigured,
    /// The route names a site source but the request carries no valid site.
    SiteMissing,
}

fn header(key: &str, value: impl Into<String>) -> HeaderValueOption {
    #[allow(deprecated)]
    HeaderValueOption {
        header: Some(HeaderValue { key: key.to_owned(), value: value.into(), raw_value: Vec::new() }),
        append: None,
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd.into(),
        keep_empty_value: false,
    }
}

fn rate_limit_headers(limit: &RateLimitState) -> Vec<HeaderValueOption> {
    vec![
        header("x-ratelimit-limit", limit.limit.to_string()),
        header("x-ratelimit-remaining", limit.remaining.to_string()),
        header("x-ratelimit-reset", limit.reset_at.timestamp().to_string()),
    ]
}

/// The answer for a decided Check.
pub fn decided(
    outcome: &CheckOutcome,
    credentials: &ExtractedKey,
    strip: bool,
    scope: &str,
    site_id: &str,
    now: DateTime<Utc>,
) -> CheckResponse {
    match (outcome.decision, &outcome.key) {
        (Ok(()), Some(key)) => {
            let scopes = key.scopes.iter().map(|scope| scope.as_str()).collect::<Vec<_>>().join(",");
            let mut ok = OkHttpResponse {
                headers: vec![
                    header(TENANT_HEADER, key.tenant_id.clone()),
                    header(KEY_ID_HEADER, key.key_id.clone()),
                    header(SCOPES_HEADER, scopes),
                ],
                response_headers_to_add: outcome.rate_limit.as_ref().map(rate_limit_headers).unwrap_or_default(),
                ..Default::default()
            };
            if strip {
                ok.headers_to_remove = credentials.headers_to_remove.clone();
                ok.query_parameters_to_remove = credentials.query_parameters_to_remove.clone();
            }
            CheckResponse {
                status: Some(RpcStatus { code: Code::Ok as i32, ..Default::default() }),
                http_response: Some(HttpResponse::OkResponse(ok)),
                ..Default::default()
            }
        }
        (Err(reason), _) => denied(reason, &reason.message(scope, site_id), outcome.rate_limit.as_ref(), now),
        // An allow without a key cannot happen; never turn it into an allow.
        (Ok(()), None) => gateway_denied(GatewayDeny::RouteMisconfigured),
    }
}

/// The answer for a request that never reached a key decision.
pub fn gateway_denied(deny: GatewayDeny) -> CheckResponse {
    match deny {
        GatewayDeny::RouteMisconfigured => denied_response(
            500,
            Code::Internal,
            "ROUTE_MISCONFIGURED",
            "The API gateway route is misconfigured",
            Vec::new(),
        ),
        GatewayDeny::SiteMissing => {
            let reason = DenyReason::SiteForbidden;
            denied_response(
                403,
                Code::PermissionDenied,
                reason.code(),
                "This request does not name a valid site",
                Vec::new(),
            )
        }
    }
}

fn denied(reason: DenyReason, message: &str, limit: Option<&RateLimitState>, now: DateTime<Utc>) -> CheckResponse {
    let mut headers = Vec::new();
    let status = reason.http_status();
    let grpc_code = match status {
        401 => {
            headers.push(header("www-authenticate", "Bearer realm=\"keygate\""));
            Code::Unauthenticated
        }
        429 => {
            if let Some(limit) = limit {
                let retry_after = (limit.reset_at - now).num_seconds().max(1);
                headers.push(header("retry-after", retry_after.to_string()));
                headers.extend(rate_limit_headers(limit));
            }
            Code::ResourceExhausted
        }
        _ => Code::PermissionDenied,
    };
    denied_response(status, grpc_code, reason.code(), message, headers)
}

fn denied_response(
    status: u16,
    grpc_code: Code,
    code: &str,
    message: &str,
    mut headers: Vec<HeaderValueOption>,
) -> CheckResponse {
    headers.push(header("content-type", "application/json"));
    let body = serde_json::json!({ "error": message, "code": code }).to_string();
    CheckResponse {
        status: Some(RpcStatus { code: grpc_code as i32, message: message.to_owned(), ..Default::default() }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: i32::from(status) }),
            headers,
            body,
        })),
        ..Default::default()
    }
}
