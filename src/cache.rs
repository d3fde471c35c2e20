//! The decision cache: everything Check needs, held in moka caches in front of the store.
//!
//! Three entry sets, each invalidated on its own by the admin calls that change it: keys by
//! hash, tenants by id, site owners by site id. A miss for one entry makes one store query
//! however many Checks wait for it. "Does not exist" is cached too, for a shorter time and in a
//! separate, bounded set, so a repeated unknown key costs no query and a flood of unknown keys
//! cannot push known keys out.
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

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::future::Cache;

use crate::domain::model::{KeyRecord, Tenant};
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

/// One read of the store: `Ok(None)` when the entry does not exist.
pub type Load<T> = Pin<Box<dyn Future<Output = Result<Option<T>, StoreError>> + Send>>;

/// Where the cache reads what it does not hold (the store, through the lookup bound).
pub trait Source: Send + Sync + 'static {
    fn key(&self, key_hash: &str) -> Load<KeyRecord>;
    fn tenant(&self, tenant_id: &str) -> Load<Tenant>;
    fn site_owner(&self, site_id: &str) -> Load<String>;
}

/// A found value and the generation at which its store read began.
#[derive(Clone)]
struct Loaded<V> {
    value: V,
    generation: u64,
    loaded_at: Instant,
}

/// One set of entries: found values, known absences, and the last invalidation of each id.
struct Entries<V> {
    /// The cache's name in metrics: `keys`, `tenants` or `sites`.
    name: &'static str,
    load: fn(&dyn Source, &str) -> Load<V>,
    found: Cache<String, Loaded<V>>,
    /// Ids whose background refresh is under way, so that one runs at a time.
    refreshing: Mutex<HashSet<String>>,
    absent: Cache<String, u64>,
    invalidated: Cache<String, u64>,
    ttl: Duration,
    stale_window: Duration,
}

impl<V: Clone + Send + Sync + 'static> Entries<V> {
    fn new(name: &'static str, settings: &CacheSettings, load: fn(&dyn Source, &str) -> Load<V>) -> Self {
        let kept = settings.ttl + settings.stale_window;
        let longest = kept.max(settings.negative_ttl) + Duration::from_secs(1);
        let evicted = move |_: Arc<String>, _: Loaded<V>, cause: moka::notification::RemovalCause| {
            if cause == moka::notification::RemovalCause::Size {
                metrics::counter!("keygate_cache_evictions_total", "cache" => name).increment(1);
            }
        };
        Self {
            name,
            load,
            // Found entries are kept through the stale window; `ttl` is enforced on read.
            found: Cache::builder()
                .max_capacity(settings.capacity)
                .time_to_live(kept)
                .eviction_listener(evicted)
                .build(),
            refreshing: Mutex::default(),
            absent: Cache::builder()
                .max_capacity((settings.capacity / 4).max(1_000))
                .time_to_live(settings.negative_ttl)
                .build(),
            // Outlives every entry it may have to overrule.
            invalidated: Cache::builder().max_capacity(settings.capacity).time_to_live(longest).build(),
            ttl: settings.ttl,
            stale_window: settings.stale_window,
        }
    }

    fn clear(&self) {
        self.found.invalidate_all();
        self.absent.invalidate_all();
    }

    /// Claims the background refresh of `id`; false when one is under way already.
    fn claim_refresh(&self, id: &str) -> bool {
        let mut refreshing = self.refreshing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        !refreshing.contains(id) && refreshing.insert(id.to_owned())
    }

    fn release_refresh(&self, id: &str) {
        self.refreshing.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(id);
    }
}

struct Inner {
    source: Arc<dyn Source>,
    keys: Entries<Arc<KeyRecord>>,
    tenants: Entries<Arc<Tenant>>,
    site_owners: Entries<Arc<str>>,
    /// Counts invalidations; loads remember it so a racing invalidation can overrule them.
    generation: AtomicU64,
    /// The generation of the last [`invalidate_all`](DecisionCache::invalidate_all): older
    /// entries are stale.
    everything_invalidated_at: AtomicU64,
}

impl Inner {
    /// Whether something of `entries` read at `generation` predates the last invalidation of `id`.
    async fn is_stale<V: Clone + Send + Sync + 'static>(
        &self,
        entries: &Entries<V>,
        id: &str,
        generation: u64,
    ) -> bool {
        generation < self.everything_invalidated_at.load(Ordering::Acquire)
            || entries.invalidated.get(id).await.is_some_and(|invalidated_at| invalidated_at > generation)
    }
}

/// The cached view of keys, tenants and site ownership. Cheap to clone: clones share one cache.
#[derive(Clone)]
pub struct DecisionCache(Arc<Inner>);

/// Which entry set of the cache an operation is about.
type Select<V> = fn(&Inner) -> &Entries<V>;

