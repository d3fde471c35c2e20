//! Proto <-> domain: request decoding with validation, record encoding.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use prost_types::Timestamp;

use crate::domain::audit::{AuditEvent, AuditEventType, AuditFilter};
use crate::domain::key::Environment;
use crate::domain::model::{KeyPatch, KeyRecord, KeyState, Site, Tenant, TenantChanges};
use crate::domain::validation::{MAX_DISPLAY_NAME_CHARS, MAX_NAME_CHARS, Violations};
use crate::proto;
use crate::service::{CreateKey, DailyUsage, Expiry, ListKeys, ServiceError};

/// The longest grace period RotateKey accepts.
pub const MAX_GRACE_DAYS: i64 = 30;

pub fn timestamp(time: DateTime<Utc>) -> Timestamp {
    Timestamp { seconds: time.timestamp(), nanos: time.timestamp_subsec_nanos() as i32 }
}

fn to_time(violations: &mut Violations, field: &str, value: &Timestamp) -> Option<DateTime<Utc>> {
    let time = u32::try_from(value.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(value.seconds, nanos));
    if time.is_none() {
        violations.add(field, "is not a valid timestamp");
    }
    time
}

/// `value` if it lies between 0 and `max_days`; else a violation saying `bound` (the rule as
/// the caller states it, which may be stricter than `max_days`, such as "within 100 years").
fn to_duration(
    violations: &mut Violations,
    field: &str,
    value: &prost_types::Duration,
    max_days: i64,
    bound: &str,
) -> Option<Duration> {
    let valid = value.seconds >= 0 && (0..1_000_000_000).contains(&value.nanos) && value.seconds <= max_days * 86_400;
    if !valid {
        violations.add(field, format!("must be {bound}"));
        return None;
    }
    Duration::try_seconds(value.seconds).map(|seconds| seconds + Duration::nanoseconds(i64::from(value.nanos)))
}

fn environment(value: i32) -> Result<Environment, ()> {
    match proto::KeyEnvironment::try_from(value) {
        Ok(proto::KeyEnvironment::Unspecified | proto::KeyEnvironment::Live) => Ok(Environment::Live),
        Ok(proto::KeyEnvironment::Test) => Ok(Environment::Test),
        Err(_) => Err(()),
    }
}

fn environment_proto(environment: Environment) -> proto::KeyEnvironment {
    match environment {
        Environment::Live => proto::KeyEnvironment::Live,
        Environment::Test => proto::KeyEnvironment::Test,
    }
}

fn metadata(
    violations: &mut Violations,
    field: &str,
    values: std::collections::HashMap<String, String>,
) -> BTreeMap<String, String> {
    let metadata: BTreeMap<_, _> = values.into_iter().collect();
    violations.metadata(field, &metadata);
    metadata
}

/// Decodes PutTenant.
pub fn put_tenant(request: proto::PutTenantRequest) -> Result<(String, TenantChanges), ServiceError> {
    let mut violations = Violations::default();
    violations.id("tenant_id", &request.tenant_id);
    if let Some(name) = &request.display_name {
        violations.optional_name("display_name", name, MAX_DISPLAY_NAME_CHARS);
    }
    let shared_rate_limit_window = match proto::RateLimitWindow::try_from(request.shared_rate_limit_window) {
        Ok(proto::RateLimitWindow::Unspecified) => None,
        Ok(window) => Some(window_from_proto(window)),
        Err(_) => {
            violations.add("shared_rate_limit_window", "must be SECOND, MINUTE, HOUR or DAY");
            None
        }
    };
    let changes = TenantChanges {
        display_name: request.display_name.filter(|name| !name.is_empty()),
        api_access_enabled: request.api_access_enabled,
        max_keys: request.max_keys,
        rate_limit_per_minute: request.rate_limit_per_minute,
        daily_request_quota: request.daily_request_quota,
        unlimited_keys: request.unlimited_keys,
        shared_rate_limit: request.shared_rate_limit,
        shared_rate_limit_window,
    };
    Ok(violations.finish((request.tenant_id, changes))?)
}

/// Checks the ids every tenant-scoped request carries.
pub fn ids(pairs: &[(&str, &str)]) -> Result<(), ServiceError> {
    let mut violations = Violations::default();
    for (field, value) in pairs {
        violations.id(field, value);
    }
    Ok(violations.finish(())?)
}

