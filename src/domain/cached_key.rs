//! A key as Check needs it: what the decision and its answer read, and nothing else, in two
//! allocations (the record, inside the cache's entry, and one buffer of all its text; where
//! each piece of text ends is kept in the record, or in a third allocation for keys with many
//! scopes, sites and metadata entries).
//!
//! The decision cache holds one per cached key, so its size is most of what a cached key
//! costs: a key with three scopes, one site and no metadata takes about 290 bytes here, where
//! the [`KeyRecord`] it is built from takes about 800 (a dozen `String`s, a `Vec` of scopes
//! and a map). The key's hash, its display prefix, its creation and last use and the key it
//! was rotated from are left out: no Check reads them.
//!
//! The record also counts its allowed Checks until the usage recorder writes them (see
//! [`AllowedCount`]), so that counting one touches no memory but the record's own.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use chrono::{DateTime, Utc};

use super::key::Environment;
use super::model::{KeyRecord, KeyState};

/// A key as Check needs it (see the module documentation). Built from a [`KeyRecord`]; its
/// text is read back through the accessors.
#[derive(Debug)]
pub struct CachedKey {
    /// The key id, the tenant id, the name, each scope, each site id, then each metadata
    /// entry's key and value, back to back.
    text: Box<str>,
    /// Where each piece of `text` ends: `3 + scopes + sites + 2 × metadata entries` of them.
    ends: Ends,
    /// Index in `ends` of the first site id.
    sites_start: u32,
    /// Index in `ends` of the first metadata key.
    metadata_start: u32,
    environment: Environment,
    /// 0 means the tenant's default.
    rate_limit_per_minute: u32,
    /// Microseconds since the epoch; [`NEVER`] for none.
    expires_at: i64,
    /// Microseconds since the epoch; [`NEVER`] for none.
    revoked_at: i64,
    /// Allowed Checks not yet handed to the usage recorder.
    pub allowed: AllowedCount,
    /// The key's own rate-limit counts, once a Check has looked them up.
    pub limit_subject: crate::limits::KeySubject,
}

/// A key's allowed Checks of one UTC day and its last use, counted in place until the usage
/// recorder takes them. Every operation is one atomic instruction on the record itself.
#[derive(Debug, Default)]
pub struct AllowedCount {
    /// The day (days since 1970-01-01, UTC) in the top 24 bits, the count in the low 40;
    /// 0 when nothing is counted.
    day_and_count: AtomicU64,
    /// The latest allowed Check, in microseconds since the epoch; 0 when none is counted.
    last_used: AtomicI64,
    /// Whether the usage recorder holds this record in its list of records to read.
    pub listed: AtomicBool,
}

/// What [`AllowedCount::take`] took: the day (midnight UTC) and its count, and the last use.
pub type Taken = (Option<(DateTime<Utc>, i64)>, Option<DateTime<Utc>>);

/// The bits of [`AllowedCount::day_and_count`] that hold the count.
const COUNT_BITS: u32 = 40;

