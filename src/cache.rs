//! The decision cache: everything Check needs, held in memory in front of the store.
//!
//! Three entry sets, each invalidated on its own by the admin calls that change it: keys by
//! hash, tenants by id, site owners by site id. Tenants and site owners are held in moka
//! caches; keys, the set that grows to millions, in keygate's own `KeyTable` (about 70 bytes
//! per entry where moka spends 370), as compact [`CachedKey`] records. A miss for one entry
//! makes one store query however many Checks wait for it. A key missing from the cache is
//! looked up only if the known-keys filter ([`KnownKeys`]) may hold it, so a made-up key costs
//! no query. "Does not exist" is cached too, for a shorter time and in a separate, bounded set,
//! so a repeated unknown id costs no query and a flood of unknown ids cannot push known entries
//! out.
//!
//! An invalidation always wins against a load that raced with it: every loaded entry remembers
//! the invalidation generation at which its store read began, every invalidation records its
//! generation per id, and an entry older than the last invalidation of its id is never served.
//!
//! A found entry past its TTL is served stale while one background read refreshes it
//! (stale-while-revalidate), for as long as the stale window lasts: no Check of a cached key
//! ever waits on the store, and while the store is down cached keys keep being answered at
//! once. Past the stale window an entry is gone, and its next Check fails closed if the store
//! cannot answer.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use metrics::Counter;
use moka::sync::Cache;
use tokio::sync::OnceCell;

use crate::domain::cached_key::CachedKey;
use crate::domain::key::KeyDigest;
use crate::domain::model::{KeyRecord, Tenant};
use crate::known::KnownKeys;
use crate::store::{ChangeTarget, StoreError};

/// Sizes and lifetimes of the cache.
#[derive(Clone, Debug)]
pub struct CacheSettings {
    /// Most found entries in each of the three sets.
    pub capacity: u64,
    /// How long a found key, tenant or site is served before it is read again.
    pub ttl: Duration,
    /// How long "no such key, tenant or site" stays cached.
    pub negative_ttl: Duration,
    /// How long past `ttl` a found entry is still served while a background read refreshes it
    /// (and while the store cannot be reached).
    pub stale_window: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            stale_window: Duration::from_secs(300),
        }
    }
}

impl CacheSettings {
    /// How long a found entry is kept: the TTL and the stale window.
    fn kept(&self) -> Duration {
        self.ttl + self.stale_window
    }
}

/// One read of the store: `Ok(None)` when the entry does not exist.
pub type Load<T> = Pin<Box<dyn Future<Output = Result<Option<T>, StoreError>> + Send>>;

/// Where the cache reads what it does not hold (the store, through the lookup bound).
pub trait Source: Send + Sync + 'static {
    /// The key whose SHA-256 is `key_hash` (64 lowercase hex digits).
    fn key(&self, key_hash: &str) -> Load<KeyRecord>;
    fn tenant(&self, tenant_id: &str) -> Load<Tenant>;
    fn site_owner(&self, site_id: &str) -> Load<String>;
}

/// Hashes cache ids: foldhash, seeded at random per cache, so that nobody can choose ids that
/// collide.
type Hasher = foldhash::fast::RandomState;

/// A found value, the generation at which its store read began, and whether it has been
/// checked against the invalidations recorded after it was stored.
struct Loaded<V> {
    value: V,
    generation: u64,
    /// When the store read ended, in nanoseconds since [`epoch`] (8 bytes where an `Instant`
    /// takes 16: one per cached key).
    loaded_at: u64,
    /// Set once a lookup found no invalidation of its id newer than `generation` while the
    /// entry was stored: every later invalidation removes the entry itself, so the
    /// invalidation record need not be read again.
    verified: AtomicBool,
    /// Set by every hit of a [`KeyTable`] entry, cleared when eviction passes it over.
    touched: AtomicBool,
}

/// The instant entries' load times count from: the first time one is asked for.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `at` in nanoseconds since [`epoch`] (0 before it; 584 years fit).
fn since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

impl<V> Loaded<V> {
    /// How long before `now` the entry was loaded (zero if after it).
    fn age(&self, now: Instant) -> Duration {
        Duration::from_nanos(since_epoch(now).saturating_sub(self.loaded_at))
    }

    fn new(value: V, generation: u64) -> Self {
        Self {
            value,
            generation,
            loaded_at: since_epoch(Instant::now()),
            verified: AtomicBool::new(false),
            touched: AtomicBool::new(false),
        }
    }
}

/// How an entry set is looked up: `str` ids (tenants, sites) or key digests.
pub trait Id:
    Hash + Eq + ToOwned<Owned: Borrow<Self> + Hash + Eq + Clone + Send + Sync + 'static> + Send + Sync + 'static
{
    /// The id as the store looks it up: itself, or a key digest as its hex hash.
    fn load_id(&self) -> std::borrow::Cow<'_, str>;
}

impl Id for str {
    fn load_id(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Borrowed(self)
    }
}

impl Id for KeyDigest {
    fn load_id(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Owned(self.to_hash().as_str().to_owned())
    }
}

/// What the cache holds.
pub trait Value: Send + Sync + 'static {}

impl<V: Send + Sync + 'static> Value for V {}

/// A value as the cache holds it, sharing the cache's own allocation (one per entry): derefs
/// to the value. Cheap to clone (an `Arc`).
pub struct Cached<V>(Arc<Loaded<V>>);

