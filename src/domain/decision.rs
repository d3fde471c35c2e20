//! The authorization decision: pure rules over a key, its tenant and the site's owner.

use chrono::{DateTime, Utc};

use super::cached_key::CachedKey;
use super::model::{KeyState, Tenant};
use super::scope::{Scope, ScopePolicy};

/// Why a Check was denied. Each reason has a fixed HTTP status and a message safe for end users.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    KeyMissing,
    KeyMalformed,
    KeyUnknown,
    KeyRevoked,
    KeyExpired,
    ScopeMissing,
    SiteForbidden,
    PlanRequired,
    RateLimited,
    QuotaExceeded,
    /// The request names a tenant that is not the key's.
    TenantMismatch,
}

impl DenyReason {
    /// Every reason, in the order of their codes in `keygate.v1.DenyReason`.
    pub const ALL: [Self; 11] = [
        Self::KeyMissing,
        Self::KeyMalformed,
        Self::KeyUnknown,
        Self::KeyRevoked,
        Self::KeyExpired,
        Self::ScopeMissing,
        Self::SiteForbidden,
        Self::PlanRequired,
        Self::RateLimited,
        Self::QuotaExceeded,
        Self::TenantMismatch,
    ];

    /// The status a REST API answers with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::KeyMissing | Self::KeyMalformed | Self::KeyUnknown | Self::KeyRevoked | Self::KeyExpired => 401,
            Self::PlanRequired => 402,
            Self::ScopeMissing | Self::SiteForbidden | Self::TenantMismatch => 403,
            Self::RateLimited | Self::QuotaExceeded => 429,
        }
    }

    /// The stable code used in logs and JSON bodies (`KEY_REVOKED`, ...).
    pub fn code(self) -> &'static str {
        match self {
            Self::KeyMissing => "KEY_MISSING",
            Self::KeyMalformed => "KEY_MALFORMED",
            Self::KeyUnknown => "KEY_UNKNOWN",
            Self::KeyRevoked => "KEY_REVOKED",
            Self::KeyExpired => "KEY_EXPIRED",
            Self::ScopeMissing => "SCOPE_MISSING",
            Self::SiteForbidden => "SITE_FORBIDDEN",
            Self::PlanRequired => "PLAN_REQUIRED",
            Self::RateLimited => "RATE_LIMITED",
            Self::QuotaExceeded => "QUOTA_EXCEEDED",
            Self::TenantMismatch => "TENANT_MISMATCH",
        }
    }

    /// The end-user message. Unknown, malformed and revoked keys share one text so a caller
    /// cannot probe which keys exist.
    pub fn message(self, scope: &str, site_id: &str) -> String {
        match self {
            Self::KeyMissing => "API key is required".to_owned(),
            Self::KeyMalformed | Self::KeyUnknown | Self::KeyRevoked => "Invalid API key".to_owned(),
            Self::KeyExpired => "API key has expired".to_owned(),
            Self::ScopeMissing => format!("API key missing required scope: {scope}"),
            Self::SiteForbidden if site_id.is_empty() => {
                "This API key is restricted to specific sites and cannot access tenant-wide resources".to_owned()
            }
            Self::SiteForbidden => format!("This API key cannot access {site_id}"),
            Self::PlanRequired => "API key access is not included in this plan".to_owned(),
            Self::RateLimited => "Rate limit exceeded".to_owned(),
            Self::QuotaExceeded => "Daily request quota exceeded".to_owned(),
            // The same whether or not the named tenant exists.
            Self::TenantMismatch => "This API key cannot access this tenant".to_owned(),
        }
    }
}

/// What a Check asks, once its key has been found.
pub struct CheckInput<'a> {
    pub key: &'a CachedKey,
    pub tenant: &'a Tenant,
    pub required_scope: &'a Scope,
    /// `None` when the request touches no single site.
    pub site_id: Option<&'a str>,
    /// The tenant that owns `site_id`, if the site exists.
    pub site_owner: Option<&'a str>,
    /// The tenant the request names, if it names one.
    pub requested_tenant: Option<&'a str>,
    pub now: DateTime<Utc>,
}

/// Decides a Check for a known key. Lifecycle first (a revoked key says nothing more), then the
/// requested tenant (another tenant's plan is none of the caller's business), plan, scope and
/// site.
pub fn decide(input: &CheckInput<'_>, policy: &ScopePolicy) -> Result<(), DenyReason> {
    match input.key.state(input.now) {
        KeyState::Revoked => return Err(DenyReason::KeyRevoked),
        KeyState::Expired => return Err(DenyReason::KeyExpired),
        KeyState::Active => {}
    }
    if input.requested_tenant.is_some_and(|requested| requested != input.key.tenant_id()) {
        return Err(DenyReason::TenantMismatch);
    }
    if !input.tenant.api_access_enabled {
        return Err(DenyReason::PlanRequired);
    }
    if !policy.grants(input.key.scopes(), input.required_scope) {
        return Err(DenyReason::ScopeMissing);
    }
    match input.site_id {
        None if input.key.site_ids().len() == 0 => Ok(()),
        None => Err(DenyReason::SiteForbidden),
        Some(site_id) => {
            let owned = input.site_owner == Some(input.tenant.tenant_id.as_str());
            let mut sites = input.key.site_ids();
            let listed = sites.len() == 0 || sites.any(|listed| listed == site_id);
            if owned && listed { Ok(()) } else { Err(DenyReason::SiteForbidden) }
        }
    }
}

