//! Key shapes: what the keys keygate mints look like, and which presented strings may be keys
//! at all.
//!
//! A shape is written as literal text and placeholders, for example `kg_{env}_{hex:64}` (the
//! default), `tga_{hex:64}`, `et_{env}_{hex:32}` or `zta_{env}_{alnum:36}`:
//!
//! - `{env}`: the key's environment, `live` or `test` (optional, at most once);
//! - `{hex:N}`, `{alnum:N}`, `{base62:N}`: the body, last: N characters of lowercase hex,
//!   lowercase letters and digits, or letters and digits (`0-9A-Za-z`, as GitHub's tokens).
//!
//! In a shape keygate mints, the body's last characters are the CRC-32 (IEEE, as zlib's
//! `crc32`) of everything before them, in the body's alphabet (8 hex, 7 alnum or 6 base62
//! digits), so a typo or a random string is refused with no lookup and secret scanners can tell
//! a key from noise; the rest is from the OS CSPRNG and must hold at least 96 bits. A shape of
//! keys keygate did not mint ([`ImportedShape`]) has no checksum: a key of that shape is looked
//! up by its hash like any other, and only the negative cache and the lookup bound stand between
//! a flood of random strings of that shape and the database.

use std::fmt;

use rand::TryRng;
use rand::rngs::SysRng;

use super::key::Environment;

/// The shape of a key minted before keygate recorded shapes, from its display prefix: every such
/// key was `{prefix}_{live|test}_` + 64 hex (`KEYGATE_KEY_PREFIX`, 2 to 16 lowercase letters and
/// digits). `None` when the prefix is not of that form or too short to tell.
pub fn legacy_notation_of(display_prefix: &str) -> Option<String> {
    let (prefix, rest) = display_prefix.split_once('_')?;
    let valid_prefix = (2..=16).contains(&prefix.len())
        && prefix.starts_with(|first: char| first.is_ascii_lowercase())
        && prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let environment = rest.strip_prefix("live_").or_else(|| rest.strip_prefix("test_"))?;
    (valid_prefix && environment.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()))
        .then(|| format!("{prefix}_{{env}}_{{hex:64}}"))
}

/// The longest key format notation, in bytes.
pub const MAX_NOTATION_BYTES: usize = 200;
/// The longest key Check accepts, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// Random bits a minted key must hold at least.
pub const MIN_RANDOM_BITS: f64 = 96.0;
/// Characters a key of no minted shape (imported, or merely presented) keeps hidden at least
/// behind its display prefix: 64 bits even of a decimal key.
pub const MIN_HIDDEN_IMPORTED_CHARS: usize = 20;
/// Random bits of a minted key its display prefix must leave hidden at least.
pub const MIN_HIDDEN_BITS: f64 = 64.0;

/// The characters a key body is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alphabet {
    /// `0-9a-f`.
    Hex,
    /// `0-9a-z`.
    Alnum,
    /// `0-9A-Za-z`.
    Base62,
}

impl Alphabet {
    fn characters(self) -> &'static [u8] {
        match self {
            Self::Hex => b"0123456789abcdef",
            Self::Alnum => b"0123456789abcdefghijklmnopqrstuvwxyz",
            Self::Base62 => b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Hex => "hex",
            Self::Alnum => "alnum",
            Self::Base62 => "base62",
        }
    }

    fn contains(self, byte: u8) -> bool {
        match self {
            Self::Hex => byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte),
            Self::Alnum => byte.is_ascii_digit() || byte.is_ascii_lowercase(),
            Self::Base62 => byte.is_ascii_alphanumeric(),
        }
    }

    fn bits_per_character(self) -> f64 {
        (self.characters().len() as f64).log2()
    }

    /// Characters the CRC-32 takes in this alphabet: the fewest that hold 2^32 values.
    fn checksum_length(self) -> usize {
        match self {
            Self::Hex => 8,
            Self::Alnum => 7,
            Self::Base62 => 6,
        }
    }

    /// `value` in this alphabet, most significant digit first, `width` digits.
    fn encode(self, mut value: u64, width: usize) -> String {
        let characters = self.characters();
        let base = characters.len() as u64;
        let mut digits = vec![b'0'; width];
        for digit in digits.iter_mut().rev() {
            *digit = characters[(value % base) as usize];
            value /= base;
        }
        String::from_utf8(digits).unwrap_or_default()
    }
}

