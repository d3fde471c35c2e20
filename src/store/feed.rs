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
    /// A key shape was minted with for the first time: every replica reads the shapes again.
    KeyFormat(String),
    /// A kind this version does not know (written by a newer replica): the whole cache must go.
    Unknown(String),
}

impl ChangeTarget {
    fn parts(&self) -> (&'static str, &str) {
        match self {
            Self::Key(hash) => ("key", hash),
            Self::Tenant(tenant_id) => ("tenant", tenant_id),
            Self::Site(site_id) => ("site", site_id),
            Self::KeyFormat(notation) => ("key_format", notation),
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
        tx: Transaction<'static, Any>,
        target: &ChangeTarget,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.commit_with_changes(tx, std::slice::from_ref(target), now).await
    }

    /// [`commit_with_change`](Self::commit_with_change) for any number of changes (none: a
    /// plain commit).
    pub(super) async fn commit_with_changes(
        &self,
        mut tx: Transaction<'static, Any>,
        targets: &[ChangeTarget],
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let sequence = self.publish(&mut tx, targets, now).await?;
        tx.commit().await?;
        self.own_changes.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).extend(sequence);
        Ok(())
    }

    /// Appends `targets` to the feed with consecutive sequence numbers; returns them.
    async fn publish(
        &self,
        tx: &mut Transaction<'static, Any>,
        targets: &[ChangeTarget],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<i64>> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let count = targets.len() as i64;
        self.query("UPDATE change_feed_head SET seq = seq + ? WHERE id = 1").bind(count).execute(&mut **tx).await?;
        let last: i64 =
            self.query("SELECT seq FROM change_feed_head WHERE id = 1").fetch_one(&mut **tx).await?.try_get(0)?;
        let sequence: Vec<i64> = (last - count + 1..=last).collect();
        let numbered: Vec<(i64, &ChangeTarget)> = sequence.iter().copied().zip(targets).collect();
        for chunk in numbered.chunks(200) {
            let rows = vec!["(?, ?, ?, ?)"; chunk.len()].join(", ");
            let mut query =
                self.query(format!("INSERT INTO change_feed (seq, kind, entity_id, created_at) VALUES {rows}"));
            for (seq, target) in chunk {
                let (kind, id) = target.parts();
                query = query.bind(*seq).bind(kind).bind(id.to_owned()).bind(micros(now));
            }
            query.execute(&mut **tx).await?;
        }
        Ok(sequence)
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
                        "key_format" => ChangeTarget::KeyFormat(id),
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

impl Store {
    /// Records, inside a transaction that mints a key, that keys are minted with the shape
    /// `notation`; true the first time (the caller then announces it on the change feed, so
    /// every replica accepts keys of that shape from then on).
    pub(super) async fn record_key_format_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        notation: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let insert = self.backend.insert_if_absent("key_formats (notation, first_minted_at)", "?, ?", "notation");
        let inserted = self.query(insert).bind(notation.to_owned()).bind(micros(now)).execute(&mut **tx).await?;
        Ok(inserted.rows_affected() == 1)
    }

    /// Records at start that keys are minted with `minting` (so that changing the setting later
    /// never breaks them, even if no key is minted before the change), and, the first time, the
    /// shapes of keys minted before keygate recorded shapes: those were all
    /// `{prefix}_{env}_{hex:64}`, and each key's display prefix names its prefix. New shapes are
    /// announced on the change feed.
    ///
    /// Writes nothing when `minting` is recorded already, so a replica on a read-only database
    /// starts (and answers UNAVAILABLE to writes) as before.
    pub async fn record_key_formats_at_start(&self, minting: &str, now: DateTime<Utc>) -> StoreResult<()> {
        if self.key_formats().await?.iter().any(|recorded| recorded == minting) {
            return Ok(());
        }
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let recorded: i64 = self.query("SELECT COUNT(*) FROM key_formats").fetch_one(&mut *tx).await?.try_get(0)?;
            let mut notations = std::collections::BTreeSet::new();
            if recorded == 0 {
                let prefixes = self.query("SELECT display_prefix FROM api_keys").fetch_all(&mut *tx).await?;
                for row in prefixes {
                    let display_prefix: String = row.try_get(0)?;
                    if let Some(notation) = crate::domain::key_format::legacy_notation_of(&display_prefix) {
                        notations.insert(notation);
                    }
                }
            }
            notations.insert(minting.to_owned());
            let mut added = Vec::new();
            for notation in notations {
                if self.record_key_format_in(&mut tx, &notation, now).await? {
                    added.push(ChangeTarget::KeyFormat(notation));
                }
            }
            self.commit_with_changes(tx, &added, now).await
        })
        .await
    }

    /// Every key shape keys were ever minted with. Not counted in
    /// [`query_count`](Store::query_count): it is the feed's work, not an API call's.
    pub async fn key_formats(&self) -> StoreResult<Vec<String>> {
        self.bounded(async {
            let rows = sqlx::query::<Any>("SELECT notation FROM key_formats ORDER BY first_minted_at")
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(|row| row.try_get::<String, _>(0).map_err(StoreError::from)).collect()
        })
        .await
    }
}
