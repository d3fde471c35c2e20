//! The Check decision path: format check, cached lookups, pure decision.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tracing::{debug, info};

use super::{Core, ServiceResult};
use crate::domain::decision::{CheckInput, DenyReason, decide};
use crate::domain::key::{ApiKeySecret, KeyFormatError};
use crate::domain::model::{KeyRecord, Tenant};
use crate::domain::scope::Scope;
use crate::limits::{LimitDecision, RateLimitState};

/// A validated Check: the raw key (checked here, never logged), the scope and the site.
pub struct CheckRequest {
    pub key: String,
    pub scope: Scope,
    pub site_id: Option<String>,
}

/// The decision and, when the key is known, its context.
#[derive(Debug)]
pub struct CheckOutcome {
    pub decision: Result<(), DenyReason>,
    pub key: Option<Arc<KeyRecord>>,
    pub rate_limit: Option<RateLimitState>,
}

/// Decides Checks, from the cache where it can.
#[derive(Clone)]
pub struct Authorizer {
    core: Arc<Core>,
}

impl Authorizer {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    /// Decides one Check. A deny is `Ok` with a reason; `Err` only when the store cannot answer
    /// for a key that is not cached (fail closed).
    pub async fn check(&self, request: &CheckRequest) -> ServiceResult<CheckOutcome> {
        let started = std::time::Instant::now();
        let outcome = self.decide(request).await;
        if let Ok(outcome) = &outcome {
            let decision = outcome.decision.err().map_or("ALLOWED", DenyReason::code);
            metrics::counter!("keygate_decisions_total", "decision" => decision).increment(1);
        }
        metrics::histogram!("keygate_check_duration_seconds").record(started.elapsed().as_secs_f64());
        outcome
    }

    async fn decide(&self, request: &CheckRequest) -> ServiceResult<CheckOutcome> {
        let denied = |reason| CheckOutcome { decision: Err(reason), key: None, rate_limit: None };
        let shapes = self.core.shapes.current();
        let secret = match ApiKeySecret::parse(&shapes, &request.key) {
            Ok(secret) => secret,
            Err(KeyFormatError::Missing) => return Ok(denied(DenyReason::KeyMissing)),
            Err(KeyFormatError::Malformed) => {
                debug!(reason = "KEY_MALFORMED", "check denied");
                return Ok(denied(DenyReason::KeyMalformed));
            }
        };
        let core = &self.core;
        let hash = secret.hash();
        let Some(key) = core.cache.key(hash.as_str()).await? else {
            info!(reason = "KEY_UNKNOWN", display_prefix = %secret.display_prefix(shapes.display_chars), "check denied");
            return Ok(denied(DenyReason::KeyUnknown));
        };
        let Some(tenant) = core.cache.tenant(&key.tenant_id).await? else {
            return Ok(denied(DenyReason::KeyUnknown));
        };
        let site_owner = match &request.site_id {
            Some(site_id) => core.cache.site_owner(site_id).await?,
            None => None,
        };
        let now = core.clock.now();
        let input = CheckInput {
            key: &key,
            tenant: &tenant,
            required_scope: &request.scope,
            site_id: request.site_id.as_deref(),
            site_owner: site_owner.as_deref(),
            now,
        };
        let decided = decide(&input, &core.policy.scopes);
        if decided.is_ok() {
            self.prime_limits(&key, &tenant, now).await;
        }
        let (decision, rate_limit) = match decided {
            Err(reason) => (Err(reason), None),
            Ok(()) => match core.limiter.check_and_count(&key, &tenant, now) {
                LimitDecision::Allowed(state) => (Ok(()), state),
                LimitDecision::Denied(reason, state) => (Err(reason), Some(state)),
            },
        };
        core.usage.record(&key, decision, now);
        match decision {
            Ok(()) => debug!(tenant_id = %key.tenant_id, key_id = %key.key_id, scope = %request.scope, "check allowed"),
            // The site id is left out: behind Envoy it is a request header value.
            Err(reason) => info!(
                tenant_id = %key.tenant_id, key_id = %key.key_id, reason = reason.code(), scope = %request.scope,
                "check denied"
            ),
        }
        Ok(CheckOutcome { decision, key: Some(key), rate_limit })
    }

    /// Reads the shared request counts of a key or tenant this replica has not counted for yet,
    /// so that a start, a rollout or a new replica never begins a window at zero. When the
    /// store cannot answer, the decision goes on with this replica's own counts.
    async fn prime_limits(&self, key: &KeyRecord, tenant: &Tenant, now: DateTime<Utc>) {
        let core = &self.core;
        let Some(needed) = core.limiter.unprimed(key, tenant, now) else { return };
        match core.lookups.run(core.store.request_counts_since(&needed)).await {
            Ok(totals) => core.limiter.prime(key, tenant, &needed, totals),
            Err(error) => {
                debug!(%error, "deciding on this replica's own request counts: the shared ones are unreadable")
            }
        }
    }
}
