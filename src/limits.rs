//! Rate limits and quotas, shared by all replicas without a database write per Check.
//!
//! **What is counted.** A key's per-minute limit is a sliding window of 60 seconds, counted in
//! 60 one-second buckets; a tenant's daily quota is the calendar UTC day. Only allowed requests
//! count. A Check at time `t` counts the requests of the bucket `t` falls in and of the 59
//! before it: everything it counts lies within the last 60 seconds, so **a client that makes
//! at most N requests in any 60 seconds is never denied**, and the limit holds to N requests in
//! any 59 seconds. A deny names the earliest time a request is admitted again (the start of the
//! second in which enough counted requests have slid out); a request sent then is admitted.
//!
//! **How replicas share it.** Each replica counts locally, per bucket. Every sync interval it
//! adds its new counts to the shared counters in the database, in one batch, and reads back the
//! totals of the recent buckets of every subject (key or tenant) it tracks. A decision uses the
//! last totals read plus this replica's counts since. Replicas therefore see each other's
//! requests a sync interval or two late: with N replicas, a limit can be exceeded by what the
//! other N-1 replicas admit in about two sync intervals.
//!
//! **No fresh start.** The first time a replica decides for a subject (after a start, a rollout,
//! or once the subject's buckets have all closed) it reads the subject's shared counts first
//! ([`Limiter::unprimed`], [`Limiter::prime`]). Only while the database cannot answer does it
//! decide on its own counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use chrono::{DateTime, Utc};

use crate::domain::cached_key::CachedKey;
use crate::domain::decision::DenyReason;
use crate::domain::model::Tenant;
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

/// The window a limit counts requests in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimitWindow {
    /// A sliding second (a tenant's shared limit).
    Second,
    /// A sliding minute.
    Minute,
    /// A sliding hour (a tenant's shared limit).
    Hour,
    /// The UTC day (a tenant's daily quota), or a sliding 24 hours (its shared limit).
    Day,
}

impl RateLimitWindow {
    /// Its length in seconds.
    pub fn seconds(self) -> i64 {
        match self {
            Self::Second => 1,
            Self::Minute => 60,
            Self::Hour => 3_600,
            Self::Day => 86_400,
        }
    }

    /// The window of a length in seconds, as stored.
    pub fn from_seconds(seconds: i64) -> Option<Self> {
        [Self::Second, Self::Minute, Self::Hour, Self::Day].into_iter().find(|window| window.seconds() == seconds)
    }

    /// `second`, `minute`, `hour` or `day`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Second => "second",
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }
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
    /// On a deny, the earliest time a request is admitted again; on an allow, the time at which
    /// every request counted now (this one included) has left the window.
    pub reset_at: DateTime<Utc>,
    pub window: RateLimitWindow,
    pub subject: RateLimitSubject,
}

/// What the limits say about one more request.
#[derive(Clone, Debug, PartialEq)]
pub enum LimitDecision {
    /// Allowed and counted; the state of the limit with the fewest requests left, if any.
    Allowed(Option<RateLimitState>),
    Denied(DenyReason, RateLimitState),
}

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;
/// Buckets in a sliding window.
const BUCKETS: i64 = 60;

/// How a limit counts: a sliding window of [`BUCKETS`] buckets, or the calendar UTC day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Span {
    Sliding { window_micros: i64 },
    UtcDay,
}

impl Span {
    const MINUTE: Self = Self::Sliding { window_micros: 60 * MICROS_PER_SECOND };

    fn bucket_micros(self) -> i64 {
        match self {
            Self::Sliding { window_micros } => window_micros / BUCKETS,
            Self::UtcDay => MICROS_PER_DAY,
        }
    }

    /// The start of the bucket `now` (microseconds since the epoch) falls in.
    fn bucket_of(self, now: i64) -> i64 {
        now.div_euclid(self.bucket_micros()) * self.bucket_micros()
    }

    /// The oldest bucket a decision at `now` counts.
    fn oldest_counted(self, now: i64) -> i64 {
        match self {
            Self::Sliding { .. } => self.bucket_of(now) - (BUCKETS - 1) * self.bucket_micros(),
            Self::UtcDay => self.bucket_of(now),
        }
    }

    /// When a bucket that started at `start` stops being counted.
    fn leaves_at(self, start: i64) -> i64 {
        match self {
            Self::Sliding { window_micros } => start + window_micros,
            Self::UtcDay => start + MICROS_PER_DAY,
        }
    }
}