impl<V> Clone for Cached<V> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<V> std::ops::Deref for Cached<V> {
    type Target = V;

    fn deref(&self) -> &V {
        &self.0.value
    }
}

impl<V: std::fmt::Debug> std::fmt::Debug for Cached<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.value.fmt(f)
    }
}

/// Where an entry set keeps the values it found.
trait Found<I: Id + ?Sized, V>: Send + Sync {
    fn get(&self, id: &I) -> Option<Arc<Loaded<V>>>;
    fn insert(&self, id: I::Owned, loaded: Arc<Loaded<V>>);
    fn invalidate(&self, id: &I);
    fn invalidate_all(&self);
    /// Entries held (moka's once its expired ones are dropped).
    fn entry_count(&self) -> u64;
}

/// Tenants and site owners, a few per tenant: moka, bounded by TinyLFU.
type Moka<I, V> = Cache<<I as ToOwned>::Owned, Arc<Loaded<V>>, Hasher>;

impl<I: Id + ?Sized, V: Value> Found<I, V> for Moka<I, V> {
    fn get(&self, id: &I) -> Option<Arc<Loaded<V>>> {
        Cache::get(self, id)
    }

    fn insert(&self, id: I::Owned, loaded: Arc<Loaded<V>>) {
        Cache::insert(self, id, loaded);
    }

    fn invalidate(&self, id: &I) {
        Cache::invalidate(self, id);
    }

    fn invalidate_all(&self) {
        Cache::invalidate_all(self);
    }

    fn entry_count(&self) -> u64 {
        self.run_pending_tasks();
        Cache::entry_count(self)
    }
}

/// A moka set of found entries of at most `capacity`, kept for `kept` (the TTL and the stale
/// window: the TTL is enforced on read), counting its evictions for room.
fn moka<I: Id + ?Sized, V: Value>(name: &'static str, capacity: u64, kept: Duration) -> Moka<I, V> {
    let evictions = metrics::counter!("keygate_cache_evictions_total", "cache" => name);
    let evicted = move |_: Arc<I::Owned>, _: Arc<Loaded<V>>, cause: moka::notification::RemovalCause| {
        if cause == moka::notification::RemovalCause::Size {
            evictions.increment(1);
        }
    };
    Cache::builder()
        .max_capacity(capacity)
        .time_to_live(kept)
        .eviction_listener(evicted)
        .build_with_hasher(Hasher::default())
}

/// The found keys, the one set that grows to millions of entries: a hash table split into
/// shards behind their own locks, about 70 bytes per entry beside the entry itself (moka
/// spends about 370: its access and write orders, its frequency sketch and its timers).
///
/// The table holds at most its capacity: inserts into different shards that race can leave it
/// a few over (at most one per shard), and the next inserts take it back down. A new key in a full table makes room in its own shard with a
/// sampled CLOCK: of [`EVICTION_SAMPLES`] entries drawn at random, one past the TTL and stale
/// window goes, else the first not read since eviction last passed it over (each one passed
/// over loses its mark), else the last one drawn. Entries past the stale window are also
/// dropped when read.
struct KeyTable<V> {
    shards: Box<[RwLock<Shard<V>>]>,
    /// Picks a key's shard; seeded at random, like the shards' own tables.
    hasher: Hasher,
    capacity: usize,
    /// Entries in all shards, changed under the lock of the shard that changes.
    held: std::sync::atomic::AtomicUsize,
    kept: Duration,
    evictions: Counter,
}

/// How many entries a full [`KeyTable`] shard draws to pick one to evict.
const EVICTION_SAMPLES: usize = 8;

/// Shards of a [`KeyTable`] of at least 1 024 entries (one below that).
const KEY_SHARDS: usize = 64;

struct Shard<V> {
    entries: IndexMap<KeyDigest, Arc<Loaded<V>>, Hasher>,
    /// xorshift64 state: which entries eviction draws.
    draw: u64,
}

impl<V> Shard<V> {
    fn next_draw(&mut self) -> u64 {
        self.draw ^= self.draw << 13;
        self.draw ^= self.draw >> 7;
        self.draw ^= self.draw << 17;
        self.draw
    }

    /// Removes one entry (see [`KeyTable`]): `Some(true)` when it was removed for room,
    /// `Some(false)` when it was past its stale window, `None` when the shard is empty.
    fn evict_one(&mut self, now: Instant, kept: Duration) -> Option<bool> {
        let len = self.entries.len() as u64;
        if len == 0 {
            return None;
        }
        let (mut untouched, mut last) = (None, None);
        for _ in 0..EVICTION_SAMPLES {
            let index = (self.next_draw() % len) as usize;
            let Some((_, loaded)) = self.entries.get_index(index) else { break };
            if loaded.age(now) >= kept {
                self.entries.swap_remove_index(index);
                return Some(false);
            }
            last = Some(index);
            if untouched.is_none() && !loaded.touched.swap(false, Ordering::Relaxed) {
                untouched = Some(index);
            }
        }
        untouched.or(last).and_then(|index| self.entries.swap_remove_index(index)).map(|_| true)
    }
}

