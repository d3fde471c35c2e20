//! Following the change feed: every replica polls the shared database for admin changes made
//! anywhere and drops the cache entries they touch, so a revoke on one replica is denied by all
//! of them within about one poll interval. The feed is in commit order with no holes, so a
//! replica that falls behind (a slow poll, a database outage) catches up from where it stopped;
//! one that finds changes pruned before it read them drops its whole cache. The follower also
//! keeps the known-keys filter ([`crate::known`]) current: it builds it at start and after the
//! whole cache was dropped, adds the keys the feed announces, and polls early when a Check of a
//! key the filter lacks waits for a poll.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::cache::DecisionCache;
use crate::domain::clock::Clock;
use crate::service::Core;
use crate::store::Store;

/// How the feed is followed and kept small.
#[derive(Clone, Debug)]
pub struct FeedSettings {
    /// Time between two reads of the feed.
    pub poll_interval: Duration,
    /// How long changes stay in the feed.
    pub retention: Duration,
}

impl Default for FeedSettings {
    fn default() -> Self {
        Self { poll_interval: Duration::from_millis(100), retention: Duration::from_secs(3600) }
    }
}

const BATCH: i64 = 1000;
/// Shortest time between two polls asked for by Checks of keys the known-keys filter lacks.
const WANTED_POLL_GAP: Duration = Duration::from_millis(10);
/// How often the known-keys filter is built anew from the database.
const REBUILD_EVERY: Duration = Duration::from_secs(3600);
/// How often the keys created since the last read are read into the known-keys filter, for keys
/// whose creation reached no feed (a replica of an earlier version during a rolling upgrade).
const RECONCILE_EVERY: Duration = Duration::from_secs(10);
/// How far the replicas' clocks (which stamp key ids) may disagree, with time to commit.
const RECONCILE_SLACK: Duration = Duration::from_secs(30);
/// Shortest time between two builds of the known-keys filter while none answers.
const BUILD_RETRY: Duration = Duration::from_secs(5);
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Where a replica starts following the feed: the current head, with a clean cache (Checks
/// may have cached entries before the head was read, and a change committed in between would
/// lie behind the starting point). Called before the server reports SERVING.
pub async fn start(core: &Core) -> Result<i64, crate::store::StoreError> {
    // Keys minted with earlier shapes keep passing Check.
    core.shapes.set_earlier(&core.store.key_formats().await?);
    let head = core.store.feed_head().await?;
    core.cache.invalidate_all();
    Ok(head)
}

/// Builds the known-keys filter from every stored key hash, in a task of its own so that the
/// follower keeps applying changes meanwhile (they reach the new filter through
/// [`KnownKeys::add`](crate::known::KnownKeys::add)). Call right after changes up to some feed
/// position were applied: keys committed up to there are in the scan.
fn build_known_keys(store: &Store, cache: &DecisionCache) {
    let Some(number) = cache.known().begin_build() else { return };
    let (store, cache) = (store.clone(), cache.clone());
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        match crate::known::build(&store, cache.known(), number).await {
            Ok(Some(filter)) => {
                info!(
                    bytes = filter.bytes(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "known-keys filter built"
                );
                cache.known().install(number, filter);
            }
            // Overtaken by a dropped cache: the follower begins another.
            Ok(None) => {}
            Err(error) => {
                warn!(%error, "cannot build the known-keys filter; will retry");
                cache.known().build_failed(number);
            }
        }
    });
}

/// Reads the keys created since `since` into the known-keys filter (see
/// [`crate::known::reconcile`]); true when the read succeeded.
async fn reconcile_known_keys(store: &Store, cache: &DecisionCache, since: chrono::DateTime<chrono::Utc>) -> bool {
    match crate::known::reconcile(store, cache.known(), since).await {
        Ok(0) => true,
        Ok(new) => {
            info!(
                keys = new,
                "keys created without a change-feed entry (by a replica of an earlier version?) added to the known-keys filter"
            );
            true
        }
        Err(error) => {
            warn!(%error, "cannot read the keys created lately; will retry");
            false
        }
    }
}

