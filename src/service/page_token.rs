//! Opaque page tokens: where the next page starts, bound to the list call that made them.
//!
//! A token names the list (keys, sites or audit events), a fingerprint of the tenant and
//! filters of the call that produced it, and the last id of its page. A token used with another
//! list, tenant or filter, or altered by hand, is INVALID_ARGUMENT; what it holds is checked
//! before it reaches the database.

use sha2::{Digest, Sha256};

use super::ServiceError;
use crate::domain::validation::Violations;

/// The token format's version, first in every token.
const VERSION: &str = "v1";
/// The longest token accepted, in characters.
const MAX_TOKEN_CHARS: usize = 512;

/// A decoded page token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageToken {
    pub after_id: String,
}

/// What a list call is: its kind and the tenant and filters that must stay the same from page
/// to page.
pub struct ListCall<'a> {
    pub kind: &'static str,
    /// The tenant and filters, in a fixed order.
    pub scope: &'a [&'a str],
}

impl ListCall<'_> {
    fn fingerprint(&self) -> String {
        let mut digest = Sha256::new();
        digest.update(self.kind.as_bytes());
        for part in self.scope {
            digest.update([0]);
            digest.update(part.as_bytes());
        }
        digest.finalize()[..8].iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// The token of the page after the one that ended with `after_id`.
    pub fn token(&self, after_id: &str) -> String {
        let text = format!("{VERSION}:{}:{}:{after_id}", self.kind, self.fingerprint());
        text.bytes().map(|byte| format!("{byte:02x}")).collect()
    }

    /// The position a token made by [`token`](Self::token) for this same call stands for;
    /// `None` for the first page (an empty token).
    pub fn decode(&self, token: &str) -> Result<Option<PageToken>, ServiceError> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = || {
            ServiceError::invalid(
                "page_token",
                "is not a token returned by this list call with the same tenant and filters",
            )
        };
        if token.len() > MAX_TOKEN_CHARS || !token.len().is_multiple_of(2) {
            return Err(invalid());
        }
        let bytes = (0..token.len())
            .step_by(2)
            .map(|i| token.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(invalid)?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        let mut parts = text.splitn(4, ':');
        let (version, kind, fingerprint, after_id) =
            (parts.next(), parts.next(), parts.next(), parts.next().ok_or_else(invalid)?);
        if version != Some(VERSION) || kind != Some(self.kind) || fingerprint != Some(&self.fingerprint()) {
            return Err(invalid());
        }
        // Only ids keygate itself could have written: nothing else reaches the database.
        let mut violations = Violations::default();
        match self.kind {
            "audit" => {
                let (time, event_id) = after_id.split_once(':').ok_or_else(invalid)?;
                time.parse::<i64>().map_err(|_| invalid())?;
                let plain = |byte: u8| byte.is_ascii_alphanumeric() || byte == b'_';
                if event_id.is_empty() || event_id.len() > 128 || !event_id.bytes().all(plain) {
                    return Err(invalid());
                }
            }
            _ => violations.id("page_token", after_id),
        }
        violations.finish(()).map_err(|_| invalid())?;
        Ok(Some(PageToken { after_id: after_id.to_owned() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_within_their_call_only() {
        let keys = ListCall { kind: "keys", scope: &["acme", "false", ""] };
        let token = keys.token("key_0001");
        assert_eq!(keys.decode(&token).unwrap().unwrap().after_id, "key_0001");
        assert_eq!(keys.decode("").unwrap(), None);
        for other in [
            ListCall { kind: "keys", scope: &["globex", "false", ""] },
            ListCall { kind: "keys", scope: &["acme", "true", ""] },
            ListCall { kind: "keys", scope: &["acme", "false", "shop.example"] },
            ListCall { kind: "sites", scope: &["acme", "false", ""] },
        ] {
            assert!(other.decode(&token).is_err(), "{} {:?}", other.kind, other.scope);
        }
    }

    #[test]
    fn forged_tokens_never_reach_the_database() {
        let keys = ListCall { kind: "keys", scope: &["acme"] };
        let forge = |after_id: &str| {
            let text = format!("{VERSION}:keys:{}:{after_id}", keys.fingerprint());
            text.bytes().map(|byte| format!("{byte:02x}")).collect::<String>()
        };
        for bad in ["key\u{0}1", "key 1", &"k".repeat(65), "", "é"] {
            assert!(keys.decode(&forge(bad)).is_err(), "{bad:?}");
        }
        for garbage in ["zz", "abc", "é", &"00".repeat(300)] {
            assert!(keys.decode(garbage).is_err(), "{garbage}");
        }
        let audit = ListCall { kind: "audit", scope: &["acme"] };
        let forge_audit = |after: &str| {
            let text = format!("{VERSION}:audit:{}:{after}", audit.fingerprint());
            text.bytes().map(|byte| format!("{byte:02x}")).collect::<String>()
        };
        assert!(audit.decode(&forge_audit("123:evt_1")).is_ok());
        assert!(audit.decode(&forge_audit(&format!("123:deny_key_{}_SCOPE_MISSING_123", "0".repeat(24)))).is_ok());
        assert!(audit.decode(&forge_audit("x:evt_1")).is_err());
        assert!(audit.decode(&forge_audit("123:evt\u{0}")).is_err());
    }
}
