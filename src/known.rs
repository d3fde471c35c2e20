//! The known-keys filter: which key hashes the database holds, as a Bloom filter, so that a
//! well-formed key nobody minted is answered "unknown key" without a database lookup.
//!
//! A flood of made-up keys is the cheapest attack on an authorization service: every one misses
//! the cache, and without the filter every one costs a store query (about 45 µs of CPU on
//! SQLite, and a connection of the pool for its duration). The filter costs about 10 bits per
//! stored key, revoked and expired keys included (their Checks are answered with their own
//! reasons). It never says "absent" for a hash it was given; for about 1% of the hashes it was
//! not given it says "maybe", and those Checks take the usual lookup.
//!
//! Keys minted on another replica reach this replica's filter through the change feed: every
//! create, rotation and import records the new key's hash there. So a key the filter does not
//! hold is answered "unknown" only once a feed poll that began after the Check arrived has been
//! applied: a key created anywhere before the Check is in the filter by then. Such a Check asks
//! the follower to poll at once rather than at its interval, and every Check waiting meanwhile
//! shares that poll; polls asked for are at least 10 ms apart, so a flood of made-up keys costs
//! at most 100 feed reads a second, and each of its Checks waits about 10 ms.
//! The follower builds the filter in a task of its own (at start, after the whole cache was
//! dropped, and every hour), so changes keep being applied meanwhile; and every 10 s it reads
//! the keys created since its last successful look, 30 s back for clock skew (key ids begin
//! with their creation time; at most the newest 50 000), for keys whose creation reached no
//! feed: those minted by a replica of an earlier version during a rolling upgrade.
//! Until the filter is built, while the feed cannot be read, or when the wait runs past its
//! limit, a Check takes the usual lookup: the filter can make an unknown key cheaper, never a
//! key that reached the feed unknown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::Duration;

use metrics::Counter;
use tokio::sync::{Notify, watch};

use crate::domain::key::KeyDigest;
use crate::store::{Store, StoreResult};

/// 64-bit words in one block: 512 bits, one cache line, so a probe reads one line per layer.
const BLOCK_WORDS: usize = 8;
/// Bits per key a layer is sized for: about 1% false "maybe" at 7 probes.
const BITS_PER_KEY: u64 = 10;
/// Bits set per key, all in one block.
const PROBES: u32 = 7;
/// Keys the smallest layer is sized for.
const SMALLEST_LAYER: u64 = 1 << 16;
/// Hashes read per query while the filter is built.
const SCAN_PAGE: i64 = 10_000;

/// One Bloom filter sized for `capacity` keys; full layers stay, and a larger one is added.
struct Layer {
    blocks: Box<[[AtomicU64; BLOCK_WORDS]]>,
    capacity: u64,
    held: AtomicU64,
}

impl Layer {
    fn new(capacity: u64) -> Self {
        let blocks = (capacity * BITS_PER_KEY).div_ceil(64 * BLOCK_WORDS as u64).max(1);
        Self { blocks: (0..blocks).map(|_| Default::default()).collect(), capacity, held: AtomicU64::new(0) }
    }

    /// The block of `digest` and the (word, bit) of each probe. SHA-256 is uniform, so its
    /// bytes are the hash: 0..8 pick the block, 8..16 the bits within it.
    fn probes(&self, digest: &KeyDigest) -> (&[AtomicU64; BLOCK_WORDS], impl Iterator<Item = (usize, u64)>) {
        let bytes = digest.bytes();
        let [block, bits] = [0, 8].map(|at| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")));
        let index = ((u128::from(block) * self.blocks.len() as u128) >> 64) as usize;
        let probes = (0..PROBES).map(move |probe| {
            let bit = (bits >> (9 * probe)) & 511;
            ((bit >> 6) as usize, 1u64 << (bit & 63))
        });
        (&self.blocks[index], probes)
    }

    fn contains(&self, digest: &KeyDigest) -> bool {
        let (block, mut probes) = self.probes(digest);
        probes.all(|(word, bit)| block[word].load(Ordering::Acquire) & bit != 0)
    }

    /// Sets the bits of `digest`; true when the layer now holds more keys than it is sized for.
    fn add(&self, digest: &KeyDigest) -> bool {
        let (block, probes) = self.probes(digest);
        for (word, bit) in probes {
            block[word].fetch_or(bit, Ordering::AcqRel);
        }
        self.held.fetch_add(1, Ordering::Relaxed) + 1 > self.capacity
    }
}

/// A Bloom filter of key digests that grows by adding layers twice as large as the last.
pub struct DigestFilter {
    layers: Vec<Layer>,
}

impl DigestFilter {
    /// An empty filter sized for `expected` keys (at least 65 536): about 10 bits each.
    pub fn with_capacity(expected: u64) -> Self {
        Self { layers: vec![Layer::new(expected.max(SMALLEST_LAYER))] }
    }