/// One part of a shape.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Env,
    Body { alphabet: Alphabet, length: usize },
}

/// A key shape, parsed from its notation (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    notation: String,
    parts: Vec<Part>,
}

impl Shape {
    /// Parses a shape's notation; the error says what is wrong with it.
    pub fn parse(notation: &str) -> Result<Self, String> {
        if notation.len() > MAX_NOTATION_BYTES {
            return Err(format!("a key format of {} characters: at most {MAX_NOTATION_BYTES}", notation.len()));
        }
        let mut parts = Vec::new();
        let mut rest = notation;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let (placeholder, tail) =
                    after.split_once('}').ok_or_else(|| format!("{notation:?}: a `{{` is never closed"))?;
                parts.push(match placeholder.split_once(':') {
                    None if placeholder == "env" => Part::Env,
                    Some((alphabet, length)) => {
                        let alphabet = match alphabet {
                            "hex" => Alphabet::Hex,
                            "alnum" => Alphabet::Alnum,
                            "base62" => Alphabet::Base62,
                            other => return Err(format!("{notation:?}: unknown alphabet {other:?} (hex, alnum, base62)")),
                        };
                        let length = Some(length)
                            .filter(|digits| !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit()))
                            .and_then(|digits| digits.parse::<usize>().ok())
                            .filter(|length| (1..=256).contains(length))
                            .ok_or_else(|| format!("{notation:?}: the length in {{{placeholder}}} must be 1 to 256"))?;
                        Part::Body { alphabet, length }
                    }
                    None => return Err(format!("{notation:?}: unknown placeholder {{{placeholder}}} ({{env}}, {{hex:N}}, {{alnum:N}}, {{base62:N}})")),
                });
                rest = tail;
            } else {
                let end = rest.find('{').unwrap_or(rest.len());
                let literal = &rest[..end];
                if !literal.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"_-".contains(&byte)) {
                    let hint = if literal.contains(',') {
                        " (separate several shapes with spaces, not commas)"
                    } else if literal.bytes().any(|byte| b"[]()*+?.|\\$".contains(&byte)) {
                        " (a regular expression must be anchored: ^…$)"
                    } else {
                        ""
                    };
                    return Err(format!("{notation:?}: literal text may hold only letters, digits, `_` and `-`{hint}"));
                }
                parts.push(Part::Literal(literal.to_owned()));
                rest = &rest[end..];
            }
        }
        let bodies = parts.iter().filter(|part| matches!(part, Part::Body { .. })).count();
        if bodies != 1 || !matches!(parts.last(), Some(Part::Body { .. })) {
            return Err(format!("{notation:?}: needs exactly one body ({{hex:N}}, {{alnum:N}} or {{base62:N}}), last"));
        }
        if parts.iter().filter(|part| **part == Part::Env).count() > 1 {
            return Err(format!("{notation:?}: {{env}} may appear once"));
        }
        let prefix: usize = parts.iter().take_while(|part| matches!(part, Part::Literal(_))).map(Part::width).sum();
        if prefix < 2 {
            return Err(format!(
                "{notation:?}: must start with at least 2 literal characters, so that keys (and secret scanners) can tell them apart"
            ));
        }
        let shape = Self { notation: notation.to_owned(), parts };
        if shape.length() > MAX_KEY_BYTES {
            return Err(format!("{notation:?}: keys would be longer than {MAX_KEY_BYTES} characters"));
        }
        Ok(shape)
    }

    /// The notation the shape was written in.
    pub fn notation(&self) -> &str {
        &self.notation
    }

    fn body(&self) -> (Alphabet, usize) {
        match self.parts.last() {
            Some(Part::Body { alphabet, length }) => (*alphabet, *length),
            _ => (Alphabet::Hex, 0),
        }
    }

    /// Every key of this shape is this long, in bytes.
    pub fn length(&self) -> usize {
        self.parts.iter().map(Part::width).sum()
    }

    /// The characters before the body that every key of this shape starts with (up to the
    /// first `{env}`).
    fn fixed_prefix(&self) -> usize {
        self.parts.iter().take_while(|part| !matches!(part, Part::Body { .. })).map(Part::width).sum()
    }

    /// Random bits in a minted key of this shape (the body less its checksum).
    pub fn random_bits(&self) -> f64 {
        let (alphabet, length) = self.body();
        length.saturating_sub(alphabet.checksum_length()) as f64 * alphabet.bits_per_character()
    }

    /// Checks that this shape can be minted: a checksum and at least 96 random bits, and that
    /// showing `display_chars` characters of a key leaves at least 64 of them hidden.
    pub fn check_mintable(&self, display_chars: usize) -> Result<(), String> {
        let (alphabet, length) = self.body();
        if self.random_bits() < MIN_RANDOM_BITS {
            let needed = (MIN_RANDOM_BITS / alphabet.bits_per_character()).ceil() as usize + alphabet.checksum_length();
            return Err(format!(
                "{:?}: {} random bits; keys need at least {MIN_RANDOM_BITS} (a {} body of at least {needed} characters: {} of them are the checksum)",
                self.notation,
                self.random_bits().floor(),
                alphabet.name(),
                alphabet.checksum_length()
            ));
        }
        let shown_random = display_chars.saturating_sub(self.fixed_prefix()).min(length);
        let hidden = self.random_bits() - shown_random as f64 * alphabet.bits_per_character();
        if hidden < MIN_HIDDEN_BITS {
            return Err(format!(
                "a display prefix of {display_chars} characters would leave only {} random bits of {:?} hidden (at least {MIN_HIDDEN_BITS})",
                hidden.floor(),
                self.notation
            ));
        }
        Ok(())
    }

    /// A fresh key of this shape from the OS CSPRNG, its checksum last.
    pub fn mint(&self, environment: Environment) -> Result<String, rand::rngs::SysError> {
        let (alphabet, length) = self.body();
        let mut key = String::with_capacity(self.length());
        for part in &self.parts {
            match part {
                Part::Literal(text) => key.push_str(text),
                Part::Env => key.push_str(environment.as_str()),
                Part::Body { .. } => key.push_str(&random_text(alphabet, length - alphabet.checksum_length())?),
            }
        }
        let checksum = alphabet.encode(u64::from(crc32fast::hash(key.as_bytes())), alphabet.checksum_length());
        key.push_str(&checksum);
        Ok(key)
    }

    /// Whether some key of this shape starts with `prefix`.
    fn could_start_with(&self, prefix: &str) -> bool {
        let mut rest = prefix.as_bytes();
        for part in &self.parts {
            let taken = part.width().min(rest.len());
            let (head, tail) = rest.split_at(taken);
            let fits = match part {
                Part::Literal(text) => text.as_bytes().starts_with(head),
                Part::Env => b"live".starts_with(head) || b"test".starts_with(head),
                Part::Body { alphabet, .. } => head.iter().all(|byte| alphabet.contains(*byte)),
            };
            if !fits {
                return false;
            }
            rest = tail;
        }
        rest.is_empty()
    }

    /// The environment a prefix of a key of this shape states, when it reaches past `{env}`.
    fn environment_in_prefix(&self, prefix: &str) -> Option<Environment> {
        if !self.could_start_with(prefix) {
            return None;
        }
        let mut position = 0;
        for part in &self.parts {
            if let Part::Env = part {
                return match prefix.get(position..position + 4)? {
                    "live" => Some(Environment::Live),
                    "test" => Some(Environment::Test),
                    _ => None,
                };
            }
            position += part.width();
        }
        None
    }

    /// Whether `key` has this shape (and, with `checksum`, a valid checksum); its environment
    /// when the shape has `{env}`.
    fn matches(&self, key: &str, checksum: bool) -> Option<Option<Environment>> {
        let bytes = key.as_bytes();
        if bytes.len() != self.length() {
            return None;
        }
        let mut position = 0;
        let mut environment = None;
        for part in &self.parts {
            match part {
                Part::Literal(text) => {
                    if !key[position..].starts_with(text.as_str()) {
                        return None;
                    }
                    position += text.len();
                }
                Part::Env => {
                    environment = Some(Environment::parse(key.get(position..position + 4)?)?);
                    position += 4;
                }
                Part::Body { alphabet, length } => {
                    if !bytes[position..position + length].iter().all(|byte| alphabet.contains(*byte)) {
                        return None;
                    }
                    position += length;
                }
            }
        }
        if checksum {
            let (alphabet, _) = self.body();
            let (checked, sum) = key.split_at(key.len() - alphabet.checksum_length());
            let expected = alphabet.encode(u64::from(crc32fast::hash(checked.as_bytes())), alphabet.checksum_length());
            if expected != sum {
                return None;
            }
        }
        Some(environment)
    }
}