/// Decodes PutSite.
pub fn put_site(request: &proto::PutSiteRequest) -> Result<(), ServiceError> {
    let mut violations = Violations::default();
    violations.id("tenant_id", &request.tenant_id);
    violations.id("site_id", &request.site_id);
    violations.optional_name("display_name", &request.display_name, MAX_DISPLAY_NAME_CHARS);
    Ok(violations.finish(())?)
}

/// Decodes a page size and checks the tenant id of a list call.
pub fn list(tenant_id: &str, page_size: i32) -> Result<usize, ServiceError> {
    let mut violations = Violations::default();
    violations.id("tenant_id", tenant_id);
    let size = violations.page_size("page_size", page_size);
    Ok(violations.finish(size)?)
}

impl TryFrom<proto::CreateKeyRequest> for CreateKey {
    type Error = ServiceError;

    fn try_from(request: proto::CreateKeyRequest) -> Result<Self, ServiceError> {
        let mut violations = Violations::default();
        violations.id("tenant_id", &request.tenant_id);
        violations.optional_name("name", &request.name, MAX_NAME_CHARS);
        let scopes = violations.scopes("scopes", &request.scopes);
        let site_ids = violations.site_ids("site_ids", &request.site_ids);
        let expiry = match &request.expiry {
            None => Expiry::Never,
            Some(proto::create_key_request::Expiry::ExpiresAt(at)) => {
                to_time(&mut violations, "expires_at", at).map_or(Expiry::Never, Expiry::At)
            }
            Some(proto::create_key_request::Expiry::ExpiresIn(duration)) => {
                // Checked against 100 calendar years by the service; this only keeps it finite.
                match to_duration(&mut violations, "expires_in", duration, 36_600, "positive and within 100 years") {
                    Some(duration) if duration.is_zero() => {
                        violations.add("expires_in", "must be positive");
                        Expiry::Never
                    }
                    Some(duration) => Expiry::After(duration),
                    None => Expiry::Never,
                }
            }
        };
        let environment = environment(request.environment).unwrap_or_else(|()| {
            violations.add("environment", "must be KEY_ENVIRONMENT_LIVE or KEY_ENVIRONMENT_TEST");
            Environment::Live
        });
        let metadata = metadata(&mut violations, "metadata", request.metadata);
        let request = CreateKey {
            tenant_id: request.tenant_id,
            name: request.name,
            scopes,
            site_ids,
            expiry,
            environment,
            metadata,
            rate_limit_per_minute: request.rate_limit_per_minute,
        };
        Ok(violations.finish(request)?)
    }
}

impl TryFrom<proto::ListKeysRequest> for ListKeys {
    type Error = ServiceError;

    fn try_from(request: proto::ListKeysRequest) -> Result<Self, ServiceError> {
        let mut violations = Violations::default();
        violations.id("tenant_id", &request.tenant_id);
        let page_size = violations.page_size("page_size", request.page_size);
        if !request.site_id.is_empty() {
            violations.id("site_id", &request.site_id);
        }
        let request = ListKeys {
            tenant_id: request.tenant_id,
            page_size,
            page_token: request.page_token,
            include_revoked: request.include_revoked,
            site_id: Some(request.site_id).filter(|site| !site.is_empty()),
        };
        Ok(violations.finish(request)?)
    }
}

/// The fields UpdateKey may change, as update_mask paths.
const UPDATABLE: [&str; 6] = ["name", "scopes", "site_ids", "expires_at", "metadata", "rate_limit_per_minute"];

impl TryFrom<proto::UpdateKeyRequest> for KeyPatch {
    type Error = ServiceError;

