//! Test harness: a real keygate server on 127.0.0.1:0 with a fresh database of its own, and
//! generated clients to talk to it.

use std::sync::Arc;
use std::time::Duration;

use keygate::config::Config;
use keygate::domain::clock::ManualClock;
use keygate::proto::authorize_client::AuthorizeClient;
use keygate::proto::key_admin_client::KeyAdminClient;
use keygate::proto::*;
use keygate::server::App;
use keygate::store::Store;
use sqlx::Connection;
use tokio::sync::oneshot;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

pub use keygate::store::Backend;

/// The variable that points the suite at a database server of `backend`.
fn server_url_variable(backend: Backend) -> Option<&'static str> {
    match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some("KEYGATE_TEST_POSTGRES_URL"),
        Backend::MySql => Some("KEYGATE_TEST_MYSQL_URL"),
    }
}

/// A database created for one test and dropped after it.
pub struct TestDatabase {
    pub url: String,
    admin_url: Option<String>,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    /// A fresh database, or `None` when the backend's server is not configured outside CI.
    /// Under CI=true a missing server fails the test: PostgreSQL and MySQL are mandatory there.
    pub async fn create(backend: Backend) -> Option<Self> {
        let Some(variable) = server_url_variable(backend) else {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!("sqlite://{}?mode=rwc", dir.path().join("keygate.db").display());
            return Some(Self { url, admin_url: None, name: String::new(), _dir: Some(dir) });
        };
        let Ok(server_url) = std::env::var(variable) else {
            crate::harness::skip(format!("{variable} is not set: no {backend:?} server to test against"));
            return None;
        };
        sqlx::any::install_default_drivers();
        let name = format!("keygate_test_{}", keygate::domain::key::new_admin_token().unwrap()[..16].to_owned());
        let mut connection = sqlx::AnyConnection::connect(&server_url)
            .await
            .unwrap_or_else(|error| panic!("cannot reach the server of {variable}: {error}"));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut connection)
            .await
            .expect("create test database");
        let _ = connection.close().await;
        let base = server_url.rsplit_once('/').map_or(server_url.as_str(), |(base, _)| base);
        Some(Self { url: format!("{base}/{name}"), admin_url: Some(server_url), name, _dir: None })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some(admin_url) = self.admin_url.clone() else {
            return;
        };
        let statement = if admin_url.starts_with("postgres") {
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)
        } else {
            format!("DROP DATABASE IF EXISTS {}", self.name)
        };
        // Drop runs outside any runtime guarantee: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let mut connection = sqlx::AnyConnection::connect(&admin_url).await.ok()?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(statement)).execute(&mut connection).await.ok()?;
                connection.close().await.ok()
            })
        })
        .join();
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct WithToken(Option<String>);

