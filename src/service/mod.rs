//! The application layer: admin operations and the Check decision path, over the store and the
//! cache. Transport-free: the gRPC adapters call these with domain types.

mod admin;
mod authorizer;
mod import;
mod page_token;

use std::sync::Arc;

pub use crate::limits::{RateLimitState, RateLimitSubject, RateLimitWindow};
pub use admin::{CreateKey, DailyUsage, Expiry, KeyService, ListKeys, Page, Rotation};
pub use authorizer::{Authorizer, CheckOutcome, CheckRequest, DENIALS};
pub use import::{Credential, ImportError, ImportKey, ImportKeys, MAX_IMPORT_KEYS};
pub use page_token::{ListCall, PageToken};

use crate::cache::{DecisionCache, Load};
use crate::domain::clock::Clock;
use crate::domain::key_format::KeyShapes;
use crate::domain::model::{KeyRecord, Tenant};
use crate::domain::scope::ScopePolicy;
use crate::domain::validation::FieldViolation;
use crate::limits::Limiter;
use crate::store::{Store, StoreError};
use crate::usage::UsageRecorder;

/// Rules for minting and checking keys, from configuration.
#[derive(Clone, Debug)]
pub struct KeyPolicy {
    /// The shapes keygate mints and accepts as configured (the shapes it minted before are
    /// added from the database: [`Core::shapes`]).
    pub shapes: KeyShapes,
    /// The active-key limit of tenants whose max_keys is 0.
    pub default_max_keys: u32,
    pub scopes: ScopePolicy,
    /// Whether every key needs a name (`KEYGATE_KEY_NAME_REQUIRED`).
    pub key_names_required: bool,
}

impl KeyPolicy {
    /// INVALID_ARGUMENT on `field` when names are required and `name` is empty (the name's
    /// form is checked where the request is decoded).
    pub fn check_name(&self, field: &str, name: &str) -> ServiceResult<()> {
        if self.key_names_required && name.is_empty() {
            return Err(ServiceError::invalid(field, "is required (and must hold a visible character)"));
        }
        Ok(())
    }
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self {
            shapes: KeyShapes::default(),
            default_max_keys: 10,
            scopes: ScopePolicy::default(),
            key_names_required: true,
        }
    }
}

/// What the services share.
pub struct Core {
    pub store: Store,
    pub cache: DecisionCache,
    pub clock: Arc<dyn Clock>,
    pub policy: KeyPolicy,
    /// Bounds the store lookups that Check misses make at once, so a flood of unknown keys
    /// cannot take every database connection (admin calls and other replicas keep theirs).
    pub lookups: Arc<LookupLimit>,
    /// Local request counters for rate limits and quotas, shared through the store.
    pub limiter: Limiter,
    /// Last use, usage and denied Checks, written in batches.
    pub usage: UsageRecorder,
    /// The key shapes Check accepts: the configured ones and those minted earlier.
    pub shapes: ShapesCell,
}

/// The key shapes in effect, replaced whole when the shapes minted earlier are (re)read.
#[derive(Debug)]
pub struct ShapesCell(std::sync::RwLock<Arc<KeyShapes>>);

impl ShapesCell {
    pub fn new(shapes: KeyShapes) -> Self {
        Self(std::sync::RwLock::new(Arc::new(shapes)))
    }

    /// The shapes now.
    pub fn current(&self) -> Arc<KeyShapes> {
        self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Adds the shapes keys were minted with before (from the database) to those accepted.
    pub fn set_earlier(&self, notations: &[String]) {
        let mut shapes = (*self.current()).clone();
        shapes.earlier = notations
            .iter()
            .filter(|notation| notation.as_str() != shapes.minting.notation())
            .filter_map(|notation| crate::domain::key_format::Shape::parse(notation).ok())
            .collect();
        *self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(shapes);
    }
}

/// A bound on concurrent store lookups of the Check path.
pub struct LookupLimit {
    permits: tokio::sync::Semaphore,
    wait: std::time::Duration,
    in_flight: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    /// `keygate_store_lookup_duration_seconds`, resolved once.
    duration: metrics::Histogram,
}

impl LookupLimit {
    /// At most `in_flight` lookups at once; a lookup waits at most `wait` for its turn. Its
    /// metrics series is resolved here: install the metrics recorder first.
    pub fn new(in_flight: usize, wait: std::time::Duration) -> Self {
        Self {
            permits: tokio::sync::Semaphore::new(in_flight.max(1)),
            wait,
            in_flight: Default::default(),
            peak: Default::default(),
            duration: metrics::histogram!("keygate_store_lookup_duration_seconds"),
        }
    }