    /// Whether `digest` may have been added: always true for one that was.
    pub fn contains(&self, digest: &KeyDigest) -> bool {
        self.layers.iter().any(|layer| layer.contains(digest))
    }

    /// Adds `digest` (once: one already held is left alone, so repeated changes of one key do
    /// not fill the filter); true when the newest layer is over its size.
    fn add(&self, digest: &KeyDigest) -> bool {
        !self.contains(digest) && self.layers.last().expect("a filter has a layer").add(digest)
    }

    /// Adds `digest`, growing the filter when its newest layer is full.
    pub fn insert(&mut self, digest: &KeyDigest) {
        if self.add(digest) {
            self.grow();
        }
    }

    fn grow(&mut self) {
        let last = self.layers.last().expect("a filter has a layer");
        if last.held.load(Ordering::Relaxed) > last.capacity {
            let capacity = last.capacity * 2;
            self.layers.push(Layer::new(capacity));
        }
    }

    /// Bytes of bits held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|layer| std::mem::size_of_val(&*layer.blocks)).sum()
    }
}

/// The filter answering now, and the build under way.
#[derive(Default)]
struct State {
    /// `None` until built, and again from the moment the whole cache is dropped until a build
    /// is installed: every miss takes the usual lookup meanwhile.
    filter: Option<DigestFilter>,
    /// A build under way: its number, and the digests added since it began (its scan may have
    /// passed them), which [`KnownKeys::install`] adds to the new filter.
    building: Option<(u64, Vec<KeyDigest>)>,
}

/// The filter of the keys the database holds, and the feed polls it waits for. Shared by the
/// decision cache (which asks it) and the feed's follower (which builds and feeds it).
pub struct KnownKeys {
    state: RwLock<State>,
    /// Numbers builds, so that one begun before [`forget`](Self::forget) is not installed.
    builds: AtomicU64,
    /// Feed polls begun, and (below) the newest one whose changes are applied.
    polls_begun: AtomicU64,
    polls_applied: watch::Sender<u64>,
    /// A Check waits for a poll: the follower polls without waiting for its interval.
    wanted: Notify,
    /// Longest wait for a poll, microseconds; past it a Check takes the usual lookup.
    wait_limit_micros: AtomicU64,
    filtered: Counter,
}

