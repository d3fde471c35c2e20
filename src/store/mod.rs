//! Persistence for tenants, sites and keys on SQLite, PostgreSQL or MySQL.
//!
//! One implementation serves all three through sqlx's `Any` driver: the schema uses only types
//! every backend reads the same way through it (text and 64-bit integers; timestamps are
//! microseconds since the epoch), and [`Backend`] covers the few dialect differences. No
//! `sqlx::Error` leaves this module: callers see [`StoreError`].

mod audit;
mod backend;
mod counts;
mod feed;
mod health;
mod import;
mod keys;
mod rows;
mod tenants;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::any::AnyPoolOptions;
use sqlx::{Any, AnyPool};

pub use audit::{DenialKey, UsageKey};
pub use backend::Backend;
pub use counts::CountKey;
pub use feed::{Change, ChangeTarget};
pub use health::{StoreHealth, TRIP_AFTER};
pub use import::ImportOutcome;

use crate::domain::model::{KeyRecord, KeyState, Site};

/// What can go wrong below the domain.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The database did not answer: no connection, a broken one, or no answer within
    /// `KEYGATE_DB_QUERY_TIMEOUT_MS`. Details are for the log only.
    #[error("database unreachable: {0}")]
    Unreachable(String),
    /// The database answered with a condition that may pass (a deadlock, a lock or statement
    /// timeout, a full disk, a read-only database); details are for the log only.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A row could not be read back (corrupt JSON, an out-of-range number).
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    /// The database refused a statement for good (a constraint, a bug): retrying will not help.
    #[error("database refused the statement: {0}")]
    Rejected(String),
    /// The database URL or pool settings are unusable.
    #[error("{0}")]
    Config(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::ColumnNotFound(_) => {
                Self::Corrupt(error.to_string())
            }
            sqlx::Error::Database(database) if !is_transient(database.as_ref()) => Self::Rejected(error.to_string()),
            sqlx::Error::Database(_) => Self::Unavailable(error.to_string()),
            _ => Self::Unreachable(error.to_string()),
        }
    }
}

/// Whether a database's own error is a condition of the database that may pass (connection
/// trouble, overload, deadlock, lock or statement timeout, shutdown, a full disk, a read-only
/// database or file) rather than a statement the database will always refuse (a bug).
fn is_transient(error: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(mysql) = error.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return matches!(
            mysql.number(),
            // Disk full, out of memory, too many connections, shutdown, network errors.
            1021 | 1037 | 1038 | 1040 | 1041 | 1053 | 1158
                ..=1161
            // Table full, lock wait timeout, deadlock, query interrupted, read-only server.
            | 1114 | 1205 | 1213 | 1317 | 1290 | 1792 | 1836
            // Statement time limits (MariaDB, MySQL), connection killed, idle disconnect.
            | 1927 | 1969 | 3024 | 4031
        );
    }
    let code = error.code().unwrap_or_default();
    if error.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_NOMEM, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL,
        // SQLITE_CANTOPEN, SQLITE_PROTOCOL, with their extended codes.
        return code.parse::<i32>().is_ok_and(|code| matches!(code & 0xff, 5 | 6 | 7 | 8 | 10 | 13 | 14 | 15));
    }
    // PostgreSQL SQLSTATE classes: connection, rollback (serialisation, deadlock), insufficient
    // resources (disk full), operator intervention (statement timeout, shutdown), system error;
    // and lock not available, read-only transaction (a standby after failover).
    ["08", "40", "53", "57", "58"].iter().any(|class| code.starts_with(class))
        || matches!(code.as_ref(), "55P03" | "25006")
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        match error {
            sqlx::migrate::MigrateError::Execute(error) => Self::from(error),
            other => Self::Rejected(format!("migration failed: {other}")),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Result of PutSite.
#[derive(Debug)]
pub enum PutSiteOutcome {
    Saved(Site),
    /// The tenant does not exist.
    TenantMissing,
    /// Another tenant owns this site id.
    OwnedByAnotherTenant,
}

/// Result of inserting a key under the tenant's active-key limit.
#[derive(Debug)]
pub enum InsertKeyOutcome {
    Inserted,
    TenantMissing,
    /// The tenant already holds `active` active keys, `limit` or more (imports may exceed it).
    LimitReached {
        limit: u32,
        active: i64,
    },
}

/// Result of a write to an existing key.
#[derive(Debug)]
pub enum KeyWrite {
    /// Written; the key as it is now.
    Done(Box<KeyRecord>),
    /// No such key for this tenant.
    NotFound,
    /// The key is revoked or expired.
    NotActive { key: Box<KeyRecord>, state: KeyState },
    /// The key was rotated: its successor is the one to change.
    Rotated { key: Box<KeyRecord> },
}

/// Result of RotateKey's write.
#[derive(Debug)]
pub enum RotateOutcome {
    Rotated,
    /// The old key was revoked, or rotated already, between the read and the write.
    Conflict,
    /// A grace period would leave the tenant with more working keys than `limit` plus the one
    /// on its way out; the tenant has `others` working keys besides the old one.
    LimitReached {
        limit: u32,
        others: i64,
    },
}

/// Filters of ListKeys.
#[derive(Debug, Default)]
pub struct KeyFilter<'a> {
    pub include_revoked: bool,
    pub site_id: Option<&'a str>,
    /// Only keys whose id sorts after this one (the page token).
    pub after_key_id: Option<&'a str>,
}