    /// The most lookups that ran at once so far.
    pub fn peak(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many lookups run now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Runs `lookup` when a slot is free. Waiting for the slot and the lookup share one
    /// deadline, `wait` (the query timeout): UNAVAILABLE when it passes, so a Check of an
    /// uncached key never waits longer than that for the store. A lookup whose caller goes away
    /// (a cancelled Check) gives its slot back all the same.
    pub async fn run<T>(
        &self,
        lookup: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let deadline = tokio::time::Instant::now() + self.wait;
        let _permit = tokio::time::timeout_at(deadline, self.permits.acquire())
            .await
            .map_err(|_| StoreError::Unavailable("too many key lookups in flight".into()))?
            .map_err(|_| StoreError::Unavailable("lookups closed".into()))?;
        let _running = Running::start(self);
        let started = std::time::Instant::now();
        let result = tokio::time::timeout_at(deadline, lookup).await.unwrap_or_else(|_| {
            Err(StoreError::Unreachable(format!(
                "no answer within KEYGATE_DB_QUERY_TIMEOUT_MS ({} ms), waiting for a lookup slot included",
                self.wait.as_millis()
            )))
        });
        self.duration.record(started.elapsed().as_secs_f64());
        result
    }
}

/// One lookup counted in flight until it ends, however it ends.
struct Running<'a>(&'a LookupLimit);

impl<'a> Running<'a> {
    fn start(limit: &'a LookupLimit) -> Self {
        use std::sync::atomic::Ordering;
        let now_in_flight = limit.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        limit.peak.fetch_max(now_in_flight, Ordering::AcqRel);
        Self(limit)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The cache's source: the store, through the lookup bound.
pub struct StoreSource {
    pub store: Store,
    pub lookups: Arc<LookupLimit>,
}

impl crate::cache::Source for StoreSource {
    fn key(&self, key_hash: &str) -> Load<KeyRecord> {
        let (store, lookups, key_hash) = (self.store.clone(), self.lookups.clone(), key_hash.to_owned());
        Box::pin(async move { lookups.run(store.key_by_hash(&key_hash)).await })
    }

    fn tenant(&self, tenant_id: &str) -> Load<Tenant> {
        let (store, lookups, tenant_id) = (self.store.clone(), self.lookups.clone(), tenant_id.to_owned());
        Box::pin(async move { lookups.run(store.get_tenant(&tenant_id)).await })
    }

    fn site_owner(&self, site_id: &str) -> Load<String> {
        let (store, lookups, site_id) = (self.store.clone(), self.lookups.clone(), site_id.to_owned());
        Box::pin(async move { lookups.run(store.site_owner(&site_id)).await })
    }
}

/// Errors of the application layer; the gRPC adapters map each to one status code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("store unavailable")]
    Unavailable(#[source] StoreError),
    /// Stored data cannot be read back (DATA_LOSS): an operator must look at the database.
    #[error("stored data is unreadable: {0}")]
    DataLoss(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// One invalid field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation { field: field.into(), description: description.into() }])
    }
}

impl From<Vec<FieldViolation>> for ServiceError {
    fn from(violations: Vec<FieldViolation>) -> Self {
        Self::InvalidArgument(violations)
    }
}

impl From<StoreError> for ServiceError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Corrupt(detail) => Self::DataLoss(detail),
            StoreError::Rejected(detail) => Self::Internal(detail),
            other => Self::Unavailable(other),
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;