    fn try_from(request: proto::UpdateKeyRequest) -> Result<Self, ServiceError> {
        let mut violations = Violations::default();
        violations.id("tenant_id", &request.tenant_id);
        violations.key_id("key_id", &request.key_id);
        let paths = request.update_mask.map(|mask| mask.paths).unwrap_or_default();
        if paths.is_empty() {
            violations.add("update_mask", format!("must name at least one of {}", UPDATABLE.join(", ")));
        }
        let mut changes = KeyPatch::default();
        for path in &paths {
            match path.as_str() {
                "name" => {
                    violations.optional_name("name", &request.name, MAX_NAME_CHARS);
                    changes.name = Some(request.name.clone());
                }
                "scopes" => changes.scopes = Some(violations.scopes("scopes", &request.scopes)),
                "site_ids" => changes.site_ids = Some(violations.site_ids("site_ids", &request.site_ids)),
                "expires_at" => {
                    changes.expires_at =
                        Some(request.expires_at.as_ref().and_then(|at| to_time(&mut violations, "expires_at", at)));
                }
                "metadata" => changes.metadata = Some(metadata(&mut violations, "metadata", request.metadata.clone())),
                "rate_limit_per_minute" => changes.rate_limit_per_minute = Some(request.rate_limit_per_minute),
                other => violations.add(
                    "update_mask",
                    format!(
                        "unknown or read-only field {:?}; updatable: {}",
                        super::Untrusted(other),
                        UPDATABLE.join(", ")
                    ),
                ),
            }
        }
        Ok(violations.finish(changes)?)
    }
}

/// Decodes RotateKey's grace period; unset is zero.
pub fn rotate_key(request: &proto::RotateKeyRequest) -> Result<Duration, ServiceError> {
    let mut violations = Violations::default();
    violations.id("tenant_id", &request.tenant_id);
    violations.key_id("key_id", &request.key_id);
    let grace = match &request.grace_period {
        None => Some(Duration::zero()),
        Some(grace) => to_duration(
            &mut violations,
            "grace_period",
            grace,
            MAX_GRACE_DAYS,
            &format!("between 0 and {MAX_GRACE_DAYS} days"),
        ),
    };
    Ok(violations.finish(grace.unwrap_or_default())?)
}

fn window_from_proto(window: proto::RateLimitWindow) -> crate::limits::RateLimitWindow {
    use crate::limits::RateLimitWindow;
    match window {
        proto::RateLimitWindow::Second => RateLimitWindow::Second,
        proto::RateLimitWindow::Hour => RateLimitWindow::Hour,
        proto::RateLimitWindow::Day => RateLimitWindow::Day,
        proto::RateLimitWindow::Minute | proto::RateLimitWindow::Unspecified => RateLimitWindow::Minute,
    }
}

/// The proto window of a domain window.
pub fn window_to_proto(window: crate::limits::RateLimitWindow) -> proto::RateLimitWindow {
    use crate::limits::RateLimitWindow;
    match window {
        RateLimitWindow::Second => proto::RateLimitWindow::Second,
        RateLimitWindow::Minute => proto::RateLimitWindow::Minute,
        RateLimitWindow::Hour => proto::RateLimitWindow::Hour,
        RateLimitWindow::Day => proto::RateLimitWindow::Day,
    }
}

pub fn tenant(tenant: &Tenant, effective_max_keys: u32) -> proto::Tenant {
    proto::Tenant {
        tenant_id: tenant.tenant_id.clone(),
        display_name: tenant.display_name.clone(),
        api_access_enabled: tenant.api_access_enabled,
        max_keys: tenant.max_keys,
        rate_limit_per_minute: tenant.rate_limit_per_minute,
        daily_request_quota: tenant.daily_request_quota,
        created_at: Some(timestamp(tenant.created_at)),
        updated_at: Some(timestamp(tenant.updated_at)),
        effective_max_keys,
        unlimited_keys: tenant.unlimited_keys,
        shared_rate_limit: tenant.shared_rate_limit,
        shared_rate_limit_window: window_to_proto(tenant.shared_rate_limit_window).into(),
    }
}

pub fn site(site: &Site) -> proto::Site {
    proto::Site {
        tenant_id: site.tenant_id.clone(),
        site_id: site.site_id.clone(),
        display_name: site.display_name.clone(),
        created_at: Some(timestamp(site.created_at)),
        updated_at: Some(timestamp(site.updated_at)),
    }
}

