//! Bearer-token authentication of callers, as a tonic interceptor.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::config::TokenSet;
use crate::telemetry::Throttle;

/// The name of the configured token a caller presented; handlers log it.
#[derive(Clone, Debug)]
pub struct Caller(pub String);

/// Requires `authorization: Bearer <token>` with one of `tokens`, unless the set is empty and
/// `optional` (Authorize without caller tokens). Never echoes what was presented.
#[derive(Clone)]
pub struct BearerAuth {
    tokens: Arc<TokenSet>,
    optional: bool,
    service: &'static str,
}

impl BearerAuth {
    /// KeyAdmin: a token is always required.
    pub fn required(tokens: TokenSet, service: &'static str) -> Self {
        Self { tokens: Arc::new(tokens), optional: false, service }
    }

    /// Authorize: a token is required only when some are configured.
    pub fn when_configured(tokens: TokenSet, service: &'static str) -> Self {
        let optional = tokens.is_empty();
        Self { tokens: Arc::new(tokens), optional, service }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if self.optional {
            return Ok(request);
        }
        let presented =
            request.metadata().get("authorization").and_then(|value| value.to_str().ok()).and_then(bearer_token);
        let Some(name) = presented.and_then(|token| self.tokens.authenticate(token)) else {
            // One line per interval however many calls are rejected: a flood cannot flood the log.
            static REJECTED: Throttle = Throttle::every(std::time::Duration::from_secs(10));
            if let Some(suppressed) = REJECTED.allow() {
                tracing::warn!(service = self.service, suppressed, "rejected a call without a valid bearer token");
            }
            return Err(Status::unauthenticated(format!(
                "{} requires `authorization: Bearer <token>` with a configured token",
                self.service
            )));
        };
        let caller = Caller(name.to_owned());
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The caller name set by [`BearerAuth`], for logs.
pub fn caller<T>(request: &Request<T>) -> &str {
    request.extensions().get::<Caller>().map_or("anonymous", |caller| caller.0.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_values_are_parsed_leniently_but_never_empty() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer   abc "), Some("abc"));
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("abc"), None);
    }
}
