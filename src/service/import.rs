//! ImportKeys: taking over keys keygate did not mint, each by its plaintext or its SHA-256,
//! without a single holder noticing the move.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use chrono::{DateTime, Utc};
use tracing::info;

use super::admin::{future_time, sorted_unique};
use super::{KeyService, ServiceError, ServiceResult};
use crate::domain::audit::{AuditEntry, AuditEventType};
use crate::domain::key::{ApiKeySecret, Environment, KeyHash, new_key_id};
use crate::domain::key_format::KeyShapes;
use crate::domain::model::KeyRecord;
use crate::domain::scope::Scope;
use crate::domain::validation::{FieldViolation, MAX_DISPLAY_PREFIX_CHARS, Violations};
use crate::store::ImportOutcome;

/// The most keys one ImportKeys call takes.
pub const MAX_IMPORT_KEYS: usize = 1000;

/// How an imported key is given.
pub enum Credential {
    /// The key itself; hashed at once, never stored, logged or returned.
    Secret(String),
    /// Its SHA-256.
    Sha256(KeyHash),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Secret(_) => f.write_str("Secret([redacted])"),
            Self::Sha256(hash) => write!(f, "Sha256({})", hash.as_str()),
        }
    }
}

/// One key of an ImportKeys call, its fields well-formed (what depends on the tenant, the
/// server's shapes and the time is checked by [`KeyService::import_keys`]).
#[derive(Debug)]
pub struct ImportKey {
    pub credential: Credential,
    /// Required with a SHA-256; taken from the key otherwise.
    pub display_prefix: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    /// In request order, so errors name the index the client sent.
    pub site_ids: Vec<String>,
    /// `None`: live, or what the key's shape states.
    pub environment: Option<Environment>,
    pub metadata: BTreeMap<String, String>,
    pub rate_limit_per_minute: u32,
    pub created_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// Why one key of an ImportKeys call was not imported.
#[derive(Debug)]
pub enum ImportError {
    /// A field breaks a rule (INVALID_ARGUMENT).
    Invalid(ServiceError),
    /// The tenant has this key already: a retry, nothing to do (ALREADY_EXISTS).
    AlreadyInTenant,
    /// Another tenant has a key with this secret (ALREADY_EXISTS, without naming it).
    Taken,
    /// The same key came earlier in the request, as `keys[first]` (ALREADY_EXISTS).
    Repeated { first: usize },
}

impl From<ServiceError> for ImportError {
    fn from(error: ServiceError) -> Self {
        Self::Invalid(error)
    }
}

/// A decoded ImportKeys call: each key decoded, or why it could not be.
#[derive(Debug)]
pub struct ImportKeys {
    pub tenant_id: String,
    pub keys: Vec<Result<ImportKey, ServiceError>>,
    pub validate_only: bool,
}

impl KeyService {
    /// Imports keys into a tenant: one result per key, in order, so that one bad key never fails
    /// the others. Not refused by `max_keys` (imported keys exist already); they count toward it
    /// afterwards. NOT_FOUND for the whole call when the tenant does not exist.
    pub async fn import_keys(
        &self,
        actor: &str,
        request: ImportKeys,
    ) -> ServiceResult<Vec<Result<KeyRecord, ImportError>>> {
        self.get_tenant(&request.tenant_id).await?;
        let now = self.now();
        let shapes = self.core.shapes.current();
        let tenant_id = request.tenant_id.clone();
        let sites: Vec<String> = request
            .keys
            .iter()
            .flatten()
            .flat_map(|key| key.site_ids.iter().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let owned: BTreeSet<String> = self.core.store.owned_sites(&tenant_id, &sites).await?.into_iter().collect();
        let mut results: Vec<Result<KeyRecord, ImportError>> = Vec::with_capacity(request.keys.len());
        let mut first_of_hash: HashMap<String, usize> = HashMap::new();
        for (index, key) in request.keys.into_iter().enumerate() {
            let record = key.and_then(|key| self.imported_record(&tenant_id, key, &shapes, &owned, now));
            let record =
                record.map_err(ImportError::Invalid).and_then(|record| match first_of_hash.get(&record.key_hash) {
                    Some(first) => Err(ImportError::Repeated { first: *first }),
                    None => {
                        first_of_hash.insert(record.key_hash.clone(), index);
                        Ok(record)
                    }
                });
            results.push(record);
        }
        let candidates: Vec<(usize, &KeyRecord)> =
            results.iter().enumerate().filter_map(|(index, result)| Some((index, result.as_ref().ok()?))).collect();
        let outcomes: Vec<(usize, ImportOutcome)> = if request.validate_only {
            let hashes: Vec<&str> = candidates.iter().map(|(_, key)| key.key_hash.as_str()).collect();
            let owners = self.core.store.key_owners(&hashes).await?;
            candidates
                .iter()
                .map(|(index, key)| {
                    let outcome = match owners.get(&key.key_hash) {
                        None => ImportOutcome::Imported,
                        Some(owner) if *owner == tenant_id => ImportOutcome::InTenant,
                        Some(_) => ImportOutcome::ElsewhereTaken,
                    };
                    (*index, outcome)
                })
                .collect()
        } else {
            let rows: Vec<(KeyRecord, AuditEntry)> = candidates
                .iter()
                .map(|(_, key)| {
                    let audit = AuditEntry::new(AuditEventType::KeyImported, actor, &tenant_id)
                        .key(&key.key_id)
                        .detail("name", &key.name)
                        .detail("display_prefix", &key.display_prefix)
                        .detail("scopes", key.scopes.iter().map(Scope::as_str).collect::<Vec<_>>().join(","));
                    ((*key).clone(), audit)
                })
                .collect();
            let this = self.clone();
            let (tenant, keys) = (tenant_id.clone(), rows);
            // Runs to completion even if the caller goes away: written keys get their cache
            // entries dropped.
            let outcomes = tokio::spawn(async move {
                let outcomes = this.core.store.import_keys(&tenant, &keys, now).await?;
                for ((key, _), outcome) in keys.iter().zip(outcomes.iter().flatten()) {
                    if *outcome == ImportOutcome::Imported {
                        this.core.cache.invalidate_key(&key.key_hash).await;
                    }
                }
                ServiceResult::Ok(outcomes)
            })
            .await
            .map_err(|error| ServiceError::Internal(format!("import task failed: {error}")))??;
            let outcomes = outcomes.ok_or_else(|| ServiceError::NotFound(format!("tenant {tenant_id} not found")))?;
            candidates.iter().map(|(index, _)| *index).zip(outcomes).collect()
        };
        let mut imported = 0;
        for (index, outcome) in outcomes {
            match outcome {
                ImportOutcome::Imported => imported += 1,
                ImportOutcome::InTenant => results[index] = Err(ImportError::AlreadyInTenant),
                ImportOutcome::ElsewhereTaken => results[index] = Err(ImportError::Taken),
            }
        }
        if !request.validate_only {
            info!(caller = %actor, tenant_id, imported, rejected = results.len() - imported, "keys imported");
        }
        Ok(results)
    }

    /// The record an imported key becomes, or why it cannot.
    fn imported_record(
        &self,
        tenant_id: &str,
        key: ImportKey,
        shapes: &KeyShapes,
        owned_sites: &BTreeSet<String>,
        now: DateTime<Utc>,
    ) -> ServiceResult<KeyRecord> {
        self.core.policy.check_name("name", &key.name)?;
        let mut violations = Violations::default();
        let (hash, display_prefix, stated) = match key.credential {
            Credential::Secret(secret) => match ApiKeySecret::parse(shapes, &secret) {
                Ok(parsed) => (parsed.hash(), shapes.display_prefix(&secret), shapes.environment_of(&secret)),
                Err(_) => {
                    return Err(ServiceError::invalid(
                        "secret",
                        "has no shape that Check accepts: add it to KEYGATE_IMPORTED_KEY_FORMATS",
                    ));
                }
            },
            Credential::Sha256(hash) => {
                if key.display_prefix.is_empty() {
                    violations.add("display_prefix", "is required with secret_sha256");
                } else if KeyHash::of(&key.display_prefix) == hash {
                    violations.add("display_prefix", "is the whole key: give only its first characters");
                } else if let Some(problem) = shapes.display_prefix_problem(&key.display_prefix) {
                    violations.add("display_prefix", problem);
                }
                (hash, key.display_prefix.clone(), shapes.environment_in_prefix(&key.display_prefix))
            }
        };
        let environment = match (key.environment, stated) {
            (Some(asked), Some(stated)) if asked != stated => {
                violations.add("environment", format!("the key states {}", stated.as_str()));
                asked
            }
            (asked, stated) => asked.or(stated).unwrap_or(Environment::Live),
        };
        for (index, scope) in key.scopes.iter().enumerate() {
            if !self.core.policy.scopes.allows(scope) {
                violations.add(format!("scopes[{index}]"), format!("{scope} is not in the scope catalogue"));
            }
        }
        for (index, site_id) in key.site_ids.iter().enumerate() {
            if !owned_sites.contains(site_id) {
                violations
                    .add(format!("site_ids[{index}]"), format!("site {site_id} is not a site of tenant {tenant_id}"));
            }
        }
        let created_at = key.created_at.unwrap_or(now);
        if created_at > now {
            violations.add("created_at", "must not be in the future");
        }
        if let Some(expires_at) = key.expires_at
            && let Err(ServiceError::InvalidArgument(found)) = future_time("expires_at", expires_at, now)
        {
            found.into_iter().for_each(|FieldViolation { field, description }| violations.add(field, description));
        }
        if let Some(last_used_at) = key.last_used_at
            && (last_used_at > now || last_used_at < created_at)
        {
            violations.add("last_used_at", "must lie between created_at and now");
        }
        violations.finish(())?;
        let key_id = new_key_id(created_at.timestamp_millis())
            .map_err(|error| ServiceError::Internal(format!("no randomness from the OS: {error}")))?;
        Ok(KeyRecord {
            key_id,
            tenant_id: tenant_id.to_owned(),
            key_hash: hash.as_str().to_owned(),
            name: key.name,
            display_prefix: display_prefix.chars().take(MAX_DISPLAY_PREFIX_CHARS).collect(),
            scopes: sorted_unique(key.scopes),
            site_ids: sorted_unique(key.site_ids),
            environment,
            metadata: key.metadata,
            rate_limit_per_minute: key.rate_limit_per_minute,
            created_at,
            expires_at: key.expires_at,
            revoked_at: None,
            last_used_at: key.last_used_at,
            rotated_from_key_id: None,
        })
    }
}
