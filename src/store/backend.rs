//! What differs between SQLite, PostgreSQL and MySQL: URL schemes, placeholders, upserts and
//! the embedded migrations.

use std::borrow::Cow;

use sqlx::AssertSqlSafe;
use sqlx::migrate::{MigrationType, Migrator};

use super::StoreError;

/// The database family behind a URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

impl Backend {
    /// Picks the backend from the URL scheme: `sqlite:`, `postgres:`/`postgresql:`, `mysql:`/`mariadb:`.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "sqlite" => Ok(Self::Sqlite),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            "mysql" | "mariadb" => Ok(Self::MySql),
            _ => Err(StoreError::Config(format!(
                "unsupported database URL scheme {scheme:?}: use sqlite:, postgres: or mysql:"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::MySql => "mysql",
        }
    }

    /// Statements are written with `?` placeholders; PostgreSQL wants `$1, $2, ...`.
    /// keygate's SQL has no `?` inside string literals, so a plain rewrite is exact.
    pub fn sql(self, text: impl Into<Cow<'static, str>>) -> AssertSqlSafe<Cow<'static, str>> {
        let text = text.into();
        if self != Self::Postgres || !text.contains('?') {
            return AssertSqlSafe(text);
        }
        let mut numbered = String::with_capacity(text.len() + 16);
        let mut index = 0;
        for c in text.chars() {
            if c == '?' {
                index += 1;
                numbered.push('$');
                numbered.push_str(&index.to_string());
            } else {
                numbered.push(c);
            }
        }
        AssertSqlSafe(Cow::Owned(numbered))
    }

    /// `INSERT ... ` that does nothing when the primary key exists.
    pub fn insert_if_absent(self, table_and_columns: &str, values: &str, primary_key: &str) -> String {
        match self {
            Self::MySql => format!(
                "INSERT INTO {table_and_columns} VALUES ({values}) ON DUPLICATE KEY UPDATE {primary_key} = {primary_key}"
            ),
            Self::Sqlite | Self::Postgres => {
                format!("INSERT INTO {table_and_columns} VALUES ({values}) ON CONFLICT ({primary_key}) DO NOTHING")
            }
        }
    }

    /// `INSERT INTO <table_and_columns> VALUES <rows>` that skips every row whose
    /// `unique_column` (a unique key) exists already.
    pub fn insert_rows_if_absent(self, table_and_columns: &str, rows: &str, unique_column: &str) -> String {
        match self {
            Self::MySql => format!(
                "INSERT INTO {table_and_columns} VALUES {rows} ON DUPLICATE KEY UPDATE {unique_column} = {unique_column}"
            ),
            Self::Sqlite | Self::Postgres => {
                format!("INSERT INTO {table_and_columns} VALUES {rows} ON CONFLICT ({unique_column}) DO NOTHING")
            }
        }
    }

    /// `INSERT INTO <table> (<columns>) VALUES <rows>` that adds the new `count` to the row
    /// with the same `<key>` when there is one (and keeps the smaller `earliest`, if given).
    pub fn insert_adding_counts(
        self,
        table: &str,
        columns: &str,
        key: &str,
        earliest: Option<&str>,
        rows: &str,
    ) -> String {
        let prefix = format!("INSERT INTO {table} ({columns}) VALUES {rows}");
        match self {
            Self::MySql => {
                let keep =
                    earliest.map_or(String::new(), |column| format!(", {column} = LEAST({column}, VALUES({column}))"));
                format!("{prefix} ON DUPLICATE KEY UPDATE count = count + VALUES(count){keep}")
            }
            Self::Sqlite | Self::Postgres => {
                let smaller = if self == Self::Sqlite { "MIN" } else { "LEAST" };
                let keep = earliest.map_or(String::new(), |column| {
                    format!(", {column} = {smaller}({table}.{column}, excluded.{column})")
                });
                format!("{prefix} ON CONFLICT ({key}) DO UPDATE SET count = {table}.count + excluded.count{keep}")
            }
        }
    }

    /// The statements that set up a new connection: SQLite's pragmas (foreign keys, WAL so that
    /// Checks read while an admin call writes, the busy timeout) and, on PostgreSQL and MySQL,
    /// statement and lock timeouts equal to `timeout`, so that the database stops work keygate
    /// has given up on and never keeps a lock for a caller that is gone.
    pub async fn session_settings(
        self,
        connection: &mut sqlx::AnyConnection,
        timeout: std::time::Duration,
    ) -> Result<Vec<String>, sqlx::Error> {
        let milliseconds = timeout.as_millis().max(1);
        Ok(match self {
            Self::Sqlite => vec![
                "PRAGMA foreign_keys = ON".into(),
                format!("PRAGMA busy_timeout = {milliseconds}"),
                "PRAGMA journal_mode = WAL".into(),
                "PRAGMA synchronous = NORMAL".into(),
            ],
            Self::Postgres => vec![
                format!("SET statement_timeout = {milliseconds}"),
                format!("SET lock_timeout = {milliseconds}"),
                format!("SET idle_in_transaction_session_timeout = {}", milliseconds * 2),
                // sqlx keeps statements prepared for the connection's life. A generic plan made
                // while a table was small scans it whole once it is large (an IN list over
                // 20 000 imported keys took 19 ms a statement): plan with the real values.
                "SET plan_cache_mode = force_custom_plan".into(),
            ],
            Self::MySql => {
                let version: String = sqlx::query_scalar("SELECT VERSION()").fetch_one(&mut *connection).await?;
                let statement_limit = if version.contains("MariaDB") {
                    format!("SET SESSION max_statement_time = {:.3}", milliseconds as f64 / 1000.0)
                } else {
                    format!("SET SESSION max_execution_time = {milliseconds}")
                };
                // A transaction whose client vanished (a black-holed network: no FIN, no RST)
                // would keep its row locks until wait_timeout, 8 hours by default. MariaDB ends
                // idle transactions on their own; MySQL only idle connections (the pool then
                // reconnects the ones idle that long, which its test-before-acquire notices).
                let idle_limit = (milliseconds * 2).div_ceil(1000);
                let idle_transactions = if version.contains("MariaDB") {
                    format!("SET SESSION idle_transaction_timeout = {idle_limit}")
                } else {
                    format!("SET SESSION wait_timeout = {}", idle_limit.max(60))
                };
                vec![
                    format!("SET SESSION innodb_lock_wait_timeout = {}", milliseconds.div_ceil(1000)),
                    statement_limit,
                    idle_transactions,
                ]
            }
        })
    }

    /// The schema migrations of this backend, embedded in the binary.
    pub fn migrator(self) -> Migrator {
        let files: &[(i64, &str, &'static str)] = match self {
            Self::Sqlite => &[
                (1, "init", include_str!("../../migrations/sqlite/0001_init.sql")),
                (2, "change feed", include_str!("../../migrations/sqlite/0002_change_feed.sql")),
                (3, "request counts", include_str!("../../migrations/sqlite/0003_request_counts.sql")),
                (4, "usage and audit", include_str!("../../migrations/sqlite/0004_usage_and_audit.sql")),
                (5, "site ownership", include_str!("../../migrations/sqlite/0005_site_ownership.sql")),
                (6, "key formats", include_str!("../../migrations/sqlite/0006_key_formats.sql")),
                (7, "tenant limits", include_str!("../../migrations/sqlite/0007_tenant_limits.sql")),
            ],
            Self::Postgres => &[
                (1, "init", include_str!("../../migrations/postgres/0001_init.sql")),
                (2, "change feed", include_str!("../../migrations/postgres/0002_change_feed.sql")),
                (3, "request counts", include_str!("../../migrations/postgres/0003_request_counts.sql")),
                (4, "usage and audit", include_str!("../../migrations/postgres/0004_usage_and_audit.sql")),
                (5, "site ownership", include_str!("../../migrations/postgres/0005_site_ownership.sql")),
                (6, "key formats", include_str!("../../migrations/postgres/0006_key_formats.sql")),
                (7, "tenant limits", include_str!("../../migrations/postgres/0007_tenant_limits.sql")),
            ],
            Self::MySql => &[
                (1, "init", include_str!("../../migrations/mysql/0001_init.sql")),
                (2, "change feed", include_str!("../../migrations/mysql/0002_change_feed.sql")),
                (3, "request counts", include_str!("../../migrations/mysql/0003_request_counts.sql")),
                (4, "usage and audit", include_str!("../../migrations/mysql/0004_usage_and_audit.sql")),
                (5, "site ownership", include_str!("../../migrations/mysql/0005_site_ownership.sql")),
                (6, "key formats", include_str!("../../migrations/mysql/0006_key_formats.sql")),
                (7, "tenant limits", include_str!("../../migrations/mysql/0007_tenant_limits.sql")),
            ],
        };
        let migrations = files
            .iter()
            .map(|&(version, description, sql)| {
                sqlx::migrate::Migration::new(
                    version,
                    Cow::Borrowed(description),
                    MigrationType::Simple,
                    sqlx::SqlSafeStr::into_sql_str(sql),
                    false,
                )
            })
            .collect();
        Migrator::with_migrations(migrations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres_only() {
        assert_eq!(Backend::Postgres.sql("a = ? AND b = ?").0, "a = $1 AND b = $2");
        assert_eq!(Backend::MySql.sql("a = ? AND b = ?").0, "a = ? AND b = ?");
    }

    #[test]
    fn schemes_pick_backends() {
        assert_eq!(Backend::from_url("sqlite://keygate.db?mode=rwc").unwrap(), Backend::Sqlite);
        assert_eq!(Backend::from_url("postgresql://localhost/db").unwrap(), Backend::Postgres);
        assert_eq!(Backend::from_url("mysql://root@localhost/db").unwrap(), Backend::MySql);
        assert!(Backend::from_url("redis://localhost").is_err());
    }
}
