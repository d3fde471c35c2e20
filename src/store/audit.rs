//! The audit log and the per-key usage counters.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{Any, Row, Transaction};

use super::rows::{micros, to_json};
use super::{Column, Store, StoreError, StoreResult};
use crate::domain::audit::{AuditEntry, AuditEvent, AuditEventType, AuditFilter};
use crate::domain::key::new_key_id;

/// Denied Checks of one key for one reason in one minute: one audit row, added to by every
/// replica.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DenialKey {
    pub tenant_id: String,
    pub key_id: String,
    /// The reason code, e.g. `SCOPE_MISSING`.
    pub reason: &'static str,
    pub minute: DateTime<Utc>,
}

/// Checks of one key in one UTC day with one outcome (`allowed` or a reason code).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UsageKey {
    pub key_id: String,
    pub day: DateTime<Utc>,
    pub outcome: &'static str,
}

/// The id of the event that aggregates a key's denials for one reason in one minute: the same
/// on every replica (so they add to one row), and shaped like every other event id: `evt_`, 12
/// hex digits of the minute's milliseconds, 12 of a hash of the key and reason.
fn denial_event_id(denial: &DenialKey) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{}\0{}", denial.key_id, denial.reason).as_bytes());
    let hash: String = digest[..6].iter().map(|byte| format!("{byte:02x}")).collect();
    format!("evt_{:012x}{hash}", denial.minute.timestamp_millis().max(0))
}

const EVENT_COLUMNS: &str = "event_id, tenant_id, key_id, event_type, actor, details, occurred_at, count";

