//! What gRPC health reports, service by service, and how it follows the store.
//!
//! | service | SERVING when |
//! |---|---|
//! | `keygate.liveness` | the process answers (liveness probes) |
//! | `keygate.v1.KeyAdmin` | the database is migrated and answering |
//! | `keygate.v1.Authorize`, `envoy.service.auth.v3.Authorization`, `""` | the database was reached once since start, and has not been unreachable for longer than the cache can answer for (TTL plus stale window) |
//!
//! So during a database outage KeyAdmin turns NOT_SERVING within about a second (the store's
//! breaker), while the decision services stay SERVING as long as cached keys can be answered:
//! a readiness probe on `""` keeps every replica in its Service through an outage instead of
//! turning a degraded service into a dead one. During shutdown everything but liveness is
//! NOT_SERVING.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::store::Store;

/// The health service name that is SERVING as long as the process answers (for liveness
/// probes, which must not restart a pod because its database is away).
pub const LIVENESS_SERVICE: &str = "keygate.liveness";

/// The services health reports on besides `""` and liveness.
pub const SERVICE_NAMES: [&str; 3] =
    ["keygate.v1.KeyAdmin", "keygate.v1.Authorize", "envoy.service.auth.v3.Authorization"];

/// How often health looks at the store, and probes it while it is unreachable.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// The statuses health reports, derived from one state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Starting,
    Ready,
    /// The database is unreachable, but cached decisions can still be answered.
    Degraded,
    /// The database has been unreachable for longer than any cached entry can be served.
    Down,
    Stopping,
}

impl State {
    fn admin(self) -> ServingStatus {
        match self {
            Self::Ready => ServingStatus::Serving,
            _ => ServingStatus::NotServing,
        }
    }

    fn decisions(self) -> ServingStatus {
        match self {
            Self::Ready | Self::Degraded => ServingStatus::Serving,
            _ => ServingStatus::NotServing,
        }
    }
}

/// The health reporter and the state it reports; clones share both.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    state: Arc<Mutex<State>>,
}

impl Health {
    pub fn new(reporter: HealthReporter) -> Self {
        Self { reporter, state: Arc::new(Mutex::new(State::Starting)) }
    }

    /// Everything NOT_SERVING but liveness, until the store is ready.
    pub async fn starting(&self) {
        self.reporter.set_service_status(LIVENESS_SERVICE, ServingStatus::Serving).await;
        self.set(State::Starting, true).await;
    }

    pub async fn ready(&self) {
        self.set(State::Ready, false).await;
    }

    /// Everything NOT_SERVING but liveness, for good.
    pub async fn stopping(&self) {
        self.set(State::Stopping, false).await;
    }

    /// Moves to `state` and reports it; nothing leaves `Stopping`.
    async fn set(&self, state: State, force: bool) -> Option<State> {
        let mut current = self.state.lock().await;
        if (*current == state && !force) || *current == State::Stopping {
            return None;
        }
        let previous = std::mem::replace(&mut *current, state);
        let (admin, decisions) = (state.admin(), state.decisions());
        self.reporter.set_service_status("", decisions).await;
        self.reporter.set_service_status(SERVICE_NAMES[0], admin).await;
        for name in &SERVICE_NAMES[1..] {
            self.reporter.set_service_status(name, decisions).await;
        }
        Some(previous)
    }
}

/// Keeps health in step with the store: probes it while it is unreachable (the breaker lets only
/// probes through) and reports Degraded, Down or Ready. `servable_for` is how long after the
/// last answer cached entries can still be served (TTL plus stale window).
pub async fn follow_store(store: Store, health: Health, servable_for: Duration) {
    let mut ticker = tokio::time::interval(FOLLOW_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        ticker.tick().await;
        // The probe, one at a time and never awaited here: against a hung database it waits
        // for the query timeout, and health must not wait with it. An answer closes the breaker.
        if store.health().unreachable_for().is_some() && probe.as_ref().is_none_or(|probe| probe.is_finished()) {
            let store = store.clone();
            probe = Some(tokio::spawn(async move {
                let _ = store.ping().await;
            }));
        }
        let state = match store.health().unreachable_for() {
            None => State::Ready,
            Some(failing) if failing < servable_for => State::Degraded,
            Some(_) => State::Down,
        };
        match health.set(state, false).await {
            Some(_) if state == State::Degraded => warn!(
                "the database is unreachable: KeyAdmin is NOT_SERVING; Authorize answers cached keys and fails closed for the rest"
            ),
            Some(_) if state == State::Down => {
                warn!("the database has been unreachable for longer than the cache can answer: NOT_SERVING")
            }
            Some(_) => info!("the database answers again: SERVING"),
            None => {}
        }
    }
}