pub fn api_key(key: &KeyRecord, now: DateTime<Utc>) -> proto::ApiKey {
    let state = match key.state(now) {
        KeyState::Active => proto::KeyState::Active,
        KeyState::Expired => proto::KeyState::Expired,
        KeyState::Revoked => proto::KeyState::Revoked,
    };
    proto::ApiKey {
        key_id: key.key_id.clone(),
        tenant_id: key.tenant_id.clone(),
        name: key.name.clone(),
        display_prefix: key.display_prefix.clone(),
        scopes: key.scopes.iter().map(|scope| scope.as_str().to_owned()).collect(),
        site_ids: key.site_ids.clone(),
        environment: environment_proto(key.environment).into(),
        metadata: key.metadata.clone().into_iter().collect(),
        rate_limit_per_minute: key.rate_limit_per_minute,
        state: state.into(),
        created_at: Some(timestamp(key.created_at)),
        expires_at: key.expires_at.map(timestamp),
        revoked_at: key.revoked_at.map(timestamp),
        last_used_at: key.last_used_at.map(timestamp),
        rotated_from_key_id: key.rotated_from_key_id.clone().unwrap_or_default(),
    }
}

/// Encodes a Check outcome.
/// The Authorize answer; a deny's `message` and `http_status` come from `answers`, as Envoy's do.
pub fn check_response(
    answers: &crate::answers::Answers,
    outcome: &crate::service::CheckOutcome,
    scope: &str,
    site_id: &str,
) -> proto::CheckResponse {
    use crate::domain::decision::DenyReason;
    let reason = outcome.decision.err();
    let mut response = proto::CheckResponse {
        allowed: reason.is_none(),
        reason: reason.map_or(proto::DenyReason::Unspecified, |reason| match reason {
            DenyReason::KeyMissing => proto::DenyReason::KeyMissing,
            DenyReason::KeyMalformed => proto::DenyReason::KeyMalformed,
            DenyReason::KeyUnknown => proto::DenyReason::KeyUnknown,
            DenyReason::KeyRevoked => proto::DenyReason::KeyRevoked,
            DenyReason::KeyExpired => proto::DenyReason::KeyExpired,
            DenyReason::ScopeMissing => proto::DenyReason::ScopeMissing,
            DenyReason::SiteForbidden => proto::DenyReason::SiteForbidden,
            DenyReason::PlanRequired => proto::DenyReason::PlanRequired,
            DenyReason::RateLimited => proto::DenyReason::RateLimited,
            DenyReason::QuotaExceeded => proto::DenyReason::QuotaExceeded,
            DenyReason::TenantMismatch => proto::DenyReason::TenantMismatch,
        }) as i32,
        message: reason.map(|reason| answers.message(reason, scope, site_id)).unwrap_or_default(),
        http_status: reason.map_or(200, |reason| u32::from(answers.status(reason))),
        ..Default::default()
    };
    if let Some(key) = &outcome.key {
        response.tenant_id = key.tenant_id().to_owned();
        response.key_id = key.key_id().to_owned();
        response.key_name = key.name().to_owned();
        response.scopes = key.scopes().map(str::to_owned).collect();
        response.site_ids = key.site_ids().map(str::to_owned).collect();
        response.environment = environment_proto(key.environment()).into();
        response.metadata = key.metadata().map(|(name, value)| (name.to_owned(), value.to_owned())).collect();
        response.expires_at = key.expires_at().map(timestamp);
    }
    response.rate_limit = outcome.rate_limit.as_ref().map(|limit| {
        use crate::service::RateLimitSubject;
        let window = window_to_proto(limit.window);
        let subject = match limit.subject {
            RateLimitSubject::Key => proto::RateLimitSubject::Key,
            RateLimitSubject::Tenant => proto::RateLimitSubject::Tenant,
        };
        proto::RateLimit {
            limit: limit.limit,
            remaining: limit.remaining,
            reset_at: Some(timestamp(limit.reset_at)),
            window: window.into(),
            subject: subject.into(),
        }
    });
    response
}

/// How many days after `start_date` GetKeyUsage's `end_date` may be (a leap year and a day:
/// 367 days in all).
const MAX_USAGE_DAYS: i64 = 366;

/// Decodes GetKeyUsage's ids and date range.
pub fn usage_range(request: &proto::GetKeyUsageRequest) -> Result<(NaiveDate, NaiveDate), ServiceError> {
    let mut violations = Violations::default();
    violations.id("tenant_id", &request.tenant_id);
    violations.key_id("key_id", &request.key_id);
    let mut date = |field: &str, value: &str| {
        let parsed = NaiveDate::parse_from_str(value, "%Y-%m-%d").ok().filter(|_| value.len() == 10);
        if parsed.is_none() {
            violations.add(field, "must be a date as YYYY-MM-DD");
        }
        parsed
    };
    let (first, last) = (date("start_date", &request.start_date), date("end_date", &request.end_date));
    if let (Some(first), Some(last)) = (first, last) {
        if last < first {
            violations.add("end_date", "must not be before start_date");
        } else if (last - first).num_days() > MAX_USAGE_DAYS {
            violations.add("end_date", format!("must be at most {MAX_USAGE_DAYS} days after start_date"));
        }
    }
    let range = first.zip(last).unwrap_or_default();
    Ok(violations.finish(range)?)
}