#[cfg(test)]
mod tests {

    use crate::domain::model::KeyRecord;

    use chrono::Duration;

    use super::*;

    fn tenant() -> Tenant {
        Tenant {
            tenant_id: "acme".into(),
            display_name: "Acme".into(),
            api_access_enabled: true,
            max_keys: 0,
            rate_limit_per_minute: 0,
            daily_request_quota: 0,
            unlimited_keys: false,
            shared_rate_limit: 0,
            shared_rate_limit_window: crate::limits::RateLimitWindow::Minute,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    fn key(site_ids: &[&str]) -> KeyRecord {
        KeyRecord { site_ids: site_ids.iter().map(|s| s.to_string()).collect(), ..KeyRecord::sample("key_1", "test") }
    }

    fn check(
        key: &KeyRecord,
        tenant: &Tenant,
        scope: &str,
        site: Option<&str>,
        owner: Option<&str>,
    ) -> Result<(), DenyReason> {
        let scope = Scope::parse(scope).unwrap();
        let key = CachedKey::from(key);
        let input = CheckInput {
            key: &key,
            tenant,
            required_scope: &scope,
            site_id: site,
            site_owner: owner,
            requested_tenant: None,
            now: Utc::now(),
        };
        decide(&input, &ScopePolicy::default())
    }

    #[test]
    fn an_active_key_with_the_scope_on_its_tenants_site_is_allowed() {
        assert_eq!(check(&key(&[]), &tenant(), "events:read", Some("s1"), Some("acme")), Ok(()));
        assert_eq!(check(&key(&["s1"]), &tenant(), "events:read", Some("s1"), Some("acme")), Ok(()));
        assert_eq!(check(&key(&[]), &tenant(), "events:read", None, None), Ok(()));
    }

    #[test]
    fn lifecycle_is_judged_at_check_time() {
        let mut expiring = key(&[]);
        expiring.expires_at = Some(Utc::now() - Duration::seconds(1));
        assert_eq!(check(&expiring, &tenant(), "events:read", None, None), Err(DenyReason::KeyExpired));
        let mut revoked = key(&[]);
        revoked.revoked_at = Some(Utc::now() - Duration::seconds(1));
        revoked.expires_at = Some(Utc::now() - Duration::seconds(1));
        assert_eq!(check(&revoked, &tenant(), "events:read", None, None), Err(DenyReason::KeyRevoked));
        let mut in_grace = key(&[]);
        in_grace.expires_at = Some(Utc::now() + Duration::hours(1));
        assert_eq!(check(&in_grace, &tenant(), "events:read", None, None), Ok(()));
    }

    #[test]
    fn plan_scope_and_site_denials() {
        let mut no_plan = tenant();
        no_plan.api_access_enabled = false;
        assert_eq!(check(&key(&[]), &no_plan, "events:read", None, None), Err(DenyReason::PlanRequired));
        assert_eq!(check(&key(&[]), &tenant(), "events:write", None, None), Err(DenyReason::ScopeMissing));
        assert_eq!(
            check(&key(&[]), &tenant(), "events:read", Some("s9"), Some("other")),
            Err(DenyReason::SiteForbidden)
        );
        assert_eq!(check(&key(&[]), &tenant(), "events:read", Some("s9"), None), Err(DenyReason::SiteForbidden));
        assert_eq!(
            check(&key(&["s1"]), &tenant(), "events:read", Some("s2"), Some("acme")),
            Err(DenyReason::SiteForbidden)
        );
        assert_eq!(check(&key(&["s1"]), &tenant(), "events:read", None, None), Err(DenyReason::SiteForbidden));
    }

    #[test]
    fn a_key_of_another_tenant_is_denied_before_its_plan_is_looked_at() {
        let scope = Scope::parse("events:read").unwrap();
        let mut no_plan = tenant();
        no_plan.api_access_enabled = false;
        let key = CachedKey::from(&key(&[]));
        let decide_for = |requested: Option<&str>, tenant: &Tenant| {
            let input = CheckInput {
                key: &key,
                tenant,
                required_scope: &scope,
                site_id: None,
                site_owner: None,
                requested_tenant: requested,
                now: Utc::now(),
            };
            decide(&input, &ScopePolicy::default())
        };
        assert_eq!(decide_for(Some("acme"), &tenant()), Ok(()));
        assert_eq!(decide_for(Some("globex"), &no_plan), Err(DenyReason::TenantMismatch));
        assert_eq!(decide_for(Some("Acme"), &tenant()), Err(DenyReason::TenantMismatch), "ids are case-sensitive");
        assert_eq!(decide_for(None, &no_plan), Err(DenyReason::PlanRequired));
    }

    #[test]
    fn messages_and_statuses_match_the_contract() {
        assert_eq!(DenyReason::ScopeMissing.message("events:read", ""), "API key missing required scope: events:read");
        assert_eq!(DenyReason::SiteForbidden.message("", "s1"), "This API key cannot access s1");
        assert_eq!(DenyReason::PlanRequired.http_status(), 402);
        assert_eq!(DenyReason::KeyRevoked.message("", ""), DenyReason::KeyUnknown.message("", ""));
    }
}