impl Part {
    fn width(&self) -> usize {
        match self {
            Self::Literal(text) => text.len(),
            Self::Env => 4,
            Self::Body { length, .. } => *length,
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.notation)
    }
}

/// `length` characters of `alphabet` from the OS CSPRNG, each equally likely (bytes that would
/// bias the choice are drawn again).
fn random_text(alphabet: Alphabet, length: usize) -> Result<String, rand::rngs::SysError> {
    let characters = alphabet.characters();
    let size = characters.len();
    let unbiased = 256 - 256 % size;
    let mut text = Vec::with_capacity(length);
    let mut buffer = [0u8; 64];
    while text.len() < length {
        SysRng.try_fill_bytes(&mut buffer)?;
        for byte in buffer {
            if (byte as usize) < unbiased && text.len() < length {
                text.push(characters[byte as usize % size]);
            }
        }
    }
    Ok(String::from_utf8(text).unwrap_or_default())
}

/// The shape of keys a deployment brings with it: a shape in the same notation but without a
/// checksum, or an anchored regular expression (`^…$`).
#[derive(Clone, Debug)]
pub enum ImportedShape {
    Template(Shape),
    Pattern(regex_lite::Regex),
}

impl ImportedShape {
    /// Parses a shape (`tga_{hex:64}`) or an anchored pattern (`^tga_[0-9a-f]{64}$`).
    pub fn parse(notation: &str) -> Result<Self, String> {
        if notation.starts_with('^') {
            if !notation.ends_with('$') {
                return Err(format!("{notation:?}: a pattern must be anchored at both ends (^…$)"));
            }
            // Anchored as a whole, whatever alternations inside it say (`^a$|b$`).
            let anchored = format!("^(?:{notation})$");
            let pattern = regex_lite::Regex::new(&anchored).map_err(|error| format!("{notation:?}: {error}"))?;
            return Ok(Self::Pattern(pattern));
        }
        Shape::parse(notation).map(Self::Template)
    }

