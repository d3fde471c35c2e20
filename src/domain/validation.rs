//! Input rules shared by every API: ids, names, metadata, scopes, sites and page sizes.
//! Each rule reports the offending field so clients get a google.rpc.BadRequest they can act on.

use std::collections::BTreeMap;

use super::scope::{MAX_SCOPES_PER_KEY, Scope};

pub const MAX_ID_LEN: usize = 64;
pub const MAX_NAME_CHARS: usize = 100;
pub const MAX_DISPLAY_NAME_CHARS: usize = 200;
/// The longest `display_prefix` an imported key may bring.
pub const MAX_DISPLAY_PREFIX_CHARS: usize = 32;
pub const MAX_METADATA_ENTRIES: usize = 16;
pub const MAX_METADATA_KEY_CHARS: usize = 64;
pub const MAX_METADATA_VALUE_CHARS: usize = 512;
pub const MAX_SITES_PER_KEY: usize = 100;
pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 1000;

/// One broken rule: which field, and what it must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// Collects every violation of a request, so a client learns all of them at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation { field: field.into(), description: description.into() });
    }

    /// `Ok(value)` when nothing was violated.
    pub fn finish<T>(self, value: T) -> Result<T, Vec<FieldViolation>> {
        if self.0.is_empty() { Ok(value) } else { Err(self.0) }
    }

    /// Tenant and site ids: 1 to 64 characters of `[A-Za-z0-9._-]`.
    pub fn id(&mut self, field: &str, value: &str) {
        if value.is_empty() {
            self.add(field, "is required");
        } else if value.len() > MAX_ID_LEN || !value.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            self.add(field, format!("must be 1 to {MAX_ID_LEN} characters of A-Z, a-z, 0-9, '.', '_' or '-'"));
        } else if value == "." || value == ".." {
            // A path segment that means "here" or "up" is no id: it could redirect a gateway.
            self.add(field, "must not be '.' or '..'");
        }
    }

    /// Key ids are opaque to clients but bounded; an unknown one is NOT_FOUND, a huge one is invalid.
    pub fn key_id(&mut self, field: &str, value: &str) {
        self.id(field, value);
    }

    /// A required human-readable name of at most `max` characters, with at least one visible
    /// character, and no control or bidirectional-control characters.
    pub fn name(&mut self, field: &str, value: &str, max: usize) {
        if !value.chars().any(is_visible) {
            self.add(field, "is required (and must hold a visible character)");
        } else {
            self.optional_name(field, value, max);
        }
    }

    /// An optional human-readable name: empty is fine; otherwise as [`name`](Self::name).
    pub fn optional_name(&mut self, field: &str, value: &str, max: usize) {
        if value.chars().count() > max {
            self.add(field, format!("must be at most {max} characters"));
        } else if value.chars().any(char::is_control) {
            self.add(field, "must not contain control characters");
        } else if value.chars().any(is_bidi_control) {
            self.add(field, "must not contain bidirectional control characters");
        } else if !value.is_empty() && !value.chars().any(is_visible) {
            self.add(field, "must hold a visible character");
        }
    }

    /// At most 16 entries; keys 1 to 64 characters, values at most 512.
    pub fn metadata(&mut self, field: &str, metadata: &BTreeMap<String, String>) {
        if metadata.len() > MAX_METADATA_ENTRIES {
            self.add(field, format!("must have at most {MAX_METADATA_ENTRIES} entries"));
        }
        for (key, value) in metadata {
            let key_chars = key.chars().count();
            if key_chars == 0 || key_chars > MAX_METADATA_KEY_CHARS {
                self.add(field, format!("keys must be 1 to {MAX_METADATA_KEY_CHARS} characters"));
            } else if key.chars().any(char::is_control) {
                self.add(field, "keys must not contain control characters");
            }
            if value.chars().count() > MAX_METADATA_VALUE_CHARS {
                self.add(format!("{field}[{key}]"), format!("must be at most {MAX_METADATA_VALUE_CHARS} characters"));
            }
        }
    }

    /// 1 to 64 well-formed scopes, returned in request order so later checks (the catalogue, a
    /// server setting checked by the service) can name the right index.
    pub fn scopes(&mut self, field: &str, values: &[String]) -> Vec<Scope> {
        if values.is_empty() {
            self.add(field, "must name at least one scope");
        } else if values.len() > MAX_SCOPES_PER_KEY {
            self.add(field, format!("must have at most {MAX_SCOPES_PER_KEY} scopes"));
            return Vec::new();
        }
        let mut scopes = Vec::with_capacity(values.len());
        for (index, value) in values.iter().enumerate() {
            match Scope::parse(value) {
                Ok(scope) => scopes.push(scope),
                Err(description) => self.add(format!("{field}[{index}]"), description),
            }
        }
        scopes
    }

    /// A required scope in a Check.
    pub fn required_scope(&mut self, field: &str, value: &str) -> Option<Scope> {
        if value.is_empty() {
            self.add(field, "is required");
            return None;
        }
        Scope::parse(value).map_err(|description| self.add(field, description)).ok()
    }

    /// At most 100 site ids, each well-formed; returned in request order (repeats included), so
    /// later checks (is each a site of the tenant?) can name the index the client sent.
    pub fn site_ids(&mut self, field: &str, values: &[String]) -> Vec<String> {
        if values.len() > MAX_SITES_PER_KEY {
            self.add(field, format!("must have at most {MAX_SITES_PER_KEY} sites"));
            return Vec::new();
        }
        for (index, value) in values.iter().enumerate() {
            self.id(&format!("{field}[{index}]"), value);
        }
        values.to_vec()
    }

    /// 0 means the default; negative is invalid; above the maximum is clamped.
    pub fn page_size(&mut self, field: &str, value: i32) -> usize {
        match value {
            0 => DEFAULT_PAGE_SIZE,
            size if size < 0 => {
                self.add(field, "must not be negative");
                DEFAULT_PAGE_SIZE
            }
            size => (size as usize).min(MAX_PAGE_SIZE),
        }
    }
}