/// A limit's subject as the database names it (`key:<key id>`, `tenant:<tenant id>`,
/// `tenant-rate:<seconds>:<tenant id>`), written on the stack: ids are at most 64 bytes, so a
/// Check builds no String (a longer name, which validation never lets through, is spilled to
/// the heap rather than cut).
struct SubjectName {
    inline: [u8; SUBJECT_INLINE_BYTES],
    len: usize,
    spilled: Option<String>,
}

/// Room for the longest name of ids of at most 64 bytes (`tenant-rate:86400:` and 64).
const SUBJECT_INLINE_BYTES: usize = 96;

impl SubjectName {
    fn of(parts: &[&str]) -> Self {
        let len = parts.iter().map(|part| part.len()).sum();
        let mut name = Self { inline: [0; SUBJECT_INLINE_BYTES], len, spilled: None };
        if len > SUBJECT_INLINE_BYTES {
            name.spilled = Some(parts.concat());
            return name;
        }
        let mut at = 0;
        for part in parts {
            name.inline[at..at + part.len()].copy_from_slice(part.as_bytes());
            at += part.len();
        }
        name
    }

    fn as_str(&self) -> &str {
        match &self.spilled {
            Some(spilled) => spilled,
            // Whole `str`s joined: always UTF-8.
            None => std::str::from_utf8(&self.inline[..self.len]).unwrap_or_default(),
        }
    }
}

/// The number of seconds of a shared window as the subject name writes it.
fn window_text(window: RateLimitWindow) -> &'static str {
    match window {
        RateLimitWindow::Second => "1",
        RateLimitWindow::Minute => "60",
        RateLimitWindow::Hour => "3600",
        RateLimitWindow::Day => "86400",
    }
}

/// One limit that applies to a Check.
struct Applied {
    limit: u32,
    span: Span,
    subject: SubjectName,
    window: RateLimitWindow,
    kind: RateLimitSubject,
    reason: DenyReason,
}

/// The limits of a key: its per-minute limit (its own, else its tenant's default for keys), its
/// tenant's shared rate limit and its tenant's daily quota, those that are set (0 means none).
fn limits_of(key: &CachedKey, tenant: &Tenant) -> impl Iterator<Item = Applied> {
    let per_minute =
        if key.rate_limit_per_minute() > 0 { key.rate_limit_per_minute() } else { tenant.rate_limit_per_minute };
    let window = tenant.shared_rate_limit_window;
    let key_limit = (per_minute > 0).then(|| Applied {
        limit: per_minute,
        span: Span::MINUTE,
        subject: SubjectName::of(&["key:", key.key_id()]),
        window: RateLimitWindow::Minute,
        kind: RateLimitSubject::Key,
        reason: DenyReason::RateLimited,
    });
    let shared = (tenant.shared_rate_limit > 0).then(|| Applied {
        limit: tenant.shared_rate_limit,
        span: Span::Sliding { window_micros: window.seconds() * MICROS_PER_SECOND },
        subject: SubjectName::of(&["tenant-rate:", window_text(window), ":", &tenant.tenant_id]),
        window,
        kind: RateLimitSubject::Tenant,
        reason: DenyReason::RateLimited,
    });
    let quota = (tenant.daily_request_quota > 0).then(|| Applied {
        limit: tenant.daily_request_quota,
        span: Span::UtcDay,
        subject: SubjectName::of(&["tenant:", &tenant.tenant_id]),
        window: RateLimitWindow::Day,
        kind: RateLimitSubject::Tenant,
        reason: DenyReason::QuotaExceeded,
    });
    [key_limit, shared, quota].into_iter().flatten()
}