    fn matches(&self, key: &str) -> bool {
        match self {
            Self::Template(shape) => shape.matches(key, false).is_some(),
            Self::Pattern(pattern) => pattern.is_match(key),
        }
    }

    /// Whether a key of this shape could start with `prefix`. For a pattern, by the literal
    /// text it starts with (`legacy_` of `^legacy_[A-Za-z0-9]{24}$`); a pattern that starts with
    /// a class or holds an alternation could start with anything.
    fn could_start_with(&self, prefix: &str) -> bool {
        match self {
            Self::Template(shape) => shape.could_start_with(prefix),
            Self::Pattern(_) => {
                let notation = self.notation();
                let body = notation.strip_prefix('^').unwrap_or(notation);
                if body.contains('|') {
                    return true;
                }
                let mut literal: Vec<char> =
                    body.chars().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-')).collect();
                if matches!(body.chars().nth(literal.len()), Some('?' | '*' | '{' | '+')) {
                    literal.pop();
                }
                let literal: String = literal.into_iter().collect();
                prefix.starts_with(&literal) || literal.starts_with(prefix)
            }
        }
    }

    pub fn notation(&self) -> &str {
        match self {
            Self::Template(shape) => shape.notation(),
            Self::Pattern(pattern) => {
                let anchored = pattern.as_str();
                anchored.strip_prefix("^(?:").and_then(|inner| inner.strip_suffix(")$")).unwrap_or(anchored)
            }
        }
    }
}

