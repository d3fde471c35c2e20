//! Last use, daily usage and denied-Check audit events, recorded without a write per Check:
//! counted in memory and written in batches every flush interval (and when the server stops).
//! What cannot be written stays pending for the next flush.

use std::collections::HashMap;
use std::mem;
use std::sync::Mutex;

use chrono::{DateTime, DurationRound, Utc};

use crate::domain::decision::DenyReason;
use crate::domain::model::KeyRecord;
use crate::store::{DenialKey, Store, StoreError, UsageKey};

/// Most buffered entries of one kind (distinct key, day and outcome; or key, reason and minute).
const MAX_PENDING: usize = 200_000;

#[derive(Debug, Default)]
struct Pending {
    usage: HashMap<UsageKey, i64>,
    last_used: HashMap<String, DateTime<Utc>>,
    /// Denied Checks per key, reason and minute: how many, and when the first was.
    denials: HashMap<DenialKey, (i64, DateTime<Utc>)>,
    dropped: u64,
}

/// Buffers what Checks of known keys leave behind.
#[derive(Debug, Default)]
pub struct UsageRecorder {
    pending: Mutex<Pending>,
}

fn truncate(time: DateTime<Utc>, unit: chrono::Duration) -> DateTime<Utc> {
    time.duration_trunc(unit).unwrap_or(time)
}

impl UsageRecorder {
    /// Records one decided Check of `key` at `now`. While the database cannot be written, at
    /// most `MAX_PENDING` entries of each kind are kept; beyond that new ones are dropped (and
    /// counted in the log) rather than growing memory without bound.
    pub fn record(&self, key: &KeyRecord, decision: Result<(), DenyReason>, now: DateTime<Utc>) {
        let day = truncate(now, chrono::Duration::days(1));
        let outcome = decision.err().map_or("ALLOWED", DenyReason::code);
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if pending.usage.len() >= MAX_PENDING || pending.denials.len() >= MAX_PENDING {
            pending.dropped += 1;
            if pending.dropped.is_power_of_two() {
                tracing::warn!(dropped = pending.dropped, "usage buffer full: records are being dropped");
            }
            return;
        }
        *pending.usage.entry(UsageKey { key_id: key.key_id.clone(), day, outcome }).or_default() += 1;
        match decision {
            Ok(()) => {
                let last_used = pending.last_used.entry(key.key_id.clone()).or_insert(now);
                *last_used = (*last_used).max(now);
            }
            Err(reason) => {
                let denial = DenialKey {
                    tenant_id: key.tenant_id.clone(),
                    key_id: key.key_id.clone(),
                    reason: reason.code(),
                    minute: truncate(now, chrono::Duration::minutes(1)),
                };
                let (count, first) = pending.denials.entry(denial).or_insert((0, now));
                *count += 1;
                *first = (*first).min(now);
            }
        }
    }

    /// Writes everything pending. Each kind is written in one transaction; a kind that fails is
    /// merged back into what is pending, and the first error is returned.
    pub async fn flush(&self, store: &Store) -> Result<(), StoreError> {
        let taken = mem::take(&mut *self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        // Sorted, so that concurrent batches of several replicas lock rows in one order.
        let mut usage: Vec<_> = taken.usage.into_iter().collect();
        usage.sort();
        let mut last_used: Vec<_> = taken.last_used.into_iter().collect();
        last_used.sort();
        let mut denials: Vec<_> = taken.denials.into_iter().collect();
        denials.sort();
        let results = (
            store.add_usage(&usage).await,
            store.touch_last_used(&last_used).await,
            store.add_check_denials(&denials).await,
        );
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if results.0.is_err() {
            for (key, count) in usage {
                *pending.usage.entry(key).or_default() += count;
            }
        }
        if results.1.is_err() {
            for (key_id, at) in last_used {
                let entry = pending.last_used.entry(key_id).or_insert(at);
                *entry = (*entry).max(at);
            }
        }
        if results.2.is_err() {
            for (denial, (count, first)) in denials {
                let (pending_count, pending_first) = pending.denials.entry(denial).or_insert((0, first));
                *pending_count += count;
                *pending_first = (*pending_first).min(first);
            }
        }
        results.0.and(results.1).and(results.2)
    }
}
