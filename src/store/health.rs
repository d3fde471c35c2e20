//! Whether the database is answering, as the store's own operations see it: a circuit breaker.
//!
//! Every bounded store operation reports its outcome. An answer (a result, or an error the
//! database itself returned) closes the breaker. The breaker opens when nothing has answered
//! for a while, seen two ways:
//!
//! - operations *fail* without an answer (a refused or broken connection, a timeout) and
//!   nothing has answered for [`TRIP_AFTER`] since the first of them began: a database that is
//!   down is known about a second after it went;
//! - operations are *in flight* and none has answered for [`HANG_AFTER`] since the oldest of
//!   them began: a database that accepts and never answers (a hung server, a black-holed
//!   network) is known two seconds after it stopped, not only when the first operation times
//!   out (`KEYGATE_DB_QUERY_TIMEOUT_MS`). The change feed reads every 100 ms, so a healthy
//!   database answers far more often than that.
//!
//! While it is open, operations fail at once with [`StoreError::Unreachable`] instead of each
//! waiting for its timeout, and only probes ([`Store::ping`](super::Store::ping)) go to the
//! database; the first probe that is answered closes it again.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::StoreError;

/// How long nothing must have answered, since an operation failed without an answer, before
/// the breaker opens.
pub const TRIP_AFTER: Duration = Duration::from_secs(1);
/// How long nothing must have answered while operations are in flight before the breaker opens.
pub const HANG_AFTER: Duration = Duration::from_secs(2);

const NEVER: u64 = u64::MAX;

/// See the module documentation.
#[derive(Debug)]
pub struct StoreHealth {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last answer.
    last_answer_ms: AtomicU64,
    /// Milliseconds since `epoch` at which the oldest operation that failed without an answer
    /// since the last answer began; `NEVER` when there is none.
    failing_since_ms: AtomicU64,
    /// Milliseconds since `epoch` at which the oldest operation begun since the last answer
    /// began, while operations are in flight; `NEVER` otherwise.
    waiting_since_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Default for StoreHealth {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            last_answer_ms: AtomicU64::new(0),
            failing_since_ms: AtomicU64::new(NEVER),
            waiting_since_ms: AtomicU64::new(NEVER),
            in_flight: AtomicUsize::new(0),
        }
    }
}

/// One operation in flight, from [`StoreHealth::begin`] until it reports its outcome or is
/// dropped (a cancelled operation says nothing about the database).
#[derive(Debug)]
pub struct Operation<'a> {
    health: &'a StoreHealth,
    started: u64,
}

impl Operation<'_> {
    /// Records the outcome of the operation.
    pub fn observe<T>(self, result: &Result<T, StoreError>) {
        let health = self.health;
        match result {
            Err(StoreError::Unreachable(_)) => {
                // An operation older than the last answer says nothing new.
                if self.started >= health.last_answer_ms.load(Ordering::Acquire) {
                    let _ = health.failing_since_ms.compare_exchange(
                        NEVER,
                        self.started,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
            }
            _ => {
                health.last_answer_ms.fetch_max(health.now_ms(), Ordering::AcqRel);
                health.failing_since_ms.store(NEVER, Ordering::Release);
                health.waiting_since_ms.store(NEVER, Ordering::Release);
            }
        }
    }
}

impl Drop for Operation<'_> {
    fn drop(&mut self) {
        if self.health.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.health.waiting_since_ms.store(NEVER, Ordering::Release);
        }
    }
}

impl StoreHealth {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// An operation begins; report its outcome with [`Operation::observe`].
    pub fn begin(&self) -> Operation<'_> {
        let started = self.now_ms();
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let _ = self.waiting_since_ms.compare_exchange(NEVER, started, Ordering::AcqRel, Ordering::Acquire);
        Operation { health: self, started }
    }

    /// How long the database has not been answering, once the breaker is open (see the module
    /// documentation); `None` while it answers.
    pub fn unreachable_for(&self) -> Option<Duration> {
        let now = self.now_ms();
        let since = |field: &AtomicU64| now.checked_sub(field.load(Ordering::Acquire)).map(Duration::from_millis);
        let failing = since(&self.failing_since_ms).filter(|failing| *failing >= TRIP_AFTER);
        let hung = match self.in_flight.load(Ordering::Acquire) {
            0 => None,
            _ => since(&self.waiting_since_ms).filter(|waiting| *waiting >= HANG_AFTER),
        };
        failing.max(hung)
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
        health.begin().observe(&unreachable());
        assert_eq!(health.unreachable_for(), None, "one failure is not an outage yet");
        std::thread::sleep(TRIP_AFTER + Duration::from_millis(20));
        assert!(health.unreachable_for().is_some(), "nothing answered for a second");
        health.begin().observe(&Err::<(), _>(StoreError::Unavailable("deadlock".into())));
        assert_eq!(health.unreachable_for(), None, "a database error is an answer");
    }

    #[test]
    fn an_operation_older_than_the_last_answer_does_not_open_the_breaker() {
        let health = StoreHealth::default();
        let old = health.begin();
        std::thread::sleep(Duration::from_millis(5));
        health.begin().observe(&Ok(()));
        old.observe(&unreachable());
        assert_eq!(health.failing_since_ms.load(Ordering::Acquire), NEVER);
    }

    #[test]
    fn operations_left_unanswered_open_the_breaker_before_they_time_out() {
        let health = StoreHealth::default();
        let hung = health.begin();
        std::thread::sleep(TRIP_AFTER);
        assert_eq!(health.unreachable_for(), None, "a slow answer is not an outage");
        std::thread::sleep(HANG_AFTER - TRIP_AFTER + Duration::from_millis(20));
        assert!(health.unreachable_for().is_some(), "nothing answered for two seconds");
        health.begin().observe(&Ok(()));
        assert_eq!(health.unreachable_for(), None, "an answer closes it");
        drop(hung);
    }

    #[test]
    fn a_cancelled_operation_says_nothing_about_the_database() {
        let health = StoreHealth::default();
        drop(health.begin());
        std::thread::sleep(HANG_AFTER + Duration::from_millis(20));
        assert_eq!(health.unreachable_for(), None);
    }
}
