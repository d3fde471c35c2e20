//! KeyAdmin's operations: tenants, sites and the key lifecycle.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, Utc};
use tracing::info;

use super::page_token::ListCall;
use super::{Core, ServiceError, ServiceResult};
use crate::domain::audit::{AuditEntry, AuditEvent, AuditEventType, AuditFilter};
use crate::domain::key::{ApiKeySecret, Environment, new_key_id};
use crate::domain::model::{KeyPatch, KeyRecord, KeyState, Site, Tenant, TenantChanges};
use crate::domain::scope::Scope;
use crate::domain::validation::Violations;
use crate::store::{InsertKeyOutcome, KeyEnd, KeyFilter, KeyWrite, PutSiteOutcome, RotateOutcome};

/// The longest expiry keygate accepts, in calendar years, so timestamps stay far from overflow.
const MAX_LIFETIME_YEARS: u32 = 100;

/// When a new key stops working.
#[derive(Clone, Copy, Debug)]
pub enum Expiry {
    Never,
    At(DateTime<Utc>),
    After(Duration),
}

/// A validated CreateKey request.
#[derive(Clone, Debug)]
pub struct CreateKey {
    pub tenant_id: String,
    pub name: String,
    /// Well-formed; the catalogue is checked by the service.
    pub scopes: Vec<Scope>,
    pub site_ids: Vec<String>,
    pub expiry: Expiry,
    pub environment: Environment,
    pub metadata: BTreeMap<String, String>,
    pub rate_limit_per_minute: u32,
}

/// A validated ListKeys request.
#[derive(Clone, Debug)]
pub struct ListKeys {
    pub tenant_id: String,
    pub page_size: usize,
    pub page_token: String,
    pub include_revoked: bool,
    pub site_id: Option<String>,
}

/// One page of a list and the token of the next one (empty on the last page).
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_page_token: String,
}

/// One UTC day of a key's Checks.
#[derive(Debug, PartialEq, Eq)]
pub struct DailyUsage {
    pub date: NaiveDate,
    pub allowed: u64,
    /// Denied Checks by reason code (`SCOPE_MISSING`, ...).
    pub denied_by_reason: BTreeMap<String, u64>,
}

/// The outcome of RotateKey.
#[derive(Debug)]
pub struct Rotation {
    pub key: KeyRecord,
    pub secret: ApiKeySecret,
    pub previous_key: KeyRecord,
}

/// KeyAdmin's operations. Every change invalidates the cache entries it touches, so the next
/// Check on this server sees it.
#[derive(Clone)]
pub struct KeyService {
    pub(super) core: Arc<Core>,
}

