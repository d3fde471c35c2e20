//! Keys: insert under the active-key limit, lookups, updates, revocation and rotation.

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::{Any, Transaction};

use super::rows::{key_from_row, micros, to_json};
use super::{
    ChangeTarget, Column, InsertKeyOutcome, KEY_COLUMNS, KeyEnd, KeyFilter, KeyWrite, RotateOutcome, Store, StoreResult,
};
use crate::domain::audit::AuditEntry;
use crate::domain::model::{KeyPatch, KeyRecord, KeyState};

impl Store {
    /// Inserts a key unless the tenant already has `max_active_keys` active keys at `now`.
    /// Concurrent calls for one tenant are serialised, so the limit is never exceeded.
    pub async fn insert_key(
        &self,
        key: &KeyRecord,
        format: &str,
        max_active_keys: u32,
        now: DateTime<Utc>,
        audit: &AuditEntry,
    ) -> StoreResult<InsertKeyOutcome> {
        self.bounded(async {
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
                return Ok(InsertKeyOutcome::LimitReached { limit: max_active_keys, active: active.0 });
            }
            self.insert_key_in(&mut tx, key).await?;
            self.record_in(&mut tx, audit, now).await?;
            // Other replicas learn of the key through the feed (their known-keys filters).
            let mut changes = vec![ChangeTarget::Key(key.key_hash.clone())];
            if self.record_key_format_in(&mut tx, format, now).await? {
                changes.push(ChangeTarget::KeyFormat(format.to_owned()));
            }
            self.commit_with_changes(tx, &changes, now).await?;
            Ok(InsertKeyOutcome::Inserted)
        })
        .await
    }

    /// How many keys of the tenant work at `now` (not revoked, not expired; a key in its
    /// rotation grace period works).
    async fn active_keys_in(
        &self,
        connection: &mut sqlx::AnyConnection,
        tenant_id: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<i64> {
        self.counted();
        let active: (i64,) = sqlx::query_as(self.backend.sql(
            "SELECT COUNT(*) FROM api_keys WHERE tenant_id = ? AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > ?)",
        ))
        .bind(tenant_id.to_owned())
        .bind(micros(now))
        .fetch_one(connection)
        .await?;
        Ok(active.0)
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
        self.bounded(async {
            let mut connection = self.pool.acquire().await?;
            self.key_in(&mut connection, tenant_id, key_id).await
        })
        .await
    }

    /// The key whose secret hashes to `key_hash`: the lookup behind every cache miss of Check.
    pub async fn key_by_hash(&self, key_hash: &str) -> StoreResult<Option<KeyRecord>> {
        self.bounded(async {
            let row = self
                .query(format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?"))
                .bind(key_hash.to_owned())
                .fetch_optional(&self.pool)
                .await?;
            row.as_ref().map(key_from_row).transpose()
        })
        .await
    }

    /// How many keys are stored, revoked and expired ones included. Not counted in
    /// [`query_count`](Store::query_count): it is the feed's work, not an API call's.
    pub async fn key_count(&self) -> StoreResult<u64> {
        self.bounded(async {
            let (count,): (i64,) =
                sqlx::query_as(self.backend.sql("SELECT COUNT(*) FROM api_keys")).fetch_one(&self.pool).await?;
            Ok(count.max(0) as u64)
        })
        .await
    }

    /// At most `limit` key hashes greater than `after`, in order: one page of the scan that
    /// builds the known-keys filter. Not counted in [`query_count`](Store::query_count).
    pub async fn key_hashes_after(&self, after: &str, limit: i64) -> StoreResult<Vec<String>> {
        self.bounded(async {
            let hashes: Vec<(String,)> = sqlx::query_as(
                self.backend.sql("SELECT key_hash FROM api_keys WHERE key_hash > ? ORDER BY key_hash LIMIT ?"),
            )
            .bind(after.to_owned())
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
            Ok(hashes.into_iter().map(|(hash,)| hash).collect())
        })
        .await
    }

    /// The newest `limit` keys whose id is greater than `after`, newest first, as (key id,
    /// hash): key ids begin with their creation time in milliseconds, so these are the keys
    /// created since. Not counted in [`query_count`](Store::query_count): it is the feed's work.
    pub async fn keys_minted_after(&self, after: &str, limit: i64) -> StoreResult<Vec<(String, String)>> {
        self.bounded(async {
            let keys: Vec<(String, String)> = sqlx::query_as(
                self.backend.sql("SELECT key_id, key_hash FROM api_keys WHERE key_id > ? ORDER BY key_id DESC LIMIT ?"),
            )
            .bind(after.to_owned())
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
            Ok(keys)
        })
        .await
    }

    /// One page of the tenant's keys in key id (creation) order.
    pub async fn list_keys(
        &self,
        tenant_id: &str,
        filter: &KeyFilter<'_>,
        limit: usize,
    ) -> StoreResult<Vec<KeyRecord>> {
        self.bounded(async {
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
        })
        .await
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
        audit: &AuditEntry,
    ) -> StoreResult<KeyWrite> {
        self.bounded(async {
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
                    query = value.bind_to(query);
                }
                let updated = query.bind(key_id.to_owned()).bind(tenant_id.to_owned()).execute(&mut *tx).await?;
                if updated.rows_affected() == 0 {
                    return Ok(KeyWrite::NotFound);
                }
            }
            if let Some(site_ids) = &patch.site_ids {
                self.replace_key_sites(&mut tx, key_id, site_ids).await?;
            }
            let Some(updated) = self.key_in(&mut tx, tenant_id, key_id).await? else {
                return Ok(KeyWrite::NotFound);
            };
            self.record_in(&mut tx, audit, now).await?;
            self.commit_with_change(tx, &ChangeTarget::Key(updated.key_hash.clone()), now).await?;
            Ok(KeyWrite::Done(Box::new(updated)))
        })
        .await
    }

    /// Revokes a key at `now` unless it is revoked already, and returns it as it is afterwards.
    pub async fn revoke_key(
        &self,
        tenant_id: &str,
        key_id: &str,
        now: DateTime<Utc>,
        audit: &AuditEntry,
    ) -> StoreResult<Option<KeyRecord>> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let revoked = self
                .query("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND tenant_id = ? AND revoked_at IS NULL")
                .bind(micros(now))
                .bind(key_id.to_owned())
                .bind(tenant_id.to_owned())
                .execute(&mut *tx)
                .await?;
            let key = self.key_in(&mut tx, tenant_id, key_id).await?;
            match key.as_ref().filter(|_| revoked.rows_affected() > 0) {
                Some(key) => {
                    self.record_in(&mut tx, audit, now).await?;
                    self.commit_with_change(tx, &ChangeTarget::Key(key.key_hash.clone()), now).await?
                }
                None => tx.commit().await?,
            }
            Ok(key)
        })
        .await
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
    /// rotated by a concurrent call. With a grace period the old key keeps working, so the
    /// tenant needs room: its other working keys must number fewer than `max_active_keys`, or
    /// the outcome is `LimitReached`.
    pub async fn rotate_key(
        &self,
        old: &KeyRecord,
        end: KeyEnd,
        successor: &KeyRecord,
        format: &str,
        max_active_keys: u32,
        audit: &AuditEntry,
    ) -> StoreResult<RotateOutcome> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            if !self.lock_tenant(&mut tx, &old.tenant_id).await? {
                return Ok(RotateOutcome::Conflict);
            }
            if self.successors_in(&mut tx, &old.key_id).await? > 0 {
                return Ok(RotateOutcome::Conflict);
            }
            if let KeyEnd::ExpireAt(_) = end {
                let others = self.active_keys_in(&mut tx, &old.tenant_id, successor.created_at).await? - 1;
                if others >= i64::from(max_active_keys) {
                    return Ok(RotateOutcome::LimitReached { limit: max_active_keys, others });
                }
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
            self.record_in(&mut tx, audit, successor.created_at).await?;
            let mut changes =
                vec![ChangeTarget::Key(old.key_hash.clone()), ChangeTarget::Key(successor.key_hash.clone())];
            if self.record_key_format_in(&mut tx, format, successor.created_at).await? {
                changes.push(ChangeTarget::KeyFormat(format.to_owned()));
            }
            self.commit_with_changes(tx, &changes, successor.created_at).await?;
            Ok(RotateOutcome::Rotated)
        })
        .await
    }
}
