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
use crate::answers::{Answers, DenyFacts, seconds_until, unix_seconds_up};
use crate::domain::decision::DenyReason;
use crate::service::{CheckOutcome, RateLimitState};

/// Default names of the headers keygate sets on allowed requests for the upstream (see
/// `[answers.headers]`); always overwritten, so a client cannot forge them.
pub const TENANT_HEADER: &str = "x-keygate-tenant-id";
pub const KEY_ID_HEADER: &str = "x-keygate-key-id";
pub const SCOPES_HEADER: &str = "x-keygate-scopes";
/// The site keygate approved, when the route names one; removed otherwise.
pub const SITE_HEADER: &str = "x-keygate-site-id";

/// What an allow needs beyond the decision.
pub struct Allowed<'a> {
    pub credentials: &'a ExtractedKey,
    pub strip_credentials: bool,
    pub site_id: Option<&'a str>,
}

/// A deny that is not a key decision: the route itself is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatewayDeny {
    /// The route has no valid `scope` context extension (fail closed).
    RouteMisconfigured,
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
        header("x-ratelimit-reset", unix_seconds_up(limit.reset_at).to_string()),
    ]
}

/// The reason code a denied client sees. Unknown, revoked and malformed keys share one, so that
/// nobody can probe which keys exist; keygate's logs, metrics, audit log and `Authorize.Check`
/// keep the precise reason.
pub fn public_code(reason: DenyReason) -> &'static str {
    if is_invalid_key(reason) { "KEY_INVALID" } else { reason.code() }
}

/// Unknown, revoked and malformed keys: the reasons that share one public answer.
fn is_invalid_key(reason: DenyReason) -> bool {
    matches!(reason, DenyReason::KeyUnknown | DenyReason::KeyRevoked | DenyReason::KeyMalformed)
}

/// The answer for a decided Check.
pub fn decided(
    answers: &Answers,
    outcome: &CheckOutcome,
    allowed: &Allowed<'_>,
    scope: &str,
    now: DateTime<Utc>,
) -> CheckResponse {
    let site_id = allowed.site_id.unwrap_or_default();
    let names = &answers.headers;
    match (outcome.decision, &outcome.key) {
        (Ok(()), Some(key)) => {
            let scopes = key.scopes().collect::<Vec<_>>().join(",");
            let mut ok = OkHttpResponse {
                headers: vec![
                    header(&names.tenant_id, key.tenant_id().to_owned()),
                    header(&names.key_id, key.key_id().to_owned()),
                    header(&names.scopes, scopes),
                ],
                response_headers_to_add: outcome.rate_limit.as_ref().map(rate_limit_headers).unwrap_or_default(),
                ..Default::default()
            };
            match allowed.site_id {
                Some(site_id) => ok.headers.push(header(&names.site_id, site_id)),
                None => ok.headers_to_remove.push(names.site_id.clone()),
            }
            if allowed.strip_credentials {
                ok.headers_to_remove.extend(allowed.credentials.headers_to_remove.iter().cloned());
                // The whole target is set rather than the parameter removed: Envoy would re-encode
                // (and reorder) the rest of the query.
                if let Some(path) = &allowed.credentials.path_without_credentials {
                    ok.headers.push(header(":path", path.clone()));
                }
            }
            CheckResponse {
                status: Some(RpcStatus { code: Code::Ok as i32, ..Default::default() }),
                http_response: Some(HttpResponse::OkResponse(ok)),
                ..Default::default()
            }
        }
        (Err(reason), _) => {
            // Unknown, revoked and malformed keys get one public answer: nothing in it may
            // depend on what only some of them reach (the site is read after the key).
            let site_id = if is_invalid_key(reason) { "" } else { site_id };
            let facts = DenyFacts { reason, scope, site_id, limit: outcome.rate_limit.as_ref(), now };
            denied(answers, &facts)
        }
        // An allow without a key cannot happen; never turn it into an allow.
        (Ok(()), None) => gateway_denied(GatewayDeny::RouteMisconfigured),
    }
}

/// The answer for a credential that cannot be read unambiguously.
pub fn malformed(answers: &Answers, scope: &str) -> CheckResponse {
    let facts = DenyFacts { reason: DenyReason::KeyMalformed, scope, site_id: "", limit: None, now: Utc::now() };
    denied(answers, &facts)
}

