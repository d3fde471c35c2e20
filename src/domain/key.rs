//! The API key itself: its format, generation, parsing and hash.
//!
//! A key reads `{prefix}_{environment}_{body}`: `body` is 64 lowercase hex characters, 56 from
//! the OS CSPRNG followed by the CRC-32 (IEEE) of every character before it. The checksum lets
//! keygate reject typos and random strings without touching the cache or the database, and lets
//! secret scanners recognise keygate keys.

use std::fmt;

use rand::TryRng;
use rand::rngs::SysRng;
use sha2::{Digest, Sha256};

/// How many characters of a key are shown to humans.
pub const DISPLAY_PREFIX_LEN: usize = 12;
/// The longest key Check accepts, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
const RANDOM_HEX_LEN: usize = 56;
const CHECKSUM_HEX_LEN: usize = 8;
const BODY_LEN: usize = RANDOM_HEX_LEN + CHECKSUM_HEX_LEN;

/// The deployment-wide first segment of every key (`kg` by default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    /// Accepts 2 to 16 characters: a lowercase letter, then lowercase letters and digits.
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut chars = value.chars();
        let starts_with_letter = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if (2..=16).contains(&value.len()) && starts_with_letter && rest_ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(format!(
                "key prefix {value:?} must be 2 to 16 characters: a lowercase letter, then lowercase letters or digits"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        Self("kg".to_owned())
    }
}

/// Whether a key is for production or for tests; part of the key string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Environment {
    Live,
    Test,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Test => "test",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "live" => Some(Self::Live),
            "test" => Some(Self::Test),
            _ => None,
        }
    }
}

/// Why a presented key is not even a well-formed keygate key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFormatError {
    /// The key is empty.
    Missing,
    /// Wrong prefix, environment, length, alphabet or checksum.
    Malformed,
}

/// A full API key. Exists only between minting and the CreateKey/RotateKey response, and while
/// a Check request is decided; `Debug` never prints it.
pub struct ApiKeySecret(String);

impl ApiKeySecret {
    /// Mints a fresh key from the OS CSPRNG.
    pub fn generate(prefix: &KeyPrefix, environment: Environment) -> Result<Self, rand::rngs::SysError> {
        let mut random = [0u8; RANDOM_HEX_LEN / 2];
        SysRng.try_fill_bytes(&mut random)?;
        let mut key = format!("{}_{}_", prefix.as_str(), environment.as_str());
        key.push_str(&hex(&random));
        let checksum = crc32fast::hash(key.as_bytes());
        key.push_str(&format!("{checksum:08x}"));
        Ok(Self(key))
    }

    /// Checks the format and checksum of a presented key, with no I/O.
    pub fn parse(prefix: &KeyPrefix, value: &str) -> Result<Self, KeyFormatError> {
        if value.is_empty() {
            return Err(KeyFormatError::Missing);
        }
        let rest = value
            .strip_prefix(prefix.as_str())
            .and_then(|rest| rest.strip_prefix('_'))
            .ok_or(KeyFormatError::Malformed)?;
        let (environment, body) = rest.split_once('_').ok_or(KeyFormatError::Malformed)?;
        Environment::parse(environment).ok_or(KeyFormatError::Malformed)?;
        let is_lower_hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
        if body.len() != BODY_LEN || !body.bytes().all(|b| is_lower_hex(&b)) {
            return Err(KeyFormatError::Malformed);
        }
        let (checked, checksum) = value.split_at(value.len() - CHECKSUM_HEX_LEN);
        if format!("{:08x}", crc32fast::hash(checked.as_bytes())) != checksum {
            return Err(KeyFormatError::Malformed);
        }
        Ok(Self(value.to_owned()))
    }

    /// The key's environment, as written in it.
    pub fn environment(&self) -> Environment {
        let environment = self.0.split('_').nth(1).and_then(Environment::parse);
        environment.unwrap_or(Environment::Live)
    }

    /// The first characters of the key, safe to show and log.
    pub fn display_prefix(&self) -> String {
        self.0.chars().take(DISPLAY_PREFIX_LEN).collect()
    }

    /// The SHA-256 of the key: the only form keygate stores.
    pub fn hash(&self) -> KeyHash {
        KeyHash(hex(&Sha256::digest(self.0.as_bytes())))
    }

    /// The full key, for the one response that returns it.
    pub fn expose(self) -> String {
        self.0
    }
}

impl fmt::Debug for ApiKeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeySecret({}…)", self.display_prefix())
    }
}

/// The lowercase hex SHA-256 of a key: the database and cache key for lookups.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyHash(String);

