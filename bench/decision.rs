//! `cargo bench`: the in-process cost of a Check, without gRPC.
//!
//! - `key_shape_check` and `key_shape_check_and_hash`: a presented key checked against the
//!   accepted shapes, then hashed (SHA-256), as every Check does first.
//! - `cached_decision/N`: `Authorizer::check` of a key already cached, among N cached keys
//!   (1 000, 100 000, 1 000 000), each with 3 scopes and one site, its tenant with a per-minute
//!   limit that never runs out: format check, hash, the key, tenant and site lookups, the
//!   decision, limit counting and usage recording. Every iteration Checks a key drawn at random
//!   among the N, so the lookups miss the CPU's caches as a large deployment's would. Usage
//!   is written to a SQLite database between samples (outside the timing), as the server's
//!   flush does, so no iteration finds the usage buffer full.
//!
//! `cargo bench --bench decision -- --sample-count 2 --sample-size 2` is the smoke run CI makes.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::Utc;
use keygate::cache::{CacheSettings, DecisionCache, Load, Source};
use keygate::config::{DatabaseConfig, DatabaseUrl};
use keygate::domain::clock::SystemClock;
use keygate::domain::key::{ApiKeySecret, Environment};
use keygate::domain::key_format::KeyShapes;
use keygate::domain::model::{KeyRecord, Tenant};
use keygate::domain::scope::Scope;
use keygate::limits::{Limiter, RateLimitWindow};
use keygate::service::{Authorizer, CheckRequest, Core, KeyPolicy, LookupLimit, ShapesCell};
use keygate::store::Store;
use keygate::usage::UsageRecorder;

fn main() {
    divan::main();
}

fn minted(count: usize) -> Vec<String> {
    let shape = KeyShapes::default().minting;
    (0..count).map(|_| ApiKeySecret::generate(&shape, Environment::Live).expect("the OS RNG").expose()).collect()
}

#[divan::bench]
fn key_shape_check(bencher: divan::Bencher) {
    let shapes = KeyShapes::default();
    let key = minted(1).remove(0);
    bencher.bench(|| ApiKeySecret::parse(&shapes, black_box(&key)).is_ok());
}

#[divan::bench]
fn key_shape_check_and_hash(bencher: divan::Bencher) {
    let shapes = KeyShapes::default();
    let key = minted(1).remove(0);
    bencher.bench(|| ApiKeySecret::parse(&shapes, black_box(&key)).map(|secret| secret.hash()).is_ok());
}

const TENANT: &str = "acme";
const SITE: &str = "shop.example";

/// The store the cache reads from, in memory: N keys of one tenant, one site.
struct Memory {
    keys: HashMap<String, KeyRecord>,
    tenant: Tenant,
}

impl Source for Memory {
    fn key(&self, key_hash: &str) -> Load<KeyRecord> {
        let found = self.keys.get(key_hash).cloned();
        Box::pin(async move { Ok(found) })
    }

    fn tenant(&self, tenant_id: &str) -> Load<Tenant> {
        let found = (tenant_id == TENANT).then(|| self.tenant.clone());
        Box::pin(async move { Ok(found) })
    }

    fn site_owner(&self, site_id: &str) -> Load<String> {
        let found = (site_id == SITE).then(|| TENANT.to_owned());
        Box::pin(async move { Ok(found) })
    }
}

fn key_record(index: usize, secret: &str) -> KeyRecord {
    let scopes = ["events:read", "events:write", "stats:read"].map(|scope| Scope::parse(scope).expect("a scope"));
    KeyRecord {
        key_id: format!("key_{index:026}"),
        tenant_id: TENANT.into(),
        key_hash: ApiKeySecret::parse(&KeyShapes::default(), secret).expect("minted").hash().as_str().to_owned(),
        name: format!("bench {index}"),
        display_prefix: secret[..12].to_owned(),
        scopes: scopes.into(),
        site_ids: vec![SITE.into()],
        environment: Environment::Live,
        metadata: Default::default(),
        rate_limit_per_minute: 0,
        created_at: Utc::now(),
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
        rotated_from_key_id: None,
    }
}

