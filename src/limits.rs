//! Rate limits and quotas, shared by all replicas without a database write per Check.
//!
//! Each replica counts allowed requests locally, per key and minute (the rate limit, a sliding
//! window) and per tenant and UTC day (the quota). Every sync interval it adds its new counts to
//! the shared counters in the database, in one batch, and reads back the totals of every counter
//! it tracks. A decision uses the last totals read plus this replica's counts since. Replicas
//! therefore see each other's requests one sync interval late: with N replicas, a limit can be
//! exceeded by at most what the other N-1 replicas admit in one sync interval.
//!
//! A replica never starts from zero on a subject (a key or a tenant) the others may have
//! counted: the first time it decides for a subject (after a start, a rollout, or once the
//! subject's windows have closed) it reads the subject's shared counts first
//! ([`Limiter::unprimed`], [`Limiter::prime`]). Only while the database cannot answer does it
//! decide on its own counts.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, DurationRound, Utc};

use crate::domain::decision::DenyReason;
use crate::domain::model::{KeyRecord, Tenant};
use crate::store::{CountKey, Store, StoreError};

/// How often counts are shared.
#[derive(Clone, Debug)]
pub struct LimitSettings {
    pub sync_interval: Duration,
    /// How often last use, usage and denied-Check events are written.
    pub usage_flush_interval: Duration,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self { sync_interval: Duration::from_millis(500), usage_flush_interval: Duration::from_secs(5) }
    }
}

#[derive(Debug, Default)]
struct Counter {
    /// The shared total as last read (this replica's flushed counts included).
    shared: i64,
    /// Counted here since the last flush began.
    pending: i64,
    /// Being written by the flush under way.
    flushing: i64,
}

impl Counter {
    fn estimate(&self) -> i64 {
        self.shared + self.pending + self.flushing
    }
}

/// The window a limit counts requests in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimitWindow {
    /// A sliding minute.
    Minute,
    /// The UTC day.
    Day,
}

/// Whose requests a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimitSubject {
    Key,
    Tenant,
}

/// The state of one limit for one Check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitState {
    /// Requests allowed per `window`.
    pub limit: u32,
    /// Requests left in the window after this one.
    pub remaining: u32,
    /// When a request is admitted again (a deny) or the window has room again (an allow).
    pub reset_at: DateTime<Utc>,
    pub window: RateLimitWindow,
    pub subject: RateLimitSubject,
}

/// What the limits say about one more request.
#[derive(Clone, Debug, PartialEq)]
pub enum LimitDecision {
    /// Allowed and counted; the state of the limit that applies, if any.
    Allowed(Option<RateLimitState>),
    Denied(DenyReason, RateLimitState),
}

/// Local counters and their synchronisation with the shared ones.
#[derive(Debug, Default)]
pub struct Limiter {
    counters: Mutex<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    windows: HashMap<CountKey, Counter>,
    /// Subjects whose shared counts this replica has read and tracks since.
    primed: HashSet<String>,
}

/// The earliest time at which the sliding window admits one more request, given this minute's
/// and the previous minute's counts: later in this minute once enough of the previous minute
/// has slid out, or else in the next minute once enough of this one has.
fn retry_at(this_minute: DateTime<Utc>, current: f64, previous: f64, limit: f64) -> DateTime<Utc> {
    let at = |minute_start: DateTime<Utc>, fraction: f64| {
        minute_start + chrono::Duration::milliseconds((fraction.clamp(0.0, 1.0) * 60_000.0).ceil() as i64)
    };
    if current + 1.0 <= limit && previous > 0.0 {
        return at(this_minute, 1.0 - (limit - 1.0 - current) / previous);
    }
    let fraction = if current > 0.0 { 1.0 - (limit - 1.0) / current } else { 0.0 };
    at(this_minute + chrono::Duration::minutes(1), fraction)
}

fn minute(now: DateTime<Utc>) -> DateTime<Utc> {
    now.duration_trunc(chrono::Duration::minutes(1)).unwrap_or(now)
}

fn day(now: DateTime<Utc>) -> DateTime<Utc> {
    now.duration_trunc(chrono::Duration::days(1)).unwrap_or(now)
}

fn count_key(subject: &str, window: DateTime<Utc>) -> CountKey {
    CountKey { subject: subject.to_owned(), window_start: window.timestamp_micros() }
}