impl KeyHash {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// A fresh key id: `key_`, 12 hex digits of milliseconds since the epoch (so ids sort by
/// creation time and pages are stable), then 12 random hex digits.
pub fn new_key_id(now_millis: i64) -> Result<String, rand::rngs::SysError> {
    let mut random = [0u8; 6];
    SysRng.try_fill_bytes(&mut random)?;
    Ok(format!("key_{:012x}{}", now_millis.max(0), hex(&random)))
}

/// A fresh admin or caller token: 32 random bytes as 64 hex characters.
pub fn new_admin_token() -> Result<String, rand::rngs::SysError> {
    let mut random = [0u8; 32];
    SysRng.try_fill_bytes(&mut random)?;
    Ok(hex(&random))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix() -> KeyPrefix {
        KeyPrefix::default()
    }

    #[test]
    fn generated_keys_have_the_documented_shape_and_parse_back() {
        let key = ApiKeySecret::generate(&prefix(), Environment::Test).unwrap().expose();
        assert_eq!(key.len(), "kg_test_".len() + 64);
        assert!(key.starts_with("kg_test_"));
        let parsed = ApiKeySecret::parse(&prefix(), &key).unwrap();
        assert_eq!(parsed.environment(), Environment::Test);
        assert_eq!(parsed.display_prefix(), &key[..12]);
    }

    #[test]
    fn checksum_is_zlib_crc32_of_everything_before_it() {
        let key = ApiKeySecret::generate(&prefix(), Environment::Live).unwrap().expose();
        let (head, tail) = key.split_at(key.len() - 8);
        // zlib.crc32(b"123456789") == 0xcbf43926: crc32fast is the same IEEE CRC.
        assert_eq!(crc32fast::hash(b"123456789"), 0xcbf4_3926);
        assert_eq!(tail, format!("{:08x}", crc32fast::hash(head.as_bytes())));
    }

    #[test]
    fn two_generated_keys_differ() {
        let a = ApiKeySecret::generate(&prefix(), Environment::Live).unwrap().expose();
        let b = ApiKeySecret::generate(&prefix(), Environment::Live).unwrap().expose();
        assert_ne!(a, b);
    }

    #[test]
    fn a_typo_or_a_foreign_key_is_malformed() {
        let key = ApiKeySecret::generate(&prefix(), Environment::Live).unwrap().expose();
        let mut typo = key.clone().into_bytes();
        typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).unwrap();
        let upper = key.to_uppercase();
        let other_prefix = key.replacen("kg_", "et_", 1);
        let other_env = key.replacen("_live_", "_prod_", 1);
        for bad in [
            typo.as_str(),
            &upper,
            &other_prefix,
            &other_env,
            &key[..key.len() - 1],
            "kg_live_",
            "Bearer x",
            "kg_live__",
        ] {
            assert_eq!(ApiKeySecret::parse(&prefix(), bad).unwrap_err(), KeyFormatError::Malformed, "{bad}");
        }
        assert_eq!(ApiKeySecret::parse(&prefix(), "").unwrap_err(), KeyFormatError::Missing);
    }

    #[test]
    fn non_ascii_input_is_malformed_not_a_panic() {
        let weird = format!("kg_live_{}", "é".repeat(32));
        assert_eq!(ApiKeySecret::parse(&prefix(), &weird).unwrap_err(), KeyFormatError::Malformed);
        assert_eq!(ApiKeySecret::parse(&prefix(), "kg_live_ééééééé").unwrap_err(), KeyFormatError::Malformed);
    }

    #[test]
    fn a_custom_prefix_mints_and_accepts_only_its_own_keys() {
        let et = KeyPrefix::parse("et").unwrap();
        let key = ApiKeySecret::generate(&et, Environment::Live).unwrap().expose();
        assert!(key.starts_with("et_live_"));
        assert!(ApiKeySecret::parse(&et, &key).is_ok());
        assert_eq!(ApiKeySecret::parse(&prefix(), &key).unwrap_err(), KeyFormatError::Malformed);
    }

    #[test]
    fn prefixes_are_validated() {
        for bad in ["", "k", "KG", "k_g", "1kg", "averyveryverylongprefix"] {
            assert!(KeyPrefix::parse(bad).is_err(), "{bad}");
        }
        assert!(KeyPrefix::parse("et").is_ok());
    }

    #[test]
    fn debug_never_prints_the_key() {
        let secret = ApiKeySecret::generate(&prefix(), Environment::Live).unwrap();
        let key_text = secret.0.clone();
        assert!(!format!("{secret:?}").contains(&key_text));
    }

    #[test]
    fn key_ids_sort_by_creation_time() {
        let earlier = new_key_id(1_000).unwrap();
        let later = new_key_id(2_000).unwrap();
        assert!(earlier < later);
        assert_eq!(earlier.len(), 28);
    }
}
