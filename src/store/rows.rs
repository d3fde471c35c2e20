//! Mapping between rows and domain records.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{StoreError, StoreResult};
use crate::domain::key::Environment;
use crate::domain::model::{KeyRecord, Site, Tenant};
use crate::domain::scope::Scope;

/// Microseconds since the epoch: how every backend stores time.
pub fn micros(time: DateTime<Utc>) -> i64 {
    time.timestamp_micros()
}

fn time(micros: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StoreError::Corrupt(format!("timestamp {micros} out of range")))
}

fn optional_time(micros: Option<i64>) -> StoreResult<Option<DateTime<Utc>>> {
    micros.map(time).transpose()
}

fn unsigned(row: &AnyRow, column: &str) -> StoreResult<u32> {
    let value: i64 = row.try_get(column)?;
    u32::try_from(value).map_err(|_| StoreError::Corrupt(format!("{column} = {value} out of range")))
}

pub fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn from_json<T: serde::de::DeserializeOwned>(row: &AnyRow, column: &str) -> StoreResult<T> {
    let text: String = row.try_get(column)?;
    serde_json::from_str(&text).map_err(|error| StoreError::Corrupt(format!("{column}: {error}")))
}

pub fn tenant_from_row(row: &AnyRow) -> StoreResult<Tenant> {
    Ok(Tenant {
        tenant_id: row.try_get("tenant_id")?,
        display_name: row.try_get("display_name")?,
        api_access_enabled: row.try_get::<i64, _>("api_access_enabled")? != 0,
        max_keys: unsigned(row, "max_keys")?,
        rate_limit_per_minute: unsigned(row, "rate_limit_per_minute")?,
        daily_request_quota: unsigned(row, "daily_request_quota")?,
        unlimited_keys: row.try_get::<i64, _>("unlimited_keys")? != 0,
        shared_rate_limit: unsigned(row, "shared_rate_limit")?,
        shared_rate_limit_window: {
            let seconds: i64 = row.try_get("shared_rate_limit_window_seconds")?;
            crate::limits::RateLimitWindow::from_seconds(seconds)
                .ok_or_else(|| StoreError::Corrupt(format!("shared_rate_limit_window_seconds: {seconds}")))?
        },
        created_at: time(row.try_get("created_at")?)?,
        updated_at: time(row.try_get("updated_at")?)?,
    })
}

pub fn site_from_row(row: &AnyRow) -> StoreResult<Site> {
    Ok(Site {
        tenant_id: row.try_get("tenant_id")?,
        site_id: row.try_get("site_id")?,
        display_name: row.try_get("display_name")?,
        created_at: time(row.try_get("created_at")?)?,
        updated_at: time(row.try_get("updated_at")?)?,
    })
}

pub fn key_from_row(row: &AnyRow) -> StoreResult<KeyRecord> {
    let scopes: Vec<String> = from_json(row, "scopes")?;
    let scopes = scopes
        .iter()
        .map(|scope| Scope::parse(scope).map_err(|_| StoreError::Corrupt(format!("stored scope {scope:?} is invalid"))))
        .collect::<StoreResult<Vec<_>>>()?;
    let environment: String = row.try_get("environment")?;
    let metadata: BTreeMap<String, Value> = from_json(row, "metadata")?;
    Ok(KeyRecord {
        key_id: row.try_get("key_id")?,
        tenant_id: row.try_get("tenant_id")?,
        key_hash: row.try_get("key_hash")?,
        name: row.try_get("name")?,
        display_prefix: row.try_get("display_prefix")?,
        scopes,
        site_ids: from_json(row, "site_ids")?,
        environment: Environment::parse(&environment)
            .ok_or_else(|| StoreError::Corrupt(format!("environment {environment:?} is invalid")))?,
        metadata: metadata
            .into_iter()
            .map(|(key, value)| match value {
                Value::String(text) => Ok((key, text)),
                other => Err(StoreError::Corrupt(format!("metadata value {other} is not a string"))),
            })
            .collect::<StoreResult<_>>()?,
        rate_limit_per_minute: unsigned(row, "rate_limit_per_minute")?,
        created_at: time(row.try_get("created_at")?)?,
        expires_at: optional_time(row.try_get("expires_at")?)?,
        revoked_at: optional_time(row.try_get("revoked_at")?)?,
        last_used_at: optional_time(row.try_get("last_used_at")?)?,
        rotated_from_key_id: row.try_get("rotated_from_key_id")?,
    })
}
