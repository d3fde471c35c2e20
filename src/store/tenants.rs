//! Tenants and their sites.

use chrono::{DateTime, Utc};
use sqlx::{Any, Transaction};

use super::rows::{micros, site_from_row, tenant_from_row};
use super::{ChangeTarget, PutSiteOutcome, Store, StoreError, StoreResult};
use crate::domain::audit::AuditEntry;
use crate::domain::model::{Site, Tenant, TenantChanges};

impl Store {
    /// Creates the tenant with defaults for unset fields, or updates the set fields.
    pub async fn put_tenant(
        &self,
        tenant_id: &str,
        changes: &TenantChanges,
        now: DateTime<Utc>,
        audit: &AuditEntry,
    ) -> StoreResult<Tenant> {
        self.bounded(async {
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
                 daily_request_quota = COALESCE(?, daily_request_quota), \
                 unlimited_keys = COALESCE(?, unlimited_keys), shared_rate_limit = COALESCE(?, shared_rate_limit), \
                 shared_rate_limit_window_seconds = COALESCE(?, shared_rate_limit_window_seconds), \
                 updated_at = ? WHERE tenant_id = ?",
            )
            .bind(changes.display_name.clone())
            .bind(changes.api_access_enabled.map(i64::from))
            .bind(changes.max_keys.map(i64::from))
            .bind(changes.rate_limit_per_minute.map(i64::from))
            .bind(changes.daily_request_quota.map(i64::from))
            .bind(changes.unlimited_keys.map(i64::from))
            .bind(changes.shared_rate_limit.map(i64::from))
            .bind(changes.shared_rate_limit_window.map(|window| window.seconds()))
            .bind(micros(now))
            .bind(tenant_id.to_owned())
            .execute(&mut *tx)
            .await?;
            let tenant = self.tenant_in(&mut tx, tenant_id).await?;
            self.record_in(&mut tx, audit, now).await?;
            self.commit_with_change(tx, &ChangeTarget::Tenant(tenant_id.to_owned()), now).await?;
            tenant.ok_or_else(|| StoreError::Corrupt("tenant vanished inside its own transaction".into()))
        })
        .await
    }

    pub async fn get_tenant(&self, tenant_id: &str) -> StoreResult<Option<Tenant>> {
        self.bounded(async {
            let mut connection = self.pool.acquire().await?;
            self.tenant_in(&mut connection, tenant_id).await
        })
        .await
    }

    async fn tenant_in(&self, connection: &mut sqlx::AnyConnection, tenant_id: &str) -> StoreResult<Option<Tenant>> {
        let row = self
            .query(
                "SELECT tenant_id, display_name, api_access_enabled, max_keys, rate_limit_per_minute, \
                 daily_request_quota, unlimited_keys, shared_rate_limit, shared_rate_limit_window_seconds, \
                 created_at, updated_at FROM tenants WHERE tenant_id = ?",
            )
            .bind(tenant_id.to_owned())
            .fetch_optional(connection)
            .await?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    /// Serialises writes to one tenant's keys: the first statement of the transaction takes the
    /// tenant's row lock (PostgreSQL, MySQL) or the database write lock (SQLite), so concurrent
    /// CreateKey calls count active keys one after another. False when the tenant does not exist.
    pub(super) async fn lock_tenant(&self, tx: &mut Transaction<'static, Any>, tenant_id: &str) -> StoreResult<bool> {
        let result = self
            .query("UPDATE tenants SET updated_at = updated_at WHERE tenant_id = ?")
            .bind(tenant_id.to_owned())
            .execute(&mut **tx)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Creates, renames or re-creates a site; a site id belongs to the tenant that first created
    /// it for good, deleted or not.
    pub async fn put_site(
        &self,
        tenant_id: &str,
        site_id: &str,
        display_name: &str,
        now: DateTime<Utc>,
        audit: &AuditEntry,
    ) -> StoreResult<PutSiteOutcome> {
        self.bounded(async {
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
                .query(
                    "UPDATE sites SET display_name = ?, updated_at = ?, \
                     created_at = CASE WHEN deleted_at IS NULL THEN created_at ELSE ? END, deleted_at = NULL \
                     WHERE site_id = ? AND tenant_id = ?",
                )
                .bind(display_name.to_owned())
                .bind(micros(now))
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
            self.record_in(&mut tx, audit, now).await?;
            self.commit_with_change(tx, &ChangeTarget::Site(site_id.to_owned()), now).await?;
            Ok(PutSiteOutcome::Saved(site_from_row(&row)?))
        })
        .await
    }

    /// Deletes a site of the tenant (it stays reserved to the tenant); false when the tenant has
    /// no such site.
    pub async fn delete_site(
        &self,
        tenant_id: &str,
        site_id: &str,
        now: DateTime<Utc>,
        audit: &AuditEntry,
    ) -> StoreResult<bool> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let result = self
                .query(
                    "UPDATE sites SET deleted_at = ?, updated_at = ? \
                     WHERE site_id = ? AND tenant_id = ? AND deleted_at IS NULL",
                )
                .bind(micros(now))
                .bind(micros(now))
                .bind(site_id.to_owned())
                .bind(tenant_id.to_owned())
                .execute(&mut *tx)
                .await?;
            if result.rows_affected() == 0 {
                return Ok(false);
            }
            self.record_in(&mut tx, audit, now).await?;
            self.commit_with_change(tx, &ChangeTarget::Site(site_id.to_owned()), now).await?;
            Ok(true)
        })
        .await
    }

    /// One page of the tenant's sites, in site id order.
    pub async fn list_sites(
        &self,
        tenant_id: &str,
        after_site_id: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<Site>> {
        self.bounded(async {
            let rows = self
                .query(
                    "SELECT tenant_id, site_id, display_name, created_at, updated_at FROM sites \
                     WHERE tenant_id = ? AND site_id > ? AND deleted_at IS NULL ORDER BY site_id LIMIT ?",
                )
                .bind(tenant_id.to_owned())
                .bind(after_site_id.unwrap_or_default().to_owned())
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(site_from_row).collect()
        })
        .await
    }

    /// The tenant that owns a site, if the site exists.
    pub async fn site_owner(&self, site_id: &str) -> StoreResult<Option<String>> {
        self.bounded(async {
            let owner: Option<(String,)> = sqlx::query_as(
                self.backend.sql("SELECT tenant_id FROM sites WHERE site_id = ? AND deleted_at IS NULL"),
            )
            .bind(site_id.to_owned())
            .fetch_optional(&self.pool)
            .await?;
            self.counted();
            Ok(owner.map(|(tenant_id,)| tenant_id))
        })
        .await
    }

    /// Which of `site_ids` the tenant owns.
    pub async fn owned_sites(&self, tenant_id: &str, site_ids: &[String]) -> StoreResult<Vec<String>> {
        self.bounded(async {
            if site_ids.is_empty() {
                return Ok(Vec::new());
            }
            let placeholders = vec!["?"; site_ids.len()].join(", ");
            let mut query = self
                .query(format!("SELECT site_id FROM sites WHERE tenant_id = ? AND deleted_at IS NULL AND site_id IN ({placeholders})"))
                .bind(tenant_id.to_owned());
            for site_id in site_ids {
                query = query.bind(site_id.clone());
            }
            let rows = query.fetch_all(&self.pool).await?;
            rows.iter().map(|row| sqlx::Row::try_get::<String, _>(row, 0).map_err(StoreError::from)).collect()
        })
        .await
    }
}