impl Default for KnownKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl KnownKeys {
    /// Not built yet: every key takes the usual lookup until a build is
    /// [installed](Self::install). Its counter `keygate_unknown_keys_filtered_total` is resolved
    /// here.
    pub fn new() -> Self {
        Self {
            state: RwLock::default(),
            builds: AtomicU64::new(0),
            polls_begun: AtomicU64::new(0),
            polls_applied: watch::Sender::new(0),
            wanted: Notify::new(),
            wait_limit_micros: AtomicU64::new(Duration::from_millis(450).as_micros() as u64),
            filtered: metrics::counter!("keygate_unknown_keys_filtered_total"),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a filter is answering.
    pub fn is_built(&self) -> bool {
        self.read().filter.is_some()
    }

    /// Whether the filter may hold `digest`; `None` while it is not built.
    pub fn may_hold(&self, digest: &KeyDigest) -> Option<bool> {
        self.read().filter.as_ref().map(|filter| filter.contains(digest))
    }

    /// Begins a build, unless one is under way: returns its number, for
    /// [`install`](Self::install). The filter in place (if any) keeps answering meanwhile.
    /// Build from a scan that starts after this call and after the feed's changes up to some
    /// position were applied; changes after that position arrive through [`add`](Self::add).
    pub fn begin_build(&self) -> Option<u64> {
        let mut state = self.write();
        if state.building.is_some() {
            return None;
        }
        let number = self.builds.fetch_add(1, Ordering::Relaxed) + 1;
        state.building = Some((number, Vec::new()));
        Some(number)
    }

    /// Starts answering from `filter`, the build numbered `number`, with every digest added
    /// since it began; a build overtaken by [`forget`](Self::forget) is dropped.
    pub fn install(&self, number: u64, mut filter: DigestFilter) {
        let mut state = self.write();
        match state.building.take() {
            Some((building, added)) if building == number => {
                for digest in &added {
                    filter.insert(digest);
                }
                state.filter = Some(filter);
            }
            other => state.building = other,
        }
    }

    /// The build numbered `number` failed: a later call to [`begin_build`](Self::begin_build)
    /// may begin another.
    pub fn build_failed(&self, number: u64) {
        let mut state = self.write();
        if state.building.as_ref().is_some_and(|(building, _)| *building == number) {
            state.building = None;
        }
    }

    /// Stops answering from the filter and drops any build under way (the whole cache was
    /// dropped: changes may have been missed); the follower builds it again.
    pub fn forget(&self) {
        *self.write() = State::default();
    }

    /// Records that a key with this digest is stored (created, rotated in, imported, or
    /// changed). Idempotent; a no-op while no filter is built or being built.
    pub fn add(&self, digest: &KeyDigest) {
        let full = {
            let state = self.read();
            // No build under way: one that begins after this scans the key (it is committed).
            state.building.is_none().then(|| state.filter.as_ref().is_some_and(|filter| filter.add(digest)))
        };
        let mut state = match full {
            Some(false) => return,
            Some(true) => self.write(),
            // A build is under way: added to the filter answering now and to the build's list
            // under the lock `install` takes, so the digest reaches whichever filter answers
            // next (the build's scan may have passed it).
            None => {
                let mut state = self.write();
                let State { filter, building } = &mut *state;
                if let Some(filter) = filter {
                    filter.insert(digest);
                }
                if let Some((_, added)) = building {
                    added.push(*digest);
                }
                return;
            }
        };
        if let Some(filter) = &mut state.filter {
            filter.grow();
        }
    }

    /// Whether the build numbered `number` is still the one under way (not overtaken by
    /// [`forget`](Self::forget)): its scan stops early otherwise.
    pub fn is_building(&self, number: u64) -> bool {
        self.read().building.as_ref().is_some_and(|(building, _)| *building == number)
    }

    /// Sets how long a Check of an unknown key waits for the next feed poll: twice the poll
    /// interval and 250 ms for the poll itself.
    pub fn set_poll_interval(&self, interval: Duration) {
        let limit = interval * 2 + Duration::from_millis(250);
        self.wait_limit_micros.store(limit.as_micros() as u64, Ordering::Relaxed);
    }

    /// Resolves when a Check waits for a poll (at once if one began waiting since the last
    /// call): many waiting Checks make one wake-up.
    pub async fn poll_wanted(&self) {
        self.wanted.notified().await;
    }

    /// The follower begins a feed poll: returns its number, for [`poll_applied`](Self::poll_applied).
    pub fn poll_begins(&self) -> u64 {
        self.polls_begun.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Every change the poll numbered `poll` read is applied (and the filter built if it was
    /// not): Checks waiting for it look again.
    pub fn poll_applied(&self, poll: u64) {
        self.polls_applied.send_if_modified(|applied| {
            let newer = poll > *applied;
            if newer {
                *applied = poll;
            }
            newer
        });
    }

    /// Whether a key with this digest may be stored: false only when the filter does not hold
    /// it after a feed poll that began after this call was applied. Waits for that poll (at most
    /// the wait limit) only for digests the filter does not hold.
    pub async fn may_exist(&self, digest: &KeyDigest) -> bool {
        // Any poll numbered above this one begins after now.
        let begun = self.polls_begun.load(Ordering::SeqCst);
        if self.may_hold(digest) != Some(false) {
            return true;
        }
        let limit = Duration::from_micros(self.wait_limit_micros.load(Ordering::Relaxed));
        let mut applied = self.polls_applied.subscribe();
        self.wanted.notify_one();
        match tokio::time::timeout(limit, applied.wait_for(|&applied| applied > begun)).await {
            Ok(Ok(_)) => {}
            // No poll in time (the feed cannot be read, or is slow): the store decides.
            _ => return true,
        }
        let known = self.may_hold(digest) != Some(false);
        if !known {
            self.filtered.increment(1);
        }
        known
    }
}

/// Builds the filter of every key hash the store holds, a page at a time, for the build
/// numbered `number`; `None` when that build was overtaken (the scan stops early). Hashes that
/// are not 64 hex digits (keygate never writes one) cannot match a lookup and are left out.
pub async fn build(store: &Store, known: &KnownKeys, number: u64) -> StoreResult<Option<DigestFilter>> {
    let expected = store.key_count().await?;
    // Room for growth before a second layer is needed.
    let mut filter = DigestFilter::with_capacity(expected + expected / 4);
    let mut after = String::new();
    loop {
        if !known.is_building(number) {
            return Ok(None);
        }
        let page = store.key_hashes_after(&after, SCAN_PAGE).await?;
        for hash in &page {
            if let Some(digest) = KeyDigest::from_hex(hash) {
                filter.insert(&digest);
            }
        }
        match page.last() {
            Some(last) if page.len() as i64 == SCAN_PAGE => after.clone_from(last),
            _ => return Ok(Some(filter)),
        }
    }
}

/// Most keys one [`reconcile`] reads: the newest ones, which are the likeliest to be missing.
const RECONCILE_BUDGET: i64 = 50_000;

/// Adds the keys created since `since` (by their key id, which begins with their creation time
/// in milliseconds), at most the newest 50 000: keys whose creation reached no feed, those
/// minted by a replica of an earlier version during a rolling upgrade in particular. Returns how
/// many of them the filter did not hold.
pub async fn reconcile(store: &Store, known: &KnownKeys, since: chrono::DateTime<chrono::Utc>) -> StoreResult<usize> {
    // Every id minted at or after `since` sorts after this one.
    let floor = crate::domain::key::key_id_floor(since.timestamp_millis());
    let mut new = 0;
    for (_, hash) in store.keys_minted_after(&floor, RECONCILE_BUDGET).await? {
        if let Some(digest) = KeyDigest::from_hex(&hash) {
            new += usize::from(known.may_hold(&digest) == Some(false));
            known.add(&digest);
        }
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u64) -> KeyDigest {
        KeyDigest::of(&format!("key-{n}"))
    }

    #[test]
    fn every_added_digest_is_held_across_growth() {
        let mut filter = DigestFilter::with_capacity(0);
        for n in 0..300_000 {
            filter.insert(&digest(n));
        }
        assert!(filter.layers.len() >= 3, "65 536 then 131 072 then 262 144: {}", filter.layers.len());
        assert!((0..300_000).all(|n| filter.contains(&digest(n))));
    }

    #[test]
    fn few_digests_not_added_are_taken_for_held() {
        let mut filter = DigestFilter::with_capacity(100_000);
        for n in 0..100_000 {
            filter.insert(&digest(n));
        }
        let maybe = (1_000_000..1_100_000).filter(|&n| filter.contains(&digest(n))).count();
        // 10 bits and 7 probes per key in one 512-bit block: about 1%.
        assert!(maybe < 2_000, "{maybe} of 100 000 unknown digests taken for held");
        assert!(filter.bytes() <= 100_000 * 10 / 8 + 64, "{} bytes", filter.bytes());
    }

    #[test]
    fn adding_a_held_digest_again_does_not_fill_the_filter() {
        let mut filter = DigestFilter::with_capacity(0);
        for _ in 0..200_000 {
            filter.insert(&digest(1));
        }
        assert_eq!(filter.layers.len(), 1);
    }

    #[tokio::test]
    async fn an_unknown_digest_is_absent_only_after_a_poll_that_began_later() {
        let known = std::sync::Arc::new(KnownKeys::new());
        known.set_poll_interval(Duration::from_secs(10));
        // Not built: everything may exist, at once.
        assert!(known.may_exist(&digest(1)).await);
        known.install(known.begin_build().unwrap(), DigestFilter::with_capacity(0));
        let poll = known.poll_begins();
        let waiting = tokio::spawn({
            let known = known.clone();
            async move { known.may_exist(&digest(1)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A poll that began before the Check does not answer it.
        known.poll_applied(poll);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        // The key was created elsewhere; the next poll brings it.
        let poll = known.poll_begins();
        known.add(&digest(1));
        known.poll_applied(poll);
        assert!(waiting.await.unwrap(), "a key the feed brought must not be unknown");

        let poll = known.poll_begins();
        let waiting = tokio::spawn({
            let known = known.clone();
            async move { known.may_exist(&digest(2)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = poll;
        let poll = known.poll_begins();
        known.poll_applied(poll);
        assert!(!waiting.await.unwrap());
    }

    #[test]
    fn digests_added_during_a_build_are_in_the_filter_it_installs() {
        let known = KnownKeys::new();
        let first = known.begin_build().unwrap();
        assert_eq!(known.begin_build(), None, "one build at a time");
        // The scan has passed these.
        known.add(&digest(1));
        let mut scanned = DigestFilter::with_capacity(0);
        scanned.insert(&digest(2));
        known.install(first, scanned);
        assert_eq!(known.may_hold(&digest(1)), Some(true));
        assert_eq!(known.may_hold(&digest(2)), Some(true));

        // A rebuild: the filter in place keeps answering, and both get what is added meanwhile.
        let second = known.begin_build().unwrap();
        known.add(&digest(3));
        assert_eq!(known.may_hold(&digest(3)), Some(true));
        known.install(second, DigestFilter::with_capacity(0));
        assert_eq!(known.may_hold(&digest(3)), Some(true));
        assert_eq!(known.may_hold(&digest(1)), Some(false), "the new filter is the new scan's");

        // A build overtaken by forget() is not installed: it may lack what was missed.
        let third = known.begin_build().unwrap();
        known.forget();
        known.install(third, DigestFilter::with_capacity(0));
        assert!(!known.is_built());
        let fourth = known.begin_build().unwrap();
        known.build_failed(fourth);
        assert!(known.begin_build().is_some(), "a failed build lets another begin");
    }

    #[test]
    fn no_digest_is_lost_to_an_install_racing_with_it() {
        let known = std::sync::Arc::new(KnownKeys::new());
        for round in 0..200u64 {
            let number = known.begin_build().unwrap();
            let adding = std::thread::spawn({
                let known = known.clone();
                move || (0..500).for_each(|n| known.add(&digest(round * 1_000 + n)))
            });
            for _ in 0..round % 50 {
                std::thread::yield_now();
            }
            known.install(number, DigestFilter::with_capacity(0));
            adding.join().unwrap();
            let lost = (0..500).filter(|n| known.may_hold(&digest(round * 1_000 + n)) != Some(true)).count();
            assert_eq!(lost, 0, "round {round}: digests added while the build was installed were lost");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_poll_the_store_decides() {
        let known = KnownKeys::new();
        known.set_poll_interval(Duration::from_millis(100));
        known.install(known.begin_build().unwrap(), DigestFilter::with_capacity(0));
        // The feed cannot be read: no poll is ever applied.
        assert!(known.may_exist(&digest(3)).await);
        known.forget();
        assert!(!known.is_built());
        assert!(known.may_exist(&digest(3)).await);
    }
}