/// Follows the feed from `last_seen` until the task is aborted.
pub async fn follow(core: Arc<Core>, settings: FeedSettings, mut last_seen: i64) {
    let (store, cache) = (&core.store, &core.cache);
    info!(from = last_seen, interval_ms = settings.poll_interval.as_millis() as u64, "following the change feed");
    let mut ticker = tokio::time::interval(settings.poll_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = tokio::time::Instant::now();
    let mut failing = false;
    let known = cache.known();
    known.set_poll_interval(settings.poll_interval);
    // Polls that Checks of unknown keys ask for are at least this far apart.
    let gap = settings.poll_interval.min(WANTED_POLL_GAP);
    let mut last_poll = tokio::time::Instant::now();
    let mut last_build: Option<tokio::time::Instant> = None;
    let mut last_reconcile = last_poll;
    // Keys created since then (less the slack) are read into the known-keys filter.
    let mut reconciled_from = core.clock.now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = known.poll_wanted() => tokio::time::sleep_until(last_poll + gap).await,
        }
        last_poll = tokio::time::Instant::now();
        let poll = known.poll_begins();
        match catch_up(store, cache, core.clock.as_ref(), last_seen).await {
            Ok((seen, formats_changed)) => {
                if formats_changed {
                    match store.key_formats().await {
                        Ok(formats) => core.shapes.set_earlier(&formats),
                        Err(error) => warn!(%error, "cannot read the key shapes minted elsewhere; will retry"),
                    }
                }
                if failing {
                    // Changes made during the outage may have been pruned with no newer change
                    // to show the hole: compare with the head.
                    match store.feed_head().await {
                        Ok(head) if head > seen => {
                            warn!(
                                last_seen = seen,
                                head, "changes were pruned while the feed was unreadable: dropping the whole cache"
                            );
                            cache.invalidate_all();
                            last_seen = head;
                        }
                        _ => last_seen = seen,
                    }
                    info!(last_seen, "change feed readable again");
                } else {
                    last_seen = seen;
                }
                failing = false;
                // Built at start, after the whole cache was dropped (retried at most every 5 s),
                // and every hour, which also folds its growth layers into one; holds every key
                // committed up to `last_seen`, and later polls add those committed since.
                let since_build = last_build.map(|at| at.elapsed());
                if since_build
                    .is_none_or(|elapsed| elapsed >= REBUILD_EVERY || (!known.is_built() && elapsed >= BUILD_RETRY))
                {
                    last_build = Some(tokio::time::Instant::now());
                    build_known_keys(store, cache);
                }
                known.poll_applied(poll);
                // Also while a build is under way (the keys read go to its list too); a failed
                // read leaves the window open for the next one.
                if last_reconcile.elapsed() >= RECONCILE_EVERY {
                    last_reconcile = tokio::time::Instant::now();
                    let now = core.clock.now();
                    if reconcile_known_keys(store, cache, reconciled_from - RECONCILE_SLACK).await {
                        reconciled_from = now;
                    }
                }
            }
            Err(error) => {
                if !failing {
                    warn!(%error, "cannot read the change feed; will retry");
                }
                failing = true;
            }
        }
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = tokio::time::Instant::now();
            let retention = chrono::Duration::from_std(settings.retention).unwrap_or(chrono::Duration::hours(1));
            if let Err(error) = store.prune_changes(core.clock.now() - retention).await {
                debug!(%error, "could not prune the change feed");
            }
        }
    }
}

