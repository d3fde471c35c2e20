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

use crate::domain::model::{KeyRecord, KeySettings, Site, Tenant, TenantChanges};

/// What can go wrong below the domain.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or failed; details are for the log only.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A row could not be read back (corrupt JSON, an out-of-range number).
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    /// The database URL or pool settings are unusable.
    #[error("{0}")]
    Config(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::ColumnNotFound(_) => {
                Self::Corrupt(error.to_string())
            }
            other => Self::Unavailable(other.to_string()),
        }
    }
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
        let row = self
            .query(format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = ? AND tenant_id = ?"))
            .bind(key_id.to_owned())
            .bind(tenant_id.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(key_from_row).transpose()
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

    /// Writes a key's editable settings unless it has been revoked meanwhile; false then.
    pub async fn update_key(&self, tenant_id: &str, key_id: &str, settings: &KeySettings) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let updated = self
            .query(
                "UPDATE api_keys SET name = ?, scopes = ?, site_ids = ?, expires_at = ?, metadata = ?, \
                 rate_limit_per_minute = ? WHERE key_id = ? AND tenant_id = ? AND revoked_at IS NULL",
            )
            .bind(settings.name.clone())
            .bind(to_json(&settings.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>()))
            .bind(to_json(&settings.site_ids))
            .bind(settings.expires_at.map(micros))
            .bind(to_json(&settings.metadata))
            .bind(i64::from(settings.rate_limit_per_minute))
            .bind(key_id.to_owned())
            .bind(tenant_id.to_owned())
            .execute(&mut *tx)
            .await?;
        if updated.rows_affected() == 0 {
            return Ok(false);
        }
        self.replace_key_sites(&mut tx, key_id, &settings.site_ids).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Revokes a key at `now` unless it is revoked already. False when nothing changed.
    pub async fn revoke_key(&self, tenant_id: &str, key_id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let result = self
            .query("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND tenant_id = ? AND revoked_at IS NULL")
            .bind(micros(now))
            .bind(key_id.to_owned())
            .bind(tenant_id.to_owned())
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Atomically ends the old key (revoked at `revoke_at`, or expiring at `expire_at`) and
    /// inserts its successor. Fails with `Conflict` when the old key was revoked or already
    /// rotated by a concurrent call.
    pub async fn rotate_key(&self, old: &KeyRecord, end: KeyEnd, successor: &KeyRecord) -> StoreResult<RotateOutcome> {
        let mut tx = self.pool.begin().await?;
        if !self.lock_tenant(&mut tx, &old.tenant_id).await? {
            return Ok(RotateOutcome::Conflict);
        }
        let successors: (i64,) =
            sqlx::query_as(self.backend.sql("SELECT COUNT(*) FROM api_keys WHERE rotated_from_key_id = ?"))
                .bind(old.key_id.clone())
                .fetch_one(&mut *tx)
                .await?;
        self.counted();
        if successors.0 > 0 {
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
