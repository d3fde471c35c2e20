//! The database goes away: cached keys keep being answered through the stale window, anything
//! else fails closed, buffered counts are kept, and keygate recovers by itself. A TCP proxy that
//! the test controls stands between keygate and PostgreSQL or MySQL (SQLite is a file in the
//! process: it has no outage to test).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keygate::proto::*;
use sqlx::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tonic::Code;

use crate::support::*;

crate::trials!(
    every_backend: [],
    once: [
        postgres_cut_serves_cached_keys_at_once_fails_closed_and_recovers,
        postgres_hang_serves_cached_keys_at_once_fails_closed_and_recovers,
        mysql_cut_serves_cached_keys_at_once_fails_closed_and_recovers,
        mysql_hang_serves_cached_keys_at_once_fails_closed_and_recovers,
        postgres_hang_is_noticed_in_seconds_and_never_stalls_a_cached_key,
        mysql_hang_is_noticed_in_seconds_and_never_stalls_a_cached_key,
        postgres_transactions_cut_off_halfway_release_their_locks,
        mysql_transactions_cut_off_halfway_release_their_locks,
        postgres_connections_ended_by_the_database_fail_no_call,
        mysql_connections_ended_by_the_database_fail_no_call,
    ],
);

/// How the proxy fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// Connections are dropped and refused (the database is down).
    Cut,
    /// Connections are accepted and open ones kept, but nothing is forwarded (the database or
    /// the network hangs).
    Hang,
}

const FORWARD: u8 = 0;
const CUT: u8 = 1;
const HANG: u8 = 2;

/// Whether connection `id` is hung: all are in HANG mode, and those opened before
/// `hung_below` always (a network that black-holes the connections it had).
#[derive(Clone)]
struct Hung {
    mode: Arc<AtomicU8>,
    hung_below: Arc<AtomicU64>,
    id: u64,
}

impl Hung {
    fn now(&self) -> bool {
        self.mode.load(Ordering::SeqCst) == HANG || self.id < self.hung_below.load(Ordering::SeqCst)
    }
}

/// Copies bytes from `from` to `to`; while the connection hangs, what was read is held back.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, hung: Hung) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let Ok(read) = from.read(&mut buffer).await else { return };
        while hung.now() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if read == 0 || to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// Forwards TCP connections to `target` until it fails as a [`Failure`].