pub fn daily_usage(day: &DailyUsage) -> proto::DailyKeyUsage {
    proto::DailyKeyUsage {
        date: day.date.format("%Y-%m-%d").to_string(),
        allowed: day.allowed,
        denied: day.denied_by_reason.values().sum(),
        denied_by_reason: day
            .denied_by_reason
            .iter()
            .map(|(reason, count)| (format!("DENY_REASON_{reason}"), *count))
            .collect(),
    }
}

fn audit_type(kind: AuditEventType) -> proto::AuditEventType {
    match kind {
        AuditEventType::TenantPut => proto::AuditEventType::TenantPut,
        AuditEventType::SitePut => proto::AuditEventType::SitePut,
        AuditEventType::SiteDeleted => proto::AuditEventType::SiteDeleted,
        AuditEventType::KeyCreated => proto::AuditEventType::KeyCreated,
        AuditEventType::KeyUpdated => proto::AuditEventType::KeyUpdated,
        AuditEventType::KeyRevoked => proto::AuditEventType::KeyRevoked,
        AuditEventType::KeyRotated => proto::AuditEventType::KeyRotated,
        AuditEventType::CheckDenied => proto::AuditEventType::CheckDenied,
        AuditEventType::KeyImported => proto::AuditEventType::KeyImported,
    }
}

/// Decodes ListAuditEvents' filter and page size.
pub fn audit_filter(request: &proto::ListAuditEventsRequest) -> Result<(AuditFilter, usize), ServiceError> {
    let mut violations = Violations::default();
    violations.id("tenant_id", &request.tenant_id);
    if !request.key_id.is_empty() {
        violations.key_id("key_id", &request.key_id);
    }
    let page_size = violations.page_size("page_size", request.page_size);
    let mut event_types = Vec::new();
    for (index, value) in request.event_types.iter().enumerate() {
        let known = AuditEventType::ALL.into_iter().find(|kind| audit_type(*kind) as i32 == *value);
        match known {
            Some(kind) => event_types.push(kind),
            None => violations.add(format!("event_types[{index}]"), "is not a known AuditEventType"),
        }
    }
    let start_time = request.start_time.as_ref().and_then(|time| to_time(&mut violations, "start_time", time));
    let end_time = request.end_time.as_ref().and_then(|time| to_time(&mut violations, "end_time", time));
    let filter = AuditFilter {
        key_id: Some(request.key_id.clone()).filter(|id| !id.is_empty()),
        event_types,
        start_time,
        end_time,
    };
    Ok(violations.finish((filter, page_size))?)
}

pub fn audit_event(event: &AuditEvent) -> proto::AuditEvent {
    proto::AuditEvent {
        event_id: event.event_id.clone(),
        tenant_id: event.tenant_id.clone(),
        key_id: event.key_id.clone().unwrap_or_default(),
        event_type: audit_type(event.event_type).into(),
        actor: event.actor.clone(),
        occurred_at: Some(timestamp(event.occurred_at)),
        details: event.details.clone().into_iter().collect(),
        count: event.count,
    }
}

