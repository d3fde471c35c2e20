//! The audit log's vocabulary: who did what to which tenant or key, and when.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};

/// What an audit event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuditEventType {
    TenantPut,
    SitePut,
    SiteDeleted,
    KeyCreated,
    KeyUpdated,
    KeyRevoked,
    KeyRotated,
    /// Denied Checks of one key for one reason within one minute.
    CheckDenied,
    /// A key taken over by ImportKeys.
    KeyImported,
}

impl AuditEventType {
    pub const ALL: [Self; 9] = [
        Self::TenantPut,
        Self::SitePut,
        Self::SiteDeleted,
        Self::KeyCreated,
        Self::KeyUpdated,
        Self::KeyRevoked,
        Self::KeyRotated,
        Self::CheckDenied,
        Self::KeyImported,
    ];

    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TenantPut => "TENANT_PUT",
            Self::SitePut => "SITE_PUT",
            Self::SiteDeleted => "SITE_DELETED",
            Self::KeyCreated => "KEY_CREATED",
            Self::KeyUpdated => "KEY_UPDATED",
            Self::KeyRevoked => "KEY_REVOKED",
            Self::KeyRotated => "KEY_ROTATED",
            Self::CheckDenied => "CHECK_DENIED",
            Self::KeyImported => "KEY_IMPORTED",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == value)
    }
}

impl fmt::Display for AuditEventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An admin change about to be recorded, in the transaction that makes it.
#[derive(Clone, Debug)]
pub struct AuditEntry {
    pub event_type: AuditEventType,
    /// The name of the admin token that made the change.
    pub actor: String,
    pub tenant_id: String,
    pub key_id: Option<String>,
    /// What changed; never a secret.
    pub details: BTreeMap<String, String>,
}

impl AuditEntry {
    pub fn new(event_type: AuditEventType, actor: &str, tenant_id: &str) -> Self {
        Self {
            event_type,
            actor: actor.to_owned(),
            tenant_id: tenant_id.to_owned(),
            key_id: None,
            details: BTreeMap::new(),
        }
    }

    pub fn key(mut self, key_id: &str) -> Self {
        self.key_id = Some(key_id.to_owned());
        self
    }

    pub fn detail(mut self, name: &str, value: impl ToString) -> Self {
        self.details.insert(name.to_owned(), value.to_string());
        self
    }
}

/// A recorded audit event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    pub event_id: String,
    pub tenant_id: String,
    pub key_id: Option<String>,
    pub event_type: AuditEventType,
    pub actor: String,
    pub details: BTreeMap<String, String>,
    pub occurred_at: DateTime<Utc>,
    pub count: u64,
}

/// Which audit events to list.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub key_id: Option<String>,
    /// Empty: every type.
    pub event_types: Vec<AuditEventType>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
}