impl Interceptor for WithToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            let value =
                MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| Status::internal("bad token"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

pub type Admin = KeyAdminClient<InterceptedService<Channel, WithToken>>;
pub type Authorizer = AuthorizeClient<InterceptedService<Channel, WithToken>>;

/// A running server and its clients. Stops the server when dropped.
pub struct TestApp {
    pub address: std::net::SocketAddr,
    /// Where the server serves `/metrics`.
    pub metrics_address: std::net::SocketAddr,
    pub admin: Admin,
    pub authorize: Authorizer,
    pub store: Store,
    pub core: Arc<keygate::service::Core>,
    pub clock: Arc<ManualClock>,
    pub channel: Channel,
    /// The database this server uses; replicas share it.
    pub database_url: String,
    /// The extra flags it was started with.
    flags: Vec<String>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The first server of a test owns (and drops) the database; replicas do not.
    _database: Option<TestDatabase>,
}

impl TestApp {
    /// A client of KeyAdmin that presents `token` (or none).
    pub fn admin_with(&self, token: Option<&str>) -> Admin {
        KeyAdminClient::with_interceptor(self.channel.clone(), WithToken(token.map(str::to_owned)))
    }

    /// A client of Authorize that presents `token` (or none).
    pub fn authorize_with(&self, token: Option<&str>) -> Authorizer {
        AuthorizeClient::with_interceptor(self.channel.clone(), WithToken(token.map(str::to_owned)))
    }

    /// Stops the server gracefully (it writes what it buffered) and starts a new one on the same
    /// database, with the same clock and flags: a restart, or one step of a rolling update.
    pub async fn restart(self) -> TestApp {
        let flags = self.flags.clone();
        self.restart_with(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await
    }

    /// [`restart`](Self::restart) with other flags: a new version of the configuration.
    pub async fn restart_with(mut self, flags: &[&str]) -> TestApp {
        let database = self._database.take();
        let (url, clock) = (self.database_url.clone(), self.clock.clone());
        self.stop().await;
        let mut app = start(&url, flags, clock).await;
        app._database = database;
        app
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server result");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts keygate on `backend` with extra command-line flags; `None` when the backend is not
/// configured here (outside CI).
pub async fn spawn_app_with(backend: Backend, flags: &[&str]) -> Option<TestApp> {
    let database = TestDatabase::create(backend).await?;
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let mut app = start(&database.url, flags, clock).await;
    app._database = Some(database);
    Some(app)
}

/// Starts keygate on a fresh database of `backend`, reaching it through the URL that `route`
/// makes of the database's own (a proxy, say). Also returns the database's own URL.
pub async fn spawn_app_routed(
    backend: Backend,
    flags: &[&str],
    route: impl FnOnce(&str) -> String,
) -> Option<(TestApp, String)> {
    let database = TestDatabase::create(backend).await?;
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let direct = database.url.clone();
    let mut app = start(&route(&direct), flags, clock).await;
    app._database = Some(database);
    Some((app, direct))
}

/// Starts another server on the database of `app`, sharing its clock: a second replica.
pub async fn spawn_replica(app: &TestApp, flags: &[&str]) -> TestApp {
    start(&app.database_url, flags, app.clock.clone()).await
}

/// Starts another server sharing `app`'s clock on the database at `database_url`.
pub async fn spawn_replica_at(app: &TestApp, database_url: &str) -> TestApp {
    start(database_url, &[], app.clock.clone()).await
}

async fn start(database_url: &str, flags: &[&str], clock: Arc<ManualClock>) -> TestApp {
    let admin_tokens = format!("tests={ADMIN_TOKEN}");
    let mut args = vec![
        "keygate",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        database_url,
        "--admin-tokens",
        &admin_tokens,
        "--negative-cache-ttl-seconds",
        "60",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(flags);
    // Through the configuration-file parser, so that `--config FILE` applies as for the binary.
    let (cli, _) = keygate::config_file::parse(args).unwrap_or_else(|error| panic!("flags parse: {error:?}"));
    let config = Config::from_args(&cli.serve).expect("valid config");
    let app = App::bind_with_clock(config, clock.clone()).await.expect("bind");
    let address = app.local_addr();
    let metrics_address = app.metrics_addr().expect("metrics are served");
    let store = app.store();
    let core = app.core();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run(async move {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect_lazy();
    wait_until_serving(channel.clone()).await;
    TestApp {
        address,
        metrics_address,
        admin: KeyAdminClient::with_interceptor(channel.clone(), WithToken(Some(ADMIN_TOKEN.to_owned()))),
        authorize: AuthorizeClient::with_interceptor(channel.clone(), WithToken(None)),
        store,
        core,
        clock,
        channel,
        database_url: database_url.to_owned(),
        flags: flags.iter().map(|flag| flag.to_string()).collect(),
        stop: Some(stop),
        server: Some(server),
        _database: None,
    }
}

/// Starts keygate on `backend` with default settings.
/// Waits until `app`'s known-keys filter answers (the feed's follower builds it in a task of
/// its own after start); until then a made-up key is looked up as any missing key is.
pub async fn known_keys_built(app: &TestApp) {
    let started = std::time::Instant::now();
    while !app.core.cache.known().is_built() {
        assert!(started.elapsed() < Duration::from_secs(10), "the known-keys filter was not built in 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn spawn_app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, &[]).await
}

/// The overall health status of the server behind `channel`.
pub async fn health(channel: Channel) -> Result<ServingStatus, Status> {
    let response = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?;
    Ok(response.into_inner().status())
}

async fn wait_until_serving(channel: Channel) {
    for _ in 0..300 {
        if matches!(health(channel.clone()).await, Ok(ServingStatus::Serving)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("keygate did not become SERVING within 15 s");
}

// ---- shorthands for common calls ----

pub async fn put_tenant(app: &TestApp, tenant_id: &str) -> Tenant {
    put_tenant_with(app, PutTenantRequest { tenant_id: tenant_id.into(), ..Default::default() }).await
}

pub async fn put_tenant_with(app: &TestApp, request: PutTenantRequest) -> Tenant {
    app.admin.clone().put_tenant(request).await.expect("PutTenant").into_inner().tenant.unwrap()
}

pub async fn get_key(app: &TestApp, tenant_id: &str, key_id: &str) -> ApiKey {
    let request = GetKeyRequest { tenant_id: tenant_id.into(), key_id: key_id.into() };
    app.admin.clone().get_key(request).await.expect("GetKey").into_inner().key.unwrap()
}

pub async fn put_site(app: &TestApp, tenant_id: &str, site_id: &str) -> Result<Site, Status> {
    let request = PutSiteRequest { tenant_id: tenant_id.into(), site_id: site_id.into(), display_name: String::new() };
    Ok(app.admin.clone().put_site(request).await?.into_inner().site.unwrap())
}

/// A CreateKey request with one scope and nothing else.
pub fn key_request(tenant_id: &str, scopes: &[&str]) -> CreateKeyRequest {
    CreateKeyRequest {
        tenant_id: tenant_id.into(),
        name: "test key".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub async fn create_key(app: &TestApp, request: CreateKeyRequest) -> Result<(ApiKey, String), Status> {
    let response = app.admin.clone().create_key(request).await?.into_inner();
    Ok((response.key.unwrap(), response.secret))
}

pub async fn check(app: &TestApp, key: &str, scope: &str, site_id: &str) -> CheckResponse {
    try_check(app, key, scope, site_id).await.expect("Check")
}

pub async fn try_check(app: &TestApp, key: &str, scope: &str, site_id: &str) -> Result<CheckResponse, Status> {
    let request = CheckRequest { key: key.into(), scope: scope.into(), site_id: site_id.into(), ..Default::default() };
    Ok(app.authorize.clone().check(request).await?.into_inner())
}

/// Asserts a deny with its reason, HTTP status and message.
#[track_caller]
pub fn assert_denied(response: &CheckResponse, reason: DenyReason, http_status: u32, message: &str) {
    assert!(!response.allowed, "expected a deny, got {response:?}");
    assert_eq!(response.reason(), reason, "{response:?}");
    assert_eq!(response.http_status, http_status);
    assert_eq!(response.message, message);
}

/// Asserts a gRPC error code and, for INVALID_ARGUMENT, that BadRequest names `field`.
#[track_caller]
pub fn assert_status(result: Result<impl std::fmt::Debug, Status>, code: Code, field: Option<&str>) {
    let status = result.expect_err("expected an error");
    assert_eq!(status.code(), code, "{status:?}");
    if let Some(field) = field {
        use tonic_types::StatusExt;
        let details = status.get_error_details();
        let bad_request = details.bad_request().unwrap_or_else(|| panic!("no BadRequest in {status:?}"));
        let fields: Vec<_> = bad_request.field_violations.iter().map(|v| v.field.as_str()).collect();
        assert!(fields.contains(&field), "violations {fields:?} do not name {field}");
    }
}

/// Kills a child process (the keygate binary) when the test ends, however it ends.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real `keygate` binary, started on a SQLite database of its own with `env` set (and
/// through `sh -c '<shell_prefix> exec keygate'` when a prefix such as `ulimit -n 128;` is
/// given); stopped when dropped.
pub struct Binary {
    pub process: KillOnDrop,
    pub address: std::net::SocketAddr,
    pub channel: Channel,
    _dir: tempfile::TempDir,
}

impl Binary {
    pub async fn start(env: &[(&str, &str)], shell_prefix: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let address = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let binary = env!("CARGO_BIN_EXE_keygate");
        let mut command = match shell_prefix {
            None => std::process::Command::new(binary),
            Some(prefix) => {
                let mut command = std::process::Command::new("sh");
                command.args(["-c", &format!("{prefix} exec {binary}")]);
                command
            }
        };
        command
            .env("KEYGATE_LISTEN", address.to_string())
            .env("KEYGATE_METRICS_LISTEN", "off")
            .env("KEYGATE_DATABASE_URL", format!("sqlite://{}?mode=rwc", dir.path().join("keygate.db").display()))
            .env("KEYGATE_ADMIN_TOKENS", format!("tests={ADMIN_TOKEN}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for (name, value) in env {
            command.env(name, value);
        }
        let process = KillOnDrop(command.spawn().expect("start the keygate binary"));
        let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect_lazy();
        wait_until_serving(channel.clone()).await;
        Self { process, address, channel, _dir: dir }
    }

    pub fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// A KeyAdmin client with the admin token.
    pub fn admin(&self) -> Admin {
        KeyAdminClient::with_interceptor(self.channel.clone(), WithToken(Some(ADMIN_TOKEN.to_owned())))
    }

    /// A tenant `acme` and a key of it with `events:read`; returns the secret.
    pub async fn key(&self) -> String {
        let mut admin = self.admin();
        admin.put_tenant(PutTenantRequest { tenant_id: "acme".into(), ..Default::default() }).await.unwrap();
        admin.create_key(key_request("acme", &["events:read"])).await.unwrap().into_inner().secret
    }

    /// Whether a fresh, well-behaved client gets `secret` allowed within `wait`.
    pub async fn serves(&self, secret: &str, wait: Duration) -> bool {
        let check = async {
            let channel = Channel::from_shared(format!("http://{}", self.address)).unwrap().connect().await.ok()?;
            let request = CheckRequest {
                key: secret.into(),
                scope: "events:read".into(),
                site_id: String::new(),
                ..Default::default()
            };
            let response = AuthorizeClient::new(channel).check(request).await.ok()?;
            Some(response.into_inner().allowed)
        };
        tokio::time::timeout(wait, check).await.ok().flatten() == Some(true)
    }
}

/// Resident memory of a process, in MiB.
pub fn resident_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<f64>().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// CPU time a process has used, user and system, from /proc.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks: u64 = [11, 12].iter().filter_map(|index| fields.get(*index)?.parse::<u64>().ok()).sum();
    Duration::from_millis(ticks * 10)
}