const KEY_COLUMNS: &str = "key_id, tenant_id, key_hash, name, display_prefix, scopes, site_ids, environment, metadata, \
     rate_limit_per_minute, created_at, expires_at, revoked_at, last_used_at, rotated_from_key_id";

/// The database, with a counter of the statements it ran (tests read it to prove cache hits).
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// The most one operation may take; see `KEYGATE_DB_QUERY_TIMEOUT_MS`.
    query_timeout: Duration,
    /// The URL, for [`connect_once`](Self::connect_once); never printed.
    url: Arc<str>,
    health: Arc<StoreHealth>,
    queries: Arc<AtomicU64>,
    /// Changes this replica committed, which its follower of the feed can skip.
    own_changes: Arc<std::sync::Mutex<std::collections::BTreeSet<i64>>>,
    /// Whether [`migrate`](Self::migrate) succeeded: until then every operation is
    /// UNAVAILABLE (a call that arrives while keygate starts must not meet missing tables).
    migrated: Arc<std::sync::atomic::AtomicBool>,
}

/// Pings a pooled connection within `timeout`: `Ok(true)` when it answers, an error (the pool
/// then drops it without further I/O) when it fails or says nothing in time.
async fn ping_within(
    connection: &mut sqlx::AnyConnection,
    timeout: Duration,
    silent: &'static str,
) -> Result<bool, sqlx::Error> {
    use sqlx::Connection;
    match tokio::time::timeout(timeout, connection.ping()).await {
        Ok(answered) => answered.map(|()| true),
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, silent))),
    }
}

impl Store {
    /// Creates the pool without connecting: the server starts, reports NOT_SERVING, and
    /// connects and migrates in the background.
    pub fn connect_lazy(database: &crate::config::DatabaseConfig) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        let url = database.url.0.as_str();
        let backend = Backend::from_url(url)?;
        let query_timeout = database.query_timeout;
        let pool = AnyPoolOptions::new()
            .max_connections(database.max_connections)
            .acquire_timeout(database.acquire_timeout.min(query_timeout))
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    use sqlx::Executor;
                    for statement in backend.session_settings(connection, query_timeout).await? {
                        connection.execute(sqlx::AssertSqlSafe(statement)).await?;
                    }
                    Ok(())
                })
            })
            // sqlx pings every connection given back to the pool (flushing the rollback of a
            // transaction dropped halfway), with no timeout: on a black-holed network that ping
            // holds the pool slot for the kernel's TCP timeout (~15 minutes). This one, first,
            // has the query timeout, and an error makes sqlx drop the connection without I/O.
            // SQLite is not pinged: its connection is a thread of this process that runs
            // commands in order (a queued rollback runs before the next user's statements),
            // and it cannot be cut off; a ping would only cost two thread hand-offs.
            .after_release(move |connection, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        return Ok(true);
                    }
                    ping_within(connection, query_timeout, "a connection given back to the pool did not answer").await
                })
            })
            // Every connection is pinged before use, as sqlx would, but within the query timeout
            // (sqlx's own ping has none). Pinging only connections idle for a while is not
            // enough: after a database restart every pooled connection is dead, however
            // recently used, and each would fail one call.
            .test_before_acquire(false)
            .before_acquire(move |connection, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        return Ok(true);
                    }
                    ping_within(connection, query_timeout, "a pooled connection did not answer").await
                })
            })
            .connect_lazy(url)
            .map_err(|error| StoreError::Config(format!("invalid database URL: {}", redact_error(&error))))?;
        Ok(Self {
            pool,
            backend,
            query_timeout,
            url: Arc::from(url),
            health: Arc::default(),
            queries: Arc::new(AtomicU64::new(0)),
            own_changes: Arc::default(),
            migrated: Arc::default(),
        })
    }

    /// Whether the database is answering, as this store's operations see it.
    pub fn health(&self) -> &StoreHealth {
        &self.health
    }

    /// Runs one store operation within the query timeout, and records whether the database
    /// answered. While the database is known to be unreachable (the breaker is open), fails at
    /// once instead: only [`ping`](Self::ping) probes it then.
    async fn bounded<T>(&self, operation: impl std::future::Future<Output = StoreResult<T>>) -> StoreResult<T> {
        if !self.migrated.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("keygate is starting: the database is not migrated yet".into()));
        }
        if let Some(failing) = self.health.unreachable_for() {
            return Err(StoreError::Unreachable(format!("no answer from the database for {} ms", failing.as_millis())));
        }
        self.timed(operation).await
    }

    /// [`bounded`](Self::bounded) without the breaker: for probes.
    async fn timed<T>(&self, operation: impl std::future::Future<Output = StoreResult<T>>) -> StoreResult<T> {
        let operation_health = self.health.begin();
        let result = match tokio::time::timeout(self.query_timeout, operation).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unreachable(format!(
                "no answer within KEYGATE_DB_QUERY_TIMEOUT_MS ({} ms)",
                self.query_timeout.as_millis()
            ))),
        };
        operation_health.observe(&result);
        result
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// How many statements this store has sent to the database since it was created.
    pub fn query_count(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Applies pending migrations (idempotent; safe to run from several replicas at once). Not
    /// bounded by the query timeout: a migration may take long on a large table.
    pub async fn migrate(&self) -> StoreResult<()> {
        self.counted();
        self.backend.migrator().run(&self.pool).await.map_err(StoreError::from)?;
        self.migrated.store(true, Ordering::Release);
        Ok(())
    }

    /// Opens one connection outside the pool, within the acquire timeout, and closes it: the
    /// error of a failed attempt names its cause (refused, unknown host, no such database).
    pub async fn connect_once(&self) -> Result<(), String> {
        use sqlx::Connection;
        let url = self.url.clone();
        let attempt = async { sqlx::AnyConnection::connect(&url).await?.close().await };
        match tokio::time::timeout(self.query_timeout.max(Duration::from_secs(5)), attempt).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(redact_error(&error)),
            Err(_) => Err("no answer in time".into()),
        }
    }

    /// How many migrations the database records as applied (0 before the first).
    pub async fn migrations_applied(&self) -> StoreResult<i64> {
        let count: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM _sqlx_migrations").fetch_one(&self.pool).await?;
        Ok(count.0)
    }

    /// Checks that the database answers, within the query timeout, even while the breaker is
    /// open: the probe that closes it.
    pub async fn ping(&self) -> StoreResult<()> {
        self.counted();
        self.timed(async {
            sqlx::query::<Any>("SELECT 1").execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    /// Closes every connection; pending queries finish first.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn counted(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("keygate_store_queries_total").increment(1);
    }

    fn query(
        &self,
        sql: impl Into<std::borrow::Cow<'static, str>>,
    ) -> sqlx::query::Query<'static, Any, sqlx::any::AnyArguments> {
        self.counted();
        sqlx::query(self.backend.sql(sql))
    }
}

