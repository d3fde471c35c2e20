//! Shared request counters for rate limits and quotas, written and read in batches.

use chrono::{DateTime, Utc};
use sqlx::{Any, Row};

use super::rows::micros;
use super::{Column, Store, StoreResult};

/// A count for one subject (`key:<id>` or `tenant:<id>`) in one bucket: a second of a key's
/// sliding minute, or a tenant's UTC day.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountKey {
    pub subject: String,
    /// Microseconds since the epoch.
    pub window_start: i64,
}

/// Rows per statement: well under every backend's placeholder limit.
const CHUNK: usize = 200;

impl Store {
    /// Adds `deltas` to the shared counters, in one transaction.
    pub async fn add_request_counts(&self, deltas: &[(CountKey, i64)]) -> StoreResult<()> {
        let rows = deltas
            .iter()
            .map(|(key, delta)| {
                vec![
                    Column::Text(Some(key.subject.clone())),
                    Column::Integer(Some(key.window_start)),
                    Column::Integer(Some(*delta)),
                ]
            })
            .collect();
        self.add_counts("request_counts", "subject, window_start, count", "subject, window_start", rows).await
    }

    /// The shared counts of each subject's buckets that start at or after its `since`
    /// (microseconds since the epoch), in as few queries as the placeholder limits allow.
    pub async fn request_counts_since(&self, ranges: &[(String, i64)]) -> StoreResult<Vec<(CountKey, i64)>> {
        let mut totals = Vec::new();
        for chunk in ranges.chunks(CHUNK) {
            let pairs = vec!["(subject = ? AND window_start >= ?)"; chunk.len()].join(" OR ");
            let sql = format!("SELECT subject, window_start, count FROM request_counts WHERE {pairs}");
            let mut query = sqlx::query::<Any>(self.backend.sql(sql));
            for (subject, since) in chunk {
                query = query.bind(subject.clone()).bind(*since);
            }
            let rows = self.bounded(async { Ok(query.fetch_all(&self.pool).await?) }).await?;
            for row in rows {
                let key = CountKey { subject: row.try_get("subject")?, window_start: row.try_get("window_start")? };
                totals.push((key, row.try_get("count")?));
            }
        }
        Ok(totals)
    }

    /// Deletes the per-second buckets of keys that started before `keys_before` and every
    /// counter that started before `all_before` (daily quotas).
    pub async fn prune_request_counts(
        &self,
        keys_before: DateTime<Utc>,
        all_before: DateTime<Utc>,
    ) -> StoreResult<u64> {
        self.bounded(async {
            let keys = sqlx::query::<Any>(
                self.backend.sql("DELETE FROM request_counts WHERE window_start < ? AND subject LIKE 'key:%'"),
            )
            .bind(micros(keys_before))
            .execute(&self.pool)
            .await?;
            let all = sqlx::query::<Any>(self.backend.sql("DELETE FROM request_counts WHERE window_start < ?"))
                .bind(micros(all_before))
                .execute(&self.pool)
                .await?;
            Ok(keys.rows_affected() + all.rows_affected())
        })
        .await
    }
}
