//! The API key itself: minting, checking, hashing, and the ids keygate gives keys and tokens.
//! What keys look like is the business of [`key_format`](super::key_format).

use std::fmt;

use rand::TryRng;
use rand::rngs::SysRng;
use sha2::{Digest, Sha256};

pub use super::key_format::MAX_KEY_BYTES;
use super::key_format::{KeyShapes, Shape, ShapeError};

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
    Missing,
    /// No accepted shape fits: wrong prefix, environment, length, alphabet or checksum.
    Malformed,
}

impl From<ShapeError> for KeyFormatError {
    fn from(error: ShapeError) -> Self {
        match error {
            ShapeError::Missing => Self::Missing,
            ShapeError::Malformed => Self::Malformed,
        }
    }
}

/// A full API key. Exists only between minting and the CreateKey/RotateKey response, in an
/// ImportKeys request, and while a Check request is decided; `Debug` never prints it.
pub struct ApiKeySecret(String);

impl ApiKeySecret {
    /// Mints a fresh key of `shape` from the OS CSPRNG.
    pub fn generate(shape: &Shape, environment: Environment) -> Result<Self, rand::rngs::SysError> {
        shape.mint(environment).map(Self)
    }

    /// Checks that a presented string has an accepted shape (and checksum), with no I/O.
    pub fn parse(shapes: &KeyShapes, value: &str) -> Result<Self, KeyFormatError> {
        shapes.check(value)?;
        Ok(Self(value.to_owned()))
    }

    /// The first `chars` characters of the key, safe to show and log.
    pub fn display_prefix(&self, chars: usize) -> String {
        self.0.chars().take(chars).collect()
    }

    /// The SHA-256 of the key: the only form keygate stores.
    pub fn hash(&self) -> KeyHash {
        KeyHash::of(&self.0)
    }

    /// Checks the shape of a presented key, as [`parse`](Self::parse) does, and returns its
    /// SHA-256 without copying it: the first step of every Check.
    pub fn digest_of(shapes: &KeyShapes, value: &str) -> Result<KeyDigest, KeyFormatError> {
        shapes.check(value)?;
        Ok(KeyDigest::of(value))
    }

    /// The full key, for the one response that returns it.
    pub fn expose(self) -> String {
        self.0
    }
}

impl fmt::Debug for ApiKeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeySecret({}…)", self.display_prefix(4))
    }
}

/// The SHA-256 of a key as 32 bytes: what the decision cache is keyed by (the database holds
/// its hex form, [`KeyHash`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// The SHA-256 of `text`.
    pub fn of(text: &str) -> Self {
        Self(Sha256::digest(text.as_bytes()).into())
    }

    /// The digest of a hex hash (a [`KeyHash`]); `None` unless it is 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.as_bytes();
        if text.len() != 64 {
            return None;
        }
        let nibble = |digit: u8| (digit as char).to_digit(16).map(|value| value as u8);
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(Self(bytes))
    }

    /// The 32 bytes of the SHA-256.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Its lowercase hex form, as stored.
    pub fn to_hash(&self) -> KeyHash {
        KeyHash(hex(&self.0))
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({})", hex(&self.0))
    }
}

/// The lowercase hex SHA-256 of a key: the database and cache key for lookups.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyHash(String);

impl KeyHash {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SHA-256 of `text`, as a key's hash would be.
    pub fn of(text: &str) -> Self {
        KeyDigest::of(text).to_hash()
    }

    /// A SHA-256 given by someone else (ImportKeys' `secret_sha256`): 64 hex digits, or 32 bytes
    /// in base64 (standard or URL-safe, padded or not). `None` for anything else.
    pub fn from_given(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.len() == 64 && text.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Some(Self(text.to_ascii_lowercase()));
        }
        let bytes = base64_decode(text.trim_end_matches('='))?;
        (bytes.len() == 32).then(|| Self(hex(&bytes)))
    }
}

/// Decodes unpadded base64, standard (`+/`) or URL-safe (`-_`) alphabet.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |byte: u8| -> Option<u32> {
        Some(match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.as_bytes().chunks(4) {
        let mut accumulated = 0u32;
        for (index, byte) in chunk.iter().enumerate() {
            accumulated |= value(*byte)? << (18 - 6 * index);
        }
        let bytes = accumulated.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// Lowercase hex, two digits a byte.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)] as char);
        out.push(DIGITS[usize::from(byte & 0xf)] as char);
    }
    out
}

