//! The database goes away: cached keys keep being answered through the stale window, anything
//! else fails closed, buffered counts are kept, and keygate recovers by itself. A TCP proxy that
//! the test controls stands between keygate and PostgreSQL or MySQL (SQLite is a file in the
//! process: it has no outage to test).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keygate::proto::*;
use sqlx::Connection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tonic::Code;

use crate::support::*;

crate::trials!(
    every_backend: [],
    once: [
        postgres_outage_serves_cached_keys_fails_closed_and_recovers,
        mysql_outage_serves_cached_keys_fails_closed_and_recovers,
    ],
);

/// Forwards TCP connections to `target` until cut; refuses them while cut.
struct Proxy {
    address: SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (is_cut, tracked) = (cut.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if is_cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let target = target.clone();
                tracked.lock().await.push(tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }));
            }
        });
        Self { address, cut, connections }
    }

    /// Drops every open connection and refuses new ones.
    async fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for connection in self.connections.lock().await.drain(..) {
            connection.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// `host:port` of a database URL such as `postgres://user@127.0.0.1:5432/db`.
fn host_port(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let after_user = after_scheme.rsplit_once('@').map_or(after_scheme, |(_, rest)| rest);
    after_user.split('/').next().unwrap_or_default().to_owned()
}

async fn postgres_outage_serves_cached_keys_fails_closed_and_recovers() {
    outage(Backend::Postgres).await;
}

async fn mysql_outage_serves_cached_keys_fails_closed_and_recovers() {
    outage(Backend::MySql).await;
}

async fn outage(backend: Backend) {
    let flags = [
        "--cache-ttl-seconds",
        "1",
        "--stale-window-seconds",
        "60",
        "--db-acquire-timeout-seconds",
        "1",
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

    proxy.cut().await;
    assert!(check(&app, &cached, "events:read", "").await.allowed, "cached and fresh");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(check(&app, &cached, "events:read", "").await.allowed, "past its TTL, inside the stale window");
    let status = try_check(&app, &uncached, "events:read", "").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "a key that is not cached is never allowed without the store");
    let admin = app.admin.clone().get_tenant(GetTenantRequest { tenant_id: "acme".into() }).await;
    assert_eq!(admin.unwrap_err().code(), Code::Unavailable);

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

    // The three allowed Checks of the limited key were counted for its rate limit and its usage,
    // the outage's included.
    let subject = format!("key:{}", cached_key.key_id);
    let started = Instant::now();
    loop {
        let mut connection = sqlx::AnyConnection::connect(&direct_url).await.unwrap();
        let sql = sqlx::AssertSqlSafe(format!("SELECT count FROM request_counts WHERE subject = '{subject}'"));
        let counts: Vec<i64> = sqlx::query_scalar(sql).fetch_all(&mut connection).await.unwrap();
        let _ = connection.close().await;
        let counted: i64 = counts.iter().sum();
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT count FROM key_usage WHERE key_id = '{}' AND outcome = 'ALLOWED'",
            cached_key.key_id
        ));
        let mut connection = sqlx::AnyConnection::connect(&direct_url).await.unwrap();
        let used: Vec<i64> = sqlx::query_scalar(sql).fetch_all(&mut connection).await.unwrap();
        let _ = connection.close().await;
        if counted == 3 && used.iter().sum::<i64>() == 3 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "counted {counted} of 3 allowed Checks");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