fn key_subject(key: &KeyRecord) -> String {
    format!("key:{}", key.key_id)
}

fn tenant_subject(tenant: &Tenant) -> String {
    format!("tenant:{}", tenant.tenant_id)
}

/// The per-minute limit of a key (its own, else its tenant's) and its tenant's daily quota;
/// 0 means none.
fn limits_of(key: &KeyRecord, tenant: &Tenant) -> (u32, u32) {
    let per_minute =
        if key.rate_limit_per_minute > 0 { key.rate_limit_per_minute } else { tenant.rate_limit_per_minute };
    (per_minute, tenant.daily_request_quota)
}

impl Limiter {
    /// The shared counters a decision for `key` at `now` needs and this replica has not read
    /// yet (its subjects were never primed, or their windows closed since); `None` when it
    /// knows them all. Read them with [`Store::request_counts`] and hand them to
    /// [`prime`](Self::prime).
    pub fn unprimed(&self, key: &KeyRecord, tenant: &Tenant, now: DateTime<Utc>) -> Option<Vec<CountKey>> {
        let (per_minute, quota) = limits_of(key, tenant);
        let counters = self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut needed = Vec::new();
        if per_minute > 0 {
            let subject = key_subject(key);
            if !counters.primed.contains(&subject) {
                let this_minute = minute(now);
                needed.push(count_key(&subject, this_minute - chrono::Duration::minutes(1)));
                needed.push(count_key(&subject, this_minute));
            }
        }
        if quota > 0 {
            let subject = tenant_subject(tenant);
            if !counters.primed.contains(&subject) {
                needed.push(count_key(&subject, day(now)));
            }
        }
        (!needed.is_empty()).then_some(needed)
    }

    /// Takes the shared totals of `windows` (absent rows count zero) and marks their subjects
    /// as known.
    pub fn prime(&self, windows: &[CountKey], totals: Vec<(CountKey, i64)>) {
        let mut counters = self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for window in windows {
            counters.windows.entry(window.clone()).or_default();
            counters.primed.insert(window.subject.clone());
        }
        for (window, total) in totals {
            let counter = counters.windows.entry(window).or_default();
            counter.shared = counter.shared.max(total);
        }
    }

    /// Decides whether `key` may make one more request at `now` and, if so, counts it. The
    /// per-minute limit is the key's own, else its tenant's; the quota is the tenant's; 0 means
    /// none. Denied requests are not counted.
    pub fn check_and_count(&self, key: &KeyRecord, tenant: &Tenant, now: DateTime<Utc>) -> LimitDecision {
        let (per_minute, quota) = limits_of(key, tenant);
        if per_minute == 0 && quota == 0 {
            return LimitDecision::Allowed(None);
        }
        let key_subject = key_subject(key);
        let tenant_subject = tenant_subject(tenant);
        let (this_minute, this_day) = (minute(now), day(now));
        let previous_minute = this_minute - chrono::Duration::minutes(1);
        let mut guard = self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let counters = &mut guard.windows;
        let count = |subject: &str, window| counters.get(&count_key(subject, window)).map_or(0, Counter::estimate);

        let next_minute = this_minute + chrono::Duration::minutes(1);
        let rate = (per_minute > 0).then(|| {
            // Sliding window: this minute's count plus the share of the previous minute's that
            // still lies within the last 60 seconds.
            let elapsed = (now - this_minute).num_milliseconds() as f64 / 60_000.0;
            let (current, previous) =
                (count(&key_subject, this_minute) as f64, count(&key_subject, previous_minute) as f64);
            let used = current + previous * (1.0 - elapsed);
            let limit = f64::from(per_minute);
            let reset_at =
                if used + 1.0 > limit { retry_at(this_minute, current, previous, limit) } else { next_minute };
            let state = RateLimitState {
                limit: per_minute,
                remaining: 0,
                reset_at,
                window: RateLimitWindow::Minute,
                subject: RateLimitSubject::Key,
            };
            (used, state)
        });
        let quota_state = (quota > 0).then(|| {
            let used = count(&tenant_subject, this_day) as f64;
            let state = RateLimitState {
                limit: quota,
                remaining: 0,
                reset_at: this_day + chrono::Duration::days(1),
                window: RateLimitWindow::Day,
                subject: RateLimitSubject::Tenant,
            };
            (used, state)
        });
        for (limit, reason) in [(&rate, DenyReason::RateLimited), (&quota_state, DenyReason::QuotaExceeded)] {
            if let Some((used, state)) = limit
                && *used + 1.0 > f64::from(state.limit)
            {
                return LimitDecision::Denied(reason, state.clone());
            }
        }
        if per_minute > 0 {
            counters.entry(count_key(&key_subject, this_minute)).or_default().pending += 1;
        }
        if quota > 0 {
            counters.entry(count_key(&tenant_subject, this_day)).or_default().pending += 1;
        }
        // On an allow, the limit with the fewest requests left (the minute's on a tie).
        let remaining = |used: f64, limit: u32| (f64::from(limit) - used - 1.0).floor().max(0.0) as u32;
        let tightest = [rate, quota_state]
            .into_iter()
            .flatten()
            .map(|(used, state)| RateLimitState { remaining: remaining(used, state.limit), ..state })
            .min_by_key(|state| state.remaining);
        LimitDecision::Allowed(tightest)
    }

