//! The database goes away: cached keys keep being answered through the stale window, anything
//! else fails closed, buffered counts are kept, and keygate recovers by itself. A TCP proxy that
//! the test controls stands between keygate and PostgreSQL or MySQL (SQLite is a file in the
//! process: it has no outage to test).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
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

/// Copies bytes from `from` to `to`; while the proxy hangs, what was read is held back.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mode: Arc<AtomicU8>) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let Ok(read) = from.read(&mut buffer).await else { return };
        while mode.load(Ordering::SeqCst) == HANG {
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
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(FORWARD));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (current, tracked) = (mode.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if current.load(Ordering::SeqCst) == CUT {
                    drop(client);
                    continue;
                }
                let (target, mode) = (target.clone(), current.clone());
                tracked.lock().await.push(tokio::spawn(async move {
                    // A hung proxy accepts and then says nothing.
                    while mode.load(Ordering::SeqCst) == HANG {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let Ok(server) = TcpStream::connect(&target).await else { return };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let upstream = tokio::spawn(pipe(client_read, server_write, mode.clone()));
                    pipe(server_read, client_write, mode).await;
                    upstream.abort();
                }));
            }
        });
        Self { address, mode, connections }
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
    let mut request =
        tonic::Request::new(CheckRequest { key: key.into(), scope: "events:read".into(), site_id: String::new() });
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
    let variable = match backend {
        Backend::Postgres => "KEYGATE_TEST_POSTGRES_URL",
        _ => "KEYGATE_TEST_MYSQL_URL",
    };
    let target = std::env::var(variable).map(|url| host_port(&url)).unwrap_or_default();
    let proxy = Proxy::start(target.clone()).await;
    let through_proxy = |url: &str| url.replacen(&target, &proxy.address.to_string(), 1);
    let Some((app, direct_url)) = spawn_app_routed(backend, &flags, through_proxy).await else { return };
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
