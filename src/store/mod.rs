//! Persistence for tenants, sites and keys on SQLite, PostgreSQL or MySQL.
//!
//! One implementation serves all three through sqlx's `Any` driver: the schema uses only types
//! every backend reads the same way through it (text and 64-bit integers; timestamps are
//! microseconds since the epoch), and [`Backend`] covers the few dialect differences. No
//! `sqlx::Error` leaves this module: callers see [`StoreError`].

mod backend;
mod rows;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Transaction};

pub use backend::Backend;
use rows::{key_from_row, micros, site_from_row, tenant_from_row, to_json};

use crate::domain::model::{KeyPatch, KeyRecord, KeyState, Site, Tenant, TenantChanges};

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
        Ok(Self { pool, backend, queries: Arc::new(AtomicU64::new(0)) })
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
    }

    fn query(
        &self,
        sql: impl Into<std::borrow::Cow<'static, str>>,
    ) -> sqlx::query::Query<'static, Any, sqlx::any::AnyArguments> {
        self.counted();
        sqlx::query(self.backend.sql(sql))
    }

    // ---- tenants ----

    /// Creates the tenant with defaults for unset fields, or updates the set fields.
    pub async fn put_tenant(
        &self,
        tenant_id: &str,
        changes: &TenantChanges,
        now: DateTime<Utc>,
    ) -> StoreResult<Tenant> {
        let mut tx = self.pool.begin().await?;
        let insert = self.backend.insert_if_absent(
            "tenants (tenant_id, display_name, api_access_enabled, max_keys, rate_limit_per_minute, \
             daily_request_quota, created_at, updated_at)",
            "?, ?, 1, 0, 0, 0, ?, ?",
            "tenant_id",
        );
        self.query(insert)
            .bind(tenant_id.to_owned())
            .bind(tenant_id.to_owned())
            .bind(micros(now))
            .bind(micros(now))
            .execute(&mut *tx)
            .await?;
        self.query(
            "UPDATE tenants SET display_name = COALESCE(?, display_name), \
             api_access_enabled = COALESCE(?, api_access_enabled), max_keys = COALESCE(?, max_keys), \
             rate_limit_per_minute = COALESCE(?, rate_limit_per_minute), \
             daily_request_quota = COALESCE(?, daily_request_quota), updated_at = ? WHERE tenant_id = ?",
        )
        .bind(changes.display_name.clone())
        .bind(changes.api_access_enabled.map(i64::from))
        .bind(changes.max_keys.map(i64::from))
        .bind(changes.rate_limit_per_minute.map(i64::from))
        .bind(changes.daily_request_quota.map(i64::from))
        .bind(micros(now))
        .bind(tenant_id.to_owned())
        .execute(&mut *tx)
        .await?;
        let tenant = self.tenant_in(&mut tx, tenant_id).await?;
        tx.commit().await?;
        tenant.ok_or_else(|| StoreError::Corrupt("tenant vanished inside its own transaction".into()))
    }

    pub async fn get_tenant(&self, tenant_id: &str) -> StoreResult<Option<Tenant>> {
        let mut connection = self.pool.acquire().await?;
        self.tenant_in(&mut connection, tenant_id).await
    }

    async fn tenant_in(&self, connection: &mut sqlx::AnyConnection, tenant_id: &str) -> StoreResult<Option<Tenant>> {
        let row = self
            .query(
                "SELECT tenant_id, display_name, api_access_enabled, max_keys, rate_limit_per_minute, \
                 daily_request_quota, created_at, updated_at FROM tenants WHERE tenant_id = ?",
            )
            .bind(tenant_id.to_owned())
            .fetch_optional(connection)
            .await?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    /// Serialises writes to one tenant's keys: the first statement of the transaction takes the
    /// tenant's row lock (PostgreSQL, MySQL) or the database write lock (SQLite), so concurrent
    /// CreateKey calls count active keys one after another. False when the tenant does not exist.
    async fn lock_tenant(&self, tx: &mut Transaction<'static, Any>, tenant_id: &str) -> StoreResult<bool> {
        let result = self
            .query("UPDATE tenants SET updated_at = updated_at WHERE tenant_id = ?")
            .bind(tenant_id.to_owned())
            .execute(&mut **tx)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    // ---- sites ----

    /// Creates or renames a site; a site id belongs to one tenant for good.
    pub async fn put_site(
        &self,
        tenant_id: &str,
        site_id: &str,
        display_name: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<PutSiteOutcome> {
        let mut tx = self.pool.begin().await?;
        if !self.lock_tenant(&mut tx, tenant_id).await? {
            return Ok(PutSiteOutcome::TenantMissing);
        }
        let insert = self.backend.insert_if_absent(
            "sites (site_id, tenant_id, display_name, created_at, updated_at)",
            "?, ?, ?, ?, ?",
            "site_id",
        );
        self.query(insert)
            .bind(site_id.to_owned())
            .bind(tenant_id.to_owned())
            .bind(display_name.to_owned())
            .bind(micros(now))
            .bind(micros(now))
            .execute(&mut *tx)
            .await?;
        let updated = self
            .query("UPDATE sites SET display_name = ?, updated_at = ? WHERE site_id = ? AND tenant_id = ?")
            .bind(display_name.to_owned())
            .bind(micros(now))
            .bind(site_id.to_owned())
            .bind(tenant_id.to_owned())
            .execute(&mut *tx)
            .await?;
        if updated.rows_affected() == 0 {
            return Ok(PutSiteOutcome::OwnedByAnotherTenant);
        }
        let row = self
            .query("SELECT tenant_id, site_id, display_name, created_at, updated_at FROM sites WHERE site_id = ?")
            .bind(site_id.to_owned())
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(PutSiteOutcome::Saved(site_from_row(&row)?))
    }

    /// Deletes a site of the tenant; false when the tenant has no such site.
    pub async fn delete_site(&self, tenant_id: &str, site_id: &str) -> StoreResult<bool> {
        let result = self
            .query("DELETE FROM sites WHERE site_id = ? AND tenant_id = ?")
            .bind(site_id.to_owned())
            .bind(tenant_id.to_owned())
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    /// One page of the tenant's sites, in site id order.
    pub async fn list_sites(
        &self,
        tenant_id: &str,
        after_site_id: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<Site>> {
        let rows = self
            .query(
                "SELECT tenant_id, site_id, display_name, created_at, updated_at FROM sites \
                 WHERE tenant_id = ? AND site_id > ? ORDER BY site_id LIMIT ?",
            )
            .bind(tenant_id.to_owned())
            .bind(after_site_id.unwrap_or_default().to_owned())
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(site_from_row).collect()
    }

    /// The tenant that owns a site, if the site exists.
    pub async fn site_owner(&self, site_id: &str) -> StoreResult<Option<String>> {
        let owner: Option<(String,)> =
            sqlx::query_as(self.backend.sql("SELECT tenant_id FROM sites WHERE site_id = ?"))
                .bind(site_id.to_owned())
                .fetch_optional(&self.pool)
                .await?;
        self.counted();
        Ok(owner.map(|(tenant_id,)| tenant_id))
    }

    /// Which of `site_ids` the tenant owns.
    pub async fn owned_sites(&self, tenant_id: &str, site_ids: &[String]) -> StoreResult<Vec<String>> {
        if site_ids.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders = vec!["?"; site_ids.len()].join(", ");
        let mut query = self
            .query(format!("SELECT site_id FROM sites WHERE tenant_id = ? AND site_id IN ({placeholders})"))
            .bind(tenant_id.to_owned());
        for site_id in site_ids {
            query = query.bind(site_id.clone());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(|row| sqlx::Row::try_get::<String, _>(row, 0).map_err(StoreError::from)).collect()
    }

    // ---- keys ----

    /// Inserts a key unless the tenant already has `max_active_keys` active keys at `now`.
    /// Concurrent calls for one tenant are serialised, so the limit is never exceeded.
    pub async fn insert_key(
        &self,
        key: &KeyRecord,
        max_active_keys: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<InsertKeyOutcome> {
        let mut tx = self.pool.begin().await?;
        if !self.lock_tenant(&mut tx, &key.tenant_id).await? {
            return Ok(InsertKeyOutcome::TenantMissing);
        }
        let active: (i64,) = sqlx::query_as(self.backend.sql(
            "SELECT COUNT(*) FROM api_keys WHERE tenant_id = ? AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > ?)",
        ))
        .bind(key.tenant_id.clone())
        .bind(micros(now))
        .fetch_one(&mut *tx)
        .await?;
        self.counted();
        if active.0 >= i64::from(max_active_keys) {
            return Ok(InsertKeyOutcome::LimitReached { limit: max_active_keys });
        }
        self.insert_key_in(&mut tx, key).await?;
        tx.commit().await?;
        Ok(InsertKeyOutcome::Inserted)
    }

    async fn insert_key_in(&self, tx: &mut Transaction<'static, Any>, record: &KeyRecord) -> StoreResult<()> {
        self.query(format!(
            "INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(record.key_id.clone())
        .bind(record.tenant_id.clone())
        .bind(record.key_hash.clone())
        .bind(record.name.clone())
        .bind(record.display_prefix.clone())
        .bind(to_json(&record.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>()))
        .bind(to_json(&record.site_ids))
        .bind(record.environment.as_str())
        .bind(to_json(&record.metadata))
        .bind(i64::from(record.rate_limit_per_minute))
        .bind(micros(record.created_at))
        .bind(record.expires_at.map(micros))
        .bind(record.revoked_at.map(micros))
        .bind(record.last_used_at.map(micros))
        .bind(record.rotated_from_key_id.clone())
        .execute(&mut **tx)
        .await?;
        self.replace_key_sites(tx, &record.key_id, &record.site_ids).await
    }

    async fn replace_key_sites(
        &self,
        tx: &mut Transaction<'static, Any>,
        key_id: &str,
        site_ids: &[String],
    ) -> StoreResult<()> {
        self.query("DELETE FROM key_sites WHERE key_id = ?").bind(key_id.to_owned()).execute(&mut **tx).await?;
        for site_id in site_ids {
            self.query("INSERT INTO key_sites (key_id, site_id) VALUES (?, ?)")
                .bind(key_id.to_owned())
                .bind(site_id.clone())
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// A key of the tenant by id.
    pub async fn get_key(&self, tenant_id: &str, key_id: &str) -> StoreResult<Option<KeyRecord>> {
        let mut connection = self.pool.acquire().await?;
        self.key_in(&mut connection, tenant_id, key_id).await
    }

    /// The key whose secret hashes to `key_hash`: the lookup behind every cache miss of Check.
    pub async fn key_by_hash(&self, key_hash: &str) -> StoreResult<Option<KeyRecord>> {
        let row = self
            .query(format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?"))
            .bind(key_hash.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    /// One page of the tenant's keys in key id (creation) order.
    pub async fn list_keys(
        &self,
        tenant_id: &str,
        filter: &KeyFilter<'_>,
        limit: usize,
    ) -> StoreResult<Vec<KeyRecord>> {
        let mut sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = ? AND key_id > ?");
        if !filter.include_revoked {
            sql.push_str(" AND revoked_at IS NULL");
        }
        if filter.site_id.is_some() {
            sql.push_str(" AND key_id IN (SELECT key_id FROM key_sites WHERE site_id = ?)");
        }
        sql.push_str(" ORDER BY key_id LIMIT ?");
        let mut query =
            self.query(sql).bind(tenant_id.to_owned()).bind(filter.after_key_id.unwrap_or_default().to_owned());
        if let Some(site_id) = filter.site_id {
            query = query.bind(site_id.to_owned());
        }
        let rows: Vec<AnyRow> = query.bind(limit as i64).fetch_all(&self.pool).await?;
        rows.iter().map(key_from_row).collect()
    }

    /// Applies the fields of `patch` that are set to an active key that was not rotated.
    /// Serialised with the tenant's other key writes, and only the patched columns are written,
    /// so concurrent updates of different fields all land.
    pub async fn update_key(
        &self,
        tenant_id: &str,
        key_id: &str,
        patch: &KeyPatch,
        now: DateTime<Utc>,
    ) -> StoreResult<KeyWrite> {
        let mut tx = self.pool.begin().await?;
        if !self.lock_tenant(&mut tx, tenant_id).await? {
            return Ok(KeyWrite::NotFound);
        }
        let Some(current) = self.key_in(&mut tx, tenant_id, key_id).await? else {
            return Ok(KeyWrite::NotFound);
        };
        match current.state(now) {
            KeyState::Active => {}
            state => return Ok(KeyWrite::NotActive { key: Box::new(current), state }),
        }
        if self.successors_in(&mut tx, key_id).await? > 0 {
            return Ok(KeyWrite::Rotated { key: Box::new(current) });
        }
        let mut assignments: Vec<(&str, Column)> = Vec::new();
        if let Some(name) = &patch.name {
            assignments.push(("name", Column::Text(Some(name.clone()))));
        }
        if let Some(scopes) = &patch.scopes {
            let scopes = to_json(&scopes.iter().map(|scope| scope.as_str()).collect::<Vec<_>>());
            assignments.push(("scopes", Column::Text(Some(scopes))));
        }
        if let Some(site_ids) = &patch.site_ids {
            assignments.push(("site_ids", Column::Text(Some(to_json(site_ids)))));
        }
        if let Some(metadata) = &patch.metadata {
            assignments.push(("metadata", Column::Text(Some(to_json(metadata)))));
        }
        if let Some(expires_at) = patch.expires_at {
            assignments.push(("expires_at", Column::Integer(expires_at.map(micros))));
        }
        if let Some(limit) = patch.rate_limit_per_minute {
            assignments.push(("rate_limit_per_minute", Column::Integer(Some(i64::from(limit)))));
        }
        if !assignments.is_empty() {
            let columns = assignments.iter().map(|(column, _)| format!("{column} = ?")).collect::<Vec<_>>();
            let sql = format!(
                "UPDATE api_keys SET {} WHERE key_id = ? AND tenant_id = ? AND revoked_at IS NULL",
                columns.join(", ")
            );
            let mut query = self.query(sql);
            for (_, value) in assignments {
                query = match value {
                    Column::Text(text) => query.bind(text),
                    Column::Integer(number) => query.bind(number),
                };
            }
            let updated = query.bind(key_id.to_owned()).bind(tenant_id.to_owned()).execute(&mut *tx).await?;
            if updated.rows_affected() == 0 {
                return Ok(KeyWrite::NotFound);
            }
        }
        if let Some(site_ids) = &patch.site_ids {
            self.replace_key_sites(&mut tx, key_id, site_ids).await?;
        }
        let updated = self.key_in(&mut tx, tenant_id, key_id).await?;
        tx.commit().await?;
        Ok(updated.map_or(KeyWrite::NotFound, |key| KeyWrite::Done(Box::new(key))))
    }

    /// Revokes a key at `now` unless it is revoked already, and returns it as it is afterwards.
    pub async fn revoke_key(
        &self,
        tenant_id: &str,
        key_id: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<KeyRecord>> {
        let mut tx = self.pool.begin().await?;
        self.query("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND tenant_id = ? AND revoked_at IS NULL")
            .bind(micros(now))
            .bind(key_id.to_owned())
            .bind(tenant_id.to_owned())
            .execute(&mut *tx)
            .await?;
        let key = self.key_in(&mut tx, tenant_id, key_id).await?;
        tx.commit().await?;
        Ok(key)
    }

    async fn key_in(
        &self,
        connection: &mut sqlx::AnyConnection,
        tenant_id: &str,
        key_id: &str,
    ) -> StoreResult<Option<KeyRecord>> {
        let row = self
            .query(format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = ? AND tenant_id = ?"))
            .bind(key_id.to_owned())
            .bind(tenant_id.to_owned())
            .fetch_optional(connection)
            .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn successors_in(&self, connection: &mut sqlx::AnyConnection, key_id: &str) -> StoreResult<i64> {
        self.counted();
        let successors: (i64,) =
            sqlx::query_as(self.backend.sql("SELECT COUNT(*) FROM api_keys WHERE rotated_from_key_id = ?"))
                .bind(key_id.to_owned())
                .fetch_one(connection)
                .await?;
        Ok(successors.0)
    }

    /// Atomically ends the old key (revoked at `revoke_at`, or expiring at `expire_at`) and
    /// inserts its successor. Fails with `Conflict` when the old key was revoked or already
    /// rotated by a concurrent call.
    pub async fn rotate_key(&self, old: &KeyRecord, end: KeyEnd, successor: &KeyRecord) -> StoreResult<RotateOutcome> {
        let mut tx = self.pool.begin().await?;
        if !self.lock_tenant(&mut tx, &old.tenant_id).await? {
            return Ok(RotateOutcome::Conflict);
        }
        if self.successors_in(&mut tx, &old.key_id).await? > 0 {
            return Ok(RotateOutcome::Conflict);
        }
        let (revoked_at, expires_at) = match end {
            KeyEnd::RevokeAt(at) => (Some(micros(at)), old.expires_at.map(micros)),
            KeyEnd::ExpireAt(at) => (None, Some(micros(at))),
        };
        let ended = self
            .query(
                "UPDATE api_keys SET revoked_at = ?, expires_at = ? \
                 WHERE key_id = ? AND tenant_id = ? AND revoked_at IS NULL",
            )
            .bind(revoked_at)
            .bind(expires_at)
            .bind(old.key_id.clone())
            .bind(old.tenant_id.clone())
            .execute(&mut *tx)
            .await?;
        if ended.rows_affected() == 0 {
            return Ok(RotateOutcome::Conflict);
        }
        self.insert_key_in(&mut tx, successor).await?;
        tx.commit().await?;
        Ok(RotateOutcome::Rotated)
    }
}

/// A value for one column of a dynamic UPDATE.
enum Column {
    Text(Option<String>),
    Integer(Option<i64>),
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