/// The answer for a request on a site-bound route that names no valid site: the
/// SITE_FORBIDDEN answer, with keygate's own text unless `[answers]` sets one that needs no
/// `{site_id}`.
pub fn site_unreadable(answers: &Answers, scope: &str) -> CheckResponse {
    let facts = DenyFacts { reason: DenyReason::SiteForbidden, scope, site_id: "", limit: None, now: Utc::now() };
    let message = answers
        .configured_message_without_site(DenyReason::SiteForbidden, scope)
        .unwrap_or_else(|| "This request does not name a valid site".to_owned());
    let body = answers.body(&facts, DenyReason::SiteForbidden.code(), &message);
    denied_response(answers.status(DenyReason::SiteForbidden), Code::PermissionDenied, &message, body, Vec::new())
}

/// The answer for a request that never reached a key decision.
pub fn gateway_denied(deny: GatewayDeny) -> CheckResponse {
    match deny {
        GatewayDeny::RouteMisconfigured => {
            let message = "The API gateway route is misconfigured";
            let body = serde_json::json!({ "error": message, "code": "ROUTE_MISCONFIGURED" }).to_string();
            denied_response(500, Code::Internal, message, body, Vec::new())
        }
    }
}

fn denied(answers: &Answers, facts: &DenyFacts<'_>) -> CheckResponse {
    let mut headers = Vec::new();
    let status = answers.status(facts.reason);
    if status == 401 {
        // RFC 9110: a 401 carries a challenge.
        headers.push(header("www-authenticate", "Bearer realm=\"keygate\""));
    }
    if let Some(limit) = facts.limit
        && matches!(facts.reason, DenyReason::RateLimited | DenyReason::QuotaExceeded)
    {
        // As RFC 9110 defines Retry-After (delay-seconds), rounded up so that a retry after
        // exactly that many seconds is admitted.
        let retry_after = seconds_until(limit.reset_at, facts.now).max(1);
        headers.push(header("retry-after", retry_after.to_string()));
        headers.extend(rate_limit_headers(limit));
    }
    let grpc_code = match facts.reason {
        DenyReason::KeyMissing
        | DenyReason::KeyMalformed
        | DenyReason::KeyUnknown
        | DenyReason::KeyRevoked
        | DenyReason::KeyExpired => Code::Unauthenticated,
        DenyReason::RateLimited | DenyReason::QuotaExceeded => Code::ResourceExhausted,
        _ => Code::PermissionDenied,
    };
    let message = answers.message(facts.reason, facts.scope, facts.site_id);
    let body = answers.body(facts, public_code(facts.reason), &message);
    denied_response(status, grpc_code, &message, body, headers)
}