    /// Adds this replica's new counts to the shared ones and reads back the totals. Counts that
    /// cannot be written stay pending for the next sync: none is lost.
    pub async fn sync(&self, store: &Store, now: DateTime<Utc>) -> Result<(), StoreError> {
        let deltas: Vec<(CountKey, i64)> = {
            let mut guard = self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let Counters { windows: counters, primed } = &mut *guard;
            // Windows that can no longer matter: minutes before the previous one (day counters
            // are kept until their day is over).
            let oldest_minute = (minute(now) - chrono::Duration::minutes(1)).timestamp_micros();
            let today = day(now).timestamp_micros();
            // Closed windows no longer affect any decision: their unwritten counts go too, so an
            // outage cannot make the buffer grow without bound.
            counters.retain(|key, _| {
                let current = if key.subject.starts_with("tenant:") { today } else { oldest_minute };
                key.window_start >= current
            });
            // A subject with no open window left is read again the next time it is seen.
            let tracked: HashSet<&str> = counters.keys().map(|key| key.subject.as_str()).collect();
            primed.retain(|subject| tracked.contains(subject.as_str()));
            let mut deltas: Vec<(CountKey, i64)> = counters
                .iter_mut()
                .filter(|(_, counter)| counter.pending > 0)
                .map(|(key, counter)| {
                    counter.flushing = counter.pending;
                    counter.pending = 0;
                    (key.clone(), counter.flushing)
                })
                .collect();
            // Every replica writes rows in one order, so concurrent batches cannot deadlock.
            deltas.sort();
            deltas
        };
        let written = store.add_request_counts(&deltas).await;
        let tracked: Vec<CountKey> = {
            let mut guard = self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let counters = &mut guard.windows;
            for (key, _) in &deltas {
                if let Some(counter) = counters.get_mut(key) {
                    match written {
                        Ok(()) => counter.shared += counter.flushing,
                        Err(_) => counter.pending += counter.flushing,
                    }
                    counter.flushing = 0;
                }
            }
            counters.keys().cloned().collect()
        };
        written?;
        let totals = store.request_counts(&tracked).await?;
        let mut guard = self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (key, total) in totals {
            if let Some(counter) = guard.windows.get_mut(&key) {
                counter.shared = counter.shared.max(total);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn the_retry_time_is_when_the_window_has_slid_enough() {
        let minute = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
        let seconds = |s: i64| minute + chrono::Duration::seconds(s);
        // Limit 10, 10 this minute: in the next minute the window holds 10 (1 - e), which admits
        // one more at e = 0.1.
        assert_eq!(retry_at(minute, 10.0, 0.0, 10.0), seconds(60 + 6));
        // Limit 10, 4 this minute and 12 in the previous one: 4 + 12 (1 - e) + 1 <= 10 from
        // e = 7/12, 35 s into this minute.
        assert_eq!(retry_at(minute, 4.0, 12.0, 10.0), seconds(35));
        // Limit 1: the one request must slide out entirely.
        assert_eq!(retry_at(minute, 1.0, 0.0, 1.0), seconds(120));
    }
}
