//! The Check decision path: format check, cached lookups, pure decision.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tracing::{debug, info};

use super::{Core, ServiceResult};
use crate::cache::Cached;
use crate::domain::cached_key::CachedKey;
use crate::domain::decision::{CheckInput, DenyReason, decide};
use crate::domain::key::{ApiKeySecret, KeyFormatError};
use crate::domain::model::Tenant;
use crate::domain::scope::Scope;
use crate::limits::{LimitDecision, RateLimitState};
use crate::telemetry::{Throttle, client_text};

/// The longest a Check waits for the shared request counts of a key new to this replica.
pub const PRIMING_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Denied Checks are logged (at info) at most ten times a second, with the count held back:
/// a client can repeat a denied call as fast as it likes. Metrics and the audit log count them all.
pub static DENIALS: Throttle = Throttle::every(std::time::Duration::from_millis(100));

/// A validated Check: the raw key (checked here, never logged), the scope and the site.
pub struct CheckRequest {
    pub key: String,
    pub scope: Scope,
    pub site_id: Option<String>,
    /// The tenant the request names (a well-formed id), if any: a key of another tenant is
    /// denied TENANT_MISMATCH.
    pub tenant_id: Option<String>,
}

/// The decision and, when the key is known, its context.
#[derive(Debug)]
pub struct CheckOutcome {
    pub decision: Result<(), DenyReason>,
    pub key: Option<Cached<CachedKey>>,
    pub rate_limit: Option<RateLimitState>,
}

/// Decides Checks, from the cache where it can.
#[derive(Clone)]
pub struct Authorizer {
    core: Arc<Core>,
    metrics: Arc<DecisionMetrics>,
}

/// The series a Check records, resolved once: `keygate_decisions_total` by decision (ALLOWED,
/// then each reason of [`DenyReason::ALL`]) and `keygate_check_duration_seconds`.
struct DecisionMetrics {
    decisions: [metrics::Counter; DenyReason::ALL.len() + 1],
    duration: metrics::Histogram,
}

impl DecisionMetrics {
    fn new() -> Self {
        let decision = |code: &'static str| metrics::counter!("keygate_decisions_total", "decision" => code);
        Self {
            decisions: std::array::from_fn(|index| match index.checked_sub(1) {
                None => decision("ALLOWED"),
                Some(reason) => decision(DenyReason::ALL[reason].code()),
            }),
            duration: metrics::histogram!("keygate_check_duration_seconds"),
        }
    }

    fn decided(&self, decision: Result<(), DenyReason>) -> &metrics::Counter {
        let index =
            decision.err().map_or(0, |reason| 1 + DenyReason::ALL.iter().position(|r| *r == reason).unwrap_or(0));
        &self.decisions[index]
    }
}

impl Authorizer {
    /// An authorizer over `core`. Its metrics series are resolved here: install the metrics
    /// recorder first.
    pub fn new(core: Arc<Core>) -> Self {
        Self { core, metrics: Arc::new(DecisionMetrics::new()) }
    }

    /// Decides one Check. A deny is `Ok` with a reason; `Err` only when the store cannot answer
    /// for a key that is not cached (fail closed).
    pub async fn check(&self, request: &CheckRequest) -> ServiceResult<CheckOutcome> {
        let started = std::time::Instant::now();
        let outcome = self.decide(request, started).await;
        if let Ok(outcome) = &outcome {
            self.metrics.decided(outcome.decision).increment(1);
        }
        self.metrics.duration.record(started.elapsed().as_secs_f64());
        outcome
    }

    async fn decide(&self, request: &CheckRequest, started: std::time::Instant) -> ServiceResult<CheckOutcome> {
        let denied = |reason| CheckOutcome { decision: Err(reason), key: None, rate_limit: None };
        let shapes = self.core.shapes.current();
        let digest = match ApiKeySecret::digest_of(&shapes, &request.key) {
            Ok(digest) => digest,
            Err(KeyFormatError::Missing) => return Ok(denied(DenyReason::KeyMissing)),
            Err(KeyFormatError::Malformed) => {
                debug!(reason = "KEY_MALFORMED", "check denied");
                return Ok(denied(DenyReason::KeyMalformed));
            }
        };
        let core = &self.core;
        let Some(key) = core.cache.key(&digest, started).await? else {
            if let Some(suppressed) = DENIALS.allow() {
                let display_prefix = client_text(&shapes.display_prefix(&request.key));
                info!(reason = "KEY_UNKNOWN", display_prefix, suppressed, "check denied");
            }
            return Ok(denied(DenyReason::KeyUnknown));
        };
        let Some(tenant) = core.cache.tenant(key.tenant_id(), started).await? else {
            return Ok(denied(DenyReason::KeyUnknown));
        };
        let site_owner = match &request.site_id {
            Some(site_id) => core.cache.site_owner(site_id, started).await?,
            None => None,
        };
        let now = core.clock.now();
        let input = CheckInput {
            key: &key,
            tenant: &tenant,
            required_scope: &request.scope,
            site_id: request.site_id.as_deref(),
            site_owner: site_owner.as_deref(),
            requested_tenant: request.tenant_id.as_deref(),
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
            Ok(()) => {
                debug!(tenant_id = key.tenant_id(), key_id = key.key_id(), scope = %request.scope, "check allowed")
            }
            // The site id is left out: behind Envoy it is a request header value.
            Err(reason) => {
                if let Some(suppressed) = DENIALS.allow() {
                    info!(
                        tenant_id = key.tenant_id(), key_id = key.key_id(), reason = reason.code(), scope = %request.scope,
                        suppressed, "check denied"
                    );
                }
            }
        }
        Ok(CheckOutcome { decision, key: Some(key), rate_limit })
    }

    /// Reads the shared request counts of a key or tenant this replica has not counted for yet,
    /// so that a start, a rollout or a new replica never begins a window at zero. The read runs
    /// on its own and the Check waits for it at most [`PRIMING_WAIT`]: when the store is slow or
    /// cannot answer, the decision goes on with this replica's own counts (and later Checks get
    /// the shared ones once the read lands), so no Check of a cached key waits on the store.
    async fn prime_limits(&self, key: &Cached<CachedKey>, tenant: &Arc<Tenant>, now: DateTime<Utc>) {
        let Some(needed) = self.core.limiter.unprimed(key, tenant, now) else { return };
        let (core, key, tenant) = (self.core.clone(), key.clone(), tenant.clone());
        let priming = tokio::spawn(async move {
            match core.lookups.run(core.store.request_counts_since(&needed)).await {
                Ok(totals) => core.limiter.prime(&key, &tenant, &needed, totals),
                Err(error) => {
                    core.limiter.priming_failed(&needed);
                    debug!(%error, "deciding on this replica's own request counts: the shared ones are unreadable");
                }
            }
        });
        let _ = tokio::time::timeout(PRIMING_WAIT, priming).await;
    }
}