fn denied_response(
    status: u16,
    grpc_code: Code,
    message: &str,
    body: String,
    mut headers: Vec<HeaderValueOption>,
) -> CheckResponse {
    headers.push(header("content-type", "application/json"));
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use chrono::Duration;

    use super::*;
    use crate::gateway::extract::Presented;

    fn credentials() -> ExtractedKey {
        ExtractedKey {
            presented: Presented::Key("k".into()),
            headers_to_remove: vec!["x-api-key".into()],
            path_without_credentials: Some("/x".into()),
        }
    }

    fn headers_of(headers: &[HeaderValueOption]) -> HashMap<String, String> {
        headers.iter().filter_map(|option| option.header.as_ref()).map(|h| (h.key.clone(), h.value.clone())).collect()
    }

    fn denied_parts(response: &CheckResponse) -> (i32, i32, HashMap<String, String>, serde_json::Value) {
        let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else { panic!("not a deny") };
        let status = denied.status.as_ref().map_or(0, |status| status.code);
        let body = serde_json::from_str(&denied.body).unwrap();
        (response.status.as_ref().unwrap().code, status, headers_of(&denied.headers), body)
    }

    fn outcome(reason: DenyReason, limit: Option<RateLimitState>) -> CheckOutcome {
        CheckOutcome { decision: Err(reason), key: None, rate_limit: limit }
    }

    #[test]
    fn a_429_carries_retry_after_and_the_rate_limit_headers() {
        let now = Utc::now();
        let limit = RateLimitState {
            limit: 60,
            remaining: 0,
            reset_at: now + Duration::milliseconds(41_300),
            window: crate::service::RateLimitWindow::Minute,
            subject: crate::service::RateLimitSubject::Key,
        };
        let allowed = Allowed { credentials: &credentials(), strip_credentials: true, site_id: None };
        let response =
            decided(&Answers::default(), &outcome(DenyReason::RateLimited, Some(limit)), &allowed, "events:read", now);
        let (grpc, status, headers, body) = denied_parts(&response);
        assert_eq!((grpc, status), (Code::ResourceExhausted as i32, 429));
        assert_eq!(headers["retry-after"], "42");
        assert_eq!(headers["x-ratelimit-limit"], "60");
        assert_eq!(headers["x-ratelimit-remaining"], "0");
        let reset = now + Duration::milliseconds(41_300);
        assert_eq!(headers["x-ratelimit-reset"], unix_seconds_up(reset).to_string());
        assert!(unix_seconds_up(reset) >= reset.timestamp() && unix_seconds_up(reset) <= reset.timestamp() + 1);
        assert_eq!(body, serde_json::json!({"error": "Rate limit exceeded", "code": "RATE_LIMITED"}));
    }

    #[test]
    fn invalid_keys_get_one_answer_even_with_placeholders_in_it() {
        let file: crate::answers::AnswersFile =
            toml::from_str("body = '{\"m\": \"{message}\", \"s\": \"{site_id}\", \"c\": \"{scope}\"}'\n[deny.KEY_INVALID]\nmessage = \"bad key for {site_id} / {scope}\"").unwrap();
        let answers = Answers::from_file(&file).unwrap();
        let allowed = Allowed { credentials: &credentials(), strip_credentials: true, site_id: Some("shop") };
        let now = Utc::now();
        let mut bodies: Vec<String> = [DenyReason::KeyUnknown, DenyReason::KeyRevoked]
            .into_iter()
            .map(|reason| {
                let response = decided(&answers, &outcome(reason, None), &allowed, "stats:read", now);
                let Some(HttpResponse::DeniedResponse(denied)) = response.http_response else { panic!() };
                denied.body
            })
            .collect();
        let Some(HttpResponse::DeniedResponse(malformed)) = malformed(&answers, "stats:read").http_response else {
            panic!()
        };
        bodies.push(malformed.body);
        assert!(bodies.iter().all(|body| body == &bodies[0]), "{bodies:?}");
        assert!(bodies[0].contains("stats:read"), "{}", bodies[0]);
    }

    #[test]
    fn deny_statuses_map_to_grpc_codes_and_www_authenticate() {
        let allowed = Allowed { credentials: &credentials(), strip_credentials: true, site_id: Some("s1") };
        let cases = [
            (DenyReason::KeyRevoked, Code::Unauthenticated, 401),
            (DenyReason::PlanRequired, Code::PermissionDenied, 402),
            (DenyReason::SiteForbidden, Code::PermissionDenied, 403),
            (DenyReason::QuotaExceeded, Code::ResourceExhausted, 429),
        ];
        for (reason, code, http) in cases {
            let response = decided(&Answers::default(), &outcome(reason, None), &allowed, "events:read", Utc::now());
            let (grpc, status, headers, body) = denied_parts(&response);
            assert_eq!((grpc, status), (code as i32, http), "{reason:?}");
            assert_eq!(headers.contains_key("www-authenticate"), http == 401, "{reason:?}");
            assert_eq!(headers["content-type"], "application/json");
            assert_eq!(body["code"], public_code(reason));
        }
        let (grpc, status, _, body) = denied_parts(&malformed(&Answers::default(), ""));
        assert_eq!((grpc, status), (Code::Unauthenticated as i32, 401));
        assert_eq!(body["code"], "KEY_INVALID");
        let bodies: Vec<String> = [DenyReason::KeyUnknown, DenyReason::KeyRevoked, DenyReason::KeyMalformed]
            .into_iter()
            .map(|reason| {
                let response =
                    decided(&Answers::default(), &outcome(reason, None), &allowed, "events:read", Utc::now());
                let Some(HttpResponse::DeniedResponse(denied)) = response.http_response else { panic!() };
                format!("{:?}", (denied.status, denied.headers, denied.body, response.status))
            })
            .collect();
        assert!(bodies.iter().all(|body| body == &bodies[0]), "one public answer: {bodies:?}");
        let (grpc, status, _, body) = denied_parts(&gateway_denied(GatewayDeny::RouteMisconfigured));
        assert_eq!((grpc, status, body["code"].as_str()), (Code::Internal as i32, 500, Some("ROUTE_MISCONFIGURED")));
    }
}