impl KeyService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    pub(super) fn now(&self) -> DateTime<Utc> {
        self.core.clock.now()
    }

    /// The active-key limit that applies to a tenant: `u32::MAX` (none) for unlimited keys.
    pub fn effective_max_keys(&self, tenant: &Tenant) -> u32 {
        match (tenant.unlimited_keys, tenant.max_keys) {
            (true, _) => u32::MAX,
            (false, 0) => self.core.policy.default_max_keys,
            (false, max_keys) => max_keys,
        }
    }

    /// Creates or updates a tenant; runs to completion, then drops the tenant's cache entry.
    pub async fn put_tenant(&self, actor: String, tenant_id: String, changes: TenantChanges) -> ServiceResult<Tenant> {
        let this = self.clone();
        to_completion(async move {
            let mut audit = AuditEntry::new(AuditEventType::TenantPut, &actor, &tenant_id);
            for (field, value) in changes.described() {
                audit = audit.detail(field, value);
            }
            let tenant = this.core.store.put_tenant(&tenant_id, &changes, this.now(), &audit).await?;
            this.core.cache.invalidate_tenant(&tenant_id).await;
            info!(caller = %actor, tenant_id, api_access_enabled = tenant.api_access_enabled, "tenant saved");
            Ok(tenant)
        })
        .await
    }

    pub async fn get_tenant(&self, tenant_id: &str) -> ServiceResult<Tenant> {
        self.core.store.get_tenant(tenant_id).await?.ok_or_else(|| tenant_not_found(tenant_id))
    }

    /// Creates or renames a site of the tenant; a site owned by another tenant is ALREADY_EXISTS.
    pub async fn put_site(
        &self,
        actor: String,
        tenant_id: String,
        site_id: String,
        display_name: String,
    ) -> ServiceResult<Site> {
        let this = self.clone();
        to_completion(async move {
            let display_name = if display_name.is_empty() { &site_id } else { &display_name };
            let audit = AuditEntry::new(AuditEventType::SitePut, &actor, &tenant_id)
                .detail("site_id", &site_id)
                .detail("display_name", display_name);
            match this.core.store.put_site(&tenant_id, &site_id, display_name, this.now(), &audit).await? {
                PutSiteOutcome::Saved(site) => {
                    this.core.cache.invalidate_site(&site_id).await;
                    info!(caller = %actor, tenant_id, site_id, "site saved");
                    Ok(site)
                }
                PutSiteOutcome::TenantMissing => Err(tenant_not_found(&tenant_id)),
                PutSiteOutcome::OwnedByAnotherTenant => {
                    Err(ServiceError::AlreadyExists(format!("site {site_id} belongs to another tenant")))
                }
            }
        })
        .await
    }

    /// Deletes a site of the tenant; keys restricted to it keep the restriction.
    pub async fn delete_site(&self, actor: String, tenant_id: String, site_id: String) -> ServiceResult<()> {
        let this = self.clone();
        to_completion(async move {
            let audit = AuditEntry::new(AuditEventType::SiteDeleted, &actor, &tenant_id).detail("site_id", &site_id);
            let deleted = this.core.store.delete_site(&tenant_id, &site_id, this.now(), &audit).await?;
            this.core.cache.invalidate_site(&site_id).await;
            if !deleted {
                return Err(ServiceError::NotFound(format!("site {site_id} not found")));
            }
            info!(caller = %actor, tenant_id, site_id, "site deleted");
            Ok(())
        })
        .await
    }

    pub async fn list_sites(&self, tenant_id: &str, page_size: usize, page_token: &str) -> ServiceResult<Page<Site>> {
        let call = ListCall { kind: "sites", scope: &[tenant_id] };
        let after = call.decode(page_token)?;
        self.get_tenant(tenant_id).await?;
        let after_id = after.as_ref().map(|token| token.after_id.as_str());
        let sites = self.core.store.list_sites(tenant_id, after_id, page_size + 1).await?;
        Ok(paginate(sites, page_size, &call, |site| &site.site_id))
    }

    /// Mints a key under the tenant's plan and active-key limit.
    pub async fn create_key(&self, actor: &str, request: CreateKey) -> ServiceResult<(KeyRecord, ApiKeySecret)> {
        self.core.policy.check_name("name", &request.name)?;
        let now = self.now();
        let tenant = self.get_tenant(&request.tenant_id).await?;
        if !tenant.api_access_enabled {
            return Err(ServiceError::FailedPrecondition(
                "API key access is not included in this tenant's plan (api_access_enabled is false)".into(),
            ));
        }
        self.check_catalogue("scopes", &request.scopes)?;
        let scopes = sorted_unique(request.scopes);
        self.check_sites_owned(&request.tenant_id, &request.site_ids).await?;
        let site_ids = sorted_unique(request.site_ids);
        let expires_at = match request.expiry {
            Expiry::Never => None,
            Expiry::At(at) => Some(future_time("expires_at", at, now)?),
            Expiry::After(after) => {
                let at =
                    now.checked_add_signed(after).ok_or_else(|| ServiceError::invalid("expires_in", "is too long"))?;
                Some(future_time("expires_in", at, now)?)
            }
        };
        let shapes = self.core.shapes.current();
        let secret = ApiKeySecret::generate(&shapes.minting, request.environment)
            .map_err(|error| ServiceError::Internal(format!("no randomness from the OS: {error}")))?;
        let record = KeyRecord {
            key_id: new_key_id(now.timestamp_millis())
                .map_err(|error| ServiceError::Internal(format!("no randomness from the OS: {error}")))?,
            tenant_id: request.tenant_id,
            key_hash: secret.hash().as_str().to_owned(),
            name: request.name,
            display_prefix: secret.display_prefix(shapes.display_chars),
            scopes,
            site_ids,
            environment: request.environment,
            metadata: request.metadata,
            rate_limit_per_minute: request.rate_limit_per_minute,
            created_at: now,
            expires_at,
            revoked_at: None,
            last_used_at: None,
            rotated_from_key_id: None,
        };
        let limit = self.effective_max_keys(&tenant);
        let audit = AuditEntry::new(AuditEventType::KeyCreated, actor, &record.tenant_id)
            .key(&record.key_id)
            .detail("name", &record.name)
            .detail("display_prefix", &record.display_prefix)
            .detail("scopes", record.scopes.iter().map(Scope::as_str).collect::<Vec<_>>().join(","));
        match self.core.store.insert_key(&record, shapes.minting.notation(), limit, now, &audit).await? {
            // Usable at once on this replica (others learn of it from the feed).
            InsertKeyOutcome::Inserted => self.core.cache.invalidate_key(&record.key_hash).await,
            InsertKeyOutcome::TenantMissing => return Err(tenant_not_found(&record.tenant_id)),
            InsertKeyOutcome::LimitReached { limit, active } => {
                let revoke = active - i64::from(limit) + 1;
                let keys = if revoke == 1 { "key" } else { "keys" };
                return Err(ServiceError::ResourceExhausted(format!(
                    "tenant {} has {active} active keys and a limit of {limit}; revoke {revoke} {keys} first",
                    record.tenant_id
                )));
            }
        }
        info!(caller = %actor, tenant_id = %record.tenant_id, key_id = %record.key_id, display_prefix = %record.display_prefix, "key created");
        Ok((record, secret))
    }

    pub async fn get_key(&self, tenant_id: &str, key_id: &str) -> ServiceResult<KeyRecord> {
        self.core.store.get_key(tenant_id, key_id).await?.ok_or_else(|| key_not_found(key_id))
    }

    pub async fn list_keys(&self, request: &ListKeys) -> ServiceResult<Page<KeyRecord>> {
        let include_revoked = request.include_revoked.to_string();
        let site = request.site_id.as_deref().unwrap_or_default();
        let call = ListCall { kind: "keys", scope: &[&request.tenant_id, &include_revoked, site] };
        let after = call.decode(&request.page_token)?;
        self.get_tenant(&request.tenant_id).await?;
        let filter = KeyFilter {
            include_revoked: request.include_revoked,
            site_id: request.site_id.as_deref(),
            after_key_id: after.as_ref().map(|token| token.after_id.as_str()),
        };
        let keys = self.core.store.list_keys(&request.tenant_id, &filter, request.page_size + 1).await?;
        Ok(paginate(keys, request.page_size, &call, |key| &key.key_id))
    }

    /// Changes the patched fields of an active key that was not rotated. Runs to completion
    /// even if the caller goes away, so the cache is always invalidated after a change.
    pub async fn update_key(
        &self,
        actor: String,
        tenant_id: String,
        key_id: String,
        mut patch: KeyPatch,
    ) -> ServiceResult<KeyRecord> {
        if let Some(name) = &patch.name {
            self.core.policy.check_name("name", name)?;
        }
        let now = self.now();
        if let Some(scopes) = patch.scopes.take() {
            self.check_catalogue("scopes", &scopes)?;
            patch.scopes = Some(sorted_unique(scopes));
        }
        if let Some(site_ids) = patch.site_ids.take() {
            self.check_sites_owned(&tenant_id, &site_ids).await?;
            patch.site_ids = Some(sorted_unique(site_ids));
        }
        if let Some(Some(expires_at)) = patch.expires_at {
            future_time("expires_at", expires_at, now)?;
        }
        let this = self.clone();
        to_completion(async move {
            let audit = AuditEntry::new(AuditEventType::KeyUpdated, &actor, &tenant_id)
                .key(&key_id)
                .detail("fields", patch.fields().join(","));
            let written = this.core.store.update_key(&tenant_id, &key_id, &patch, now, &audit).await?;
            let key = this.written(written, &key_id).await?;
            info!(caller = %actor, tenant_id, key_id, "key updated");
            Ok(key)
        })
        .await
    }

    /// Invalidates whatever a write touched and maps its outcome.
    async fn written(&self, written: KeyWrite, key_id: &str) -> ServiceResult<KeyRecord> {
        let key = match &written {
            KeyWrite::Done(key) | KeyWrite::NotActive { key, .. } | KeyWrite::Rotated { key } => key,
            KeyWrite::NotFound => return Err(key_not_found(key_id)),
        };
        self.core.cache.invalidate_key(&key.key_hash).await;
        match written {
            KeyWrite::Done(key) => Ok(*key),
            KeyWrite::NotActive { state: KeyState::Revoked, .. } => Err(revoked(key_id)),
            KeyWrite::NotActive { .. } => Err(ServiceError::FailedPrecondition(format!(
                "key {key_id} has expired and cannot be changed; create a new key"
            ))),
            KeyWrite::Rotated { .. } => {
                Err(ServiceError::FailedPrecondition(format!("key {key_id} was rotated; change its successor instead")))
            }
            KeyWrite::NotFound => Err(key_not_found(key_id)),
        }
    }

    /// Revokes a key at once; revoking a revoked key returns it unchanged. The cache entry is
    /// dropped every time, so a retried revoke also repairs a cache a failed one left behind.
    pub async fn revoke_key(&self, actor: String, tenant_id: String, key_id: String) -> ServiceResult<KeyRecord> {
        let this = self.clone();
        to_completion(async move {
            let audit = AuditEntry::new(AuditEventType::KeyRevoked, &actor, &tenant_id).key(&key_id);
            let key = this.core.store.revoke_key(&tenant_id, &key_id, this.now(), &audit).await?;
            let key = key.ok_or_else(|| key_not_found(&key_id))?;
            this.core.cache.invalidate_key(&key.key_hash).await;
            info!(caller = %actor, tenant_id, key_id, "key revoked");
            Ok(key)
        })
        .await
    }

    /// Mints a successor of an active key; the old key works for `grace` more, or is revoked now.
    pub async fn rotate_key(
        &self,
        actor: String,
        tenant_id: String,
        key_id: String,
        grace: Duration,
    ) -> ServiceResult<Rotation> {
        let this = self.clone();
        to_completion(async move { this.rotate(&actor, &tenant_id, &key_id, grace).await }).await
    }

    async fn rotate(&self, actor: &str, tenant_id: &str, key_id: &str, grace: Duration) -> ServiceResult<Rotation> {
        let now = self.now();
        let old = self.get_key(tenant_id, key_id).await?;
        if old.state(now) != KeyState::Active {
            return Err(ServiceError::FailedPrecondition(format!("key {key_id} is not active and cannot be rotated")));
        }
        let shapes = self.core.shapes.current();
        let secret = ApiKeySecret::generate(&shapes.minting, old.environment)
            .map_err(|error| ServiceError::Internal(format!("no randomness from the OS: {error}")))?;
        let successor = KeyRecord {
            key_id: new_key_id(now.timestamp_millis())
                .map_err(|error| ServiceError::Internal(format!("no randomness from the OS: {error}")))?,
            key_hash: secret.hash().as_str().to_owned(),
            display_prefix: secret.display_prefix(shapes.display_chars),
            created_at: now,
            revoked_at: None,
            last_used_at: None,
            rotated_from_key_id: Some(old.key_id.clone()),
            ..old.clone()
        };
        let end = if grace.is_zero() {
            KeyEnd::RevokeAt(now)
        } else {
            let grace_end = now + grace;
            KeyEnd::ExpireAt(old.expires_at.map_or(grace_end, |expires_at| expires_at.min(grace_end)))
        };
        let audit = AuditEntry::new(AuditEventType::KeyRotated, actor, tenant_id)
            .key(key_id)
            .detail("new_key_id", &successor.key_id)
            .detail("grace_seconds", grace.num_seconds());
        let tenant = self.get_tenant(tenant_id).await?;
        let limit = self.effective_max_keys(&tenant);
        let outcome =
            self.core.store.rotate_key(&old, end, &successor, shapes.minting.notation(), limit, &audit).await?;
        // Whatever happened, the old key's cached state may be out of date now.
        self.core.cache.invalidate_key(&old.key_hash).await;
        match outcome {
            RotateOutcome::Rotated => self.core.cache.invalidate_key(&successor.key_hash).await,
            RotateOutcome::Conflict => {
                return Err(ServiceError::FailedPrecondition(format!("key {key_id} was rotated or revoked already")));
            }
            RotateOutcome::LimitReached { limit, others } => {
                return Err(ServiceError::ResourceExhausted(format!(
                    "tenant {tenant_id} has {others} other working keys and a limit of {limit}; a key in its grace period \
                     counts until it expires: rotate without a grace period, or revoke a key first"
                )));
            }
        }
        info!(caller = %actor, tenant_id, key_id = %successor.key_id, previous_key_id = key_id, grace_seconds = grace.num_seconds(), "key rotated");
        let previous_key = self.get_key(tenant_id, key_id).await?;
        Ok(Rotation { key: successor, secret, previous_key })
    }

    /// A key's Checks per UTC day from `first` to `last` (inclusive), every day included.
    pub async fn get_key_usage(
        &self,
        tenant_id: &str,
        key_id: &str,
        first: NaiveDate,
        last: NaiveDate,
    ) -> ServiceResult<Vec<DailyUsage>> {
        self.get_key(tenant_id, key_id).await?;
        let start_of = |date: NaiveDate| date.and_time(NaiveTime::MIN).and_utc();
        let rows = self.core.store.key_usage(key_id, start_of(first), start_of(last)).await?;
        let mut days: Vec<DailyUsage> = first
            .iter_days()
            .take_while(|date| *date <= last)
            .map(|date| DailyUsage { date, allowed: 0, denied_by_reason: BTreeMap::new() })
            .collect();
        for (day, outcome, count) in rows {
            let count = u64::try_from(count).unwrap_or_default();
            let Some(entry) = days.iter_mut().find(|entry| entry.date == day.date_naive()) else { continue };
            if outcome == "ALLOWED" {
                entry.allowed += count;
            } else {
                *entry.denied_by_reason.entry(outcome).or_default() += count;
            }
        }
        Ok(days)
    }

    /// One page of a tenant's audit log, oldest first.
    pub async fn list_audit_events(
        &self,
        tenant_id: &str,
        filter: &AuditFilter,
        page_size: usize,
        page_token: &str,
    ) -> ServiceResult<Page<AuditEvent>> {
        let key_id = filter.key_id.clone().unwrap_or_default();
        let event_types = filter.event_types.iter().map(|kind| kind.as_str()).collect::<Vec<_>>().join(",");
        let time =
            |time: Option<DateTime<Utc>>| time.map_or_else(String::new, |time| time.timestamp_micros().to_string());
        let (start, end) = (time(filter.start_time), time(filter.end_time));
        let call = ListCall { kind: "audit", scope: &[tenant_id, &key_id, &event_types, &start, &end] };
        let after = call.decode(page_token)?;
        let after = match &after {
            None => None,
            Some(token) => {
                let invalid = || ServiceError::invalid("page_token", "is not a token returned by this list call");
                let (time, event_id) = token.after_id.split_once(':').ok_or_else(invalid)?;
                let time = time.parse::<i64>().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(invalid)?;
                Some((time, event_id))
            }
        };
        self.get_tenant(tenant_id).await?;
        let mut events = self.core.store.list_audit_events(tenant_id, filter, after, page_size + 1).await?;
        let next_page_token = if events.len() > page_size {
            events.truncate(page_size);
            events.last().map_or_else(String::new, |last| {
                call.token(&format!("{}:{}", last.occurred_at.timestamp_micros(), last.event_id))
            })
        } else {
            String::new()
        };
        Ok(Page { items: events, next_page_token })
    }

    fn check_catalogue(&self, field: &str, scopes: &[Scope]) -> ServiceResult<()> {
        let mut violations = Violations::default();
        for (index, scope) in scopes.iter().enumerate() {
            if !self.core.policy.scopes.allows(scope) {
                violations.add(format!("{field}[{index}]"), format!("{scope} is not in the scope catalogue"));
            }
        }
        Ok(violations.finish(())?)
    }

    async fn check_sites_owned(&self, tenant_id: &str, site_ids: &[String]) -> ServiceResult<()> {
        let mut distinct = site_ids.to_vec();
        distinct.sort();
        distinct.dedup();
        let owned = self.core.store.owned_sites(tenant_id, &distinct).await?;
        let mut violations = Violations::default();
        for (index, site_id) in site_ids.iter().enumerate() {
            if !owned.contains(site_id) {
                violations
                    .add(format!("site_ids[{index}]"), format!("site {site_id} is not a site of tenant {tenant_id}"));
            }
        }
        Ok(violations.finish(())?)
    }
}