struct Bench {
    runtime: tokio::runtime::Runtime,
    authorizer: Authorizer,
    core: Arc<Core>,
    requests: Vec<CheckRequest>,
    _database: tempfile::TempDir,
}

impl Bench {
    fn new(count: usize) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let database = tempfile::tempdir().expect("a temporary directory");
        let config = DatabaseConfig {
            url: DatabaseUrl(format!("sqlite://{}/bench.db?mode=rwc", database.path().display())),
            max_connections: 2,
            acquire_timeout: std::time::Duration::from_secs(5),
            query_timeout: std::time::Duration::from_secs(30),
        };
        let store = {
            let _runtime = runtime.enter();
            Store::connect_lazy(&config).expect("a store")
        };
        runtime.block_on(store.migrate()).expect("migrated");
        let secrets = minted(count);
        let keys = secrets.iter().enumerate().map(|(index, secret)| key_record(index, secret));
        let now = Utc::now();
        let tenant = Tenant {
            tenant_id: TENANT.into(),
            display_name: "Acme".into(),
            api_access_enabled: true,
            max_keys: 0,
            rate_limit_per_minute: 4_000_000_000,
            daily_request_quota: 0,
            unlimited_keys: true,
            shared_rate_limit: 0,
            shared_rate_limit_window: RateLimitWindow::Minute,
            created_at: now,
            updated_at: now,
        };
        let memory = Memory { keys: keys.map(|key| (key.key_hash.clone(), key)).collect(), tenant };
        let settings = CacheSettings { capacity: count as u64 * 11 / 10 + 1_000, ..CacheSettings::default() };
        let lookups = Arc::new(LookupLimit::new(16, std::time::Duration::from_secs(30)));
        let core = Arc::new(Core {
            cache: DecisionCache::new(&settings, Arc::new(memory)),
            store,
            clock: Arc::new(SystemClock),
            policy: KeyPolicy::default(),
            lookups,
            limiter: Limiter::new(std::time::Duration::from_secs(3600)),
            usage: UsageRecorder::default(),
            shapes: ShapesCell::new(KeyShapes::default()),
        });
        let authorizer = Authorizer::new(core.clone());
        let requests: Vec<CheckRequest> = secrets
            .into_iter()
            .map(|key| CheckRequest {
                key,
                scope: Scope::parse("events:read").expect("a scope"),
                site_id: Some(SITE.into()),
                tenant_id: None,
            })
            .collect();
        let bench = Self { runtime, authorizer, core, requests, _database: database };
        // Every key cached (and its first Check's limit priming done), usage written.
        for (index, request) in bench.requests.iter().enumerate() {
            bench.check(request);
            if index % 100_000 == 99_999 {
                bench.flush();
            }
        }
        bench.flush();
        bench
    }

    /// Checks `request`: polled once in place, as a server task would poll it, and only if that
    /// does not finish it (a cache miss, a first Check's limit priming) run to the end.
    fn check(&self, request: &CheckRequest) {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let _runtime = self.runtime.enter();
        let mut check = std::pin::pin!(self.authorizer.check(request));
        let outcome = match check.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(outcome) => outcome,
            Poll::Pending => self.runtime.block_on(check),
        };
        assert!(outcome.expect("decided").decision.is_ok());
    }

    fn flush(&self) {
        self.runtime.block_on(self.core.usage.flush(&self.core.store)).expect("usage written");
    }
}

#[divan::bench(args = [1_000, 100_000, 1_000_000], sample_count = 100, sample_size = 1_000)]
fn cached_decision(bencher: divan::Bencher, keys: usize) {
    let bench = Bench::new(keys);
    let drawn = AtomicUsize::new(0);
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ keys as u64;
    bencher
        .with_inputs(|| {
            if drawn.fetch_add(1, Ordering::Relaxed) % 50_000 == 49_999 {
                bench.flush();
            }
            // xorshift: a key drawn at random, at no cost inside the timing.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            &bench.requests[(state % keys as u64) as usize]
        })
        .bench_local_refs(|request| bench.check(request));
}