impl DecisionCache {
    /// An empty cache that reads from `source`.
    pub fn new(settings: &CacheSettings, source: Arc<dyn Source>) -> Self {
        Self(Arc::new(Inner {
            source,
            keys: Entries::new("keys", settings, |source, id| {
                let load = source.key(id);
                Box::pin(async move { Ok(load.await?.map(Arc::new)) })
            }),
            tenants: Entries::new("tenants", settings, |source, id| {
                let load = source.tenant(id);
                Box::pin(async move { Ok(load.await?.map(Arc::new)) })
            }),
            site_owners: Entries::new("sites", settings, |source, id| {
                let load = source.site_owner(id);
                Box::pin(async move { Ok(load.await?.map(Arc::from)) })
            }),
            generation: AtomicU64::new(0),
            everything_invalidated_at: AtomicU64::new(0),
        }))
    }

    /// The key with this hash.
    pub async fn key(&self, key_hash: &str) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        self.get(|inner| &inner.keys, key_hash).await
    }

    /// The tenant with this id.
    pub async fn tenant(&self, tenant_id: &str) -> Result<Option<Arc<Tenant>>, StoreError> {
        self.get(|inner| &inner.tenants, tenant_id).await
    }

    /// The tenant that owns this site.
    pub async fn site_owner(&self, site_id: &str) -> Result<Option<Arc<str>>, StoreError> {
        self.get(|inner| &inner.site_owners, site_id).await
    }

    async fn get<V: Clone + Send + Sync + 'static>(
        &self,
        select: Select<V>,
        id: &str,
    ) -> Result<Option<V>, StoreError> {
        let inner = &*self.0;
        let entries = select(inner);
        let load = || (entries.load)(&*inner.source, id);
        // Invalidations are rare (admin calls), so a few rounds always settle.
        for _ in 0..3 {
            if let Some(loaded) = entries.found.get(id).await {
                let age = loaded.loaded_at.elapsed();
                if inner.is_stale(entries, id, loaded.generation).await {
                    entries.found.invalidate(id).await;
                } else if age < entries.ttl {
                    metrics::counter!("keygate_cache_hits_total", "cache" => entries.name).increment(1);
                    return Ok(Some(loaded.value));
                } else if age < entries.ttl + entries.stale_window {
                    metrics::counter!("keygate_cache_stale_hits_total", "cache" => entries.name).increment(1);
                    self.refresh_in_background(select, id);
                    return Ok(Some(loaded.value));
                } else {
                    entries.found.invalidate(id).await;
                }
            }
            if let Some(generation) = entries.absent.get(id).await {
                if !inner.is_stale(entries, id, generation).await {
                    metrics::counter!("keygate_cache_hits_total", "cache" => entries.name).increment(1);
                    return Ok(None);
                }
                entries.absent.invalidate(id).await;
            }
            metrics::counter!("keygate_cache_misses_total", "cache" => entries.name).increment(1);
            let generation = inner.generation.load(Ordering::Acquire);
            let loaded = entries.found.try_get_with_by_ref(id, load_entry(load(), generation)).await;
            match loaded {
                Ok(loaded) if !inner.is_stale(entries, id, loaded.generation).await => return Ok(Some(loaded.value)),
                Ok(_) => entries.found.invalidate(id).await,
                Err(miss) => match &*miss {
                    Miss::Store(error) => return Err(error.clone()),
                    Miss::Absent if !inner.is_stale(entries, id, generation).await => {
                        entries.absent.insert(id.to_owned(), generation).await;
                        return Ok(None);
                    }
                    Miss::Absent => {}
                },
            }
        }
        load().await
    }

    /// Reads an entry past its TTL again, in the background; until that read succeeds, the
    /// old value is served. One refresh per id at a time; a failed one leaves the entry as it
    /// is (the next Check past the TTL tries again).
    fn refresh_in_background<V: Clone + Send + Sync + 'static>(&self, select: Select<V>, id: &str) {
        if !select(&self.0).claim_refresh(id) {
            return;
        }
        let (inner, id) = (self.0.clone(), id.to_owned());
        tokio::spawn(async move {
            let entries = select(&inner);
            let generation = inner.generation.load(Ordering::Acquire);
            match (entries.load)(&*inner.source, &id).await {
                Ok(Some(value)) => {
                    entries.found.insert(id.clone(), Loaded { value, generation, loaded_at: Instant::now() }).await;
                    // An invalidation that raced with the read wins.
                    if inner.is_stale(entries, &id, generation).await {
                        entries.found.invalidate(&id).await;
                    }
                }
                Ok(None) => {
                    entries.found.invalidate(&id).await;
                    if !inner.is_stale(entries, &id, generation).await {
                        entries.absent.insert(id.clone(), generation).await;
                    }
                }
                Err(_) => {}
            }
            entries.release_refresh(&id);
        });
    }

    fn invalidate<V: Clone + Send + Sync + 'static>(&self, select: Select<V>, id: &str) -> impl Future<Output = ()> {
        let inner = self.0.clone();
        let id = id.to_owned();
        async move {
            let entries = select(&inner);
            let generation = inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
            entries.invalidated.insert(id.clone(), generation).await;
            entries.found.invalidate(&id).await;
            entries.absent.invalidate(&id).await;
        }
    }

    /// Entries held per cache (found and absent), once moka's pending bookkeeping is done.
    pub async fn sizes(&self) -> [(&'static str, u64); 3] {
        let inner = &*self.0;
        inner.keys.found.run_pending_tasks().await;
        inner.keys.absent.run_pending_tasks().await;
        inner.tenants.found.run_pending_tasks().await;
        inner.tenants.absent.run_pending_tasks().await;
        inner.site_owners.found.run_pending_tasks().await;
        inner.site_owners.absent.run_pending_tasks().await;
        let size = |found: u64, absent: u64| found + absent;
        [
            (inner.keys.name, size(inner.keys.found.entry_count(), inner.keys.absent.entry_count())),
            (inner.tenants.name, size(inner.tenants.found.entry_count(), inner.tenants.absent.entry_count())),
            (
                inner.site_owners.name,
                size(inner.site_owners.found.entry_count(), inner.site_owners.absent.entry_count()),
            ),
        ]
    }

    /// Drops everything, for a replica that may have missed changes.
    pub fn invalidate_all(&self) {
        let inner = &*self.0;
        let generation = inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        inner.everything_invalidated_at.store(generation, Ordering::Release);
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

    /// Drops a key after RevokeKey, RotateKey or UpdateKey.
    pub async fn invalidate_key(&self, key_hash: &str) {
        self.invalidate(|inner| &inner.keys, key_hash).await;
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
#[derive(Clone)]
enum Miss {
    Absent,
    Store(StoreError),
}

/// Reads an entry from the store, remembering the generation at which the read began.
async fn load_entry<V>(load: Load<V>, generation: u64) -> Result<Loaded<V>, Miss> {
    match load.await {
        Ok(Some(value)) => Ok(Loaded { value, generation, loaded_at: Instant::now() }),
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

    #[tokio::test]
    async fn found_and_absent_entries_are_served_without_loading_again() {
        let (cache, sites) = cache_with(CacheSettings::default());
        sites.set("s1", Ok(Some("acme")));
        for _ in 0..3 {
            assert_eq!(cache.site_owner("s1").await.unwrap().as_deref(), Some("acme"));
            assert_eq!(cache.site_owner("s2").await.unwrap(), None);
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
            async move { cache.site_owner("s1").await }
        });
        started_rx.await.unwrap();
        // The admin change commits while the first read, which saw the old owner, is stalled.
        sites.set("s1", Ok(Some("new-owner")));
        cache.invalidate_site("s1").await;
        release_tx.send(()).unwrap();
        assert_eq!(slow.await.unwrap().unwrap().as_deref(), Some("new-owner"), "the racing load read again");
        assert_eq!(
            cache.site_owner("s1").await.unwrap().as_deref(),
            Some("new-owner"),
            "a value read before an invalidation is never served after it"
        );
    }

    #[tokio::test]
    async fn past_the_ttl_an_entry_is_served_at_once_while_a_background_read_refreshes_it() {
        let settings = CacheSettings { ttl: Duration::from_millis(50), ..CacheSettings::default() };
        let (cache, sites) = cache_with(settings);
        sites.set("s1", Ok(Some("acme")));
        cache.site_owner("s1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;

        // A store that never answers holds no Check of a cached entry.
        sites.set("s1", Ok(Some("globex")));
        let (started_tx, started_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        *sites.gate.lock().unwrap() = Some((started_tx, release_rx));
        let served = tokio::time::timeout(Duration::from_secs(1), cache.site_owner("s1")).await;
        assert_eq!(served.expect("answered without waiting").unwrap().as_deref(), Some("acme"));
        started_rx.await.unwrap();
        assert_eq!(cache.site_owner("s1").await.unwrap().as_deref(), Some("acme"), "one refresh at a time");
        assert_eq!(sites.reads.load(Ordering::SeqCst), 2);

        // Once the refresh is answered, the new value is served.
        release_tx.send(()).unwrap();
        for _ in 0..100 {
            if cache.site_owner("s1").await.unwrap().as_deref() == Some("globex") {
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
            cache.site_owner("s1").await.unwrap();
            tokio::time::sleep(Duration::from_millis(80)).await;
            sites.set("s1", Err(down()));
            for _ in 0..3 {
                let owner = cache.site_owner("s1").await;
                assert_eq!(owner.is_ok(), served, "stale window {stale_window:?}: {owner:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    #[tokio::test]
    async fn store_errors_are_not_cached() {
        let (cache, sites) = cache_with(CacheSettings::default());
        sites.set("s1", Err(down()));
        assert!(cache.site_owner("s1").await.is_err());
        sites.set("s1", Ok(Some("acme")));
        assert_eq!(cache.site_owner("s1").await.unwrap().as_deref(), Some("acme"));
    }
}