impl<V> KeyTable<V> {
    fn new(name: &'static str, capacity: u64, kept: Duration) -> Self {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX).max(1);
        let shards = if capacity >= 16 * KEY_SHARDS { KEY_SHARDS } else { 1 };
        let hasher = Hasher::default();
        let seeds = std::hash::BuildHasher::hash_one(&hasher, name);
        Self {
            shards: (0..shards as u64)
                .map(|shard| {
                    // xorshift needs a state other than 0.
                    let draw = (seeds ^ shard.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
                    RwLock::new(Shard { entries: IndexMap::with_hasher(Hasher::default()), draw })
                })
                .collect(),
            hasher,
            capacity,
            held: Default::default(),
            kept,
            evictions: metrics::counter!("keygate_cache_evictions_total", "cache" => name),
        }
    }

    fn shard(&self, id: &KeyDigest) -> &RwLock<Shard<V>> {
        let hash = std::hash::BuildHasher::hash_one(&self.hasher, id);
        &self.shards[(hash >> 32) as usize % self.shards.len()]
    }

    fn read(lock: &RwLock<Shard<V>>) -> std::sync::RwLockReadGuard<'_, Shard<V>> {
        lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(lock: &RwLock<Shard<V>>) -> std::sync::RwLockWriteGuard<'_, Shard<V>> {
        lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<V: Value> Found<KeyDigest, V> for KeyTable<V> {
    fn get(&self, id: &KeyDigest) -> Option<Arc<Loaded<V>>> {
        let loaded = Self::read(self.shard(id)).entries.get(id).cloned()?;
        // Written only when it changes, so that hits of one key on several cores do not
        // contend for its cache line.
        if !loaded.touched.load(Ordering::Relaxed) {
            loaded.touched.store(true, Ordering::Relaxed);
        }
        Some(loaded)
    }

    fn insert(&self, id: KeyDigest, loaded: Arc<Loaded<V>>) {
        let mut shard = Self::write(self.shard(&id));
        if !shard.entries.contains_key(&id) {
            // One out for the one coming in, and one more while racing inserts (or an insert
            // into an empty shard of a full table) have left the table over its capacity.
            for _ in 0..2 {
                if self.held.load(Ordering::Relaxed) < self.capacity {
                    break;
                }
                let Some(for_room) = shard.evict_one(Instant::now(), self.kept) else { break };
                self.held.fetch_sub(1, Ordering::Relaxed);
                if for_room {
                    self.evictions.increment(1);
                }
            }
        }
        if shard.entries.insert(id, loaded).is_none() {
            self.held.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn invalidate(&self, id: &KeyDigest) {
        // The count changes under the shard's lock, as every change of it does.
        let mut shard = Self::write(self.shard(id));
        if shard.entries.swap_remove(id).is_some() {
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn invalidate_all(&self) {
        for shard in &self.shards {
            let mut shard = Self::write(shard);
            self.held.fetch_sub(shard.entries.len(), Ordering::Relaxed);
            // The memory goes too: a table emptied after a change feed gap starts small again.
            shard.entries = IndexMap::with_hasher(Hasher::default());
        }
    }

    /// Entries held, those past their stale window included until they are met: read without
    /// a lock (every metrics scrape asks).
    fn entry_count(&self) -> u64 {
        self.held.load(Ordering::Relaxed) as u64
    }
}

/// Cache hit and miss counters of one entry set, resolved once.
struct EntryMetrics {
    hits: Counter,
    stale_hits: Counter,
    misses: Counter,
}

/// One set of entries: found values, known absences, and the last invalidation of each id.
struct Entries<I: Id + ?Sized, V> {
    /// The cache's name in metrics: `keys`, `tenants` or `sites`.
    name: &'static str,
    load: fn(&dyn Source, &str) -> Load<V>,
    found: Box<dyn Found<I, V>>,
    /// Store reads under way, one per id however many Checks wait for it.
    loading: Mutex<std::collections::HashMap<I::Owned, Arc<Loading<V>>, Hasher>>,
    /// Ids whose background refresh is under way, so that one runs at a time.
    refreshing: Mutex<HashSet<I::Owned>>,
    absent: Cache<I::Owned, u64, Hasher>,
    invalidated: Cache<I::Owned, u64, Hasher>,
    ttl: Duration,
    stale_window: Duration,
    metrics: EntryMetrics,
}

impl<I: Id + ?Sized, V: Value> Entries<I, V> {
    /// An empty set that keeps what it finds in `found`.
    fn new(
        name: &'static str,
        settings: &CacheSettings,
        load: fn(&dyn Source, &str) -> Load<V>,
        found: Box<dyn Found<I, V>>,
    ) -> Self {
        let longest = settings.kept().max(settings.negative_ttl) + Duration::from_secs(1);
        Self {
            name,
            load,
            found,
            loading: Mutex::default(),
            refreshing: Mutex::default(),
            absent: Cache::builder()
                .max_capacity((settings.capacity / 4).max(1_000))
                .time_to_live(settings.negative_ttl)
                .build_with_hasher(Hasher::default()),
            // Outlives every entry it may have to overrule.
            invalidated: Cache::builder()
                .max_capacity(settings.capacity)
                .time_to_live(longest)
                .build_with_hasher(Hasher::default()),
            ttl: settings.ttl,
            stale_window: settings.stale_window,
            metrics: EntryMetrics {
                hits: metrics::counter!("keygate_cache_hits_total", "cache" => name),
                stale_hits: metrics::counter!("keygate_cache_stale_hits_total", "cache" => name),
                misses: metrics::counter!("keygate_cache_misses_total", "cache" => name),
            },
        }
    }

    fn clear(&self) {
        self.found.invalidate_all();
        self.absent.invalidate_all();
    }

    /// The set's name and how many entries it holds (found and absent).
    fn size(&self) -> (&'static str, u64) {
        self.absent.run_pending_tasks();
        (self.name, self.found.entry_count() + self.absent.entry_count())
    }

    /// Claims the background refresh of `id`; false when one is under way already.
    fn claim_refresh(&self, id: &I) -> bool {
        let mut refreshing = self.refreshing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        !refreshing.contains(id) && refreshing.insert(id.to_owned())
    }

    fn release_refresh(&self, id: &I) {
        self.refreshing.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(id);
    }

    fn read(&self, source: &dyn Source, id: &I) -> Load<V> {
        (self.load)(source, &id.load_id())
    }

    /// Runs `load` for `id` unless a read of `id` is under way already, in which case this waits
    /// for that one: a miss makes one store read however many Checks wait for it. A found
    /// entry is stored; neither an absence nor an error is (the caller decides). The read
    /// outlives a cancelled caller only while another waits for it, and leaves nothing behind.
    async fn load_once<F>(&self, id: &I, load: impl FnOnce() -> F) -> Result<Arc<Loaded<V>>, Miss>
    where
        F: Future<Output = Result<Arc<Loaded<V>>, Miss>>,
    {
        let lock = || self.loading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let cell = lock().entry(id.to_owned()).or_default().clone();
        let waiting = Waiting { entries: self, id, cell };
        let result = waiting
            .cell
            .get_or_init(|| async {
                let result = load().await;
                if let Ok(loaded) = &result {
                    self.found.insert(id.to_owned(), loaded.clone());
                }
                result
            })
            .await
            .clone();
        drop(waiting);
        result
    }
}

/// One store read of an id, shared by every Check that waits for it.
type Loading<V> = OnceCell<Result<Arc<Loaded<V>>, Miss>>;

/// A Check waiting for a [`Loading`] read. When it stops waiting (done, or cancelled), the read
/// is forgotten if it has finished or nobody else waits for it, so the next miss reads again
/// and abandoned reads cannot pile up.
struct Waiting<'a, I: Id + ?Sized, V> {
    entries: &'a Entries<I, V>,
    id: &'a I,
    cell: Arc<Loading<V>>,
}

impl<I: Id + ?Sized, V> Drop for Waiting<'_, I, V> {
    fn drop(&mut self) {
        let mut loading = self.entries.loading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(current) = loading.get(self.id) else { return };
        // The map's reference and this one: nobody else waits.
        if Arc::ptr_eq(current, &self.cell) && (self.cell.initialized() || Arc::strong_count(&self.cell) == 2) {
            loading.remove(self.id);
        }
    }
}

struct Inner {
    source: Arc<dyn Source>,
    keys: Entries<KeyDigest, CachedKey>,
    tenants: Entries<str, Arc<Tenant>>,
    site_owners: Entries<str, Arc<str>>,
    /// Which keys the store holds: a key missing from it is unknown without a query.
    known: KnownKeys,
    /// Counts invalidations; loads remember it so a racing invalidation can overrule them.
    generation: AtomicU64,
    /// The generation of the last [`invalidate_all`](DecisionCache::invalidate_all): older
    /// entries are stale.
    everything_invalidated_at: AtomicU64,
}

impl Inner {
    /// Whether something of `entries` read at `generation` predates the last invalidation of `id`.
    fn is_stale<I: Id + ?Sized, V: Value>(&self, entries: &Entries<I, V>, id: &I, generation: u64) -> bool {
        generation < self.everything_invalidated_at.load(Ordering::Acquire)
            || entries.invalidated.get(id).is_some_and(|invalidated_at| invalidated_at > generation)
    }

    /// Whether a stored entry predates an invalidation: the invalidation record is read until
    /// one lookup finds the entry current (see [`Loaded::verified`]).
    fn is_outdated<I: Id + ?Sized, V: Value>(&self, entries: &Entries<I, V>, id: &I, loaded: &Loaded<V>) -> bool {
        if loaded.verified.load(Ordering::Acquire) {
            return loaded.generation < self.everything_invalidated_at.load(Ordering::Acquire);
        }
        let outdated = self.is_stale(entries, id, loaded.generation);
        if !outdated {
            loaded.verified.store(true, Ordering::Release);
        }
        outdated
    }
}

/// The cached view of keys, tenants and site ownership. Cheap to clone: clones share one cache.
#[derive(Clone)]
pub struct DecisionCache(Arc<Inner>);

/// Which entry set of the cache an operation is about.
type Select<I, V> = fn(&Inner) -> &Entries<I, V>;

impl DecisionCache {
    /// An empty cache that reads from `source`. Its metrics series are resolved here: install
    /// the metrics recorder first.
    pub fn new(settings: &CacheSettings, source: Arc<dyn Source>) -> Self {
        Self(Arc::new(Inner {
            source,
            keys: Entries::new(
                "keys",
                settings,
                |source, id| {
                    let load = source.key(id);
                    Box::pin(async move { Ok(load.await?.map(|key| CachedKey::from(&key))) })
                },
                Box::new(KeyTable::new("keys", settings.capacity, settings.kept())),
            ),
            tenants: Entries::new(
                "tenants",
                settings,
                |source, id| {
                    let load = source.tenant(id);
                    Box::pin(async move { Ok(load.await?.map(Arc::new)) })
                },
                Box::new(moka::<str, _>("tenants", settings.capacity, settings.kept())),
            ),
            site_owners: Entries::new(
                "sites",
                settings,
                |source, id| {
                    let load = source.site_owner(id);
                    Box::pin(async move { Ok(load.await?.map(Arc::from)) })
                },
                Box::new(moka::<str, _>("sites", settings.capacity, settings.kept())),
            ),
            known: KnownKeys::new(),
            generation: AtomicU64::new(0),
            everything_invalidated_at: AtomicU64::new(0),
        }))
    }

    /// The key with this SHA-256, as of `now` (one clock reading serves a Check's lookups).
    /// A digest missing from the cache is looked up only if the known-keys filter may hold it
    /// (see [`KnownKeys::may_exist`]), so a made-up key costs no store query.
    pub async fn key(&self, digest: &KeyDigest, now: Instant) -> Result<Option<Cached<CachedKey>>, StoreError> {
        let select: Select<KeyDigest, CachedKey> = |inner| &inner.keys;
        if let Some(hit) = self.fresh(select, digest, now) {
            return Ok(Some(hit));
        }
        Box::pin(async move {
            if !self.0.known.may_exist(digest).await {
                return Ok(None);
            }
            self.get_slowly(select, digest, now).await
        })
        .await
    }

    /// Keys the store holds, as far as this replica knows: asked on every key missing from the
    /// cache, built and fed by the change feed's follower.
    pub fn known(&self) -> &KnownKeys {
        &self.0.known
    }

    /// The tenant with this id, as of `now`.
    pub async fn tenant(&self, tenant_id: &str, now: Instant) -> Result<Option<Arc<Tenant>>, StoreError> {
        Ok(self.get(|inner| &inner.tenants, tenant_id, now).await?.map(|tenant| Arc::clone(&tenant)))
    }

    /// The tenant that owns this site, as of `now`.
    pub async fn site_owner(&self, site_id: &str, now: Instant) -> Result<Option<Arc<str>>, StoreError> {
        Ok(self.get(|inner| &inner.site_owners, site_id, now).await?.map(|owner| Arc::clone(&owner)))
    }

    async fn get<I: Id + ?Sized, V: Value>(
        &self,
        select: Select<I, V>,
        id: &I,
        now: Instant,
    ) -> Result<Option<Cached<V>>, StoreError> {
        // Anything but a fresh hit takes the slow path, boxed so that a Check's future stays
        // small.
        match self.fresh(select, id, now) {
            Some(hit) => Ok(Some(hit)),
            None => Box::pin(self.get_slowly(select, id, now)).await,
        }
    }

    /// The hot path: a fresh entry already checked against invalidations.
    fn fresh<I: Id + ?Sized, V: Value>(&self, select: Select<I, V>, id: &I, now: Instant) -> Option<Cached<V>> {
        let inner = &*self.0;
        let entries = select(inner);
        let loaded = entries.found.get(id)?;
        if loaded.verified.load(Ordering::Acquire)
            && loaded.generation >= inner.everything_invalidated_at.load(Ordering::Acquire)
            && loaded.age(now) < entries.ttl
        {
            entries.metrics.hits.increment(1);
            return Some(Cached(loaded));
        }
        None
    }

    /// [`get`](Self::get) past its hot path: stale, unverified, absent or missing entries.
    async fn get_slowly<I: Id + ?Sized, V: Value>(
        &self,
        select: Select<I, V>,
        id: &I,
        now: Instant,
    ) -> Result<Option<Cached<V>>, StoreError> {
        let inner = &*self.0;
        let entries = select(inner);
        let load = || entries.read(&*inner.source, id);
        // Invalidations are rare (admin calls), so a few rounds always settle.
        for _ in 0..3 {
            if let Some(loaded) = entries.found.get(id) {
                let age = loaded.age(now);
                if inner.is_outdated(entries, id, &loaded) {
                    entries.found.invalidate(id);
                } else if age < entries.ttl {
                    entries.metrics.hits.increment(1);
                    return Ok(Some(Cached(loaded)));
                } else if age < entries.ttl + entries.stale_window {
                    entries.metrics.stale_hits.increment(1);
                    self.refresh_in_background(select, id);
                    return Ok(Some(Cached(loaded)));
                } else {
                    entries.found.invalidate(id);
                }
            }
            if let Some(generation) = entries.absent.get(id) {
                if !inner.is_stale(entries, id, generation) {
                    entries.metrics.hits.increment(1);
                    return Ok(None);
                }
                entries.absent.invalidate(id);
            }
            entries.metrics.misses.increment(1);
            let generation = inner.generation.load(Ordering::Acquire);
            let loaded = entries.load_once(id, || load_entry(load(), generation)).await;
            match loaded {
                Ok(loaded) if !inner.is_outdated(entries, id, &loaded) => return Ok(Some(Cached(loaded))),
                Ok(_) => entries.found.invalidate(id),
                Err(miss) => match &miss {
                    Miss::Store(error) => return Err(error.clone()),
                    Miss::Absent if !inner.is_stale(entries, id, generation) => {
                        entries.absent.insert(id.to_owned(), generation);
                        return Ok(None);
                    }
                    Miss::Absent => {}
                },
            }
        }
        // Not stored: its generation is never compared.
        Ok(load().await?.map(|value| Cached(Arc::new(Loaded::new(value, 0)))))
    }

    /// Reads an entry past its TTL again, in the background; until that read succeeds, the
    /// old value is served. One refresh per id at a time; a failed one leaves the entry as it
    /// is (the next Check past the TTL tries again).
    fn refresh_in_background<I: Id + ?Sized, V: Value>(&self, select: Select<I, V>, id: &I) {
        if !select(&self.0).claim_refresh(id) {
            return;
        }
        let (inner, id) = (self.0.clone(), id.to_owned());
        tokio::spawn(async move {
            let entries = select(&inner);
            let generation = inner.generation.load(Ordering::Acquire);
            match entries.read(&*inner.source, id.borrow()).await {
                Ok(Some(value)) => {
                    entries.found.insert(id.clone(), Arc::new(Loaded::new(value, generation)));
                    // An invalidation that raced with the read wins.
                    if inner.is_stale(entries, id.borrow(), generation) {
                        entries.found.invalidate(id.borrow());
                    }
                }
                Ok(None) => {
                    entries.found.invalidate(id.borrow());
                    if !inner.is_stale(entries, id.borrow(), generation) {
                        entries.absent.insert(id.clone(), generation);
                    }
                }
                Err(_) => {}
            }
            entries.release_refresh(id.borrow());
        });
    }

    fn invalidate<I: Id + ?Sized, V: Value>(
        &self,
        select: Select<I, V>,
        id: &I,
    ) -> impl Future<Output = ()> + use<I, V> {
        let inner = self.0.clone();
        let id = id.to_owned();
        async move {
            let entries = select(&inner);
            let generation = inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
            entries.invalidated.insert(id.clone(), generation);
            entries.found.invalidate(id.borrow());
            entries.absent.invalidate(id.borrow());
        }
    }

    /// Entries held per cache (found and absent), once expired ones are dropped.
    pub async fn sizes(&self) -> [(&'static str, u64); 3] {
        let inner = &*self.0;
        [inner.keys.size(), inner.tenants.size(), inner.site_owners.size()]
    }

    /// Drops everything, for a replica that may have missed changes.
    pub fn invalidate_all(&self) {
        let inner = &*self.0;
        let generation = inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        inner.everything_invalidated_at.store(generation, Ordering::Release);
        // Changes may have been missed: keys too, until the follower builds the filter again.
        inner.known.forget();
        inner.keys.clear();
        inner.tenants.clear();
        inner.site_owners.clear();
    }

    /// Drops what a change of the feed touched.
    pub async fn apply(&self, target: &ChangeTarget) {
        match target {
            ChangeTarget::Key(hash) => self.invalidate_key(hash).await,
            ChangeTarget::Tenant(tenant_id) => self.invalidate_tenant(tenant_id).await,
            ChangeTarget::Site(site_id) => self.invalidate_site(site_id).await,
            // Shapes are not cached entries: the feed's follower reloads them.
            ChangeTarget::KeyFormat(_) => {}
            ChangeTarget::Unknown(_) => self.invalidate_all(),
        }
    }

    /// Drops a key (by its hex hash) after CreateKey, RevokeKey, RotateKey, UpdateKey or
    /// ImportKeys, and records it in the known-keys filter. A hash that is not
    /// 64 hex digits drops every entry: keygate never writes one, so something is wrong.
    pub async fn invalidate_key(&self, key_hash: &str) {
        match KeyDigest::from_hex(key_hash) {
            Some(digest) => {
                // Created, rotated in, imported or changed: stored, in any case.
                self.0.known.add(&digest);
                self.invalidate(|inner| &inner.keys, &digest).await
            }
            None => self.invalidate_all(),
        }
    }

    /// Drops a tenant after PutTenant.
    pub async fn invalidate_tenant(&self, tenant_id: &str) {
        self.invalidate(|inner| &inner.tenants, tenant_id).await;
    }

    /// Drops a site's owner after PutSite or DeleteSite.
    pub async fn invalidate_site(&self, site_id: &str) {
        self.invalidate(|inner| &inner.site_owners, site_id).await;
    }
}

/// Why a load produced no entry.
#[derive(Clone, Debug)]
enum Miss {
    Absent,
    Store(StoreError),
}

/// Reads an entry from the store, remembering the generation at which the read began.
async fn load_entry<V>(load: Load<V>, generation: u64) -> Result<Arc<Loaded<V>>, Miss> {
    match load.await {
        Ok(Some(value)) => Ok(Arc::new(Loaded::new(value, generation))),
        Ok(None) => Err(Miss::Absent),
        Err(error) => Err(Miss::Store(error)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;

    use tokio::sync::oneshot;

    use super::*;

    /// Site owners as a test store: what each read answers, how many reads there were, and a
    /// gate that can hold the next read until released.
    #[derive(Default)]
    struct Sites {
        owners: Mutex<HashMap<&'static str, Result<Option<String>, StoreError>>>,
        reads: AtomicUsize,
        gate: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
    }

    impl Sites {
        fn set(&self, site: &'static str, owner: Result<Option<&str>, StoreError>) {
            self.owners.lock().unwrap().insert(site, owner.map(|owner| owner.map(str::to_owned)));
        }
    }

    struct Source(Arc<Sites>);

    impl super::Source for Source {
        fn key(&self, _: &str) -> Load<KeyRecord> {
            Box::pin(async { Ok(None) })
        }

        fn tenant(&self, _: &str) -> Load<Tenant> {
            Box::pin(async { Ok(None) })
        }

        fn site_owner(&self, site_id: &str) -> Load<String> {
            let sites = self.0.clone();
            // What the store holds when the read begins.
            let answer = sites.owners.lock().unwrap().get(site_id).cloned().unwrap_or(Ok(None));
            let gate = sites.gate.lock().unwrap().take();
            Box::pin(async move {
                sites.reads.fetch_add(1, Ordering::SeqCst);
                if let Some((started, release)) = gate {
                    let _ = started.send(());
                    let _ = release.await;
                }
                answer
            })
        }
    }

    fn cache_with(settings: CacheSettings) -> (DecisionCache, Arc<Sites>) {
        let sites = Arc::new(Sites::default());
        (DecisionCache::new(&settings, Arc::new(Source(sites.clone()))), sites)
    }

    fn down() -> StoreError {
        StoreError::Unreachable("down".into())
    }

    fn digest(index: u32) -> KeyDigest {
        KeyDigest::of(&index.to_string())
    }

    fn loaded(index: u32) -> Arc<Loaded<u32>> {
        Arc::new(Loaded::new(index, 0))
    }

    #[test]
    fn a_full_key_table_keeps_to_its_capacity_and_keeps_the_keys_in_use() {
        let table = KeyTable::<u32>::new("keys", 8_192, Duration::from_secs(60));
        let read = |index: u32| table.get(&digest(index)).map(|loaded| loaded.value);
        for index in 0..4_096 {
            table.insert(digest(index), loaded(index));
        }
        // While keys 0..2 048 are in use, 8 192 keys come and go once each (a scan, or a flood
        // of keys that are each Checked once) and keys 2 048..4 096 are never read again.
        for index in 4_096..12_288 {
            if index % 64 == 0 {
                for in_use in 0..2_048 {
                    read(in_use);
                }
            }
            table.insert(digest(index), loaded(index));
        }
        let held = table.entry_count();
        assert!((8_192..=8_192 + KEY_SHARDS as u64).contains(&held), "{held} entries");
        let kept_in_use = (0..2_048).filter(|index| read(*index) == Some(*index)).count();
        let kept_idle = (2_048..4_096).filter(|index| read(*index) == Some(*index)).count();
        assert!(kept_in_use > 1_900, "{kept_in_use} of the 2 048 keys in use kept");
        // The idle ones fare as the passing ones do: about 6 144 of the 10 240 never read since.
        assert!(kept_idle < 1_500, "{kept_idle} of the 2 048 idle keys kept");
    }

    #[test]
    fn a_key_table_makes_room_with_entries_past_their_time_first() {
        let table = KeyTable::<u32>::new("keys", 8, Duration::from_millis(30));
        for index in 0..6 {
            table.insert(digest(index), loaded(index));
        }
        std::thread::sleep(Duration::from_millis(40));
        // Two current entries, never read: eviction's first choice but for expired ones.
        for index in 6..9 {
            table.insert(digest(index), loaded(index));
        }
        assert_eq!(table.entry_count(), 8);
        for index in 6..9 {
            assert_eq!(table.get(&digest(index)).map(|loaded| loaded.value), Some(index));
        }
    }

    #[test]
    fn a_working_set_as_large_as_the_capacity_fits() {
        for capacity in [1_000, 1_024, 10_000] {
            let table = KeyTable::<u32>::new("keys", capacity, Duration::from_secs(60));
            for index in 0..capacity as u32 {
                table.insert(digest(index), loaded(index));
            }
            let kept = (0..capacity as u32).filter(|index| table.get(&digest(*index)).is_some()).count();
            assert_eq!(kept as u64, capacity);
            table.insert(digest(u32::MAX), loaded(0));
            assert_eq!(table.entry_count(), capacity, "one in, one out");
        }
    }

    #[test]
    fn a_key_table_over_its_capacity_comes_back_down() {
        let table = KeyTable::<u32>::new("keys", 2_048, Duration::from_secs(60));
        std::thread::scope(|scope| {
            for thread in 0..8 {
                let table = &table;
                scope.spawn(move || {
                    for index in 0..2_000 {
                        table.insert(digest(thread * 10_000 + index), loaded(index));
                    }
                });
            }
        });
        assert!(table.entry_count() <= 2_048 + 64, "{} entries", table.entry_count());
        for index in 0..200 {
            table.insert(digest(1_000_000 + index), loaded(index));
        }
        assert_eq!(table.entry_count(), 2_048, "later inserts take the overshoot back");
    }

    #[test]
    fn a_key_table_forgets_what_is_invalidated() {
        let table = KeyTable::<u32>::new("keys", 100_000, Duration::from_secs(60));
        for index in 0..1_000 {
            table.insert(digest(index), loaded(index));
        }
        table.invalidate(&digest(7));
        assert!(table.get(&digest(7)).is_none());
        assert_eq!(table.entry_count(), 999);
        table.insert(digest(7), loaded(70));
        assert_eq!(table.get(&digest(7)).map(|loaded| loaded.value), Some(70), "replaced, not duplicated");
        table.invalidate_all();
        assert_eq!(table.entry_count(), 0);
    }

    #[tokio::test]
    async fn found_and_absent_entries_are_served_without_loading_again() {
        let (cache, sites) = cache_with(CacheSettings::default());
        sites.set("s1", Ok(Some("acme")));
        for _ in 0..3 {
            assert_eq!(cache.site_owner("s1", Instant::now()).await.unwrap().as_deref(), Some("acme"));
            assert_eq!(cache.site_owner("s2", Instant::now()).await.unwrap(), None);
        }
        assert_eq!(sites.reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_invalidation_during_a_load_wins() {
        let (cache, sites) = cache_with(CacheSettings::default());
        sites.set("s1", Ok(Some("old-owner")));
        let (started_tx, started_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        *sites.gate.lock().unwrap() = Some((started_tx, release_rx));
        let slow = tokio::spawn({
            let cache = cache.clone();
            async move { cache.site_owner("s1", Instant::now()).await }
        });
        started_rx.await.unwrap();
        // The admin change commits while the first read, which saw the old owner, is stalled.
        sites.set("s1", Ok(Some("new-owner")));
        cache.invalidate_site("s1").await;
        release_tx.send(()).unwrap();
        assert_eq!(slow.await.unwrap().unwrap().as_deref(), Some("new-owner"), "the racing load read again");
        assert_eq!(
            cache.site_owner("s1", Instant::now()).await.unwrap().as_deref(),
            Some("new-owner"),
            "a value read before an invalidation is never served after it"
        );
    }

    #[tokio::test]
    async fn past_the_ttl_an_entry_is_served_at_once_while_a_background_read_refreshes_it() {
        let settings = CacheSettings { ttl: Duration::from_millis(50), ..CacheSettings::default() };
        let (cache, sites) = cache_with(settings);
        sites.set("s1", Ok(Some("acme")));
        cache.site_owner("s1", Instant::now()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;

        // A store that never answers holds no Check of a cached entry.
        sites.set("s1", Ok(Some("globex")));
        let (started_tx, started_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        *sites.gate.lock().unwrap() = Some((started_tx, release_rx));
        let served = tokio::time::timeout(Duration::from_secs(1), cache.site_owner("s1", Instant::now())).await;
        assert_eq!(served.expect("answered without waiting").unwrap().as_deref(), Some("acme"));
        started_rx.await.unwrap();
        assert_eq!(
            cache.site_owner("s1", Instant::now()).await.unwrap().as_deref(),
            Some("acme"),
            "one refresh at a time"
        );
        assert_eq!(sites.reads.load(Ordering::SeqCst), 2);

        // Once the refresh is answered, the new value is served.
        release_tx.send(()).unwrap();
        for _ in 0..100 {
            if cache.site_owner("s1", Instant::now()).await.unwrap().as_deref() == Some("globex") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the background refresh never landed");
    }

    #[tokio::test]
    async fn entries_are_served_through_the_stale_window_while_the_store_is_down_and_not_after() {
        for (stale_window, served) in [(Duration::from_secs(60), true), (Duration::ZERO, false)] {
            let settings = CacheSettings { ttl: Duration::from_millis(50), stale_window, ..CacheSettings::default() };
            let (cache, sites) = cache_with(settings);
            sites.set("s1", Ok(Some("acme")));
            cache.site_owner("s1", Instant::now()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(80)).await;
            sites.set("s1", Err(down()));
            for _ in 0..3 {
                let owner = cache.site_owner("s1", Instant::now()).await;
                assert_eq!(owner.is_ok(), served, "stale window {stale_window:?}: {owner:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    #[tokio::test]
    async fn checks_that_miss_together_share_one_read() {
        let (cache, sites) = cache_with(CacheSettings::default());
        sites.set("s1", Ok(Some("acme")));
        let (started_tx, started_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        *sites.gate.lock().unwrap() = Some((started_tx, release_rx));
        let waiting: Vec<_> = (0..5)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.site_owner("s1", Instant::now()).await })
            })
            .collect();
        started_rx.await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        release_tx.send(()).unwrap();
        for check in waiting {
            assert_eq!(check.await.unwrap().unwrap().as_deref(), Some("acme"));
        }
        assert_eq!(sites.reads.load(Ordering::SeqCst), 1);
        assert!(cache.0.site_owners.loading.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_read_every_waiter_gave_up_on_leaves_nothing_behind() {
        let (cache, sites) = cache_with(CacheSettings::default());
        sites.set("s1", Ok(Some("acme")));
        let (started_tx, _started_rx) = oneshot::channel();
        let (_release_tx, release_rx) = oneshot::channel();
        *sites.gate.lock().unwrap() = Some((started_tx, release_rx));
        // A client that goes away while its key is read (a flood of cancelled Checks).
        let gave_up = tokio::time::timeout(Duration::from_millis(20), cache.site_owner("s1", Instant::now())).await;
        assert!(gave_up.is_err());
        assert!(cache.0.site_owners.loading.lock().unwrap().is_empty(), "nothing left for nobody");
        assert_eq!(cache.site_owner("s1", Instant::now()).await.unwrap().as_deref(), Some("acme"), "read again");
    }

    #[tokio::test]
    async fn store_errors_are_not_cached() {
        let (cache, sites) = cache_with(CacheSettings::default());
        sites.set("s1", Err(down()));
        assert!(cache.site_owner("s1", Instant::now()).await.is_err());
        sites.set("s1", Ok(Some("acme")));
        assert_eq!(cache.site_owner("s1", Instant::now()).await.unwrap().as_deref(), Some("acme"));
    }
}
