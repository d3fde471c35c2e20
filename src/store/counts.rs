//! Shared request counters for rate limits and quotas, written and read in batches.

use chrono::{DateTime, Utc};
use sqlx::{Any, Row};

use super::rows::micros;
use super::{Column, Store, StoreResult};

/// A count for one subject (`key:<id>` or `tenant:<id>`) in one window.
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

    /// The shared totals of `keys` (absent rows are zero and left out), looked up by their
    /// exact subject and window.
    pub async fn request_counts(&self, keys: &[CountKey]) -> StoreResult<Vec<(CountKey, i64)>> {
        let mut totals = Vec::new();
        for chunk in keys.chunks(CHUNK) {
            let pairs = vec!["(subject = ? AND window_start = ?)"; chunk.len()].join(" OR ");
            let sql = format!("SELECT subject, window_start, count FROM request_counts WHERE {pairs}");
            let mut query = sqlx::query::<Any>(self.backend.sql(sql));
            for key in chunk {
                query = query.bind(key.subject.clone()).bind(key.window_start);
            }
            let rows = self.bounded(async { Ok(query.fetch_all(&self.pool).await?) }).await?;
            for row in rows {
                let key = CountKey { subject: row.try_get("subject")?, window_start: row.try_get("window_start")? };
                totals.push((key, row.try_get("count")?));
            }
        }
        Ok(totals)
    }

    /// Deletes counters of windows that started before `before`.
    pub async fn prune_request_counts(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        self.bounded(async {
            let result = sqlx::query::<Any>(self.backend.sql("DELETE FROM request_counts WHERE window_start < ?"))
                .bind(micros(before))
                .execute(&self.pool)
                .await?;
            Ok(result.rows_affected())
        })
        .await
    }
}
