//! Last use, daily usage and denied-Check audit events, recorded without a write per Check:
//! counted in memory and written in batches every flush interval (and when the server stops).
//! What cannot be written stays pending for the next flush.
//!
//! An allowed Check, nearly every Check, is counted in its cached key record itself
//! ([`AllowedCount`](crate::domain::cached_key::AllowedCount)); the recorder lists each
//! record once per flush and reads the counts out of it when it writes.

use std::collections::HashMap;
use std::mem;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use chrono::{DateTime, DurationRound, Utc};

use crate::cache::Cached;
use crate::domain::cached_key::CachedKey;
use crate::domain::decision::DenyReason;
use crate::store::{DenialKey, Store, StoreError, UsageKey};

/// Most buffered entries of one kind (distinct key, day and outcome; or key, reason and minute).
const MAX_PENDING: usize = 200_000;

/// What one key's Checks left since the last flush: a Check of a key already pending looks it
/// up by its id and allocates nothing.
#[derive(Debug, Default)]
struct KeyUsage {
    /// Checks per UTC day and outcome (`ALLOWED` or a reason code): nearly always one entry.
    counts: Vec<(DateTime<Utc>, &'static str, i64)>,
    last_used: Option<DateTime<Utc>>,
}

#[derive(Debug, Default)]
struct Pending {
    keys: HashMap<String, KeyUsage, foldhash::fast::RandomState>,
    /// Entries of `counts` over all keys.
    usage_entries: usize,
    /// Denied Checks per key, reason and minute: how many, and when the first was.
    denials: HashMap<DenialKey, (i64, DateTime<Utc>)>,
    dropped: u64,
    /// Records whose [`AllowedCount`](crate::domain::cached_key::AllowedCount) holds counts
    /// to write, each once.
    counted: Vec<Cached<CachedKey>>,
}

impl Pending {
    fn add_usage(&mut self, key_id: &str, day: DateTime<Utc>, outcome: &'static str, count: i64) {
        let usage = match self.keys.get_mut(key_id) {
            Some(usage) => usage,
            None => self.keys.entry(key_id.to_owned()).or_default(),
        };
        match usage.counts.iter_mut().find(|(at, counted, _)| *at == day && *counted == outcome) {
            Some((_, _, counted)) => *counted += count,
            None => {
                usage.counts.push((day, outcome, count));
                self.usage_entries += 1;
            }
        }
    }

    fn touch(&mut self, key_id: &str, at: DateTime<Utc>) {
        let usage = match self.keys.get_mut(key_id) {
            Some(usage) => usage,
            None => self.keys.entry(key_id.to_owned()).or_default(),
        };
        usage.last_used = Some(usage.last_used.map_or(at, |last| last.max(at)));
    }
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
    pub fn record(&self, key: &Cached<CachedKey>, decision: Result<(), DenyReason>, now: DateTime<Utc>) {
        if decision.is_ok() && key.allowed.count(now) {
            if !key.allowed.listed.load(Ordering::SeqCst) && !key.allowed.listed.swap(true, Ordering::SeqCst) {
                self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).counted.push(key.clone());
            }
            return;
        }
        let day = truncate(now, chrono::Duration::days(1));
        let outcome = decision.err().map_or("ALLOWED", DenyReason::code);
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if pending.usage_entries >= MAX_PENDING || pending.denials.len() >= MAX_PENDING {
            pending.dropped += 1;
            if pending.dropped.is_power_of_two() {
                tracing::warn!(dropped = pending.dropped, "usage buffer full: records are being dropped");
            }
            return;
        }
        pending.add_usage(key.key_id(), day, outcome, 1);
        match decision {
            Ok(()) => pending.touch(key.key_id(), now),
            Err(reason) => {
                let denial = DenialKey {
                    tenant_id: key.tenant_id().to_owned(),
                    key_id: key.key_id().to_owned(),
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
        let mut taken = mem::take(&mut *self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        for key in mem::take(&mut taken.counted) {
            // Unlisted first: a Check counted after the take lists the record again.
            key.allowed.listed.store(false, Ordering::SeqCst);
            let (counted, last_used) = key.allowed.take();
            if let Some((day, count)) = counted {
                taken.add_usage(key.key_id(), day, "ALLOWED", count);
            }
            if let Some(at) = last_used {
                taken.touch(key.key_id(), at);
            }
        }
        let (mut usage, mut last_used) = (Vec::with_capacity(taken.usage_entries), Vec::new());
        for (key_id, key_usage) in taken.keys {
            for (day, outcome, count) in key_usage.counts {
                usage.push((UsageKey { key_id: key_id.clone(), day, outcome }, count));
            }
            if let Some(at) = key_usage.last_used {
                last_used.push((key_id, at));
            }
        }
        // Sorted, so that concurrent batches of several replicas lock rows in one order.
        usage.sort();
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
                pending.add_usage(&key.key_id, key.day, key.outcome, count);
            }
        }
        if results.1.is_err() {
            for (key_id, at) in last_used {
                pending.touch(&key_id, at);
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