/// Why a presented string is not a key keygate could hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShapeError {
    Missing,
    /// No accepted shape fits (or its checksum is wrong).
    Malformed,
}

/// The shapes a deployment mints and accepts: the one it mints now, those it minted before
/// (remembered in the database), and those of imported keys.
#[derive(Clone, Debug)]
pub struct KeyShapes {
    pub minting: Shape,
    pub earlier: Vec<Shape>,
    pub imported: Vec<ImportedShape>,
    /// How many characters of a key `display_prefix` shows.
    pub display_chars: usize,
}

impl Default for KeyShapes {
    fn default() -> Self {
        Self {
            minting: Shape::parse(DEFAULT_SHAPE).unwrap_or_else(|_| unreachable!("the default shape parses")),
            earlier: Vec::new(),
            imported: Vec::new(),
            display_chars: DEFAULT_DISPLAY_CHARS,
        }
    }
}

/// The shape keygate mints unless configured otherwise.
pub const DEFAULT_SHAPE: &str = "kg_{env}_{hex:64}";
/// How many characters of a key `display_prefix` shows unless configured otherwise.
pub const DEFAULT_DISPLAY_CHARS: usize = 12;

impl KeyShapes {
    /// Checks a presented key against every accepted shape, with no I/O: a minted shape with its
    /// checksum first (the one minted now, then earlier ones), then imported shapes.
    pub fn check(&self, key: &str) -> Result<(), ShapeError> {
        if key.is_empty() {
            return Err(ShapeError::Missing);
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(ShapeError::Malformed);
        }
        let minted =
            std::iter::once(&self.minting).chain(&self.earlier).any(|shape| shape.matches(key, true).is_some());
        if minted || self.imported.iter().any(|shape| shape.matches(key)) { Ok(()) } else { Err(ShapeError::Malformed) }
    }

    /// The environment a key states (in a shape with `{env}`, minted or imported), if any.
    pub fn environment_of(&self, key: &str) -> Option<Environment> {
        let minted = std::iter::once(&self.minting).chain(&self.earlier).find_map(|shape| shape.matches(key, true));
        let imported = || {
            self.imported.iter().find_map(|shape| match shape {
                ImportedShape::Template(shape) => shape.matches(key, false),
                ImportedShape::Pattern(_) => None,
            })
        };
        minted.or_else(imported).flatten()
    }

    /// The part of a key safe to show and log: `display_chars` characters of a key of a minted
    /// shape (whose hidden part the configuration checked); of any other key (imported, or
    /// merely presented) at most that many and never more than leaves
    /// [`MIN_HIDDEN_IMPORTED_CHARS`] hidden, since nothing is known of its randomness.
    pub fn display_prefix(&self, key: &str) -> String {
        let minted =
            std::iter::once(&self.minting).chain(&self.earlier).any(|shape| shape.matches(key, true).is_some());
        let shown = match minted {
            true => self.display_chars,
            false => self.display_chars.min(key.chars().count().saturating_sub(MIN_HIDDEN_IMPORTED_CHARS)),
        };
        key.chars().take(shown).collect()
    }