/// Whether any limit applies to `key`.
fn any_limit(key: &CachedKey, tenant: &Tenant) -> bool {
    key.rate_limit_per_minute() > 0
        || tenant.rate_limit_per_minute > 0
        || tenant.shared_rate_limit > 0
        || tenant.daily_request_quota > 0
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

/// The buckets of one subject, oldest first (at most [`BUCKETS`] of them, so a sorted `Vec`:
/// one small allocation where a `BTreeMap` node took about 400 bytes).
#[derive(Debug, Default)]
struct Counts {
    buckets: Vec<(i64, Counter)>,
    /// Whether this replica has read the subject's shared counts and tracks them since.
    primed: bool,
    /// Taken out of the limiter's map by a sync (no bucket left): a Check that still holds it
    /// counts in the subject the map holds now instead.
    detached: bool,
}

impl Counts {
    /// The buckets that started at `oldest` or later.
    fn since(&self, oldest: i64) -> &[(i64, Counter)] {
        &self.buckets[self.buckets.partition_point(|(start, _)| *start < oldest)..]
    }

    /// The bucket that starts at `start`, made if missing.
    fn bucket(&mut self, start: i64) -> &mut Counter {
        // Almost always the newest bucket, or one after it.
        let at = match self.buckets.last() {
            Some((last, _)) if *last == start => self.buckets.len() - 1,
            Some((last, _)) if *last < start => self.buckets.len(),
            None => 0,
            Some(_) => self.buckets.partition_point(|(existing, _)| *existing < start),
        };
        if self.buckets.get(at).is_none_or(|(existing, _)| *existing != start) {
            self.buckets.insert(at, (start, Counter::default()));
        }
        &mut self.buckets[at].1
    }

    fn get_mut(&mut self, start: i64) -> Option<&mut Counter> {
        let at = self.buckets.binary_search_by_key(&start, |(existing, _)| *existing).ok()?;
        Some(&mut self.buckets[at].1)
    }
}

/// One subject's counts: a key's, or a tenant's for one of its limits.
#[derive(Debug)]
pub struct Subject {
    span: Span,
    counts: Mutex<Counts>,
}

impl Subject {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Where a cached key keeps its own subject (`key:<key id>`), so that a Check finds its counts
/// without looking its name up among every subject the limiter tracks (8 bytes per record).
#[derive(Debug, Default)]
pub struct KeySubject(ArcSwapOption<Subject>);

/// Subjects by name.
type Subjects = HashMap<String, Arc<Subject>, foldhash::fast::RandomState>;

/// Local counters and their synchronisation with the shared ones.
#[derive(Debug)]
pub struct Limiter {
    subjects: Mutex<Subjects>,
    /// Subjects whose shared counts are being read ([`unprimed`](Self::unprimed) hands each
    /// out once until [`prime`](Self::prime) or [`priming_failed`](Self::priming_failed)).
    priming: Mutex<std::collections::HashSet<String>>,
    /// How far back a sync reads shared counts: the buckets other replicas can still be adding
    /// to (their counts arrive within a couple of sync intervals).
    read_back: Duration,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new(LimitSettings::default().sync_interval)
    }
}

fn micros(time: DateTime<Utc>) -> i64 {
    time.timestamp_micros()
}

fn time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

impl Limiter {
    /// A limiter that shares its counts every `sync_interval`.
    pub fn new(sync_interval: Duration) -> Self {
        Self {
            subjects: Mutex::default(),
            priming: Mutex::default(),
            read_back: sync_interval * 4 + Duration::from_secs(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Subjects> {
        self.subjects.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The subject named `name`, made if missing.
    fn named(&self, name: &str, span: Span) -> Arc<Subject> {
        let mut subjects = self.lock();
        match subjects.get(name) {
            Some(subject) => subject.clone(),
            None => {
                let subject = Arc::new(Subject { span, counts: Mutex::default() });
                subjects.insert(name.to_owned(), subject.clone());
                subject
            }
        }
    }

    /// The subject of `applied` for `key`: a key's own subject from its record (looked up by
    /// name only the first time, or once a sync detached it), a tenant's by name.
    fn subject(&self, key: &CachedKey, applied: &Applied) -> Arc<Subject> {
        let own = applied.kind == RateLimitSubject::Key;
        if own && let Some(subject) = key.limit_subject.0.load_full() {
            return subject;
        }
        let named = self.named(applied.subject.as_str(), applied.span);
        if own {
            key.limit_subject.0.store(Some(named.clone()));
        }
        named
    }

    /// Forgets the detached subject a record holds, so that the next look goes by name.
    fn reattach(key: &CachedKey, applied: &Applied) {
        if applied.kind == RateLimitSubject::Key {
            key.limit_subject.0.store(None);
        }
    }

    /// Runs `with` on the counts of `applied`'s subject for `key`, locked and attached to the
    /// limiter's map (a sync detaches only under the subject's lock).
    fn with_counts<R>(&self, key: &CachedKey, applied: &Applied, with: impl FnOnce(&mut Counts) -> R) -> R {
        loop {
            let subject = self.subject(key, applied);
            let mut counts = subject.lock();
            if !counts.detached {
                return with(&mut counts);
            }
            drop(counts);
            Self::reattach(key, applied);
        }
    }

    /// The subjects of a decision for `key` at `now` whose shared counts this replica has not
    /// read yet (and is not reading already), each with the oldest bucket the decision needs;
    /// `None` when there are none. Read them with [`Store::request_counts_since`] and hand them
    /// to [`prime`](Self::prime), or to [`priming_failed`](Self::priming_failed).
    pub fn unprimed(&self, key: &CachedKey, tenant: &Tenant, now: DateTime<Utc>) -> Option<Vec<(String, i64)>> {
        if !any_limit(key, tenant) {
            return None;
        }
        let mut needed = Vec::new();
        let mut priming = None;
        for applied in limits_of(key, tenant) {
            if self.with_counts(key, &applied, |counts| counts.primed) {
                continue;
            }
            let priming =
                priming.get_or_insert_with(|| self.priming.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
            // Primed meanwhile? `prime` marks subjects under the same lock it gives them back
            // under, so a subject is handed out once.
            if self.with_counts(key, &applied, |counts| counts.primed) {
                continue;
            }
            let subject = applied.subject.as_str().to_owned();
            if priming.insert(subject.clone()) {
                needed.push((subject, applied.span.oldest_counted(micros(now))));
            }
        }
        (!needed.is_empty()).then_some(needed)
    }

    /// Takes the shared totals read for `needed` (subjects and the buckets since) and marks the
    /// subjects as known.
    pub fn prime(&self, key: &CachedKey, tenant: &Tenant, needed: &[(String, i64)], totals: Vec<(CountKey, i64)>) {
        // Held until every subject is marked: locks are taken priming, then map, then subject.
        let mut priming = self.priming.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (subject, _) in needed {
            priming.remove(subject);
        }
        for applied in limits_of(key, tenant) {
            if !needed.iter().any(|(subject, _)| subject == applied.subject.as_str()) {
                continue;
            }
            self.with_counts(key, &applied, |counts| {
                counts.primed = true;
                for (bucket, total) in totals.iter().filter(|(bucket, _)| bucket.subject == applied.subject.as_str()) {
                    let counter = counts.bucket(bucket.window_start);
                    counter.shared = counter.shared.max(*total);
                }
            });
        }
    }

    /// Gives `needed` back, unread: the next decision that needs them asks again.
    pub fn priming_failed(&self, needed: &[(String, i64)]) {
        let mut priming = self.priming.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (subject, _) in needed {
            priming.remove(subject);
        }
    }

    /// Decides whether `key` may make one more request at `now` and, if so, counts it against
    /// every limit that applies. A denied request is not counted. The subjects are locked in
    /// one order (the key's, the tenant's shared limit, the tenant's quota) and held together,
    /// so a decision and its counting are one step for every limit.
    pub fn check_and_count(&self, key: &CachedKey, tenant: &Tenant, now: DateTime<Utc>) -> LimitDecision {
        if !any_limit(key, tenant) {
            return LimitDecision::Allowed(None);
        }
        let now = micros(now);
        let applied: [Option<Applied>; 3] = {
            let mut limits = limits_of(key, tenant);
            std::array::from_fn(|_| limits.next())
        };
        loop {
            let held: Vec<(&Applied, Arc<Subject>)> =
                applied.iter().flatten().map(|limit| (limit, self.subject(key, limit))).collect();
            let mut locked: Vec<(&Applied, std::sync::MutexGuard<'_, Counts>)> =
                held.iter().map(|(limit, subject)| (*limit, subject.lock())).collect();
            // A sync detached one since it was looked up: look again.
            if let Some(&(limit, _)) = locked.iter().find(|(_, counts)| counts.detached) {
                drop(locked);
                Self::reattach(key, limit);
                continue;
            }
            return Self::decide_and_count(&mut locked, now);
        }
    }

    /// [`check_and_count`](Self::check_and_count) on the locked counts of every limit.
    fn decide_and_count(locked: &mut [(&Applied, std::sync::MutexGuard<'_, Counts>)], now: i64) -> LimitDecision {
        let mut fewest_left: Option<RateLimitState> = None;
        let mut denied: Option<(DenyReason, RateLimitState)> = None;
        for (limit, counts) in locked.iter() {
            let counted = counts.since(limit.span.oldest_counted(now));
            let used: i64 = counted.iter().map(|(_, counter)| counter.estimate()).sum();
            let state = |remaining: u32, reset_at: i64| RateLimitState {
                limit: limit.limit,
                remaining,
                reset_at: time(reset_at),
                window: limit.window,
                subject: limit.kind,
            };
            if used + 1 > i64::from(limit.limit) {
                // Of several used-up limits, the one that frees up last: a client that waits
                // until the reported reset is admitted by all of them.
                let counted: Vec<(i64, i64)> =
                    counted.iter().map(|(start, counter)| (*start, counter.estimate())).collect();
                let reset_at = admitted_again_at(limit.span, &counted, i64::from(limit.limit));
                if denied.as_ref().is_none_or(|(_, state)| micros(state.reset_at) < reset_at) {
                    denied = Some((limit.reason, state(0, reset_at)));
                }
                continue;
            }
            let remaining = u32::try_from(i64::from(limit.limit) - used - 1).unwrap_or(0);
            let state = state(remaining, limit.span.leaves_at(limit.span.bucket_of(now)));
            // The fewest requests left; of limits with as few, the one that frees up last.
            if fewest_left.as_ref().is_none_or(|fewest| {
                (state.remaining, std::cmp::Reverse(state.reset_at))
                    < (fewest.remaining, std::cmp::Reverse(fewest.reset_at))
            }) {
                fewest_left = Some(state);
            }
        }
        if let Some((reason, state)) = denied {
            return LimitDecision::Denied(reason, state);
        }
        for (limit, counts) in locked.iter_mut() {
            counts.bucket(limit.span.bucket_of(now)).pending += 1;
        }
        LimitDecision::Allowed(fewest_left)
    }

    /// Adds this replica's new counts to the shared ones and reads back the recent totals of
    /// every subject it tracks. Counts that cannot be written stay pending for the next sync:
    /// none is lost while its bucket can still matter.
    pub async fn sync(&self, store: &Store, now: DateTime<Utc>) -> Result<(), StoreError> {
        let now = micros(now);
        // Buckets that no decision counts any more go, their unwritten counts too, so an outage
        // cannot make the buffer grow without bound; a subject with no bucket left is detached
        // and read again the next time it is seen.
        let tracked: Vec<(String, Arc<Subject>)> = {
            let mut subjects = self.lock();
            subjects.retain(|_, subject| {
                let mut counts = subject.lock();
                let oldest = subject.span.oldest_counted(now);
                let gone = counts.buckets.partition_point(|(start, _)| *start < oldest);
                counts.buckets.drain(..gone);
                counts.detached = counts.buckets.is_empty();
                if counts.detached {
                    // A cached record may hold the subject for minutes yet: keep no room.
                    counts.buckets = Vec::new();
                }
                !counts.detached
            });
            subjects.iter().map(|(name, subject)| (name.clone(), subject.clone())).collect()
        };
        let mut deltas: Vec<(CountKey, i64, &Subject)> = Vec::new();
        for (name, subject) in &tracked {
            for (start, counter) in subject.lock().buckets.iter_mut().filter(|(_, counter)| counter.pending > 0) {
                counter.flushing = counter.pending;
                counter.pending = 0;
                deltas.push((CountKey { subject: name.clone(), window_start: *start }, counter.flushing, subject));
            }
        }
        // Every replica writes rows in one order, so concurrent batches cannot deadlock.
        deltas.sort_by(|a, b| a.0.cmp(&b.0));
        let rows: Vec<(CountKey, i64)> = deltas.iter().map(|(bucket, count, _)| (bucket.clone(), *count)).collect();
        let written = store.add_request_counts(&rows).await;
        for (bucket, _, subject) in &deltas {
            if let Some(counter) = subject.lock().get_mut(bucket.window_start) {
                match written {
                    Ok(()) => counter.shared += counter.flushing,
                    Err(_) => counter.pending += counter.flushing,
                }
                counter.flushing = 0;
            }
        }
        written?;
        let read_back = i64::try_from(self.read_back.as_micros()).unwrap_or(i64::MAX);
        let ranges: Vec<(String, i64)> = tracked
            .iter()
            .map(|(name, subject)| match subject.span {
                Span::Sliding { .. } => (name.clone(), now.saturating_sub(read_back)),
                Span::UtcDay => (name.clone(), Span::UtcDay.bucket_of(now)),
            })
            .collect();
        let totals = store.request_counts_since(&ranges).await?;
        let by_name: HashMap<&str, &Subject> =
            tracked.iter().map(|(name, subject)| (name.as_str(), &**subject)).collect();
        for (bucket, total) in totals {
            if let Some(subject) = by_name.get(bucket.subject.as_str())
                && bucket.window_start >= subject.span.oldest_counted(now)
            {
                let mut counts = subject.lock();
                if !counts.detached {
                    let counter = counts.bucket(bucket.window_start);
                    counter.shared = counter.shared.max(total);
                }
            }
        }
        Ok(())
    }
}

/// The earliest time at which one more request fits under `limit`, given the counted buckets
/// (oldest first): the moment enough of them have left the window.
fn admitted_again_at(span: Span, counted: &[(i64, i64)], limit: i64) -> i64 {
    let mut used: i64 = counted.iter().map(|(_, count)| count).sum();
    for (start, count) in counted {
        used -= count;
        if used < limit {
            return span.leaves_at(*start);
        }
    }
    counted.last().map_or(0, |(start, _)| span.leaves_at(*start))
}

#[cfg(test)]
mod tests {

    use chrono::TimeZone;

    use super::*;

    fn key(per_minute: u32) -> CachedKey {
        CachedKey::from(&record(per_minute))
    }

    fn record(per_minute: u32) -> crate::domain::model::KeyRecord {
        crate::domain::model::KeyRecord {
            rate_limit_per_minute: per_minute,
            ..crate::domain::model::KeyRecord::sample("key_1", "k")
        }
    }

    fn tenant(quota: u32) -> Tenant {
        Tenant {
            tenant_id: "acme".into(),
            display_name: "Acme".into(),
            api_access_enabled: true,
            max_keys: 0,
            rate_limit_per_minute: 0,
            daily_request_quota: quota,
            unlimited_keys: false,
            shared_rate_limit: 0,
            shared_rate_limit_window: RateLimitWindow::Minute,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    fn start() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap()
    }

    fn at(seconds: f64) -> DateTime<Utc> {
        start() + chrono::Duration::microseconds((seconds * 1e6) as i64)
    }

    /// Replays requests at the given seconds; returns which were allowed.
    fn replay(limit: u32, seconds: &[f64]) -> Vec<bool> {
        let (limiter, key, tenant) = (Limiter::default(), key(limit), tenant(0));
        seconds
            .iter()
            .map(|second| matches!(limiter.check_and_count(&key, &tenant, at(*second)), LimitDecision::Allowed(_)))
            .collect()
    }

    #[test]
    fn a_subject_is_handed_out_for_priming_once() {
        let limiter = std::sync::Arc::new(Limiter::default());
        let tenant = std::sync::Arc::new(tenant(0));
        for round in 0..200 {
            let key = std::sync::Arc::new(CachedKey::from(&crate::domain::model::KeyRecord {
                key_id: format!("key_{round}"),
                ..record(5)
            }));
            let handed = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|scope| {
                for _ in 0..4 {
                    scope.spawn(|| {
                        for _ in 0..50 {
                            if let Some(needed) = limiter.unprimed(&key, &tenant, at(0.0)) {
                                handed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                limiter.prime(&key, &tenant, &needed, Vec::new());
                            }
                        }
                    });
                }
            });
            assert_eq!(handed.into_inner(), 1, "round {round}: the shared counts were read more than once");
        }
    }

    #[test]
    fn a_reloaded_record_counts_in_the_same_subject() {
        let (limiter, tenant) = (Limiter::default(), tenant(0));
        let (first, second) = (key(2), key(2));
        assert!(matches!(limiter.check_and_count(&first, &tenant, at(0.0)), LimitDecision::Allowed(_)));
        // The key's entry was dropped and read again: a new record, the same counts.
        assert!(matches!(limiter.check_and_count(&second, &tenant, at(1.0)), LimitDecision::Allowed(_)));
        assert!(matches!(limiter.check_and_count(&first, &tenant, at(2.0)), LimitDecision::Denied(..)));
        assert!(matches!(limiter.check_and_count(&second, &tenant, at(2.0)), LimitDecision::Denied(..)));
    }

    #[tokio::test]
    async fn a_key_whose_buckets_all_closed_is_read_again_and_counted_where_the_sync_writes() {
        let dir = tempfile::tempdir().unwrap();
        let database = crate::config::DatabaseConfig {
            url: crate::config::DatabaseUrl(format!("sqlite://{}?mode=rwc", dir.path().join("limits.db").display())),
            max_connections: 2,
            acquire_timeout: Duration::from_secs(5),
            query_timeout: Duration::from_secs(5),
        };
        let store = Store::connect_lazy(&database).unwrap();
        store.migrate().await.unwrap();
        let (limiter, key, tenant) = (Limiter::default(), key(5), tenant(0));
        let needed = limiter.unprimed(&key, &tenant, at(0.0)).expect("a first Check reads the shared counts");
        limiter.prime(&key, &tenant, &needed, Vec::new());
        assert!(limiter.unprimed(&key, &tenant, at(0.0)).is_none());
        assert!(matches!(limiter.check_and_count(&key, &tenant, at(0.0)), LimitDecision::Allowed(_)));
        limiter.sync(&store, at(0.5)).await.unwrap();

        // Two minutes on, no bucket is counted any more: the sync lets the subject go, while the
        // cached record still holds it.
        limiter.sync(&store, at(120.0)).await.unwrap();
        let held = key.limit_subject.0.load_full().expect("the record still holds its subject");
        assert!(held.lock().detached);
        assert_eq!(held.lock().buckets.capacity(), 0, "a let-go subject keeps no room for buckets");
        drop(held);
        // A Check that finds the subject let go between its priming and its counting.
        assert!(matches!(limiter.check_and_count(&key, &tenant, at(121.0)), LimitDecision::Allowed(_)));
        limiter.sync(&store, at(121.5)).await.unwrap();
        let counted = || async {
            let written = store.request_counts_since(&[("key:key_1".to_owned(), micros(at(100.0)))]).await.unwrap();
            written.iter().map(|(_, count)| count).sum::<i64>()
        };
        assert_eq!(counted().await, 1, "the Check after the subject was let go reached the shared counts");
        // And the subject is read again before the next decision.
        limiter.sync(&store, at(240.0)).await.unwrap();
        let needed = limiter.unprimed(&key, &tenant, at(241.0)).expect("read again after its buckets closed");
        limiter.prime(&key, &tenant, &needed, Vec::new());
        assert!(matches!(limiter.check_and_count(&key, &tenant, at(241.0)), LimitDecision::Allowed(_)));
        assert!(limiter.unprimed(&key, &tenant, at(241.0)).is_none(), "primed where it is counted");
        limiter.sync(&store, at(241.5)).await.unwrap();
        assert_eq!(counted().await, 2);
    }

    #[test]
    fn when_several_limits_are_used_up_the_deny_names_the_one_that_frees_up_last() {
        let limiter = Limiter::default();
        let key = key(2);
        let mut tenant = tenant(0);
        tenant.shared_rate_limit = 2;
        tenant.shared_rate_limit_window = RateLimitWindow::Hour;
        for second in [0.0, 1.0] {
            assert!(matches!(limiter.check_and_count(&key, &tenant, at(second)), LimitDecision::Allowed(_)));
        }
        // Both the key's 2 a minute and the tenant's 2 an hour are used up: the hour decides.
        let LimitDecision::Denied(reason, state) = limiter.check_and_count(&key, &tenant, at(2.0)) else {
            panic!("denied")
        };
        assert_eq!(
            (reason, state.window, state.subject),
            (DenyReason::RateLimited, RateLimitWindow::Hour, RateLimitSubject::Tenant)
        );
        assert_eq!(state.reset_at, at(3_600.0), "the first request leaves the hour");
        // At the minute's reset the tenant's hour still denies; at the reported reset, admitted.
        assert!(matches!(limiter.check_and_count(&key, &tenant, at(61.0)), LimitDecision::Denied(..)));
        assert!(matches!(limiter.check_and_count(&key, &tenant, state.reset_at), LimitDecision::Allowed(_)));
    }

    #[test]
    fn a_request_61_seconds_after_the_last_one_is_admitted_at_limit_1() {
        assert_eq!(replay(1, &[0.0, 61.0]), [true, true]);
        assert_eq!(replay(1, &[30.5, 90.5]), [true, true]);
        assert_eq!(replay(1, &[0.0, 59.0]), [true, false]);
    }

    #[test]
    fn a_client_asking_every_second_gets_exactly_the_limit_each_minute() {
        for limit in [1u32, 2, 5] {
            let seconds: Vec<f64> = (0..240).map(f64::from).collect();
            let allowed = replay(limit, &seconds);
            let per_minute: Vec<usize> =
                allowed.chunks(60).map(|minute| minute.iter().filter(|allowed| **allowed).count()).collect();
            assert_eq!(per_minute, vec![limit as usize; 4], "limit {limit}");
        }
    }

    #[test]
    fn a_client_that_keeps_to_n_in_any_60_seconds_is_never_denied() {
        // Deterministic pseudo-random schedules that are compliant by construction: a request is
        // sent only when fewer than `limit` were sent in the 60 seconds before it.
        for limit in [1u32, 2, 5, 1000] {
            let mut state: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(limit);
            let (limiter, key, tenant) = (Limiter::default(), key(limit), tenant(0));
            let mut sent: Vec<f64> = Vec::new();
            let mut now = 0.0;
            while now < 600.0 {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                now += (state >> 40) as f64 / (1u64 << 24) as f64 * (120.0 / f64::from(limit));
                let in_window = sent.iter().filter(|at| **at > now - 60.0).count();
                if in_window < limit as usize {
                    let decision = limiter.check_and_count(&key, &tenant, at(now));
                    assert!(
                        matches!(decision, LimitDecision::Allowed(_)),
                        "limit {limit}, request at {now:.3}s denied"
                    );
                    sent.push(now);
                }
            }
            assert!(sent.len() > limit as usize, "limit {limit}: the schedule made {} requests", sent.len());
        }
    }

    #[test]
    fn no_more_than_the_limit_is_admitted_in_any_59_seconds() {
        for limit in [1u32, 2, 5, 1000] {
            let (limiter, key, tenant) = (Limiter::default(), key(limit), tenant(0));
            let mut admitted = Vec::new();
            // A client hammering ten times a second for five minutes.
            for tick in 0..3000 {
                let now = f64::from(tick) / 10.0;
                if matches!(limiter.check_and_count(&key, &tenant, at(now)), LimitDecision::Allowed(_)) {
                    admitted.push(now);
                }
            }
            for (index, first) in admitted.iter().enumerate() {
                let within = admitted[index..].iter().take_while(|at| **at < first + 59.0).count();
                assert!(within <= limit as usize, "limit {limit}: {within} admitted within 59 s of {first}");
            }
        }
    }

    #[test]
    fn a_request_at_the_announced_time_is_admitted() {
        for limit in [1u32, 2, 5, 1000] {
            let (limiter, key, tenant) = (Limiter::default(), key(limit), tenant(0));
            let mut now = at(12.3);
            for _ in 0..limit {
                assert!(matches!(limiter.check_and_count(&key, &tenant, now), LimitDecision::Allowed(_)));
                now += chrono::Duration::milliseconds(250);
            }
            for _ in 0..3 {
                // Use up what is admitted now, then wait exactly as long as the deny says.
                while matches!(limiter.check_and_count(&key, &tenant, now), LimitDecision::Allowed(_)) {}
                let LimitDecision::Denied(DenyReason::RateLimited, state) = limiter.check_and_count(&key, &tenant, now)
                else {
                    panic!("limit {limit}: expected a deny at {now}");
                };
                assert!(state.reset_at > now);
                let early = state.reset_at - chrono::Duration::microseconds(1);
                assert!(matches!(limiter.check_and_count(&key, &tenant, early), LimitDecision::Denied(..)));
                now = state.reset_at;
                assert!(
                    matches!(limiter.check_and_count(&key, &tenant, now), LimitDecision::Allowed(_)),
                    "limit {limit}: a request at the announced {now} is admitted"
                );
            }
        }
    }

    #[test]
    fn the_daily_quota_resets_at_midnight_utc() {
        let (limiter, key, tenant) = (Limiter::default(), key(0), tenant(2));
        assert!(matches!(limiter.check_and_count(&key, &tenant, at(10.0)), LimitDecision::Allowed(_)));
        assert!(matches!(limiter.check_and_count(&key, &tenant, at(20.0)), LimitDecision::Allowed(_)));
        let LimitDecision::Denied(DenyReason::QuotaExceeded, state) = limiter.check_and_count(&key, &tenant, at(30.0))
        else {
            panic!("expected the quota to deny");
        };
        let midnight = Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0).unwrap();
        assert_eq!(state.reset_at, midnight);
        assert!(matches!(limiter.check_and_count(&key, &tenant, midnight), LimitDecision::Allowed(_)));
    }
}
