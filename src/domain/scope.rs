//! Scopes: `resource:action`, `resource:*` or `*`, and how a key's scopes grant a required one.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

/// The most scopes one key may hold.
pub const MAX_SCOPES_PER_KEY: usize = 64;
const MAX_SEGMENT_LEN: usize = 64;

/// One well-formed scope.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope(String);

impl Scope {
    /// Accepts `*`, `resource:*` and `resource:action`, where each segment is 1 to 64 characters:
    /// a lowercase letter, then lowercase letters, digits, `_`, `-` or `.`.
    pub fn parse(value: &str) -> Result<Self, String> {
        if value == "*" {
            return Ok(Self(value.to_owned()));
        }
        let valid = |segment: &str| {
            let mut chars = segment.chars();
            segment.len() <= MAX_SEGMENT_LEN
                && chars.next().is_some_and(|c| c.is_ascii_lowercase())
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.".contains(c))
        };
        match value.split_once(':') {
            Some((resource, action)) if valid(resource) && (action == "*" || valid(action)) => {
                Ok(Self(value.to_owned()))
            }
            _ => {
                Err("must be `resource:action`, `resource:*` or `*` (lowercase letters, digits, `_`, `-`, `.`)"
                    .to_owned())
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn resource(&self) -> &str {
        resource(&self.0)
    }

    fn action(&self) -> &str {
        action(&self.0)
    }
}

/// The resource of a well-formed scope (`*` for `*`).
fn resource(scope: &str) -> &str {
    scope.split_once(':').map_or("*", |(resource, _)| resource)
}

/// The action of a well-formed scope (`*` for `*`).
fn action(scope: &str) -> &str {
    scope.split_once(':').map_or("*", |(_, action)| action)
}

/// A scope is looked up by its text (the catalogue checks a cached key's scopes as `&str`).
impl std::borrow::Borrow<str> for Scope {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Server-wide scope rules: action implications and an optional catalogue of allowed scopes.
#[derive(Clone, Debug, Default)]
pub struct ScopePolicy {
    /// For each action, every action it implies (transitively closed), e.g. admin => {write, read}.
    implied_actions: HashMap<String, BTreeSet<String>>,
    /// When set, the only scopes CreateKey and UpdateKey accept (wildcards of a listed resource too).
    catalogue: Option<BTreeSet<Scope>>,
}

impl ScopePolicy {
    /// Builds a policy from `higher>lower` action pairs (e.g. `admin>write`, `write>read`) and
    /// an optional catalogue. Cycles are allowed and harmless.
    pub fn new(implications: &[(String, String)], catalogue: Option<Vec<Scope>>) -> Self {
        let mut direct: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (higher, lower) in implications {
            direct.entry(higher.clone()).or_default().insert(lower.clone());
        }
        let mut implied_actions = HashMap::new();
        for start in direct.keys() {
            let mut seen = BTreeSet::new();
            let mut pending = vec![start.clone()];
            while let Some(action) = pending.pop() {
                for next in direct.get(&action).into_iter().flatten() {
                    if seen.insert(next.clone()) {
                        pending.push(next.clone());
                    }
                }
            }
            implied_actions.insert(start.clone(), seen);
        }
        Self { implied_actions, catalogue: catalogue.map(|scopes| scopes.into_iter().collect()) }
    }

    /// Whether a key holding `held` may use an endpoint that requires `required`.
    /// Write does not imply read unless the policy says so.
    ///
    /// A held scope the catalogue does not allow (a key created before the catalogue changed)
    /// grants nothing: fail closed, so that no stored wildcard reaches a route meant for no key.
    /// `held` are well-formed scopes (a key's, as stored).
    pub fn grants<'a>(&self, held: impl IntoIterator<Item = &'a str>, required: &Scope) -> bool {
        held.into_iter().any(|scope| self.allows_text(scope) && self.scope_grants(scope, required))
    }

    fn scope_grants(&self, held: &str, required: &Scope) -> bool {
        if held == "*" || held == required.as_str() {
            return true;
        }
        if resource(held) != required.resource() {
            return false;
        }
        let held = action(held);
        held == "*" || self.implied_actions.get(held).is_some_and(|implied| implied.contains(required.action()))
    }

    /// Whether the catalogue (if any) allows a key to hold `scope`: only the scopes it lists.
    /// A wildcard (`*`, `goals:*`) is allowed only when listed itself: a wildcard grants scopes
    /// outside the catalogue too (a route may require one so that no key can reach it).
    pub fn allows(&self, scope: &Scope) -> bool {
        self.allows_text(scope.as_str())
    }

    fn allows_text(&self, scope: &str) -> bool {
        self.catalogue.as_ref().is_none_or(|catalogue| catalogue.contains(scope))
    }
}

/// Parses `higher>lower` pairs separated by commas, as the `--scope-implies` setting takes them.
pub fn parse_implications(value: &str) -> Result<Vec<(String, String)>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (higher, lower) =
                pair.split_once('>').ok_or_else(|| format!("scope implication {pair:?} must read `higher>lower`"))?;
            let (higher, lower) = (higher.trim(), lower.trim());
            for action in [higher, lower] {
                Scope::parse(&format!("x:{action}"))
                    .ok()
                    .filter(|_| action != "*")
                    .ok_or_else(|| format!("scope implication {pair:?} names an invalid action {action:?}"))?;
            }
            Ok((higher.to_owned(), lower.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(values: &[&str]) -> Vec<Scope> {
        values.iter().map(|v| Scope::parse(v).unwrap()).collect()
    }

    fn held<'a>(values: &'a [&'a str]) -> impl Iterator<Item = &'a str> {
        values.iter().copied()
    }

    fn required(value: &str) -> Scope {
        Scope::parse(value).unwrap()
    }

    #[test]
    fn exact_and_wildcard_scopes_grant() {
        let policy = ScopePolicy::default();
        assert!(policy.grants(held(&["events:read"]), &required("events:read")));
        assert!(policy.grants(held(&["events:*"]), &required("events:write")));
        assert!(policy.grants(held(&["*"]), &required("sites:delete")));
        assert!(!policy.grants(held(&["events:*"]), &required("sites:read")));
        assert!(!policy.grants(held(&[]), &required("sites:read")));
    }

    #[test]
    fn write_does_not_imply_read_by_default() {
        let policy = ScopePolicy::default();
        assert!(!policy.grants(held(&["goals:write"]), &required("goals:read")));
    }

    #[test]
    fn configured_implications_are_transitive_and_per_resource() {
        let policy = ScopePolicy::new(&parse_implications("admin>write, write>read").unwrap(), None);
        assert!(policy.grants(held(&["goals:admin"]), &required("goals:read")));
        assert!(policy.grants(held(&["goals:write"]), &required("goals:read")));
        assert!(!policy.grants(held(&["goals:read"]), &required("goals:write")));
        assert!(!policy.grants(held(&["goals:admin"]), &required("sites:read")));
    }

    #[test]
    fn malformed_scopes_are_rejected() {
        for bad in [
            "",
            "events",
            "Events:read",
            "events:",
            ":read",
            "events:read:x",
            "*:read",
            "ev ents:read",
            "événements:read",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
        assert!(Scope::parse(&format!("{}:read", "a".repeat(65))).is_err());
        for good in ["*", "events:*", "events:read", "site.stats:read_all"] {
            assert!(Scope::parse(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn the_catalogue_limits_what_keys_may_hold() {
        let policy = ScopePolicy::new(&[], Some(scopes(&["events:read", "events:write"])));
        assert!(policy.allows(&required("events:read")));
        assert!(!policy.allows(&required("events:*")), "a wildcard would grant events:admin too");
        assert!(!policy.allows(&required("*")));
        assert!(!policy.allows(&required("billing:read")));
        assert!(!policy.allows(&required("billing:*")));
        let with_wildcards = ScopePolicy::new(&[], Some(scopes(&["events:read", "events:*", "*"])));
        assert!(with_wildcards.allows(&required("events:*")) && with_wildcards.allows(&required("*")));
    }

    #[test]
    fn a_held_scope_the_catalogue_no_longer_lists_grants_nothing() {
        let policy = ScopePolicy::new(&[], Some(scopes(&["v1:read"])));
        assert!(!policy.grants(held(&["*"]), &required("v1:write")));
        assert!(!policy.grants(held(&["v1:*"]), &required("v1:read")));
        assert!(policy.grants(held(&["*", "v1:read"]), &required("v1:read")));
        assert!(ScopePolicy::default().grants(held(&["*"]), &required("v1:write")), "no catalogue: as held");
    }

    #[test]
    fn malformed_implications_are_rejected() {
        assert!(parse_implications("admin").is_err());
        assert!(parse_implications("Admin>read").is_err());
        assert!(parse_implications("*>read").is_err());
        assert_eq!(parse_implications("").unwrap(), vec![]);
    }
}