struct Proxy {
    address: SocketAddr,
    mode: Arc<AtomicU8>,
    next_id: Arc<AtomicU64>,
    hung_below: Arc<AtomicU64>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(FORWARD));
        let (next_id, hung_below) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (current, tracked, ids, below) = (mode.clone(), connections.clone(), next_id.clone(), hung_below.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if current.load(Ordering::SeqCst) == CUT {
                    drop(client);
                    continue;
                }
                let target = target.clone();
                let hung =
                    Hung { mode: current.clone(), hung_below: below.clone(), id: ids.fetch_add(1, Ordering::SeqCst) };
                tracked.lock().await.push(tokio::spawn(async move {
                    // A hung proxy accepts and then says nothing.
                    while hung.now() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let Ok(server) = TcpStream::connect(&target).await else { return };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let upstream = tokio::spawn(pipe(client_read, server_write, hung.clone()));
                    pipe(server_read, client_write, hung).await;
                    upstream.abort();
                }));
            }
        });
        Self { address, mode, next_id, hung_below, connections }
    }

    /// Black-holes every connection open now, for good; new ones are forwarded.
    fn hang_open_connections(&self) {
        self.hung_below.store(self.next_id.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    async fn fail(&self, failure: Failure) {
        match failure {
            Failure::Cut => {
                self.mode.store(CUT, Ordering::SeqCst);
                for connection in self.connections.lock().await.drain(..) {
                    connection.abort();
                }
            }
            Failure::Hang => self.mode.store(HANG, Ordering::SeqCst),
        }
    }

    fn restore(&self) {
        self.mode.store(FORWARD, Ordering::SeqCst);
    }
}

/// `host:port` of a database URL such as `postgres://user@127.0.0.1:5432/db`.
fn host_port(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let after_user = after_scheme.rsplit_once('@').map_or(after_scheme, |(_, rest)| rest);
    after_user.split('/').next().unwrap_or_default().to_owned()
}

async fn postgres_cut_serves_cached_keys_at_once_fails_closed_and_recovers() {
    outage(Backend::Postgres, Failure::Cut).await;
}

async fn postgres_hang_serves_cached_keys_at_once_fails_closed_and_recovers() {
    outage(Backend::Postgres, Failure::Hang).await;
}

async fn mysql_cut_serves_cached_keys_at_once_fails_closed_and_recovers() {
    outage(Backend::MySql, Failure::Cut).await;
}

async fn mysql_hang_serves_cached_keys_at_once_fails_closed_and_recovers() {
    outage(Backend::MySql, Failure::Hang).await;
}

/// The status health reports for `service`.
async fn health_of(app: &TestApp, service: &str) -> tonic_health::pb::health_check_response::ServingStatus {
    let request = tonic_health::pb::HealthCheckRequest { service: service.into() };
    let client = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    client.clone().check(request).await.unwrap().into_inner().status()
}

/// A Check with the 1 s deadline of the example Envoy config.
async fn check_within_a_second(app: &TestApp, key: &str) -> Result<CheckResponse, tonic::Status> {
    let mut request = tonic::Request::new(CheckRequest {
        key: key.into(),
        scope: "events:read".into(),
        site_id: String::new(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(1));
    Ok(app.authorize.clone().check(request).await?.into_inner())
}

async fn outage(backend: Backend, failure: Failure) {
    use tonic_health::pb::health_check_response::ServingStatus::{NotServing, Serving};
    let flags = [
        "--cache-ttl-seconds",
        "1",
        "--stale-window-seconds",
        "6",
        "--db-query-timeout-ms",
        "500",
        "--usage-sync-interval-ms",
        "100",
        "--usage-flush-interval-ms",
        "100",
    ];
    let Some((proxy, app, direct_url)) = behind_proxy(backend, &flags).await else { return };
    put_tenant(&app, "acme").await;
    let mut limited = key_request("acme", &["events:read"]);
    limited.rate_limit_per_minute = 1000;
    let (cached_key, cached) = create_key(&app, limited).await.unwrap();
    let (_, uncached) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    assert!(check(&app, &cached, "events:read", "").await.allowed);

    proxy.fail(failure).await;
    let outage_began = Instant::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Past its TTL, inside the stale window: answered at once, every time.
    for _ in 0..10 {
        let started = Instant::now();
        let response = check_within_a_second(&app, &cached).await.expect("a cached key is answered");
        assert!(response.allowed);
        assert!(started.elapsed() < Duration::from_millis(250), "a cached key waited {:?}", started.elapsed());
    }
    // Not cached: UNAVAILABLE within the 1 s deadline, never an allow, never a timeout.
    for _ in 0..3 {
        let status = check_within_a_second(&app, &uncached).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{failure:?}: {status:?}");
    }
    // Checks of unknown keys that their clients give up on leave no lookup counted in flight.
    for index in 0..20 {
        let mut request = tonic::Request::new(CheckRequest {
            key: format!("kg_live_{index:064}"),
            scope: "events:read".into(),
            site_id: String::new(),
            ..Default::default()
        });
        request.set_timeout(Duration::from_millis(50));
        let _ = app.authorize.clone().check(request).await;
    }
    let admin = app.admin.clone().get_tenant(GetTenantRequest { tenant_id: "acme".into() }).await;
    assert_eq!(admin.unwrap_err().code(), Code::Unavailable);
    // Health tells the truth within a few seconds: KeyAdmin cannot work, the decision services can.
    let started = Instant::now();
    while health_of(&app, "keygate.v1.KeyAdmin").await != NotServing {
        assert!(started.elapsed() < Duration::from_secs(5), "KeyAdmin still SERVING during the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for service in ["", "keygate.v1.Authorize", "envoy.service.auth.v3.Authorization"] {
        assert_eq!(health_of(&app, service).await, Serving, "{service:?} answers from the cache");
    }
    assert_eq!(app.core.lookups.in_flight(), 0, "abandoned lookups are not counted in flight");

    // Once nothing cached can be answered any more (TTL + stale window), Authorize says so.
    while outage_began.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = check_within_a_second(&app, &cached).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "past the stale window a cached key fails closed");
    assert_eq!(health_of(&app, "keygate.v1.Authorize").await, NotServing);

    proxy.restore();
    let started = Instant::now();
    loop {
        match try_check(&app, &uncached, "events:read", "").await {
            Ok(response) if response.allowed => break,
            other => assert!(started.elapsed() < Duration::from_secs(15), "keygate did not recover: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.admin.clone().get_tenant(GetTenantRequest { tenant_id: "acme".into() }).await.unwrap();
    let started = Instant::now();
    while health_of(&app, "keygate.v1.KeyAdmin").await != Serving {
        assert!(started.elapsed() < Duration::from_secs(5), "KeyAdmin not SERVING again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The allowed Checks of the limited key were counted for its rate limit and its usage, the
    // outage's included.
    let allowed = 11;
    let subject = format!("key:{}", cached_key.key_id);
    let started = Instant::now();
    loop {
        let mut connection = sqlx::AnyConnection::connect(&direct_url).await.unwrap();
        let sql = sqlx::AssertSqlSafe(format!("SELECT count FROM request_counts WHERE subject = '{subject}'"));
        let counts: Vec<i64> = sqlx::query_scalar(sql).fetch_all(&mut connection).await.unwrap();
        let counted: i64 = counts.iter().sum();
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT count FROM key_usage WHERE key_id = '{}' AND outcome = 'ALLOWED'",
            cached_key.key_id
        ));
        let used: Vec<i64> = sqlx::query_scalar(sql).fetch_all(&mut connection).await.unwrap();
        let _ = connection.close().await;
        if counted == allowed && used.iter().sum::<i64>() == allowed {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "counted {counted} of {allowed} allowed Checks");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn postgres_hang_is_noticed_in_seconds_and_never_stalls_a_cached_key() {
    hang_with_the_default_query_timeout(Backend::Postgres).await;
}

async fn mysql_hang_is_noticed_in_seconds_and_never_stalls_a_cached_key() {
    hang_with_the_default_query_timeout(Backend::MySql).await;
}

/// A proxy in front of `backend`'s test server and an app behind it.
async fn behind_proxy(backend: Backend, flags: &[&str]) -> Option<(Proxy, TestApp, String)> {
    let variable = match backend {
        Backend::Postgres => "KEYGATE_TEST_POSTGRES_URL",
        _ => "KEYGATE_TEST_MYSQL_URL",
    };
    let target = std::env::var(variable).map(|url| host_port(&url)).unwrap_or_default();
    let proxy = Proxy::start(target.clone()).await;
    let through_proxy = |url: &str| url.replacen(&target, &proxy.address.to_string(), 1);
    let (app, direct_url) = spawn_app_routed(backend, flags, through_proxy).await?;
    Some((proxy, app, direct_url))
}

/// With the default 5 s query timeout, a database that stops answering is known within about
/// two seconds (not at the first timeout), a cached key never waits on it, not even for the
/// shared counts of a rate limit it has not used here yet, and a Check of an uncached key
/// waits at most the query timeout in all, queueing for a lookup slot included.
async fn hang_with_the_default_query_timeout(backend: Backend) {
    use tonic_health::pb::health_check_response::ServingStatus::NotServing;
    let flags = ["--cache-ttl-seconds", "1", "--stale-window-seconds", "60", "--max-lookups-in-flight", "2"];
    let Some((proxy, app, _)) = behind_proxy(backend, &flags).await else { return };
    put_tenant(&app, "acme").await;
    let mut limited = key_request("acme", &["events:read"]);
    limited.rate_limit_per_minute = 100;
    let (_, secret) = create_key(&app, limited).await.unwrap();
    // Cached by a denied Check: its rate limit's shared counts were never read on this replica.
    assert!(!check(&app, &secret, "events:write", "").await.allowed);

    proxy.fail(Failure::Hang).await;
    let hung_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..5 {
        let started = Instant::now();
        let response = check_within_a_second(&app, &secret).await.expect("a cached key is answered");
        assert!(response.allowed, "{response:?}");
        assert!(started.elapsed() < Duration::from_millis(500), "a cached key waited {:?}", started.elapsed());
    }
    let uncached: Vec<_> = (0..12)
        .map(|index| {
            let authorize = app.authorize.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let request = CheckRequest {
                    key: format!("kg_live_{index:064}"),
                    scope: "events:read".into(),
                    site_id: String::new(),
                    ..Default::default()
                };
                let result = authorize.clone().check(request).await;
                (started.elapsed(), result.map(|response| response.into_inner().allowed))
            })
        })
        .collect();
    while health_of(&app, "keygate.v1.KeyAdmin").await != NotServing {
        assert!(
            hung_at.elapsed() < Duration::from_secs(4),
            "KeyAdmin still SERVING {:?} into the hang",
            hung_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{backend:?}: NOT_SERVING {:?} into the hang", hung_at.elapsed());
    for check in uncached {
        let (took, result) = check.await.unwrap();
        assert!(!matches!(result, Ok(true)), "an unknown key is never allowed");
        assert!(took < Duration::from_millis(5500), "an uncached Check took {took:?}: more than the query timeout");
    }
    proxy.restore();
}

async fn postgres_transactions_cut_off_halfway_release_their_locks() {
    transactions_cut_off_halfway(Backend::Postgres).await;
}

async fn mysql_transactions_cut_off_halfway_release_their_locks() {
    transactions_cut_off_halfway(Backend::MySql).await;
}

/// The network black-holes keygate's database connections in the middle of CreateKey
/// transactions (which lock their tenant's row) and then works again for new connections: the
/// database ends the orphaned transactions within twice the query timeout, the pool lets go of
/// the dead connections, and CreateKey works again.
async fn transactions_cut_off_halfway(backend: Backend) {
    let flags = ["--db-query-timeout-ms", "1000"];
    let Some((proxy, app, _)) = behind_proxy(backend, &flags).await else { return };
    put_tenant_with(&app, PutTenantRequest { tenant_id: "acme".into(), max_keys: Some(10_000), ..Default::default() })
        .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let creators: Vec<_> = (0..6)
        .map(|_| {
            let (app_admin, stop) = (app.admin.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let _ = app_admin.clone().create_key(key_request("acme", &["events:read"])).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.hang_open_connections();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    for creator in creators {
        creator.await.unwrap();
    }
    let cut_at = Instant::now();
    loop {
        match app.admin.clone().create_key(key_request("acme", &["events:read"])).await {
            Ok(_) => break,
            Err(status) => assert!(
                cut_at.elapsed() < Duration::from_secs(15),
                "CreateKey still fails {:?} after the cut: {status:?}",
                cut_at.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("{backend:?}: CreateKey works again {:?} after the cut", cut_at.elapsed());
    for _ in 0..20 {
        app.admin.clone().get_tenant(GetTenantRequest { tenant_id: "acme".into() }).await.unwrap();
    }
}

async fn postgres_connections_ended_by_the_database_fail_no_call() {
    connections_ended_by_the_database(Backend::Postgres).await;
}

async fn mysql_connections_ended_by_the_database_fail_no_call() {
    connections_ended_by_the_database(Backend::MySql).await;
}

/// The database ends every connection keygate holds, a fraction of a second after their last
/// use (a restart, a failover, an administrator): each pooled connection is found dead before
/// a call uses it, and no admin call and no Check of an uncached key fails.
async fn connections_ended_by_the_database(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let mut keys = Vec::new();
    for _ in 0..10 {
        keys.push(create_key(&app, key_request("acme", &["events:read"])).await.unwrap().1);
    }
    let get_tenant = |app: &TestApp| {
        let mut admin = app.admin.clone();
        async move { admin.get_tenant(GetTenantRequest { tenant_id: "acme".into() }).await }
    };
    // Several connections in the pool, all used just now.
    let busy: Vec<_> = (0..8).map(|_| tokio::spawn(get_tenant(&app))).collect();
    for call in busy {
        call.await.unwrap().unwrap();
    }
    let mut database = sqlx::AnyConnection::connect(&app.database_url).await.unwrap();
    let ended = match backend {
        Backend::Postgres => {
            let ended: Vec<(bool,)> = sqlx::query_as(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .fetch_all(&mut database)
            .await
            .unwrap();
            ended.len()
        }
        _ => {
            let ids: Vec<(i64,)> = sqlx::query_as(
                "SELECT CAST(id AS SIGNED) FROM information_schema.processlist \
                 WHERE db = DATABASE() AND id <> CONNECTION_ID()",
            )
            .fetch_all(&mut database)
            .await
            .unwrap();
            for (id,) in &ids {
                sqlx::query(sqlx::AssertSqlSafe(format!("KILL {id}"))).execute(&mut database).await.unwrap();
            }
            ids.len()
        }
    };
    assert!(ended >= 2, "{backend:?}: keygate held {ended} connections");
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..20 {
        get_tenant(&app).await.expect("an admin call after the database ended the connections");
    }
    app.core.cache.invalidate_all();
    for key in &keys {
        let checked = try_check(&app, key, "events:read", "").await.expect("a Check of an uncached key");
        assert!(checked.allowed, "{checked:?}");
    }
}
