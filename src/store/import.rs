//! ImportKeys' write: up to a thousand keys of one tenant in one transaction, in multi-row
//! statements, each key either landing or found to exist already.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::{Any, Row, Transaction};

use super::rows::{micros, to_json};
use super::{ChangeTarget, Column, KEY_COLUMNS, Store, StoreResult};
use crate::domain::audit::AuditEntry;
use crate::domain::model::KeyRecord;

/// Rows per multi-row statement: well under every backend's placeholder limit.
const ROWS: usize = 100;

/// What became of one imported key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportOutcome {
    Imported,
    /// A key with this hash is already the tenant's.
    InTenant,
    /// A key with this hash belongs to another tenant.
    ElsewhereTaken,
}

impl Store {
    /// Which of `hashes` are keys already, and whose (tenant id by hash).
    pub async fn key_owners(&self, hashes: &[&str]) -> StoreResult<HashMap<String, String>> {
        self.bounded(async {
            let mut connection = self.pool.acquire().await?;
            self.key_owners_in(&mut connection, hashes).await
        })
        .await
    }

    async fn key_owners_in(
        &self,
        connection: &mut sqlx::AnyConnection,
        hashes: &[&str],
    ) -> StoreResult<HashMap<String, String>> {
        let mut owners = HashMap::new();
        for chunk in hashes.chunks(ROWS) {
            let placeholders = vec!["?"; chunk.len()].join(", ");
            let mut query =
                self.query(format!("SELECT key_hash, tenant_id FROM api_keys WHERE key_hash IN ({placeholders})"));
            for hash in chunk {
                query = query.bind((*hash).to_owned());
            }
            for row in query.fetch_all(&mut *connection).await? {
                owners.insert(row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?);
            }
        }
        Ok(owners)
    }

    /// Inserts `keys` (all of `tenant_id`, with distinct hashes) with their audit entries, unless
    /// a key with the same hash exists; one outcome per key, in order. `None` when the tenant
    /// does not exist. Every key that lands is announced on the change feed, so a replica that
    /// cached its hash as unknown forgets that at once.
    pub async fn import_keys(
        &self,
        tenant_id: &str,
        keys: &[(KeyRecord, AuditEntry)],
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Vec<ImportOutcome>>> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            if !self.lock_tenant(&mut tx, tenant_id).await? {
                return Ok(None);
            }
            let hashes: Vec<&str> = keys.iter().map(|(key, _)| key.key_hash.as_str()).collect();
            let owners = self.key_owners_in(&mut tx, &hashes).await?;
            let fresh: Vec<&(KeyRecord, AuditEntry)> =
                keys.iter().filter(|(key, _)| !owners.contains_key(&key.key_hash)).collect();
            self.insert_keys_if_absent(&mut tx, &fresh).await?;
            // A concurrent import of the same hash may have won: only the rows with our ids landed.
            let landed = self.existing_key_ids(&mut tx, &fresh).await?;
            let taken: Vec<&str> = fresh
                .iter()
                .filter(|(key, _)| !landed.contains(&key.key_id))
                .map(|(key, _)| key.key_hash.as_str())
                .collect();
            let late_owners = self.key_owners_in(&mut tx, &taken).await?;
            let imported: Vec<&(KeyRecord, AuditEntry)> =
                fresh.iter().copied().filter(|(key, _)| landed.contains(&key.key_id)).collect();
            self.insert_key_sites(&mut tx, &imported).await?;
            self.record_many_in(&mut tx, imported.iter().map(|(_, audit)| audit), now).await?;
            let changes: Vec<ChangeTarget> =
                imported.iter().map(|(key, _)| ChangeTarget::Key(key.key_hash.clone())).collect();
            self.commit_with_changes(tx, &changes, now).await?;
            let outcome = |key: &KeyRecord| {
                let owner = owners.get(&key.key_hash).or_else(|| late_owners.get(&key.key_hash));
                match owner {
                    None if landed.contains(&key.key_id) => ImportOutcome::Imported,
                    Some(owner) if owner == tenant_id => ImportOutcome::InTenant,
                    _ => ImportOutcome::ElsewhereTaken,
                }
            };
            Ok(Some(keys.iter().map(|(key, _)| outcome(key)).collect()))
        })
        .await
    }

    async fn insert_keys_if_absent(
        &self,
        tx: &mut Transaction<'static, Any>,
        keys: &[&(KeyRecord, AuditEntry)],
    ) -> StoreResult<()> {
        for chunk in keys.chunks(ROWS) {
            let row = format!("({})", vec!["?"; 15].join(", "));
            let rows = vec![row.as_str(); chunk.len()].join(", ");
            let sql = self.backend.insert_rows_if_absent(&format!("api_keys ({KEY_COLUMNS})"), &rows, "key_hash");
            let mut query = self.query(sql);
            for (key, _) in chunk {
                for column in key_columns(key) {
                    query = column.bind_to(query);
                }
            }
            query.execute(&mut **tx).await?;
        }
        Ok(())
    }

    async fn existing_key_ids(
        &self,
        tx: &mut Transaction<'static, Any>,
        keys: &[&(KeyRecord, AuditEntry)],
    ) -> StoreResult<HashSet<String>> {
        let mut landed = HashSet::new();
        for chunk in keys.chunks(ROWS) {
            let placeholders = vec!["?"; chunk.len()].join(", ");
            let mut query = self.query(format!("SELECT key_id FROM api_keys WHERE key_id IN ({placeholders})"));
            for (key, _) in chunk {
                query = query.bind(key.key_id.clone());
            }
            for row in query.fetch_all(&mut **tx).await? {
                landed.insert(row.try_get::<String, _>(0)?);
            }
        }
        Ok(landed)
    }

    async fn insert_key_sites(
        &self,
        tx: &mut Transaction<'static, Any>,
        keys: &[&(KeyRecord, AuditEntry)],
    ) -> StoreResult<()> {
        let pairs: Vec<(&str, &str)> = keys
            .iter()
            .flat_map(|(key, _)| key.site_ids.iter().map(|site_id| (key.key_id.as_str(), site_id.as_str())))
            .collect();
        for chunk in pairs.chunks(ROWS) {
            let rows = vec!["(?, ?)"; chunk.len()].join(", ");
            let mut query = self.query(format!("INSERT INTO key_sites (key_id, site_id) VALUES {rows}"));
            for (key_id, site_id) in chunk {
                query = query.bind((*key_id).to_owned()).bind((*site_id).to_owned());
            }
            query.execute(&mut **tx).await?;
        }
        Ok(())
    }
}

/// The values of [`KEY_COLUMNS`] for one key.
pub(super) fn key_columns(key: &KeyRecord) -> [Column; 15] {
    let text = |value: &str| Column::Text(Some(value.to_owned()));
    [
        text(&key.key_id),
        text(&key.tenant_id),
        text(&key.key_hash),
        text(&key.name),
        text(&key.display_prefix),
        text(&to_json(&key.scopes.iter().map(|scope| scope.as_str()).collect::<Vec<_>>())),
        text(&to_json(&key.site_ids)),
        text(key.environment.as_str()),
        text(&to_json(&key.metadata)),
        Column::Integer(Some(i64::from(key.rate_limit_per_minute))),
        Column::Integer(Some(micros(key.created_at))),
        Column::Integer(key.expires_at.map(micros)),
        Column::Integer(key.revoked_at.map(micros)),
        Column::Integer(key.last_used_at.map(micros)),
        Column::Text(key.rotated_from_key_id.clone()),
    ]
}