/// A fresh key id: `key_`, 12 hex digits of milliseconds since the epoch (so ids sort by
/// creation time and pages are stable), then 12 random hex digits.
pub fn new_key_id(now_millis: i64) -> Result<String, rand::rngs::SysError> {
    let mut random = [0u8; 6];
    SysRng.try_fill_bytes(&mut random)?;
    Ok(format!("key_{:012x}{}", now_millis.max(0), hex(&random)))
}

/// The greatest string below every key id minted at `millis` or later (see [`new_key_id`]).
pub fn key_id_floor(millis: i64) -> String {
    format!("key_{:012x}", millis.max(0))
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

    #[test]
    fn generated_keys_parse_back_and_hash_to_their_sha256() {
        let shapes = KeyShapes::default();
        let key = ApiKeySecret::generate(&shapes.minting, Environment::Test).unwrap();
        let text = key.0.clone();
        assert_eq!(text.len(), "kg_test_".len() + 64);
        assert!(text.starts_with("kg_test_"));
        let parsed = ApiKeySecret::parse(&shapes, &text).unwrap();
        assert_eq!(parsed.display_prefix(12), &text[..12]);
        assert_eq!(parsed.hash().as_str(), hex(&Sha256::digest(text.as_bytes())));
        let digest = ApiKeySecret::digest_of(&shapes, &text).unwrap();
        assert_eq!(digest.to_hash(), parsed.hash());
        assert_eq!(KeyDigest::from_hex(parsed.hash().as_str()), Some(digest));
        assert_eq!(ApiKeySecret::digest_of(&shapes, "kg_live_nope").unwrap_err(), KeyFormatError::Malformed);
        for bad in ["", "0", &"g".repeat(64), &"0".repeat(63), &format!("{}é", "0".repeat(62))] {
            assert_eq!(KeyDigest::from_hex(bad), None, "{bad}");
        }
        assert_eq!(ApiKeySecret::parse(&shapes, "").unwrap_err(), KeyFormatError::Missing);
        assert_eq!(ApiKeySecret::parse(&shapes, "kg_live_nope").unwrap_err(), KeyFormatError::Malformed);
    }

    #[test]
    fn non_ascii_input_is_malformed_not_a_panic() {
        let shapes = KeyShapes::default();
        for weird in [format!("kg_live_{}", "é".repeat(32)), "kg_live_ééééééé".into(), "ké".repeat(40)] {
            assert_eq!(ApiKeySecret::parse(&shapes, &weird).unwrap_err(), KeyFormatError::Malformed);
        }
    }

    #[test]
    fn debug_never_prints_the_key() {
        let secret = ApiKeySecret::generate(&KeyShapes::default().minting, Environment::Live).unwrap();
        let key_text = secret.0.clone();
        assert!(!format!("{secret:?}").contains(&key_text[8..]));
    }

    #[test]
    fn given_hashes_are_read_as_hex_or_base64() {
        let digest = Sha256::digest(b"tga_0123");
        let expected = hex(&digest);
        assert_eq!(KeyHash::from_given(&expected).unwrap().as_str(), expected);
        assert_eq!(KeyHash::from_given(&expected.to_uppercase()).unwrap().as_str(), expected);
        // Python: base64.b64encode(hashlib.sha256(b"tga_0123").digest()), and its URL-safe form.
        let standard = "ZmZarh1o+cRvgwONkROBM0ecq1bTBaKbEYneMK1Uwrg=";
        assert_eq!(KeyHash::from_given(standard).unwrap().as_str(), expected);
        assert_eq!(KeyHash::from_given(&standard.replace('+', "-")).unwrap().as_str(), expected);
        assert_eq!(KeyHash::from_given(standard.trim_end_matches('=')).unwrap().as_str(), expected);
        for bad in ["", "abc", &"g".repeat(64), "AAAA", &"A".repeat(45)] {
            assert!(KeyHash::from_given(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn key_ids_sort_by_creation_time() {
        let earlier = new_key_id(1_000).unwrap();
        let later = new_key_id(2_000).unwrap();
        assert!(earlier < later);
        assert_eq!(earlier.len(), 28);
    }
}