/// A value for one column of a statement built at run time.
pub(super) enum Column {
    Text(Option<String>),
    Integer(Option<i64>),
}

type AnyQuery = sqlx::query::Query<'static, Any, sqlx::any::AnyArguments>;

impl Column {
    fn bind_to(self, query: AnyQuery) -> AnyQuery {
        match self {
            Self::Text(text) => query.bind(text),
            Self::Integer(number) => query.bind(number),
        }
    }
}

impl Store {
    /// Inserts `rows` (values for `columns`, the last one `count`) into `table`, adding `count`
    /// to the row with the same `key` where there is one. In chunks, in one transaction. Not
    /// counted in [`query_count`](Store::query_count): it is background work.
    pub(super) async fn add_counts(
        &self,
        table: &str,
        columns: &str,
        key: &str,
        rows: Vec<Vec<Column>>,
    ) -> StoreResult<()> {
        self.add_counts_keeping_earliest(table, columns, key, None, rows).await
    }

    /// [`add_counts`](Self::add_counts), and where a row exists, `earliest` (a time column)
    /// keeps the smaller of its value and the new one.
    pub(super) async fn add_counts_keeping_earliest(
        &self,
        table: &str,
        columns: &str,
        key: &str,
        earliest: Option<&str>,
        rows: Vec<Vec<Column>>,
    ) -> StoreResult<()> {
        const CHUNK: usize = 100;
        let Some(width) = rows.first().map(Vec::len) else { return Ok(()) };
        let placeholders = format!("({})", vec!["?"; width].join(", "));
        // Each statement has the query timeout, not the whole batch: a batch can be long after
        // an outage, and a statement that gets no answer drops (rolls back) the transaction.
        let mut tx = self.bounded(async { Ok(self.pool.begin().await?) }).await?;
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let chunk: Vec<Vec<Column>> = rows.by_ref().take(CHUNK).collect();
            let values = vec![placeholders.as_str(); chunk.len()].join(", ");
            let mut query = sqlx::query::<Any>(
                self.backend.sql(self.backend.insert_adding_counts(table, columns, key, earliest, &values)),
            );
            for value in chunk.into_iter().flatten() {
                query = value.bind_to(query);
            }
            self.bounded(async { Ok(query.execute(&mut *tx).await?) }).await?;
        }
        self.bounded(async { Ok(tx.commit().await?) }).await
    }
}

/// How RotateKey ends the old key.
#[derive(Clone, Copy, Debug)]
pub enum KeyEnd {
    RevokeAt(DateTime<Utc>),
    ExpireAt(DateTime<Utc>),
}

/// sqlx errors can quote the URL they failed to parse, and with it a password.
fn redact_error(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Configuration(_) => "the URL could not be parsed".to_owned(),
        other => other.to_string(),
    }
}