    /// What is wrong with `prefix` as the display prefix of an imported hash: `None` when some
    /// accepted shape starts like it and still hides [`MIN_HIDDEN_IMPORTED_CHARS`] characters
    /// (of a template, by its length; of a pattern, whose lengths are unknown, when the prefix is
    /// at most `display_chars` long).
    pub fn display_prefix_problem(&self, prefix: &str) -> Option<String> {
        if !self.could_start_with(prefix) {
            return Some(
                "no accepted key shape starts like this, so Check would refuse the key: add its shape to \
                 KEYGATE_IMPORTED_KEY_FORMATS"
                    .into(),
            );
        }
        let shown = prefix.chars().count();
        let templates =
            std::iter::once(&self.minting).chain(&self.earlier).chain(self.imported.iter().filter_map(|shape| {
                match shape {
                    ImportedShape::Template(shape) => Some(shape),
                    ImportedShape::Pattern(_) => None,
                }
            }));
        let mut longest = 0;
        for shape in templates.filter(|shape| shape.could_start_with(prefix)) {
            longest = longest.max(shape.length().saturating_sub(MIN_HIDDEN_IMPORTED_CHARS));
        }
        let patterns = self
            .imported
            .iter()
            .any(|shape| matches!(shape, ImportedShape::Pattern(_)) && shape.could_start_with(prefix));
        if patterns {
            longest = longest.max(self.display_chars);
        }
        (shown > longest).then(|| {
            format!(
                "shows too much of the key: at most {longest} characters, so that at least \
                 {MIN_HIDDEN_IMPORTED_CHARS} stay hidden"
            )
        })
    }

    /// The environment a display prefix states (`et_test_…` of `et_{env}_{hex:32}`), if any.
    pub fn environment_in_prefix(&self, prefix: &str) -> Option<Environment> {
        let imported = self.imported.iter().filter_map(|shape| match shape {
            ImportedShape::Template(shape) => Some(shape),
            ImportedShape::Pattern(_) => None,
        });
        std::iter::once(&self.minting)
            .chain(&self.earlier)
            .chain(imported)
            .find_map(|shape| shape.environment_in_prefix(prefix))
    }