/// Applies every change after `last_seen`; returns the newest sequence number applied, and
/// whether a new key shape was announced (the caller reads the shapes again).
pub async fn catch_up(
    store: &Store,
    cache: &DecisionCache,
    clock: &dyn Clock,
    mut last_seen: i64,
) -> Result<(i64, bool), crate::store::StoreError> {
    let mut formats_changed = false;
    loop {
        let changes = store.changes_after(last_seen, BATCH).await?;
        if changes.first().is_some_and(|first| first.seq != last_seen + 1) {
            warn!(
                last_seen,
                next = changes[0].seq,
                "changes were pruned before this replica read them: dropping the whole cache"
            );
            cache.invalidate_all();
        }
        for change in &changes {
            // This replica's own changes were applied when they were made: no lag to measure.
            // Its new keys go into the filter again, in case it was being built meanwhile.
            if store.take_own_change(change.seq) {
                if let crate::store::ChangeTarget::Key(hash) = &change.target
                    && let Some(digest) = crate::domain::key::KeyDigest::from_hex(hash)
                {
                    cache.known().add(&digest);
                }
            } else {
                formats_changed |= matches!(change.target, crate::store::ChangeTarget::KeyFormat(_));
                cache.apply(&change.target).await;
                // Measured on the clock that stamped the change.
                let lag = clock.now() - change.created_at;
                metrics::histogram!("keygate_invalidation_lag_seconds")
                    .record(lag.num_microseconds().unwrap_or(0).max(0) as f64 / 1e6);
                debug!(seq = change.seq, lag_ms = lag.num_milliseconds(), "applied a change from the feed");
            }
            last_seen = change.seq;
        }
        if (changes.len() as i64) < BATCH {
            return Ok((last_seen, formats_changed));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cache::CacheSettings;
    use crate::config::{DatabaseConfig, DatabaseUrl};
    use crate::domain::audit::{AuditEntry, AuditEventType};
    use crate::domain::clock::SystemClock;
    use crate::domain::key::KeyDigest;
    use crate::domain::model::TenantChanges;
    use crate::service::{LookupLimit, StoreSource};
    use chrono::Utc;

    /// A migrated SQLite store in a directory that lives as long as the returned guard.
    async fn migrated_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("feed.db").display());
        let database = DatabaseConfig {
            url: DatabaseUrl(url),
            max_connections: 2,
            acquire_timeout: Duration::from_secs(5),
            query_timeout: Duration::from_secs(5),
        };
        let store = Store::connect_lazy(&database).unwrap();
        store.migrate().await.unwrap();
        (dir, store)
    }

    fn cache_of(store: &Store) -> DecisionCache {
        let lookups = Arc::new(LookupLimit::new(2, Duration::from_secs(5)));
        DecisionCache::new(&CacheSettings::default(), Arc::new(StoreSource { store: store.clone(), lookups }))
    }

    fn audit(tenant_id: &str) -> AuditEntry {
        AuditEntry::new(AuditEventType::TenantPut, "tests", tenant_id)
    }

    #[tokio::test]
    async fn a_replica_that_missed_pruned_changes_drops_its_whole_cache() {
        let (_dir, store) = migrated_store().await;
        let cache = cache_of(&store);
        let now = Utc::now();
        store.put_tenant("acme", &TenantChanges::default(), now, &audit("acme")).await.unwrap();
        let last_seen = store.feed_head().await.unwrap();
        assert!(cache.tenant("acme", std::time::Instant::now()).await.unwrap().unwrap().api_access_enabled);

        // Changes this replica never read are pruned; a later unrelated change shows the hole.
        store
            .put_tenant(
                "acme",
                &TenantChanges { api_access_enabled: Some(false), ..Default::default() },
                now,
                &audit("acme"),
            )
            .await
            .unwrap();
        store.prune_changes(now + chrono::Duration::seconds(1)).await.unwrap();
        store
            .put_tenant("globex", &TenantChanges::default(), now + chrono::Duration::seconds(2), &audit("globex"))
            .await
            .unwrap();

        let (seen, _) = catch_up(&store, &cache, &SystemClock, last_seen).await.unwrap();
        assert_eq!(seen, store.feed_head().await.unwrap());
        let tenant = cache.tenant("acme", std::time::Instant::now()).await.unwrap().unwrap();
        assert!(!tenant.api_access_enabled, "the cached tenant was dropped and read again");
    }

    fn key_record(secret: &str) -> crate::domain::model::KeyRecord {
        crate::domain::model::KeyRecord::sample(&format!("key_{secret}"), secret)
    }

    /// Builds the filter as the follower's task does, and waits for it.
    async fn build_now(store: &Store, cache: &DecisionCache) {
        let number = cache.known().begin_build().unwrap();
        cache.known().install(number, crate::known::build(store, cache.known(), number).await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn the_known_keys_filter_follows_the_feed_and_is_built_again_after_a_hole() {
        let (_dir, store) = migrated_store().await;
        let cache = cache_of(&store);
        let now = Utc::now();
        store.put_tenant("acme", &TenantChanges::default(), now, &audit("acme")).await.unwrap();
        let insert = |secret: &'static str| {
            let store = store.clone();
            async move {
                let (key, audit) = (key_record(secret), audit("acme"));
                let outcome = store.insert_key(&key, "kg_{env}_{base62:32}", 100, now, &audit).await.unwrap();
                assert!(matches!(outcome, crate::store::InsertKeyOutcome::Inserted));
            }
        };
        insert("first").await;
        let last_seen = store.feed_head().await.unwrap();
        assert_eq!(cache.known().may_hold(&KeyDigest::of("first")), None, "not built yet");
        build_now(&store, &cache).await;
        assert_eq!(cache.known().may_hold(&KeyDigest::of("first")), Some(true));
        assert_eq!(cache.known().may_hold(&KeyDigest::of("never stored")), Some(false));

        // Inserted by this replica's own store (no cache call): the feed brings it.
        insert("second").await;
        assert_eq!(cache.known().may_hold(&KeyDigest::of("second")), Some(false));
        let (last_seen, _) = catch_up(&store, &cache, &SystemClock, last_seen).await.unwrap();
        assert_eq!(cache.known().may_hold(&KeyDigest::of("second")), Some(true));

        // Changes pruned unread: the filter may lack keys, so it is dropped with the cache.
        insert("third").await;
        store.prune_changes(now + chrono::Duration::seconds(1)).await.unwrap();
        store.put_tenant("globex", &TenantChanges::default(), now, &audit("globex")).await.unwrap();
        catch_up(&store, &cache, &SystemClock, last_seen).await.unwrap();
        assert!(!cache.known().is_built(), "a filter that may lack keys must not answer");
        build_now(&store, &cache).await;
        for secret in ["first", "second", "third"] {
            assert_eq!(cache.known().may_hold(&KeyDigest::of(secret)), Some(true), "{secret}");
        }

        // A build whose scan is done, then a key committed with no feed entry (a replica of an
        // earlier version): the reconciliation under way reaches the filter the build installs.
        let number = cache.known().begin_build().unwrap();
        let scanned = crate::known::build(&store, cache.known(), number).await.unwrap().unwrap();
        let (key, audit) = (key_record("fourth"), audit("acme"));
        store.insert_key(&key, "kg_{env}_{base62:32}", 100, now, &audit).await.unwrap();
        store.prune_changes(now + chrono::Duration::seconds(10)).await.unwrap();
        let new = crate::known::reconcile(&store, cache.known(), now - chrono::Duration::minutes(5)).await.unwrap();
        assert_eq!(new, 1, "the filter in place lacked only the fourth key");
        cache.known().install(number, scanned);
        assert_eq!(cache.known().may_hold(&KeyDigest::of("fourth")), Some(true));
    }

    #[tokio::test]
    async fn catching_up_applies_changes_in_order_and_resumes_where_it_stopped() {
        let (_dir, store) = migrated_store().await;
        let cache = cache_of(&store);
        let start = store.feed_head().await.unwrap();
        for tenant in ["a", "b", "c"] {
            store.put_tenant(tenant, &TenantChanges::default(), Utc::now(), &audit(tenant)).await.unwrap();
        }
        let (seen, _) = catch_up(&store, &cache, &SystemClock, start).await.unwrap();
        assert_eq!(seen, start + 3);
        assert_eq!(catch_up(&store, &cache, &SystemClock, seen).await.unwrap().0, seen, "nothing new");
    }
}