/// Decodes ImportKeys: the call's own fields must be right (else INVALID_ARGUMENT for the
/// whole call); each key is decoded on its own, its errors naming fields within the key.
pub fn import_keys(request: proto::ImportKeysRequest) -> Result<crate::service::ImportKeys, ServiceError> {
    use crate::service::{Credential, ImportKey, MAX_IMPORT_KEYS};
    let mut violations = Violations::default();
    violations.id("tenant_id", &request.tenant_id);
    if request.keys.is_empty() || request.keys.len() > MAX_IMPORT_KEYS {
        violations.add("keys", format!("must hold 1 to {MAX_IMPORT_KEYS} keys"));
    }
    violations.finish(())?;
    let keys = request
        .keys
        .into_iter()
        .map(|key| {
            let mut violations = Violations::default();
            let credential = match key.credential {
                Some(proto::imported_key::Credential::Secret(secret)) if !secret.is_empty() => {
                    if secret.len() > crate::domain::key::MAX_KEY_BYTES {
                        violations
                            .add("secret", format!("must be at most {} bytes", crate::domain::key::MAX_KEY_BYTES));
                    }
                    Some(Credential::Secret(secret))
                }
                Some(proto::imported_key::Credential::SecretSha256(hash)) => {
                    let parsed = crate::domain::key::KeyHash::from_given(&hash);
                    if parsed.is_none() {
                        violations.add("secret_sha256", "must be a SHA-256: 64 hex digits, or 32 bytes in base64");
                    }
                    parsed.map(Credential::Sha256)
                }
                _ => {
                    violations.add("secret", "give the key as secret or its SHA-256 as secret_sha256");
                    None
                }
            };
            violations.optional_name(
                "display_prefix",
                &key.display_prefix,
                crate::domain::validation::MAX_DISPLAY_PREFIX_CHARS,
            );
            violations.optional_name("name", &key.name, MAX_NAME_CHARS);
            let scopes = violations.scopes("scopes", &key.scopes);
            let site_ids = violations.site_ids("site_ids", &key.site_ids);
            let environment = match proto::KeyEnvironment::try_from(key.environment) {
                Ok(proto::KeyEnvironment::Unspecified) => None,
                Ok(proto::KeyEnvironment::Live) => Some(Environment::Live),
                Ok(proto::KeyEnvironment::Test) => Some(Environment::Test),
                Err(_) => {
                    violations.add("environment", "must be KEY_ENVIRONMENT_LIVE or KEY_ENVIRONMENT_TEST");
                    None
                }
            };
            let metadata = metadata(&mut violations, "metadata", key.metadata);
            let mut time = |field: &str, value: &Option<prost_types::Timestamp>| {
                value.as_ref().and_then(|value| to_time(&mut violations, field, value))
            };
            let (created_at, expires_at, last_used_at) = (
                time("created_at", &key.created_at),
                time("expires_at", &key.expires_at),
                time("last_used_at", &key.last_used_at),
            );
            violations.finish(())?;
            Ok(ImportKey {
                credential: credential.ok_or_else(|| ServiceError::invalid("secret", "is required"))?,
                display_prefix: key.display_prefix,
                name: key.name,
                scopes,
                site_ids,
                environment,
                metadata,
                rate_limit_per_minute: key.rate_limit_per_minute,
                created_at,
                expires_at,
                last_used_at,
            })
        })
        .collect();
    Ok(crate::service::ImportKeys { tenant_id: request.tenant_id, keys, validate_only: request.validate_only })
}

/// The `google.rpc.Status` of one key ImportKeys did not import: INVALID_ARGUMENT with a
/// BadRequest naming the field, or ALREADY_EXISTS with an ErrorInfo whose `reason` a script can
/// act on: `KEY_ALREADY_IMPORTED` (the tenant has it: a retry), `KEY_TAKEN` (another tenant has
/// it), `KEY_REPEATED` (earlier in the same request).
pub fn import_error(error: crate::service::ImportError) -> tonic_types::pb::Status {
    use crate::service::ImportError;
    use prost::Message;
    use tonic_types::{ErrorDetails, StatusExt};
    let (message, reason) = match error {
        ImportError::Invalid(error) => {
            let status = tonic::Status::from(error);
            return tonic_types::pb::Status::decode(status.details()).unwrap_or_else(|_| tonic_types::pb::Status {
                code: status.code() as i32,
                message: status.message().to_owned(),
                details: Vec::new(),
            });
        }
        ImportError::AlreadyInTenant => ("the tenant has this key already".to_owned(), "KEY_ALREADY_IMPORTED"),
        ImportError::Taken => {
            ("this key cannot be imported: a key with this secret exists already".to_owned(), "KEY_TAKEN")
        }
        ImportError::Repeated { first } => {
            (format!("this key is keys[{first}] of this request already"), "KEY_REPEATED")
        }
    };
    let details = ErrorDetails::with_error_info(reason, "keygate", std::collections::HashMap::new());
    let status = tonic::Status::with_error_details(tonic::Code::AlreadyExists, message, details);
    tonic_types::pb::Status::decode(status.details()).unwrap_or_default()
}
