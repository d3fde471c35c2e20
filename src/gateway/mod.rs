//! keygate behind Envoy: the `envoy.service.auth.v3.Authorization` decision, on the same path
//! and cache as `Authorize.Check`.
//!
//! A route says what it needs through its ext_authz `context_extensions`: `scope` (required; a
//! route without one is denied, fail closed), at most one site source (`site`, `site_header`,
//! `site_path`, `site_query`) and at most one tenant source (`tenant`, `tenant_header`,
//! `tenant_path` with `{tenant}`, `tenant_query`): a key of another tenant is denied
//! TENANT_MISMATCH, as is a request on such a route that names no valid tenant. The key comes from the first configured [`KeySource`] present.

mod extract;
mod response;

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse};
use tracing::{error, info};

pub use extract::{ExtractedKey, KeySource, KeySources, Presented, SiteError, SiteSource, extract_key, extract_site};
pub use response::{GatewayDeny, KEY_ID_HEADER, SCOPES_HEADER, SITE_HEADER, TENANT_HEADER};

use crate::domain::clock::Clock;
use crate::domain::scope::Scope;
use crate::service::{self, Authorizer, DENIALS, ServiceResult};
use crate::telemetry::{Throttle, client_text};

/// Gateway settings.
#[derive(Clone, Debug)]
pub struct GatewaySettings {
    pub key_sources: KeySources,
    /// Remove the credential headers and query parameters before the request goes upstream.
    pub strip_credentials: bool,
    /// Deny answers and identity header names.
    pub answers: std::sync::Arc<crate::answers::Answers>,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self { key_sources: KeySources::default(), strip_credentials: true, answers: Default::default() }
    }
}

/// Decides Envoy's Checks.
#[derive(Clone)]
pub struct Gateway {
    authorizer: Authorizer,
    settings: GatewaySettings,
    clock: std::sync::Arc<dyn Clock>,
}

/// A route without a valid scope is the operator's mistake, but every request on it repeats it.
static MISCONFIGURED: Throttle = Throttle::every(std::time::Duration::from_secs(1));

impl Gateway {
    pub fn new(authorizer: Authorizer, settings: GatewaySettings, clock: std::sync::Arc<dyn Clock>) -> Self {
        Self { authorizer, settings, clock }
    }

    /// Decides one request. `Err` only when the store cannot answer (Envoy then applies its
    /// failure mode, which must be closed). Logs name the route by its `route` context
    /// extension, never by its path: a path can hold a key.
    pub async fn check(&self, request: &CheckRequest) -> ServiceResult<CheckResponse> {
        let attributes = request.attributes.as_ref();
        let empty = HashMap::new();
        let context = attributes.map_or(&empty, |attributes| &attributes.context_extensions);
        let http =
            attributes.and_then(|attributes| attributes.request.as_ref()).and_then(|request| request.http.as_ref());
        let headers = http.map(headers_of).unwrap_or_default();
        let target = http.map_or("", |http| http.path.as_str());
        let route = || context.get("route").map_or_else(|| "unnamed".to_owned(), |route| client_text(route));

        let Some(scope) = context.get("scope").and_then(|scope| Scope::parse(scope).ok()) else {
            if let Some(suppressed) = MISCONFIGURED.allow() {
                error!(route = route(), suppressed, "ext_authz route has no valid `scope` context extension: denying");
            }
            return Ok(response::gateway_denied(GatewayDeny::RouteMisconfigured));
        };
        let credentials = extract_key(&self.settings.key_sources, &headers, target);
        let key = match &credentials.presented {
            Presented::Unreadable => return Ok(response::malformed(&self.settings.answers, scope.as_str())),
            // No key: say so first, before anything about the site.
            Presented::Absent => String::new(),
            Presented::Key(key) => key.clone(),
        };
        // The site and the tenant the route names; nothing about them when there is no key.
        let read = |source: SiteSource, what: &str| match key.is_empty() {
            true => Ok(None),
            false => extract_site(&source, &headers, target).inspect_err(|problem| {
                if let Some(suppressed) = DENIALS.allow() {
                    info!(route = route(), ?problem, suppressed, "gateway request names no valid {what}: denying");
                }
            }),
        };
        let Ok(site_id) = read(SiteSource::from_context(context), "site") else {
            return Ok(response::site_unreadable(&self.settings.answers, scope.as_str()));
        };
        // A tenant-bound route without a readable tenant: no key is of the empty tenant, so the
        // key is judged as for any other tenant's route (its lifecycle first, then
        // TENANT_MISMATCH).
        let tenant_id = match read(SiteSource::tenant_from_context(context), "tenant") {
            Ok(tenant_id) => tenant_id,
            Err(_) => Some(String::new()),
        };
        let check = service::CheckRequest { key, scope, site_id, tenant_id };
        let outcome = self.authorizer.check(&check).await?;
        crate::grpc::record_decision(&outcome);
        let allowed = response::Allowed {
            credentials: &credentials,
            strip_credentials: self.settings.strip_credentials,
            site_id: check.site_id.as_deref(),
        };
        Ok(response::decided(&self.settings.answers, &outcome, &allowed, check.scope.as_str(), self.clock.now()))
    }
}

/// The request headers, from `headers` or, when Envoy sends raw headers, from `header_map`
/// (repeated headers joined by commas, as Envoy joins them in `headers`).
fn headers_of(
    http: &envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest,
) -> std::borrow::Cow<'_, HashMap<String, String>> {
    if !http.headers.is_empty() {
        return std::borrow::Cow::Borrowed(&http.headers);
    }
    let mut headers: HashMap<String, String> = HashMap::new();
    for header in http.header_map.iter().flat_map(|map| &map.headers) {
        let value = if header.raw_value.is_empty() {
            header.value.clone()
        } else {
            String::from_utf8_lossy(&header.raw_value).into_owned()
        };
        headers
            .entry(header.key.to_ascii_lowercase())
            .and_modify(|joined| {
                joined.push(',');
                joined.push_str(&value);
            })
            .or_insert(value);
    }
    std::borrow::Cow::Owned(headers)
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;

    use super::*;

    #[test]
    fn raw_headers_are_read_and_repeated_ones_joined_as_envoy_joins_them() {
        let raw =
            |key: &str, value: &str| HeaderValue { key: key.into(), value: String::new(), raw_value: value.into() };
        let http = HttpRequest {
            header_map: Some(HeaderMap {
                headers: vec![
                    raw("Authorization", "Bearer a"),
                    raw("authorization", "Bearer b"),
                    raw("x-site-id", "s1"),
                ],
            }),
            ..Default::default()
        };
        let headers = headers_of(&http);
        assert_eq!(headers["authorization"], "Bearer a,Bearer b");
        assert_eq!(headers["x-site-id"], "s1");
        let extracted = extract_key(&KeySources::default(), &headers, "/");
        assert_eq!(extracted.presented, Presented::Unreadable);
    }
}