impl Store {
    /// Records an admin change inside its transaction.
    pub(super) async fn record_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        entry: &AuditEntry,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.record_many_in(tx, std::iter::once(entry), now).await
    }

    /// Records admin changes inside their transaction, a hundred to a statement.
    pub(super) async fn record_many_in<'a>(
        &self,
        tx: &mut Transaction<'static, Any>,
        entries: impl Iterator<Item = &'a AuditEntry>,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let entries: Vec<&AuditEntry> = entries.collect();
        for chunk in entries.chunks(100) {
            let rows = vec!["(?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
            let mut query = self.query(format!("INSERT INTO audit_events ({EVENT_COLUMNS}) VALUES {rows}"));
            for entry in chunk {
                let event_id = new_key_id(now.timestamp_millis())
                    .map_err(|error| StoreError::Unavailable(format!("no randomness from the OS: {error}")))?
                    .replacen("key_", "evt_", 1);
                query = query
                    .bind(event_id)
                    .bind(entry.tenant_id.clone())
                    .bind(entry.key_id.clone().unwrap_or_default())
                    .bind(entry.event_type.as_str())
                    .bind(entry.actor.clone())
                    .bind(to_json(&entry.details))
                    .bind(micros(now))
                    .bind(1_i64);
            }
            query.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Adds aggregated denied Checks to the audit log, in one transaction: one event per key,
    /// reason and minute, stamped with the first denial of it that any replica saw.
    pub async fn add_check_denials(&self, denials: &[(DenialKey, (i64, DateTime<Utc>))]) -> StoreResult<()> {
        let text = |value: &str| Column::Text(Some(value.to_owned()));
        let rows = denials
            .iter()
            .map(|(denial, (count, first))| {
                vec![
                    text(&denial_event_id(denial)),
                    text(&denial.tenant_id),
                    text(&denial.key_id),
                    text(AuditEventType::CheckDenied.as_str()),
                    text(""),
                    text(&to_json(&BTreeMap::from([("reason", denial.reason)]))),
                    Column::Integer(Some(micros(*first))),
                    Column::Integer(Some(*count)),
                ]
            })
            .collect();
        self.add_counts_keeping_earliest("audit_events", EVENT_COLUMNS, "event_id", Some("occurred_at"), rows).await
    }

    /// One page of a tenant's audit log, oldest first, after the event `after` (its time and id).
    pub async fn list_audit_events(
        &self,
        tenant_id: &str,
        filter: &AuditFilter,
        after: Option<(DateTime<Utc>, &str)>,
        limit: usize,
    ) -> StoreResult<Vec<AuditEvent>> {
        self.bounded(async {
            let mut sql = format!("SELECT {EVENT_COLUMNS} FROM audit_events WHERE tenant_id = ?");
            if filter.key_id.is_some() {
                sql.push_str(" AND key_id = ?");
            }
            if !filter.event_types.is_empty() {
                sql.push_str(&format!(" AND event_type IN ({})", vec!["?"; filter.event_types.len()].join(", ")));
            }
            if filter.start_time.is_some() {
                sql.push_str(" AND occurred_at >= ?");
            }
            if filter.end_time.is_some() {
                sql.push_str(" AND occurred_at < ?");
            }
            if after.is_some() {
                sql.push_str(" AND (occurred_at > ? OR (occurred_at = ? AND event_id > ?))");
            }
            sql.push_str(" ORDER BY occurred_at, event_id LIMIT ?");
            let mut query = self.query(sql).bind(tenant_id.to_owned());
            if let Some(key_id) = &filter.key_id {
                query = query.bind(key_id.clone());
            }
            for event_type in &filter.event_types {
                query = query.bind(event_type.as_str());
            }
            if let Some(start) = filter.start_time {
                query = query.bind(micros(start));
            }
            if let Some(end) = filter.end_time {
                query = query.bind(micros(end));
            }
            if let Some((time, event_id)) = after {
                query = query.bind(micros(time)).bind(micros(time)).bind(event_id.to_owned());
            }
            let rows = query.bind(limit as i64).fetch_all(&self.pool).await?;
            rows.iter()
                .map(|row| {
                    let event_type: String = row.try_get("event_type")?;
                    let details: String = row.try_get("details")?;
                    let key_id: String = row.try_get("key_id")?;
                    let occurred_at: i64 = row.try_get("occurred_at")?;
                    let count: i64 = row.try_get("count")?;
                    Ok(AuditEvent {
                        event_id: row.try_get("event_id")?,
                        tenant_id: row.try_get("tenant_id")?,
                        key_id: Some(key_id).filter(|key_id| !key_id.is_empty()),
                        event_type: AuditEventType::parse(&event_type)
                            .ok_or_else(|| StoreError::Corrupt(format!("audit event type {event_type:?}")))?,
                        actor: row.try_get("actor")?,
                        details: serde_json::from_str(&details)
                            .map_err(|error| StoreError::Corrupt(error.to_string()))?,
                        occurred_at: DateTime::from_timestamp_micros(occurred_at)
                            .ok_or_else(|| StoreError::Corrupt(format!("audit time {occurred_at}")))?,
                        count: u64::try_from(count).unwrap_or_default(),
                    })
                })
                .collect()
        })
        .await
    }

    /// Adds Check counts to the daily usage of keys, in one transaction.
    pub async fn add_usage(&self, usage: &[(UsageKey, i64)]) -> StoreResult<()> {
        let rows = usage
            .iter()
            .map(|(key, count)| {
                vec![
                    Column::Text(Some(key.key_id.clone())),
                    Column::Integer(Some(micros(key.day))),
                    Column::Text(Some(key.outcome.to_owned())),
                    Column::Integer(Some(*count)),
                ]
            })
            .collect();
        self.add_counts("key_usage", "key_id, day, outcome, count", "key_id, day, outcome", rows).await
    }

    /// A key's daily usage rows between two UTC day starts, inclusive: (day, outcome, count).
    pub async fn key_usage(
        &self,
        key_id: &str,
        first_day: DateTime<Utc>,
        last_day: DateTime<Utc>,
    ) -> StoreResult<Vec<(DateTime<Utc>, String, i64)>> {
        self.bounded(async {
            let rows = self
                .query("SELECT day, outcome, count FROM key_usage WHERE key_id = ? AND day >= ? AND day <= ?")
                .bind(key_id.to_owned())
                .bind(micros(first_day))
                .bind(micros(last_day))
                .fetch_all(&self.pool)
                .await?;
            rows.iter()
                .map(|row| {
                    let day: i64 = row.try_get("day")?;
                    let day = DateTime::from_timestamp_micros(day)
                        .ok_or_else(|| StoreError::Corrupt(format!("usage day {day}")))?;
                    Ok((day, row.try_get("outcome")?, row.try_get("count")?))
                })
                .collect()
        })
        .await
    }

    /// Moves keys' `last_used_at` forward (never back), one statement per key, committed in
    /// small chunks so that no key row stays locked for long (a RevokeKey may be waiting).
    pub async fn touch_last_used(&self, last_used: &[(String, DateTime<Utc>)]) -> StoreResult<()> {
        for chunk in last_used.chunks(25) {
            self.touch_last_used_chunk(chunk).await?;
        }
        Ok(())
    }

    async fn touch_last_used_chunk(&self, last_used: &[(String, DateTime<Utc>)]) -> StoreResult<()> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            for (key_id, at) in last_used {
                sqlx::query::<Any>(self.backend.sql(
                    "UPDATE api_keys SET last_used_at = ? WHERE key_id = ? AND (last_used_at IS NULL OR last_used_at < ?)",
                ))
                .bind(micros(*at))
                .bind(key_id.clone())
                .bind(micros(*at))
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }
}
