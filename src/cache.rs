//! The decision cache: everything Check needs, held in moka caches in front of the store.
//!
//! Three caches, each invalidated on its own by the admin calls that change it: keys by hash,
//! tenants by id, site owners by site id. A miss for one entry makes one store query however
//! many Checks wait for it; an entry that does not exist is cached too, for a shorter time, so a
//! repeated unknown key costs no query. An invalidation that races with a load in flight wins:
//! the load's result is dropped and read again.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;

use crate::domain::model::{KeyRecord, Tenant};
use crate::store::StoreError;

/// Sizes and lifetimes of the cache.
#[derive(Clone, Debug)]
pub struct CacheSettings {
    /// Most entries in each of the three caches.
    pub capacity: u64,
    /// How long a found key, tenant or site stays cached.
    pub ttl: Duration,
    /// How long "no such key, tenant or site" stays cached.
    pub negative_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self { capacity: 100_000, ttl: Duration::from_secs(60), negative_ttl: Duration::from_secs(5) }
    }
}

/// Found entries live `ttl`, absent ones `negative_ttl`.
struct PresenceExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl<K, V> Expiry<K, Option<V>> for PresenceExpiry {
    fn expire_after_create(&self, _key: &K, value: &Option<V>, _created_at: Instant) -> Option<Duration> {
        Some(if value.is_some() { self.ttl } else { self.negative_ttl })
    }
}

type Entries<V> = Cache<String, Option<V>>;

/// Why a load was not cached.
enum LoadError {
    Store(StoreError),
    /// An invalidation ran during the load.
    Raced,
}

/// The cached view of keys, tenants and site ownership.
pub struct DecisionCache {
    keys: Entries<Arc<KeyRecord>>,
    tenants: Entries<Arc<Tenant>>,
    site_owners: Entries<Arc<str>>,
    /// Bumped by every invalidation, so a load that raced with one is not trusted.
    generation: AtomicU64,
}

impl DecisionCache {
    pub fn new(settings: &CacheSettings) -> Self {
        fn build<V: Clone + Send + Sync + 'static>(settings: &CacheSettings) -> Entries<V> {
            Cache::builder()
                .max_capacity(settings.capacity)
                .expire_after(PresenceExpiry { ttl: settings.ttl, negative_ttl: settings.negative_ttl })
                .build()
        }
        Self {
            keys: build(settings),
            tenants: build(settings),
            site_owners: build(settings),
            generation: AtomicU64::new(0),
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

    async fn get<V, F, Fut>(&self, cache: &Entries<V>, id: &str, load: F) -> Result<Option<V>, StoreError>
    where
        V: Clone + Send + Sync + 'static,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<V>, StoreError>>,
    {
        // Invalidations are rare (admin calls), so a few retries always settle.
        for _ in 0..3 {
            let generation = self.generation.load(Ordering::Acquire);
            let loaded = cache
                .try_get_with_by_ref(id, async {
                    let value = load().await.map_err(LoadError::Store)?;
                    // An admin change landed while the store was read: the value may predate it.
                    if self.generation.load(Ordering::Acquire) != generation {
                        return Err(LoadError::Raced);
                    }
                    Ok(value)
                })
                .await;
            match loaded {
                Ok(value) if self.generation.load(Ordering::Acquire) == generation => return Ok(value),
                Ok(_) => cache.invalidate(id).await,
                Err(error) => match &*error {
                    LoadError::Raced => {}
                    LoadError::Store(error) => return Err(error.clone()),
                },
            }
        }
        load().await
    }

    /// Drops a key after RevokeKey, RotateKey or UpdateKey.
    pub async fn invalidate_key(&self, key_hash: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.keys.invalidate(key_hash).await;
    }

    /// Drops a tenant after PutTenant.
    pub async fn invalidate_tenant(&self, tenant_id: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.tenants.invalidate(tenant_id).await;
    }

    /// Drops a site's owner after PutSite or DeleteSite.
    pub async fn invalidate_site(&self, site_id: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.site_owners.invalidate(site_id).await;
    }

    /// Entries held across the three caches (approximate, as moka counts).
    pub fn entry_count(&self) -> u64 {
        self.keys.entry_count() + self.tenants.entry_count() + self.site_owners.entry_count()
    }
}