impl AllowedCount {
    /// Counts one allowed Check at `now` unless a count of another day is waiting (the day
    /// turned since the recorder last took the counts): then `false`, and the caller counts it
    /// elsewhere.
    pub fn count(&self, now: DateTime<Utc>) -> bool {
        let day = u64::try_from(now.timestamp().div_euclid(86_400)).unwrap_or(0) & ((1 << (64 - COUNT_BITS)) - 1);
        let mut current = self.day_and_count.load(Ordering::SeqCst);
        loop {
            let count = current & ((1 << COUNT_BITS) - 1);
            if (current != 0 && current >> COUNT_BITS != day) || count == (1 << COUNT_BITS) - 1 {
                return false;
            }
            let next = (day << COUNT_BITS) | (count + 1);
            // Sequentially consistent, as the recorder's `listed` flag is: a count that lands
            // after a flush took the record's counts sees the record unlisted, and lists it.
            match self.day_and_count.compare_exchange_weak(current, next, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        self.last_used.fetch_max(now.timestamp_micros(), Ordering::SeqCst);
        true
    }

    /// Takes what is counted: the day (midnight UTC) and its count, and the last use.
    pub fn take(&self) -> Taken {
        let day_and_count = self.day_and_count.swap(0, Ordering::SeqCst);
        let last_used = self.last_used.swap(0, Ordering::SeqCst);
        let counted = (day_and_count != 0).then(|| {
            let day = i64::try_from(day_and_count >> COUNT_BITS).unwrap_or(0);
            let midnight = DateTime::from_timestamp(day * 86_400, 0).unwrap_or_default();
            (midnight, i64::try_from(day_and_count & ((1 << COUNT_BITS) - 1)).unwrap_or(0))
        });
        (counted, (last_used != 0).then(|| DateTime::from_timestamp_micros(last_used).unwrap_or_default()))
    }
}

/// The pieces before the scopes: key id, tenant id, name.
const FIXED: u32 = 3;

/// No expiry, no revocation.
const NEVER: i64 = i64::MAX;

/// How many text pieces a record holds inline: a key with up to 9 scopes, sites and metadata
/// entries' names and values together, and under 64 KiB of text.
const INLINE_ENDS: usize = 12;

/// Where each piece of a record's text ends, in bytes: inline for most keys (see
/// [`INLINE_ENDS`]), else in an allocation of its own.
#[derive(Debug)]
enum Ends {
    Inline { len: u8, ends: [u16; INLINE_ENDS] },
    Heap(Box<[u32]>),
}

impl Ends {
    fn new(ends: Vec<u32>) -> Self {
        let short = |end: &u32| u16::try_from(*end).is_ok();
        if ends.len() <= INLINE_ENDS && ends.iter().all(short) {
            let mut inline = [0; INLINE_ENDS];
            for (slot, end) in inline.iter_mut().zip(&ends) {
                *slot = u16::try_from(*end).unwrap_or(0);
            }
            return Self::Inline { len: ends.len() as u8, ends: inline };
        }
        Self::Heap(ends.into_boxed_slice())
    }

    fn get(&self, index: usize) -> Option<u32> {
        match self {
            Self::Inline { len, ends } => ends[..usize::from(*len)].get(index).copied().map(u32::from),
            Self::Heap(ends) => ends.get(index).copied(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Inline { len, .. } => usize::from(*len),
            Self::Heap(ends) => ends.len(),
        }
    }
}

impl From<&KeyRecord> for CachedKey {
    fn from(key: &KeyRecord) -> Self {
        let scopes = key.scopes.iter().map(|scope| scope.as_str());
        let sites = key.site_ids.iter().map(String::as_str);
        let metadata = key.metadata.iter().flat_map(|(name, value)| [name.as_str(), value.as_str()]);
        let pieces =
            [key.key_id.as_str(), &key.tenant_id, &key.name].into_iter().chain(scopes).chain(sites).chain(metadata);
        let (mut text, mut ends) = (String::new(), Vec::new());
        for piece in pieces {
            text.push_str(piece);
            // A record's text is far below 4 GiB (ids of 64 bytes, at most 100 sites); a longer
            // one would read back as empty pieces, which grant nothing.
            ends.push(u32::try_from(text.len()).unwrap_or(u32::MAX));
        }
        // A record of 4 billion pieces cannot be loaded in the first place.
        let count = |len: usize| u32::try_from(len).unwrap_or(u32::MAX);
        let sites_start = FIXED.saturating_add(count(key.scopes.len()));
        let micros = |at: Option<DateTime<Utc>>| at.map_or(NEVER, |at| at.timestamp_micros().min(NEVER - 1));
        Self {
            text: text.into_boxed_str(),
            ends: Ends::new(ends),
            sites_start,
            metadata_start: sites_start.saturating_add(count(key.site_ids.len())),
            environment: key.environment,
            rate_limit_per_minute: key.rate_limit_per_minute,
            expires_at: micros(key.expires_at),
            revoked_at: micros(key.revoked_at),
            allowed: AllowedCount::default(),
            limit_subject: Default::default(),
        }
    }
}

impl CachedKey {
    /// The `index`-th piece of text; empty when there is none.
    fn piece(&self, index: u32) -> &str {
        let index = index as usize;
        let start = match index.checked_sub(1) {
            None => 0,
            Some(previous) => self.ends.get(previous).unwrap_or(0) as usize,
        };
        let end = self.ends.get(index).unwrap_or(0) as usize;
        self.text.get(start..end).unwrap_or_default()
    }

    fn pieces(&self, from: u32, to: u32) -> impl ExactSizeIterator<Item = &str> + Clone {
        (from..to.max(from)).map(|index| self.piece(index))
    }

    pub fn key_id(&self) -> &str {
        self.piece(0)
    }

    pub fn tenant_id(&self) -> &str {
        self.piece(1)
    }

    pub fn name(&self) -> &str {
        self.piece(2)
    }

    /// The key's scopes, in the order they were stored (each well-formed, as CreateKey and
    /// UpdateKey accept them).
    pub fn scopes(&self) -> impl ExactSizeIterator<Item = &str> + Clone {
        self.pieces(FIXED, self.sites_start)
    }

    /// The sites the key is restricted to; none means every site of its tenant.
    pub fn site_ids(&self) -> impl ExactSizeIterator<Item = &str> + Clone {
        self.pieces(self.sites_start, self.metadata_start)
    }

    /// The key's metadata entries, ordered by name.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &str)> {
        let start = self.metadata_start;
        let count = u32::try_from(self.ends.len()).unwrap_or(u32::MAX).saturating_sub(start) / 2;
        (0..count).map(move |entry| {
            let at = start + entry * 2;
            (self.piece(at), self.piece(at + 1))
        })
    }

    pub fn environment(&self) -> Environment {
        self.environment
    }

    /// The key's own per-minute limit; 0 means its tenant's default for keys.
    pub fn rate_limit_per_minute(&self) -> u32 {
        self.rate_limit_per_minute
    }

    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        (self.expires_at != NEVER).then(|| DateTime::from_timestamp_micros(self.expires_at)).flatten()
    }

    /// The state at `now`, judged as [`KeyState::at`] judges it.
    pub fn state(&self, now: DateTime<Utc>) -> KeyState {
        let now = now.timestamp_micros();
        if self.revoked_at <= now {
            KeyState::Revoked
        } else if self.expires_at <= now {
            KeyState::Expired
        } else {
            KeyState::Active
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::domain::scope::Scope;

    fn record(scopes: &[&str], sites: &[&str], metadata: &[(&str, &str)]) -> KeyRecord {
        KeyRecord {
            key_id: "key_01hzy".into(),
            tenant_id: "acme".into(),
            key_hash: "0".repeat(64),
            name: "Ünïcode name".into(),
            display_prefix: "kg_live_abcd".into(),
            scopes: scopes.iter().map(|scope| Scope::parse(scope).unwrap()).collect(),
            site_ids: sites.iter().map(|site| (*site).to_owned()).collect(),
            environment: Environment::Test,
            metadata: metadata.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>(),
            rate_limit_per_minute: 7,
            created_at: Utc::now(),
            // As the store keeps times: to the microsecond.
            expires_at: DateTime::from_timestamp_micros((Utc::now() + chrono::Duration::days(1)).timestamp_micros()),
            revoked_at: None,
            last_used_at: None,
            rotated_from_key_id: None,
        }
    }

    #[test]
    fn every_field_a_check_reads_comes_back_as_it_was() {
        for (scopes, sites, metadata) in [
            (&["events:read", "events:write", "stats:read"][..], &["shop.example"][..], &[][..]),
            (&[][..], &[][..], &[("plan", "pro"), ("", ""), ("région", "eu-west")][..]),
            (&["*"][..], &["a", "", "c"][..], &[("k", "")][..]),
            // More pieces than a record holds inline.
            (&["a:b", "c:d"][..], &["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"][..], &[("k", "v")][..]),
        ] {
            let key = record(scopes, sites, metadata);
            let cached = CachedKey::from(&key);
            assert_eq!(cached.key_id(), key.key_id);
            assert_eq!(cached.tenant_id(), key.tenant_id);
            assert_eq!(cached.name(), key.name);
            assert_eq!(cached.scopes().collect::<Vec<_>>(), scopes);
            assert_eq!(cached.scopes().len(), scopes.len());
            assert_eq!(cached.site_ids().collect::<Vec<_>>(), sites);
            let expected: Vec<_> = key.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            assert_eq!(cached.metadata().collect::<Vec<_>>(), expected);
            assert_eq!(cached.environment(), Environment::Test);
            assert_eq!(cached.rate_limit_per_minute(), 7);
            assert_eq!(cached.expires_at(), key.expires_at);
            for at in [Utc::now(), Utc::now() + chrono::Duration::days(2)] {
                assert_eq!(cached.state(at), key.state(at));
            }
        }
    }

    #[test]
    fn allowed_checks_are_counted_per_day_and_taken_once() {
        let cached = CachedKey::from(&record(&["events:read"], &[], &[]));
        let day = DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z").unwrap().to_utc();
        let (morning, evening) = (day + chrono::Duration::hours(9), day + chrono::Duration::hours(21));
        assert!(cached.allowed.count(evening));
        assert!(cached.allowed.count(morning));
        assert!(!cached.allowed.count(day + chrono::Duration::days(1)), "the next day waits for a take");
        assert_eq!(cached.allowed.take(), (Some((day, 2)), Some(evening)));
        assert_eq!(cached.allowed.take(), (None, None), "taken once");
        assert!(cached.allowed.count(day + chrono::Duration::days(1)));
        assert_eq!(cached.allowed.take().0, Some((day + chrono::Duration::days(1), 1)));
    }

    #[test]
    fn a_record_with_over_64_kib_of_text_reads_back_whole() {
        let mut key = record(&["events:read"], &["shop.example"], &[]);
        key.name = "n".repeat(70_000);
        let cached = CachedKey::from(&key);
        assert_eq!(cached.name(), key.name);
        assert_eq!(cached.scopes().collect::<Vec<_>>(), ["events:read"]);
        assert_eq!(cached.site_ids().collect::<Vec<_>>(), ["shop.example"]);
    }

    #[test]
    fn a_key_with_more_pieces_than_u16_counts_keeps_its_site_restriction() {
        let scopes: Vec<String> = (0..70_000).map(|index| format!("s{index}:read")).collect();
        let mut key = record(&[], &["shop.example"], &[("plan", "pro")]);
        key.scopes = scopes.iter().map(|scope| Scope::parse(scope).unwrap()).collect();
        let cached = CachedKey::from(&key);
        assert_eq!(cached.scopes().len(), 70_000);
        assert_eq!(cached.site_ids().collect::<Vec<_>>(), ["shop.example"]);
        assert_eq!(cached.metadata().collect::<Vec<_>>(), [("plan", "pro")]);
    }

    #[test]
    fn a_revoked_key_stays_revoked() {
        let mut key = record(&["events:read"], &[], &[]);
        key.revoked_at = Some(Utc::now() - chrono::Duration::seconds(1));
        assert_eq!(CachedKey::from(&key).state(Utc::now()), KeyState::Revoked);
    }
}