fn paginate<T>(mut items: Vec<T>, page_size: usize, call: &ListCall<'_>, id: impl Fn(&T) -> &String) -> Page<T> {
    let next_page_token = if items.len() > page_size {
        items.truncate(page_size);
        items.last().map(|last| call.token(id(last))).unwrap_or_default()
    } else {
        String::new()
    };
    Page { items, next_page_token }
}

/// Runs an admin change on its own task, so a caller that goes away (a cancelled call, a
/// deadline) cannot stop it between the database write and the cache invalidation.
async fn to_completion<T: Send + 'static>(
    change: impl std::future::Future<Output = ServiceResult<T>> + Send + 'static,
) -> ServiceResult<T> {
    tokio::spawn(change).await.map_err(|error| ServiceError::Internal(format!("admin task failed: {error}")))?
}

pub(super) fn sorted_unique<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items.dedup();
    items
}

pub(super) fn future_time(field: &str, at: DateTime<Utc>, now: DateTime<Utc>) -> ServiceResult<DateTime<Utc>> {
    if at <= now {
        Err(ServiceError::invalid(field, "must be in the future"))
    } else if now.checked_add_months(chrono::Months::new(12 * MAX_LIFETIME_YEARS)).is_none_or(|latest| at > latest) {
        Err(ServiceError::invalid(field, format!("must be within {MAX_LIFETIME_YEARS} years")))
    } else {
        Ok(at)
    }
}

fn tenant_not_found(tenant_id: &str) -> ServiceError {
    ServiceError::NotFound(format!("tenant {tenant_id} not found"))
}

fn key_not_found(key_id: &str) -> ServiceError {
    ServiceError::NotFound(format!("key {key_id} not found"))
}

fn revoked(key_id: &str) -> ServiceError {
    ServiceError::FailedPrecondition(format!("key {key_id} is revoked and cannot be changed"))
}
