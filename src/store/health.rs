//! Whether the database is answering, as the store's own operations see it: a circuit breaker.
//!
//! Every bounded store operation reports its outcome. An answer (a result, or an error the
//! database itself returned) closes the breaker; an operation that got no answer (a timeout, a
//! refused or broken connection) opens it once nothing has answered for [`TRIP_AFTER`]. While
//! it is open, operations fail at once with [`StoreError::Unreachable`] instead of each waiting
//! for its timeout, and only probes ([`Store::ping`](super::Store::ping)) go to the database;
//! the first probe that is answered closes it again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::StoreError;

/// How long nothing must have answered before the breaker opens.
pub const TRIP_AFTER: Duration = Duration::from_secs(1);

const NEVER: u64 = u64::MAX;

/// See the module documentation.
#[derive(Debug)]
pub struct StoreHealth {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last answer.
    last_answer_ms: AtomicU64,
    /// Milliseconds since `epoch` at which the oldest unanswered operation since the last
    /// answer began; `NEVER` when there is none.
    failing_since_ms: AtomicU64,
}

impl Default for StoreHealth {
    fn default() -> Self {
        Self { epoch: Instant::now(), last_answer_ms: AtomicU64::new(0), failing_since_ms: AtomicU64::new(NEVER) }
    }
}

impl StoreHealth {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A timestamp for [`observe`](Self::observe): when an operation begins.
    pub fn started(&self) -> u64 {
        self.now_ms()
    }

    /// Records the outcome of an operation that began at `started`.
    pub fn observe<T>(&self, started: u64, result: &Result<T, StoreError>) {
        match result {
            Err(StoreError::Unreachable(_)) => {
                // An operation older than the last answer says nothing new.
                if started >= self.last_answer_ms.load(Ordering::Acquire) {
                    let _ = self.failing_since_ms.compare_exchange(NEVER, started, Ordering::AcqRel, Ordering::Acquire);
                }
            }
            _ => {
                self.last_answer_ms.fetch_max(self.now_ms(), Ordering::AcqRel);
                self.failing_since_ms.store(NEVER, Ordering::Release);
            }
        }
    }

    /// How long the database has not been answering, once that is at least [`TRIP_AFTER`]
    /// (the breaker is open); `None` while it answers.
    pub fn unreachable_for(&self) -> Option<Duration> {
        let since = self.failing_since_ms.load(Ordering::Acquire);
        let failing = Duration::from_millis(self.now_ms().checked_sub(since)?);
        (failing >= TRIP_AFTER).then_some(failing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable() -> Result<(), StoreError> {
        Err(StoreError::Unreachable("timeout".into()))
    }

    #[test]
    fn the_breaker_opens_after_a_second_without_answers_and_closes_on_the_next_answer() {
        let health = StoreHealth::default();
        let started = health.started();
        health.observe(started, &unreachable());
        assert_eq!(health.unreachable_for(), None, "one failure is not an outage yet");
        std::thread::sleep(TRIP_AFTER + Duration::from_millis(20));
        assert!(health.unreachable_for().is_some(), "nothing answered for a second");
        health.observe(health.started(), &Err::<(), _>(StoreError::Unavailable("deadlock".into())));
        assert_eq!(health.unreachable_for(), None, "a database error is an answer");
    }

    #[test]
    fn an_operation_older_than_the_last_answer_does_not_open_the_breaker() {
        let health = StoreHealth::default();
        let old = health.started();
        std::thread::sleep(Duration::from_millis(5));
        health.observe(health.started(), &Ok(()));
        health.observe(old, &unreachable());
        assert_eq!(health.failing_since_ms.load(Ordering::Acquire), NEVER);
    }
}
