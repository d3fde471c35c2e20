//! The records keygate keeps: tenants, sites and keys.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::key::Environment;
use super::scope::Scope;

/// A tenant with its plan limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    pub tenant_id: String,
    pub display_name: String,
    pub api_access_enabled: bool,
    /// 0 means the server default.
    pub max_keys: u32,
    /// 0 means no limit.
    pub rate_limit_per_minute: u32,
    /// 0 means no quota.
    pub daily_request_quota: u32,
    /// No active-key limit at all; `max_keys` is then ignored.
    pub unlimited_keys: bool,
    /// Requests per `shared_rate_limit_window` across all the tenant's keys; 0 means none.
    pub shared_rate_limit: u32,
    /// The sliding window of `shared_rate_limit`.
    pub shared_rate_limit_window: crate::limits::RateLimitWindow,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The fields of a PutTenant call; `None` keeps the current value (or the default on create).
#[derive(Clone, Debug, Default)]
pub struct TenantChanges {
    pub display_name: Option<String>,
    pub api_access_enabled: Option<bool>,
    pub max_keys: Option<u32>,
    pub rate_limit_per_minute: Option<u32>,
    pub daily_request_quota: Option<u32>,
    pub unlimited_keys: Option<bool>,
    pub shared_rate_limit: Option<u32>,
    pub shared_rate_limit_window: Option<crate::limits::RateLimitWindow>,
}

impl TenantChanges {
    /// The fields that are set, with their new values, for the audit log.
    pub fn described(&self) -> Vec<(&'static str, String)> {
        let mut fields = Vec::new();
        if let Some(name) = &self.display_name {
            fields.push(("display_name", name.clone()));
        }
        if let Some(enabled) = self.api_access_enabled {
            fields.push(("api_access_enabled", enabled.to_string()));
        }
        if let Some(unlimited) = self.unlimited_keys {
            fields.push(("unlimited_keys", unlimited.to_string()));
        }
        if let Some(window) = self.shared_rate_limit_window {
            fields.push(("shared_rate_limit_window", window.name().to_owned()));
        }
        for (field, value) in [
            ("max_keys", self.max_keys),
            ("rate_limit_per_minute", self.rate_limit_per_minute),
            ("daily_request_quota", self.daily_request_quota),
            ("shared_rate_limit", self.shared_rate_limit),
        ] {
            if let Some(value) = value {
                fields.push((field, value.to_string()));
            }
        }
        fields
    }
}

/// A site owned by one tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    pub tenant_id: String,
    pub site_id: String,
    pub display_name: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The lifecycle state of a key at some instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Expired,
    Revoked,
}

impl KeyState {
    /// The state at `now` of a key with these expiry and revocation times: revoked once
    /// `revoked_at` is reached (a rotation's grace period ends then), else expired once
    /// `expires_at` is.
    pub fn at(now: DateTime<Utc>, expires_at: Option<DateTime<Utc>>, revoked_at: Option<DateTime<Utc>>) -> Self {
        if revoked_at.is_some_and(|revoked_at| revoked_at <= now) {
            Self::Revoked
        } else if expires_at.is_some_and(|expires_at| expires_at <= now) {
            Self::Expired
        } else {
            Self::Active
        }
    }
}

/// A stored key: everything but the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: String,
    pub tenant_id: String,
    /// Lowercase hex SHA-256 of the full key: the lookup key of Check. Not a secret.
    pub key_hash: String,
    pub name: String,
    pub display_prefix: String,
    pub scopes: Vec<Scope>,
    /// Empty: every site of the tenant.
    pub site_ids: Vec<String>,
    pub environment: Environment,
    pub metadata: BTreeMap<String, String>,
    /// 0 means the tenant's default.
    pub rate_limit_per_minute: u32,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub rotated_from_key_id: Option<String>,
}

#[cfg(test)]
impl KeyRecord {
    /// A working key of tenant `acme` for tests: id `key_id`, the hash of `secret`, scope
    /// `events:read`, no sites, no limit, no expiry.
    pub(crate) fn sample(key_id: &str, secret: &str) -> Self {
        Self {
            key_id: key_id.into(),
            tenant_id: "acme".into(),
            key_hash: super::key::KeyDigest::of(secret).to_hash().as_str().to_owned(),
            name: secret.into(),
            display_prefix: "kg_live_abcd".into(),
            scopes: vec![Scope::parse("events:read").expect("a scope")],
            site_ids: Vec::new(),
            environment: Environment::Live,
            metadata: BTreeMap::new(),
            rate_limit_per_minute: 0,
            created_at: Utc::now(),
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
            rotated_from_key_id: None,
        }
    }
}

impl KeyRecord {
    /// The state at `now`: expiry and grace periods are judged when asked, never stored.
    pub fn state(&self, now: DateTime<Utc>) -> KeyState {
        KeyState::at(now, self.expires_at, self.revoked_at)
    }
}

/// The changes of an UpdateKey call: `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub scopes: Option<Vec<Scope>>,
    pub site_ids: Option<Vec<String>>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<DateTime<Utc>>>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub rate_limit_per_minute: Option<u32>,
}

impl KeyPatch {
    /// The names of the fields the patch sets, for the audit log.
    pub fn fields(&self) -> Vec<&'static str> {
        [
            ("name", self.name.is_some()),
            ("scopes", self.scopes.is_some()),
            ("site_ids", self.site_ids.is_some()),
            ("expires_at", self.expires_at.is_some()),
            ("metadata", self.metadata.is_some()),
            ("rate_limit_per_minute", self.rate_limit_per_minute.is_some()),
        ]
        .into_iter()
        .filter_map(|(field, set)| set.then_some(field))
        .collect()
    }
}
