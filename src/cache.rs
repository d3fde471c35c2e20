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

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::future::Cache;

use crate::domain::model::{KeyRecord, Tenant};
use crate::store::{ChangeTarget, StoreError};

/// Sizes and lifetimes of the cache.
#[derive(Clone, Debug)]
pub struct CacheSettings {
    /// Most found entries in each of the three sets.
    pub capacity: u64,
    /// How long a found key, tenant or site stays cached.
    pub ttl: Duration,
    /// How long "no such key, tenant or site" stays cached.
    pub negative_ttl: Duration,
    /// How long past `ttl` a found entry is still served while the store cannot be reached.
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

/// A found value and the generation at which its store read began.
#[derive(Clone)]
struct Loaded<V> {
    value: V,
    generation: u64,
    loaded_at: Instant,
}

/// Why a load produced no entry.
#[derive(Clone)]
enum Miss {
    Absent,
    Store(StoreError),
}

/// Reads an entry from the store, remembering the generation at which the read began.
async fn load_entry<V, F, Fut>(load: &F, generation: u64) -> Result<Loaded<V>, Miss>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Option<V>, StoreError>>,
{
    match load().await {
        Ok(Some(value)) => Ok(Loaded { value, generation, loaded_at: Instant::now() }),
        Ok(None) => Err(Miss::Absent),
        Err(error) => Err(Miss::Store(error)),
    }
}

/// One set of entries: found values, known absences, and the last invalidation of each id.
struct Entries<V> {
    /// The cache's name in metrics: `keys`, `tenants` or `sites`.
    name: &'static str,
    found: Cache<String, Loaded<V>>,
    /// Reloads of expired entries under way, so concurrent Checks share one.
    refreshing: Cache<String, Loaded<V>>,
    absent: Cache<String, u64>,
    invalidated: Cache<String, u64>,
    ttl: Duration,
    stale_window: Duration,
}

impl<V: Clone + Send + Sync + 'static> Entries<V> {
    fn new(name: &'static str, settings: &CacheSettings) -> Self {
        let kept = settings.ttl + settings.stale_window;
        let longest = kept.max(settings.negative_ttl) + Duration::from_secs(1);
        let evicted = move |_: Arc<String>, _: Loaded<V>, cause: moka::notification::RemovalCause| {
            if cause == moka::notification::RemovalCause::Size {
                metrics::counter!("keygate_cache_evictions_total", "cache" => name).increment(1);
            }
        };
        Self {
            name,
            // Found entries are kept through the stale window; `ttl` is enforced on read.
            found: Cache::builder()
                .max_capacity(settings.capacity)
                .time_to_live(kept)
                .eviction_listener(evicted)
                .build(),
            refreshing: Cache::builder().max_capacity(settings.capacity).time_to_live(Duration::from_secs(60)).build(),
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

    /// Whether something read at `generation` predates the last invalidation of `id`.
    async fn is_stale(&self, id: &str, generation: u64, everything_invalidated_at: u64) -> bool {
        generation < everything_invalidated_at
            || self.invalidated.get(id).await.is_some_and(|invalidated_at| invalidated_at > generation)
    }

    fn clear(&self) {
        self.found.invalidate_all();
        self.absent.invalidate_all();
    }
}

/// The cached view of keys, tenants and site ownership.
pub struct DecisionCache {
    keys: Entries<Arc<KeyRecord>>,
    tenants: Entries<Arc<Tenant>>,
    site_owners: Entries<Arc<str>>,
    /// Counts invalidations; loads remember it so a racing invalidation can overrule them.
    generation: AtomicU64,
    /// The generation of the last [`invalidate_all`](Self::invalidate_all): older entries are stale.
    everything_invalidated_at: AtomicU64,
}

impl DecisionCache {
    pub fn new(settings: &CacheSettings) -> Self {
        Self {
            keys: Entries::new("keys", settings),
            tenants: Entries::new("tenants", settings),
            site_owners: Entries::new("sites", settings),
            generation: AtomicU64::new(0),
            everything_invalidated_at: AtomicU64::new(0),
        }
    }

    /// The key with this hash, loading it with `load` on a miss.
    pub async fn key<F, Fut>(&self, key_hash: &str, load: F) -> Result<Option<Arc<KeyRecord>>, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<KeyRecord>, StoreError>>,
    {
        self.get(&self.keys, key_hash, || async { Ok(load().await?.map(Arc::new)) }).await
    }

    /// The tenant with this id, loading it with `load` on a miss.
    pub async fn tenant<F, Fut>(&self, tenant_id: &str, load: F) -> Result<Option<Arc<Tenant>>, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<Tenant>, StoreError>>,
    {
        self.get(&self.tenants, tenant_id, || async { Ok(load().await?.map(Arc::new)) }).await
    }

    /// The tenant that owns this site, loading it with `load` on a miss.
    pub async fn site_owner<F, Fut>(&self, site_id: &str, load: F) -> Result<Option<Arc<str>>, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<String>, StoreError>>,
    {
        self.get(&self.site_owners, site_id, || async { Ok(load().await?.map(Arc::from)) }).await
    }

    async fn get<V, F, Fut>(&self, entries: &Entries<V>, id: &str, load: F) -> Result<Option<V>, StoreError>
    where
        V: Clone + Send + Sync + 'static,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<V>, StoreError>>,
    {
        let is_stale = |generation| async move {
            let everything = self.everything_invalidated_at.load(Ordering::Acquire);
            entries.is_stale(id, generation, everything).await
        };
        // Invalidations are rare (admin calls), so a few rounds always settle.
        for _ in 0..3 {
            if let Some(loaded) = entries.found.get(id).await {
                if is_stale(loaded.generation).await {
                    entries.found.invalidate(id).await;
                } else if loaded.loaded_at.elapsed() < entries.ttl {
                    metrics::counter!("keygate_cache_hits_total", "cache" => entries.name).increment(1);
                    return Ok(Some(loaded.value));
                } else {
                    return self.refresh(entries, id, loaded, &load).await;
                }
            }
            if let Some(generation) = entries.absent.get(id).await {
                if !is_stale(generation).await {
                    metrics::counter!("keygate_cache_hits_total", "cache" => entries.name).increment(1);
                    return Ok(None);
                }
                entries.absent.invalidate(id).await;
            }
            metrics::counter!("keygate_cache_misses_total", "cache" => entries.name).increment(1);
            let generation = self.generation.load(Ordering::Acquire);
            let loaded = entries.found.try_get_with_by_ref(id, load_entry(&load, generation)).await;
            match loaded {
                Ok(loaded) if !is_stale(loaded.generation).await => return Ok(Some(loaded.value)),
                Ok(_) => entries.found.invalidate(id).await,
                Err(miss) => match &*miss {
                    Miss::Store(error) => return Err(error.clone()),
                    Miss::Absent if !is_stale(generation).await => {
                        entries.absent.insert(id.to_owned(), generation).await;
                        return Ok(None);
                    }
                    Miss::Absent => {}
                },
            }
        }
        load().await
    }

    /// Reloads an entry past its `ttl`. While the store cannot be reached, the old value is
    /// served until the stale window ends too; then the error is.
    async fn refresh<V, F, Fut>(
        &self,
        entries: &Entries<V>,
        id: &str,
        old: Loaded<V>,
        load: &F,
    ) -> Result<Option<V>, StoreError>
    where
        V: Clone + Send + Sync + 'static,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<V>, StoreError>>,
    {
        let generation = self.generation.load(Ordering::Acquire);
        let refreshed = entries.refreshing.try_get_with_by_ref(id, load_entry(load, generation)).await;
        entries.refreshing.invalidate(id).await;
        match refreshed {
            Ok(loaded) => {
                entries.found.insert(id.to_owned(), loaded.clone()).await;
                Ok(Some(loaded.value))
            }
            Err(miss) => match &*miss {
                Miss::Absent => {
                    entries.found.invalidate(id).await;
                    entries.absent.insert(id.to_owned(), generation).await;
                    Ok(None)
                }
                Miss::Store(StoreError::Unavailable(_))
                    if old.loaded_at.elapsed() < entries.ttl + entries.stale_window =>
                {
                    Ok(Some(old.value))
                }
                Miss::Store(error) => Err(error.clone()),
            },
        }
    }

    async fn invalidate<V: Clone + Send + Sync + 'static>(&self, entries: &Entries<V>, id: &str) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        entries.invalidated.insert(id.to_owned(), generation).await;
        entries.found.invalidate(id).await;
        entries.absent.invalidate(id).await;
    }

    /// Entries held per cache (found and absent), once moka's pending bookkeeping is done.
    pub async fn sizes(&self) -> [(&'static str, u64); 3] {
        self.keys.found.run_pending_tasks().await;
        self.keys.absent.run_pending_tasks().await;
        self.tenants.found.run_pending_tasks().await;
        self.tenants.absent.run_pending_tasks().await;
        self.site_owners.found.run_pending_tasks().await;
        self.site_owners.absent.run_pending_tasks().await;
        let size = |found: u64, absent: u64| found + absent;
        [
            (self.keys.name, size(self.keys.found.entry_count(), self.keys.absent.entry_count())),
            (self.tenants.name, size(self.tenants.found.entry_count(), self.tenants.absent.entry_count())),
            (self.site_owners.name, size(self.site_owners.found.entry_count(), self.site_owners.absent.entry_count())),
        ]
    }

    /// Drops everything, for a replica that may have missed changes.
    pub fn invalidate_all(&self) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.everything_invalidated_at.store(generation, Ordering::Release);
        self.keys.clear();
        self.tenants.clear();
        self.site_owners.clear();
    }

    /// Drops what a change of the feed touched.
    pub async fn apply(&self, target: &ChangeTarget) {
        match target {
            ChangeTarget::Key(hash) => self.invalidate_key(hash).await,
            ChangeTarget::Tenant(tenant_id) => self.invalidate_tenant(tenant_id).await,
            ChangeTarget::Site(site_id) => self.invalidate_site(site_id).await,
            ChangeTarget::Unknown(_) => self.invalidate_all(),
        }
    }

    /// Drops a key after RevokeKey, RotateKey or UpdateKey.
    pub async fn invalidate_key(&self, key_hash: &str) {
        self.invalidate(&self.keys, key_hash).await;
    }

    /// Drops a tenant after PutTenant.
    pub async fn invalidate_tenant(&self, tenant_id: &str) {
        self.invalidate(&self.tenants, tenant_id).await;
    }

    /// Drops a site's owner after PutSite or DeleteSite.
    pub async fn invalidate_site(&self, site_id: &str) {
        self.invalidate(&self.site_owners, site_id).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn cache() -> DecisionCache {
        DecisionCache::new(&CacheSettings::default())
    }

    #[tokio::test]
    async fn found_and_absent_entries_are_served_without_loading_again() {
        let cache = cache();
        let loads = AtomicUsize::new(0);
        let load = |value: Option<&'static str>| {
            let loads = &loads;
            move || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok(value.map(str::to_owned))
            }
        };
        for _ in 0..3 {
            assert_eq!(cache.site_owner("s1", load(Some("acme"))).await.unwrap().as_deref(), Some("acme"));
            assert_eq!(cache.site_owner("s2", load(None)).await.unwrap(), None);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_invalidation_during_a_load_wins() {
        let cache = Arc::new(cache());
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let slow = {
            let cache = cache.clone();
            tokio::spawn(async move {
                let started = std::sync::Mutex::new(Some(started_tx));
                let release = tokio::sync::Mutex::new(Some(release_rx));
                cache
                    .site_owner("s1", || async {
                        let first_read = started.lock().unwrap().take();
                        let Some(started) = first_read else {
                            // Read again after the change: the database has the new owner.
                            return Ok(Some("new-owner".to_owned()));
                        };
                        // The first read sees the old owner, then stalls past the admin change.
                        let _ = started.send(());
                        if let Some(release) = release.lock().await.take() {
                            let _ = release.await;
                        }
                        Ok(Some("old-owner".to_owned()))
                    })
                    .await
            })
        };
        started_rx.await.unwrap();
        cache.invalidate_site("s1").await;
        release_tx.send(()).unwrap();
        let slow_result = slow.await.unwrap().unwrap();
        assert_eq!(slow_result.as_deref(), Some("new-owner"), "the racing load read again");
        let owner = cache.site_owner("s1", || async { Ok(Some("unexpected load".to_owned())) }).await.unwrap();
        assert_eq!(owner.as_deref(), Some("new-owner"), "a value read before an invalidation is never served after it");
    }

    #[tokio::test]
    async fn expired_entries_are_served_through_the_stale_window_while_the_store_is_down() {
        let settings =
            |stale_window| CacheSettings { ttl: Duration::from_millis(50), stale_window, ..CacheSettings::default() };
        let down = || async { Err(StoreError::Unavailable("down".into())) };
        for (stale_window, served) in [(Duration::from_secs(60), true), (Duration::ZERO, false)] {
            let cache = DecisionCache::new(&settings(stale_window));
            cache.site_owner("s1", || async { Ok(Some("acme".to_owned())) }).await.unwrap();
            tokio::time::sleep(Duration::from_millis(80)).await;
            let owner = cache.site_owner("s1", down).await;
            assert_eq!(owner.is_ok(), served, "stale window {stale_window:?}: {owner:?}");
        }
        // Past the TTL with the store up, the entry is read again.
        let cache = DecisionCache::new(&settings(Duration::from_secs(60)));
        cache.site_owner("s1", || async { Ok(Some("acme".to_owned())) }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        let owner = cache.site_owner("s1", || async { Ok(Some("globex".to_owned())) }).await.unwrap();
        assert_eq!(owner.as_deref(), Some("globex"));
    }

    #[tokio::test]
    async fn store_errors_are_not_cached() {
        let cache = cache();
        let failing = || async { Err(StoreError::Unavailable("down".into())) };
        assert!(cache.site_owner("s1", failing).await.is_err());
        let owner = cache.site_owner("s1", || async { Ok(Some("acme".to_owned())) }).await.unwrap();
        assert_eq!(owner.as_deref(), Some("acme"));
    }
}