/// Characters that reorder how text displays (the "Trojan Source" characters): a name holding
/// one can show as something it is not.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Whether a character shows something: a letter, number, punctuation, symbol or spacing mark
/// by its Unicode general category (not a separator, a lone combining mark, a format control,
/// private use, unassigned or a noncharacter), and not one of the blanks of [`is_invisible`].
fn is_visible(c: char) -> bool {
    use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};
    let shows = matches!(
        c.general_category_group(),
        GeneralCategoryGroup::Letter
            | GeneralCategoryGroup::Number
            | GeneralCategoryGroup::Punctuation
            | GeneralCategoryGroup::Symbol
    ) || c.general_category() == GeneralCategory::SpacingMark;
    shows && !is_invisible(c)
}

/// Characters that display as nothing: Unicode's default-ignorable code points (zero-width
/// spaces and joiners, the soft hyphen, variation selectors, fillers, tags, BOM), by their
/// ranges in Unicode 15, and the braille blank (U+2800), which fonts draw as a space.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{2800}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D159}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_bounded_and_plain() {
        let mut violations = Violations::default();
        violations.id("tenant_id", "acme-Inc_1.eu");
        assert!(violations.finish(()).is_ok());
        for bad in ["", "a b", "a/b", "ä", ".", "..", &"x".repeat(65)] {
            let mut violations = Violations::default();
            violations.id("tenant_id", bad);
            let errors = violations.finish(()).unwrap_err();
            assert_eq!(errors[0].field, "tenant_id", "{bad}");
        }
    }

    #[test]
    fn invisible_and_reordering_names_are_refused_like_blank_ones() {
        for invisible in [
            "\u{200B}",
            " \u{200B}\u{FEFF} ",
            "\u{2060}\u{180E}",
            "\u{3164}",
            "\u{2800}\u{2800}",
            "\u{0301}",
            "\u{FDD0}",
            "\u{0378}",
            "\u{E000}",
            "\u{13430}",
        ] {
            let mut violations = Violations::default();
            violations.name("name", invisible, MAX_NAME_CHARS);
            assert!(violations.finish(()).is_err(), "{invisible:?}");
            let mut violations = Violations::default();
            violations.optional_name("display_name", invisible, MAX_NAME_CHARS);
            assert!(violations.finish(()).is_err(), "{invisible:?}");
        }
        for reordered in ["admin\u{202E}txt.exe", "a\u{2066}b", "\u{200F}x"] {
            let mut violations = Violations::default();
            violations.name("name", reordered, MAX_NAME_CHARS);
            assert!(violations.finish(()).is_err(), "{reordered:?}");
        }
        for fine in ["Café", "Data sync", "数据", "a\u{200D}b"] {
            let mut violations = Violations::default();
            violations.name("name", fine, MAX_NAME_CHARS);
            assert!(violations.finish(()).is_ok(), "{fine:?}");
        }
        let mut violations = Violations::default();
        violations.optional_name("display_name", "", MAX_NAME_CHARS);
        assert!(violations.finish(()).is_ok(), "an optional name may be empty");
    }

    #[test]
    fn names_count_characters_not_bytes() {
        let mut violations = Violations::default();
        violations.name("name", &"é".repeat(100), MAX_NAME_CHARS);
        assert!(violations.finish(()).is_ok());
        let mut violations = Violations::default();
        violations.name("name", &"é".repeat(101), MAX_NAME_CHARS);
        assert!(violations.finish(()).is_err());
        let mut violations = Violations::default();
        violations.name("name", "  ", MAX_NAME_CHARS);
        assert!(violations.finish(()).is_err());
    }

    #[test]
    fn metadata_limits_name_the_field() {
        let too_many: BTreeMap<_, _> = (0..17).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        let mut violations = Violations::default();
        violations.metadata("metadata", &too_many);
        assert_eq!(violations.finish(()).unwrap_err()[0].field, "metadata");
        let long_value = BTreeMap::from([("plan".to_owned(), "v".repeat(513))]);
        let mut violations = Violations::default();
        violations.metadata("metadata", &long_value);
        assert_eq!(violations.finish(()).unwrap_err()[0].field, "metadata[plan]");
    }

    #[test]
    fn scopes_are_required_and_bounded() {
        let mut violations = Violations::default();
        let scopes = violations.scopes("scopes", &["b:read".into(), "a:read".into(), "b:read".into()]);
        assert!(violations.finish(()).is_ok());
        assert_eq!(scopes.iter().map(Scope::as_str).collect::<Vec<_>>(), ["b:read", "a:read", "b:read"]);
        let mut violations = Violations::default();
        violations.scopes("scopes", &[]);
        assert!(violations.finish(()).is_err());
        let mut violations = Violations::default();
        violations.scopes("scopes", &vec!["a:read".to_owned(); 65]);
        assert!(violations.finish(()).is_err());
    }

    #[test]
    fn page_sizes_default_and_clamp() {
        let mut violations = Violations::default();
        assert_eq!(violations.page_size("page_size", 0), DEFAULT_PAGE_SIZE);
        assert_eq!(violations.page_size("page_size", 5000), MAX_PAGE_SIZE);
        assert!(violations.finish(()).is_ok());
        let mut violations = Violations::default();
        violations.page_size("page_size", -1);
        assert!(violations.finish(()).is_err());
    }
}
