//! The change feed: admin changes that replicas must apply to their caches, in commit order.

use chrono::{DateTime, Utc};
use sqlx::{Any, Row, Transaction};

use super::rows::micros;
use super::{Store, StoreError, StoreResult};

/// What a change touched: the cache entry every replica must drop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeTarget {
    /// A key, by the hash the cache is keyed by.
    Key(String),
    Tenant(String),
    Site(String),
    /// A kind this version does not know (written by a newer replica): the whole cache must go.
    Unknown(String),
}

impl ChangeTarget {
    fn parts(&self) -> (&'static str, &str) {
        match self {
            Self::Key(hash) => ("key", hash),
            Self::Tenant(tenant_id) => ("tenant", tenant_id),
            Self::Site(site_id) => ("site", site_id),
            Self::Unknown(kind) => ("unknown", kind),
        }
    }
}

/// One entry of the feed.
#[derive(Clone, Debug)]
pub struct Change {
    pub seq: i64,
    pub target: ChangeTarget,
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Appends a change to the transaction that makes it, and commits. It comes last, after
    /// every other lock the transaction takes: the head row stays locked until commit, which
    /// makes sequence order commit order (and keeps lock order acyclic). Once committed, the
    /// change is remembered as this replica's own: its cache was updated already.
    pub(super) async fn commit_with_change(
        &self,
        mut tx: Transaction<'static, Any>,
        target: &ChangeTarget,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let seq = self.publish(&mut tx, target, now).await?;
        tx.commit().await?;
        self.own_changes.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(seq);
        Ok(())
    }

    async fn publish(
        &self,
        tx: &mut Transaction<'static, Any>,
        target: &ChangeTarget,
        now: DateTime<Utc>,
    ) -> StoreResult<i64> {
        self.query("UPDATE change_feed_head SET seq = seq + 1 WHERE id = 1").execute(&mut **tx).await?;
        let seq: i64 =
            self.query("SELECT seq FROM change_feed_head WHERE id = 1").fetch_one(&mut **tx).await?.try_get(0)?;
        let (kind, id) = target.parts();
        self.query("INSERT INTO change_feed (seq, kind, entity_id, created_at) VALUES (?, ?, ?, ?)")
            .bind(seq)
            .bind(kind)
            .bind(id.to_owned())
            .bind(micros(now))
            .execute(&mut **tx)
            .await?;
        Ok(seq)
    }

    /// Whether this replica made change `seq` itself (and already applied it to its cache).
    /// Forgets everything up to `seq`: the feed is read in order.
    pub fn take_own_change(&self, seq: i64) -> bool {
        let mut own = self.own_changes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let is_own = own.remove(&seq);
        own.retain(|&other| other > seq);
        is_own
    }

    /// The sequence number of the newest change. Feed reads are not counted in
    /// [`query_count`](Store::query_count), which counts work done for API calls.
    pub async fn feed_head(&self) -> StoreResult<i64> {
        self.bounded(async {
            let row = sqlx::query::<Any>("SELECT seq FROM change_feed_head WHERE id = 1").fetch_one(&self.pool).await?;
            Ok(row.try_get(0)?)
        })
        .await
    }

    /// Up to `limit` changes after `seq`, oldest first.
    pub async fn changes_after(&self, seq: i64, limit: i64) -> StoreResult<Vec<Change>> {
        self.bounded(async {
            let rows = sqlx::query::<Any>(
                self.backend
                    .sql("SELECT seq, kind, entity_id, created_at FROM change_feed WHERE seq > ? ORDER BY seq LIMIT ?"),
            )
            .bind(seq)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|row| {
                    let kind: String = row.try_get("kind")?;
                    let id: String = row.try_get("entity_id")?;
                    let target = match kind.as_str() {
                        "key" => ChangeTarget::Key(id),
                        "tenant" => ChangeTarget::Tenant(id),
                        "site" => ChangeTarget::Site(id),
                        other => ChangeTarget::Unknown(other.to_owned()),
                    };
                    let micros: i64 = row.try_get("created_at")?;
                    let created_at = DateTime::from_timestamp_micros(micros)
                        .ok_or_else(|| StoreError::Corrupt(format!("change time {micros}")))?;
                    Ok(Change { seq: row.try_get("seq")?, target, created_at })
                })
                .collect()
        })
        .await
    }

    /// Deletes changes made before `before`; returns how many.
    pub async fn prune_changes(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        self.bounded(async {
            let result = sqlx::query::<Any>(self.backend.sql("DELETE FROM change_feed WHERE created_at < ?"))
                .bind(micros(before))
                .execute(&self.pool)
                .await?;
            Ok(result.rows_affected())
        })
        .await
    }
}