    /// Whether some accepted key could start with `prefix` (a display prefix given with an
    /// imported hash): a minted or imported template allows it, or an imported pattern's
    /// literal start does (see [`ImportedShape::could_start_with`]).
    pub fn could_start_with(&self, prefix: &str) -> bool {
        std::iter::once(&self.minting).chain(&self.earlier).any(|shape| shape.could_start_with(prefix))
            || self.imported.iter().any(|shape| shape.could_start_with(prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_prefixes_of_keys_of_no_minted_shape_keep_twenty_characters_hidden() {
        let shapes =
            KeyShapes { imported: vec![ImportedShape::parse("^[a-z0-9]{16}$").unwrap()], ..KeyShapes::default() };
        assert_eq!(shapes.display_prefix("k7x2m9q4w8e1r6t3"), "", "a 16-character key shows nothing");
        let long = format!("tga_{}", "a".repeat(64));
        assert_eq!(shapes.display_prefix(&long), &long[..12]);
        let minted = shapes.minting.mint(Environment::Live).unwrap();
        assert_eq!(shapes.display_prefix(&minted), &minted[..12]);
    }

    #[test]
    fn patterns_are_anchored_as_a_whole_and_lengths_are_plain_digits() {
        let pattern = ImportedShape::parse("^a$|b$").unwrap();
        assert!(pattern.matches("a") && pattern.matches("b"));
        assert!(!pattern.matches("xb") && !pattern.matches("ax"), "no alternative escapes the anchors");
        assert!(Shape::parse("kg_{hex:+64}").is_err());
        let comma = ImportedShape::parse("tga_{hex:64},bj_{env}_{hex:64}").unwrap_err();
        assert!(comma.contains("spaces"), "{comma}");
        let unanchored = ImportedShape::parse("tga_[0-9a-f]{64}").unwrap_err();
        assert!(unanchored.contains("^…$"), "{unanchored}");
        assert!(Shape::parse(&format!("{}_{{hex:64}}", "a".repeat(300))).is_err());
    }

    #[test]
    fn a_prefix_is_checked_against_every_template_and_the_literal_start_of_patterns() {
        let shapes =
            KeyShapes { imported: vec![ImportedShape::parse("tga_{hex:64}").unwrap()], ..KeyShapes::default() };
        for prefix in ["tga_4f2a", "kg_live_ab12", "kg_te", "t"] {
            assert!(shapes.could_start_with(prefix), "{prefix}");
        }
        for prefix in ["tga_XYZ", "kg_prod_", "zta_live_", "kg_live_g"] {
            assert!(!shapes.could_start_with(prefix), "{prefix}");
        }
        let patterns = |notation: &str| KeyShapes {
            imported: vec![ImportedShape::parse(notation).unwrap()],
            ..KeyShapes::default()
        };
        let legacy = patterns("^legacy_[A-Za-z0-9]{24}$");
        assert!(legacy.could_start_with("legacy_AbC") && legacy.could_start_with("leg"));
        assert!(!legacy.could_start_with("sk_live_4f2a"));
        assert!(patterns("^xy?z.*$").could_start_with("xz12"), "an optional last letter is not required");
        assert!(!patterns("^xy?z.*$").could_start_with("yz12"));
        assert!(patterns("^[a-z]{3}_.+$").could_start_with("anything"), "a class first: anything");
        assert!(patterns("^ab_.+$|^cd_.+$").could_start_with("cd_1"), "alternations: anything");
    }

    #[test]
    fn a_hashs_display_prefix_hides_twenty_characters_and_states_its_environment() {
        let shapes = KeyShapes {
            imported: vec![
                ImportedShape::parse("et_{env}_{hex:32}").unwrap(),
                ImportedShape::parse("^legacy_[A-Za-z0-9]{24}$").unwrap(),
            ],
            ..KeyShapes::default()
        };
        assert_eq!(shapes.display_prefix_problem("et_live_0123456789ab"), None, "40 - 20 = 20 characters");
        assert!(shapes.display_prefix_problem("et_live_0123456789abc").unwrap().contains("at most 20"));
        assert_eq!(shapes.display_prefix_problem("legacy_AbCd"), None);
        assert!(shapes.display_prefix_problem("legacy_AbCdEfGhIjKlMnOpQrSt").unwrap().contains("at most 12"));
        assert!(shapes.display_prefix_problem("sk_live_").unwrap().contains("no accepted key shape"));
        assert_eq!(shapes.environment_in_prefix("et_test_fac6"), Some(Environment::Test));
        assert_eq!(shapes.environment_in_prefix("et_live"), Some(Environment::Live));
        assert_eq!(shapes.environment_in_prefix("et_li"), None, "not reached yet");
        assert_eq!(shapes.environment_in_prefix("legacy_AbCd"), None);
    }

    /// The shapes the reference products promise.
    const PRODUCTS: [(&str, &str, usize); 4] = [
        ("EngageTrack", "et_{env}_{hex:32}", 40),
        ("trackagoat", "tga_{hex:64}", 68),
        ("Jetrack", "bj_{env}_{hex:64}", 72),
        ("Zero Trust Analytics", "zta_{env}_{alnum:36}", 45),
    ];

    #[test]
    fn the_reference_products_shapes_mint_and_check() {
        for (product, notation, length) in PRODUCTS {
            let shape = Shape::parse(notation).unwrap();
            shape.check_mintable(DEFAULT_DISPLAY_CHARS).unwrap_or_else(|error| panic!("{product}: {error}"));
            let shapes = KeyShapes { minting: shape.clone(), ..KeyShapes::default() };
            for environment in [Environment::Live, Environment::Test] {
                let key = shape.mint(environment).unwrap();
                assert_eq!(key.len(), length, "{product}: {key}");
                assert_eq!(shapes.check(&key), Ok(()), "{product}");
                if notation.contains("{env}") {
                    assert_eq!(shapes.environment_of(&key), Some(environment));
                    assert!(key.contains(&format!("_{}_", environment.as_str())));
                }
                // One character off anywhere: refused with no lookup.
                for position in [0, key.len() / 2, key.len() - 1] {
                    let mut typo = key.clone().into_bytes();
                    typo[position] = if typo[position] == b'a' { b'b' } else { b'a' };
                    let typo = String::from_utf8(typo).unwrap();
                    assert_eq!(shapes.check(&typo), Err(ShapeError::Malformed), "{product}: {typo}");
                }
            }
        }
        assert!(Shape::parse("bj_{env}_{hex:64}").unwrap().mint(Environment::Live).unwrap().starts_with("bj_live_"));
        assert!(Shape::parse("tga_{hex:64}").unwrap().mint(Environment::Test).unwrap().starts_with("tga_"));
    }

    #[test]
    fn checksums_are_zlib_crc32_in_the_body_alphabet() {
        let hex = Shape::parse("kg_{env}_{hex:64}").unwrap().mint(Environment::Live).unwrap();
        let (head, tail) = hex.split_at(hex.len() - 8);
        assert_eq!(crc32fast::hash(b"123456789"), 0xcbf4_3926);
        assert_eq!(tail, format!("{:08x}", crc32fast::hash(head.as_bytes())));
        let base62 = Shape::parse("ghp_{base62:36}").unwrap().mint(Environment::Live).unwrap();
        let (head, tail) = base62.split_at(base62.len() - 6);
        assert_eq!(tail, Alphabet::Base62.encode(u64::from(crc32fast::hash(head.as_bytes())), 6));
        assert_eq!(Alphabet::Alnum.encode(35, 3), "00z");
        assert_eq!(Alphabet::Base62.encode(61, 2), "0z");
    }

    #[test]
    fn shapes_with_too_little_randomness_or_no_prefix_are_refused() {
        for (bad, why) in [
            ("kg_{hex:16}", "random bits"),
            ("et_{env}_{hex:31}", "random bits"),
            ("zta_{alnum:25}", "random bits"),
            ("{hex:64}", "2 literal"),
            ("k{hex:64}", "2 literal"),
            ("kg_{hex:64}_x", "last"),
            ("kg_{env}_{env}_{hex:64}", "once"),
            ("kg_{hex:64}{hex:8}", "exactly one"),
            ("kg_{b64:40}", "unknown alphabet"),
            ("kg_{hex:0}", "1 to 256"),
            ("kg {hex:64}", "literal"),
            ("kg_{hex:64", "never closed"),
        ] {
            let refused = Shape::parse(bad)
                .and_then(|shape| shape.check_mintable(DEFAULT_DISPLAY_CHARS))
                .expect_err(&format!("{bad} is refused"));
            assert!(refused.contains(why), "{bad}: {refused}");
        }
        let display = Shape::parse("et_{env}_{hex:32}").unwrap().check_mintable(30).unwrap_err();
        assert!(display.contains("display prefix"), "{display}");
    }

    #[test]
    fn random_bodies_use_the_whole_alphabet_evenly() {
        let text = random_text(Alphabet::Alnum, 36_000).unwrap();
        for character in Alphabet::Alnum.characters() {
            let count = text.bytes().filter(|byte| byte == character).count();
            assert!((800..1200).contains(&count), "{} appears {count} times of ~1000", *character as char);
        }
    }

    #[test]
    fn earlier_shapes_keep_working_and_imported_ones_need_no_checksum() {
        let old = Shape::parse("et_{env}_{hex:32}").unwrap();
        let old_key = old.mint(Environment::Live).unwrap();
        let mut shapes = KeyShapes { minting: Shape::parse("tga_{hex:64}").unwrap(), ..KeyShapes::default() };
        assert_eq!(shapes.check(&old_key), Err(ShapeError::Malformed));
        shapes.earlier.push(old);
        assert_eq!(shapes.check(&old_key), Ok(()));

        shapes.imported = vec![
            ImportedShape::parse("legacy_{hex:40}").unwrap(),
            ImportedShape::parse("^sk_[A-Za-z0-9]{24}$").unwrap(),
        ];
        assert_eq!(shapes.check(&format!("legacy_{}", "a".repeat(40))), Ok(()));
        assert_eq!(shapes.check(&format!("sk_{}", "Ab9".repeat(8))), Ok(()));
        assert_eq!(shapes.check(&format!("sk_{}", "Ab9".repeat(8) + "x")), Err(ShapeError::Malformed));
        assert_eq!(shapes.check(""), Err(ShapeError::Missing));
        assert!(ImportedShape::parse("^sk_.*").is_err(), "patterns are anchored at both ends");
        assert!(ImportedShape::parse("sk_.*$").is_err());
    }
}
