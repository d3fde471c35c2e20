//! The gRPC adapters: decode requests, call the services, encode responses.

mod admin;
mod auth;
mod authorize;
mod convert;
mod envoy;
pub(crate) mod framing;
mod middleware;
mod status;

pub use admin::KeyAdminApi;
pub use auth::{BearerAuth, bearer_token};
pub use authorize::AuthorizeApi;
pub use envoy::EnvoyAuthorizationApi;
pub use middleware::{CallLabels, CallLayer, MAX_MESSAGE_CHARS};

/// Puts a Check's decision on the current span (never the key): reason, tenant and key id.
pub(crate) fn record_decision(outcome: &crate::service::CheckOutcome) {
    let span = tracing::Span::current();
    span.record("reason", outcome.decision.err().map_or("ALLOWED", crate::domain::decision::DenyReason::code));
    if let Some(key) = &outcome.key {
        span.record("tenant_id", key.tenant_id());
        span.record("key_id", key.key_id());
    }
}

/// A request field for a log line before it is validated: escaped and cut to 64 characters, so
/// hostile input can neither forge log lines nor flood them.
pub(crate) struct Untrusted<'a>(pub &'a str);

impl std::fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const LIMIT: usize = 64;
        let shown: String = self.0.chars().take(LIMIT).collect();
        let ellipsis = if self.0.chars().nth(LIMIT).is_some() { "…" } else { "" };
        write!(f, "{shown:?}{ellipsis}")
    }
}

#[cfg(test)]
mod tests {
    use super::Untrusted;

    #[test]
    fn untrusted_fields_are_escaped_and_cut() {
        assert_eq!(format!("{:?}", Untrusted("acme")), "\"acme\"");
        assert_eq!(format!("{:?}", Untrusted("a\nfake log line")), "\"a\\nfake log line\"");
        assert_eq!(format!("{:?}", Untrusted(&"x".repeat(1000))).len(), 66 + "…".len());
    }
}
