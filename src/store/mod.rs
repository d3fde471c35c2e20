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

use crate::domain::model::{KeyRecord, KeyState, Site};

/// What can go wrong below the domain.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or failed; details are for the log only.
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
            _ => Self::Unavailable(error.to_string()),
        }
    }
}

/// Whether a database's own error is worth retrying (connection trouble, overload, deadlock,
/// lock timeout, shutdown) rather than a statement the database will always refuse.
fn is_transient(error: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(mysql) = error.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        // Lock wait timeout, deadlock, too many connections, server shutdown, read-only.
        return matches!(mysql.number(), 1205 | 1213 | 1040 | 1053 | 1290 | 1836);
    }
    let code = error.code().unwrap_or_default();
    if error.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // SQLITE_BUSY and SQLITE_LOCKED, with their extended codes.
        return code.parse::<i32>().is_ok_and(|code| matches!(code & 0xff, 5 | 6));
    }
    // PostgreSQL SQLSTATE classes: connection, rollback (serialisation, deadlock),
    // insufficient resources, operator intervention; and lock not available.
    ["08", "40", "53", "57"].iter().any(|class| code.starts_with(class)) || code == "55P03"
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        Self::Unavailable(format!("migration failed: {error}"))
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
    /// The tenant already holds `limit` active keys.
    LimitReached {
        limit: u32,
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
    queries: Arc<AtomicU64>,
    /// Changes this replica committed, which its follower of the feed can skip.
    own_changes: Arc<std::sync::Mutex<std::collections::BTreeSet<i64>>>,
}

impl Store {
    /// Creates the pool without connecting: the server starts, reports NOT_SERVING, and
    /// connects and migrates in the background.
    pub fn connect_lazy(url: &str, max_connections: u32, acquire_timeout: Duration) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        use sqlx::Executor;
                        // WAL lets Checks read while an admin call writes.
                        connection
                            .execute(
                                "PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000; \
                                 PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;",
                            )
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_lazy(url)
            .map_err(|error| StoreError::Config(format!("invalid database URL: {}", redact_error(&error))))?;
        Ok(Self { pool, backend, queries: Arc::new(AtomicU64::new(0)), own_changes: Arc::default() })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// How many statements this store has sent to the database since it was created.
    pub fn query_count(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Applies pending migrations (idempotent; safe to run from several replicas at once).
    pub async fn migrate(&self) -> StoreResult<()> {
        self.counted();
        self.backend.migrator().run(&self.pool).await?;
        Ok(())
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> StoreResult<()> {
        self.counted();
        sqlx::query::<Any>("SELECT 1").execute(&self.pool).await?;
        Ok(())
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
        const CHUNK: usize = 100;
        let Some(width) = rows.first().map(Vec::len) else { return Ok(()) };
        let placeholders = format!("({})", vec!["?"; width].join(", "));
        let mut tx = self.pool.begin().await?;
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let chunk: Vec<Vec<Column>> = rows.by_ref().take(CHUNK).collect();
            let values = vec![placeholders.as_str(); chunk.len()].join(", ");
            let mut query =
                sqlx::query::<Any>(self.backend.sql(self.backend.insert_adding_counts(table, columns, key, &values)));
            for value in chunk.into_iter().flatten() {
                query = value.bind_to(query);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
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
