//! What keygate reads from a request that Envoy forwards: the key and the site. Pure functions
//! over the header map (keys lower-cased by Envoy) and the raw request target (path + query).

use std::collections::HashMap;

use crate::domain::validation::Violations;

/// Where a gateway request may carry its key, tried in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// `Authorization: Bearer <key>` (scheme case-insensitive).
    Bearer,
    /// A request header holding the key as it is, e.g. `x-api-key`.
    Header(String),
    /// A query parameter, e.g. `_apikey`.
    Query(String),
}

/// The configured key sources, e.g. `bearer,header:x-api-key,query:_apikey`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySources(Vec<KeySource>);

impl KeySources {
    /// Whether a header of this name is one a key is read from (and stripped), however spelled.
    pub fn reads_header(&self, name: &str) -> bool {
        self.0.iter().any(|source| matches!(source, KeySource::Header(header) if same_header_name(name, header)))
    }
}

impl Default for KeySources {
    fn default() -> Self {
        Self(vec![KeySource::Bearer, KeySource::Header("x-api-key".into()), KeySource::Query("_apikey".into())])
    }
}

impl KeySources {
    /// Parses `bearer`, `header:<name>` and `query:<name>` entries, comma-separated.
    pub fn parse(value: &str) -> Result<Self, String> {
        let sources = value
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| match entry.split_once(':') {
                None if entry.eq_ignore_ascii_case("bearer") => Ok(KeySource::Bearer),
                Some(("header", name)) if is_token(name) => Ok(KeySource::Header(name.to_ascii_lowercase())),
                Some(("query", name)) if !name.is_empty() && !name.contains(['&', '=', '#']) => {
                    Ok(KeySource::Query(name.to_owned()))
                }
                _ => Err(format!("key source {entry:?} must be `bearer`, `header:<name>` or `query:<name>`")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if sources.is_empty() {
            return Err("at least one key source is required".into());
        }
        Ok(Self(sources))
    }
}

fn is_token(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// What a request presents as its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Presented {
    /// No configured source is present.
    Absent,
    /// The value of the first present source (possibly empty, as in `Bearer ` with nothing after it).
    Key(String),
    /// The first present source cannot be read unambiguously: repeated (Envoy joins repeated
    /// headers with commas), mixed with another scheme, or badly percent-encoded. Denied as
    /// malformed, never guessed at.
    Unreadable,
}

/// The key found in a request, and every credential to strip before the request goes upstream.
#[derive(Debug, PartialEq, Eq)]
pub struct ExtractedKey {
    pub presented: Presented,
    /// Headers that carried a keygate credential, however spelled (lower-case names).
    pub headers_to_remove: Vec<String>,
    /// The request target as sent, byte for byte, less every query parameter that spells a
    /// credential; `None` when the query holds none.
    pub path_without_credentials: Option<String>,
}

/// Reads the key from the first configured source present in the request, and lists every
/// source present, under any spelling a web framework would accept, so that none reaches the
/// upstream. A source present only under another spelling (`_APIKEY` for `_apikey`, `x_api_key`
/// for `x-api-key`) is unreadable: keygate does not guess which the upstream would read.
pub fn extract_key(sources: &KeySources, headers: &HashMap<String, String>, target: &str) -> ExtractedKey {
    let mut extracted =
        ExtractedKey { presented: Presented::Absent, headers_to_remove: Vec::new(), path_without_credentials: None };
    let mut query_names = Vec::new();
    for source in &sources.0 {
        let found = match source {
            KeySource::Bearer => headers.get("authorization").and_then(|value| bearer_value(value)).inspect(|_| {
                extracted.headers_to_remove.push("authorization".into());
            }),
            KeySource::Header(name) => {
                let spellings: Vec<&String> =
                    headers.keys().filter(|present| same_header_name(present, name)).collect();
                extracted.headers_to_remove.extend(spellings.iter().map(|present| (*present).clone()));
                match (headers.get(name), spellings.len()) {
                    (_, 0) => None,
                    (Some(value), 1) if !value.contains(',') => Some(Presented::Key(value.trim().to_owned())),
                    _ => Some(Presented::Unreadable),
                }
            }
            KeySource::Query(name) => {
                query_names.push(name.as_str());
                match query_parameter(target, name).value {
                    QueryValue::Absent => None,
                    QueryValue::One(value) => Some(Presented::Key(value)),
                    QueryValue::Unreadable => Some(Presented::Unreadable),
                }
            }
        };
        if let (Presented::Absent, Some(found)) = (&extracted.presented, found) {
            extracted.presented = found;
        }
    }
    extracted.path_without_credentials = without_query_parameters(target, &query_names);
    // A credential keygate cannot strip byte for byte must not reach the upstream beside the
    // key it read elsewhere.
    if query_names.iter().any(|name| behind_a_semicolon(target, name)) {
        extracted.presented = Presented::Unreadable;
    }
    extracted
}

/// Whether two header names are one to a web framework: case never matters, and CGI-style
/// servers read `-` and `_` alike.
fn same_header_name(present: &str, configured: &str) -> bool {
    let normal = |byte: u8| if byte == b'_' { b'-' } else { byte.to_ascii_lowercase() };
    present.len() == configured.len() && present.bytes().zip(configured.bytes()).all(|(a, b)| normal(a) == normal(b))
}

/// The names a query parameter name can stand for in some web framework: percent-decoded (`+`
/// as a space), case folded (ASP.NET), cut at a NUL (PHP reads names as C strings), with or
/// without its leading spaces (PHP strips them), an array suffix such as `[]` dropped (PHP,
/// Rails), stray brackets around it dropped (Rack 2 reads `[siteId]` and `siteId]` as
/// `siteId`), and spaces, dots, dashes and pluses read as underscores (PHP). Empty when the
/// name does not decode.
fn canonical_parameter_names(raw: &str) -> Vec<String> {
    let Some(decoded) = percent_decode(raw, true) else { return Vec::new() };
    let decoded = decoded.to_lowercase();
    let decoded = decoded.split('\0').next().unwrap_or_default();
    let mut names = Vec::new();
    for spaced in [decoded, decoded.trim_start()] {
        let unbracketed = match spaced.find('[') {
            Some(bracket) if bracket > 0 && spaced.ends_with(']') => &spaced[..bracket],
            _ => spaced,
        };
        for candidate in [unbracketed, spaced.trim_matches(|c| c == '[' || c == ']')] {
            let name: String =
                candidate.chars().map(|c| if matches!(c, ' ' | '.' | '-' | '+') { '_' } else { c }).collect();
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// Whether a raw query parameter name spells `name` for some web framework.
fn spells(raw: &str, name: &str) -> bool {
    // An empty pair (`a=1&&b=2`, or no query at all) names nothing.
    if raw.is_empty() {
        return false;
    }
    let wanted = canonical_parameter_names(name);
    raw == name || canonical_parameter_names(raw).iter().any(|candidate| wanted.first() == Some(candidate))
}

/// The request target less every query parameter that spells one of `names`, every other byte
/// as sent (order, empty pairs, bare names, escapes); `None` when none is there.
fn without_query_parameters(target: &str, names: &[&str]) -> Option<String> {
    let (path, query) = target.split_once('?')?;
    let pairs: Vec<&str> = query.split('&').collect();
    let kept: Vec<&str> = pairs
        .iter()
        .copied()
        .filter(|pair| {
            let raw = pair.split_once('=').map_or(*pair, |(raw, _)| raw);
            !names.iter().any(|name| spells(raw, name))
        })
        .collect();
    if kept.len() == pairs.len() {
        return None;
    }
    Some(if kept.is_empty() { path.to_owned() } else { format!("{path}?{}", kept.join("&")) })
}

/// The credential of an `Authorization` value with the Bearer scheme; `None` when no part of
/// it is Bearer (another scheme belongs to someone else and is left alone). Several values
/// (joined by commas) of which one is Bearer are unreadable.
fn bearer_value(value: &str) -> Option<Presented> {
    let is_bearer = |part: &str| {
        let part = part.trim();
        let scheme = part.split([' ', '\t']).next().unwrap_or_default();
        scheme.eq_ignore_ascii_case("bearer")
    };
    let parts: Vec<&str> = value.split(',').collect();
    if !parts.iter().any(|part| is_bearer(part)) {
        return None;
    }
    if parts.len() > 1 {
        return Some(Presented::Unreadable);
    }
    let value = value.trim();
    let credential = value.split_once([' ', '\t']).map_or("", |(_, rest)| rest.trim());
    Some(Presented::Key(credential.to_owned()))
}

/// How a route names the site (or the tenant) of a request, from its `context_extensions`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SiteSource {
    /// The route touches no single site.
    None,
    /// `site`: a literal site id.
    Literal(String),
    /// `site_header`: the name of a request header.
    Header(String),
    /// `site_path`: a template such as `/v1/sites/{site}/` matched against the path; the
    /// placeholder is `{site}` (`{tenant}` for a tenant source).
    Path { template: String, placeholder: &'static str },
    /// `site_query`: a query parameter.
    Query(String),
}

impl SiteSource {
    /// The first of `site`, `site_header`, `site_path`, `site_query` that the route sets.
    pub fn from_context(context: &HashMap<String, String>) -> Self {
        Self::named(context, ["site", "site_header", "site_path", "site_query"], "{site}")
    }

    /// The route's tenant source: the first of `tenant`, `tenant_header`, `tenant_path` (with
    /// `{tenant}`), `tenant_query`.
    pub fn tenant_from_context(context: &HashMap<String, String>) -> Self {
        Self::named(context, ["tenant", "tenant_header", "tenant_path", "tenant_query"], "{tenant}")
    }

    /// The first of the literal, header, path and query extensions `keys` names that is set.
    fn named(context: &HashMap<String, String>, keys: [&str; 4], placeholder: &'static str) -> Self {
        let get = |key: &str| context.get(key).filter(|value| !value.is_empty()).cloned();
        let [literal, header, path, query] = keys;
        if let Some(site) = get(literal) {
            Self::Literal(site)
        } else if let Some(header) = get(header) {
            Self::Header(header.to_ascii_lowercase())
        } else if let Some(template) = get(path) {
            Self::Path { template, placeholder }
        } else if let Some(parameter) = get(query) {
            Self::Query(parameter)
        } else {
            Self::None
        }
    }
}

/// Why no site could be read from a request whose route names a site source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SiteError {
    /// The header, path segment or parameter is absent.
    Missing,
    /// It is present but is no valid site id (after percent-decoding).
    Invalid,
}

/// The site (or tenant) id of a request, `Ok(None)` when the route names no source.
pub fn extract_site(
    source: &SiteSource,
    headers: &HashMap<String, String>,
    path: &str,
) -> Result<Option<String>, SiteError> {
    let raw = match source {
        SiteSource::None => return Ok(None),
        SiteSource::Literal(site) => Some(site.clone()),
        // Under two spellings (`x-site-id` and `x_site_id`, one to CGI-style servers), the
        // upstream may read the other one.
        SiteSource::Header(name) if headers.keys().filter(|present| same_header_name(present, name)).count() > 1 => {
            return Err(SiteError::Invalid);
        }
        SiteSource::Header(name) => headers.get(name).map(|value| value.trim().to_owned()),
        SiteSource::Path { .. } if has_dot_segments(path_only(path)) => return Err(SiteError::Invalid),
        SiteSource::Path { template, placeholder } => match_path(template, placeholder, path_only(path)),
        SiteSource::Query(name) => match query_parameter(path, name).value {
            QueryValue::Absent => None,
            QueryValue::One(site) => Some(site),
            QueryValue::Unreadable => return Err(SiteError::Invalid),
        },
    };
    let site = raw.filter(|site| !site.is_empty()).ok_or(SiteError::Missing)?;
    let mut violations = Violations::default();
    violations.id("site", &site);
    violations.finish(Some(site)).map_err(|_| SiteError::Invalid)
}

fn path_only(target: &str) -> &str {
    target.split(['?', '#']).next().unwrap_or_default()
}

/// Matches `template` (literal text with one `{site}` placeholder) against the start of `path`;
/// the placeholder takes one path segment, percent-decoded.
fn match_path(template: &str, placeholder: &str, path: &str) -> Option<String> {
    let (before, after) = template.split_once(placeholder)?;
    let rest = path.strip_prefix(before)?;
    let end = rest.find('/').unwrap_or(rest.len());
    let (segment, remainder) = rest.split_at(end);
    let after_matches =
        if after.is_empty() { true } else { remainder.starts_with(after) || (after == "/" && remainder.is_empty()) };
    after_matches.then(|| percent_decode(segment, false)).flatten()
}

/// What the query holds for one parameter name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryValue {
    Absent,
    /// Exactly one occurrence, spelled exactly, with a value that decodes.
    One(String),
    /// Repeated, spelled with percent-escapes, or with a value that does not decode: backends
    /// disagree on what such a query means, so keygate decides nothing from it.
    Unreadable,
}

/// A parameter's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryParameter {
    pub value: QueryValue,
}

/// Looks up `name` in the query of a request target, under every spelling a web framework would
/// take for it (see [`canonical_parameter_names`]): one occurrence spelled exactly is read, and
/// anything else (`%5Fapikey`, `_APIKEY`, `_apikey[]` or a repeat) is unreadable.
pub fn query_parameter(target: &str, name: &str) -> QueryParameter {
    let query = query_of(target);
    let occurrences: Vec<(&str, &str)> = query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .filter(|(raw, _)| spells(raw, name))
        .collect();
    let value = match occurrences.as_slice() {
        _ if behind_a_semicolon(target, name) => QueryValue::Unreadable,
        [] => QueryValue::Absent,
        [(raw, value)] if *raw == name => percent_decode(value, true).map_or(QueryValue::Unreadable, QueryValue::One),
        _ => QueryValue::Unreadable,
    };
    QueryParameter { value }
}

/// The query of a request target, without a fragment.
fn query_of(target: &str) -> &str {
    let query = target.split_once('?').map_or("", |(_, query)| query);
    query.split('#').next().unwrap_or_default()
}

/// Whether `name` is spelled after a `;` inside one `&`-separated pair (`a=1;_apikey=KEY`,
/// `_apikey;=KEY`): frameworks that split on `;` too (Rack before 3, Go before 1.17, Python
/// before 3.9.2) read a parameter there that the others do not, so keygate can neither read
/// it nor strip it byte for byte: the request is unreadable.
fn behind_a_semicolon(target: &str, name: &str) -> bool {
    query_of(target).split('&').filter(|pair| pair.contains(';')).any(|pair| {
        pair.split(';').any(|part| {
            let raw = part.split_once('=').map_or(part, |(raw, _)| raw);
            spells(raw, name)
        })
    })
}

/// Whether a path has a `.` or `..` segment, as written or percent-encoded.
pub fn has_dot_segments(path: &str) -> bool {
    path.split('/').any(|segment| matches!(percent_decode(segment, false).as_deref(), Some(".") | Some("..")))
}

/// Percent-decodes `text`; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decode(text: &str, plus_is_space: bool) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => {
                let hex = text.get(index + 1..index + 3)?;
                decoded.push(u8::from_str_radix(hex, 16).ok()?);
                index += 3;
            }
            b'+' if plus_is_space => {
                decoded.push(b' ');
                index += 1;
            }
            byte => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(decoded).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn key(pairs: &[(&str, &str)], path: &str) -> Presented {
        extract_key(&KeySources::default(), &headers(pairs), path).presented
    }

    fn found(value: &str) -> Presented {
        Presented::Key(value.to_owned())
    }

    #[test]
    fn the_first_present_source_wins() {
        assert_eq!(key(&[("authorization", "Bearer aaa"), ("x-api-key", "bbb")], "/x?_apikey=ccc"), found("aaa"));
        assert_eq!(key(&[("x-api-key", "bbb")], "/x?_apikey=ccc"), found("bbb"));
        assert_eq!(key(&[], "/x?a=1&_apikey=ccc"), found("ccc"));
        assert_eq!(key(&[], "/x"), Presented::Absent);
    }

    #[test]
    fn every_credential_present_is_stripped() {
        let extracted = extract_key(
            &KeySources::default(),
            &headers(&[("authorization", "Bearer a"), ("x-api-key", "b")]),
            "/x?_apikey=c",
        );
        assert_eq!(extracted.headers_to_remove, ["authorization", "x-api-key"]);
        assert_eq!(extracted.path_without_credentials.as_deref(), Some("/x"));
    }

    #[test]
    fn the_query_reaches_the_upstream_as_sent_less_the_credential() {
        let path = |target: &str| {
            extract_key(&KeySources::default(), &HashMap::new(), target).path_without_credentials.unwrap()
        };
        assert_eq!(path("/v1/stats?b=2&siteId=s&a=1&_apikey=KEY"), "/v1/stats?b=2&siteId=s&a=1");
        assert_eq!(path("/x?&flag&_apikey=KEY&&x=1&q=a%20b+c"), "/x?&flag&&x=1&q=a%20b+c");
        assert_eq!(path("/x?_apikey=KEY"), "/x");
        assert_eq!(path("/x?_apikey=a&_APIKEY=b&z"), "/x?z");
        assert_eq!(extract_key(&KeySources::default(), &HashMap::new(), "/x?a=1").path_without_credentials, None);
    }

    #[test]
    fn every_spelling_of_a_credential_is_stripped_and_never_read() {
        let bearer = [("authorization", "Bearer k")];
        for spelling in [
            "_APIKEY",
            "_ApiKey",
            "%5Fapikey",
            "_api%4Bey",
            "_apikey[]",
            "_apikey%5B%5D",
            "_apikey[0]",
            ".apikey",
            "%20apikey",
            "+apikey",
            "-apikey",
            "%20_apikey",
            "+_apikey",
            "_apikey%00",
            "_apikey%00x",
            "[_apikey]",
            "]_apikey",
            "_apikey]",
            "_apikey%5D",
        ] {
            let target = format!("/x?a=1&{spelling}=LEAK&b=2");
            let alone = extract_key(&KeySources::default(), &HashMap::new(), &target);
            assert_eq!(alone.presented, Presented::Unreadable, "{spelling} alone is not guessed at");
            let with_bearer = extract_key(&KeySources::default(), &headers(&bearer), &target);
            assert_eq!(with_bearer.presented, found("k"), "{spelling} next to a Bearer");
            assert_eq!(with_bearer.path_without_credentials.as_deref(), Some("/x?a=1&b=2"), "{spelling} is stripped");
        }
        for header in ["x_api_key", "X-Api-Key", "x_API-key"] {
            let extracted = extract_key(&KeySources::default(), &headers(&[(header, "LEAK")]), "/");
            assert_eq!(extracted.headers_to_remove, [header]);
            assert_eq!(extracted.presented, if header == "x-api-key" { found("LEAK") } else { Presented::Unreadable });
        }
        let both = extract_key(&KeySources::default(), &headers(&[("x-api-key", "a"), ("x_api_key", "b")]), "/");
        assert_eq!(both.presented, Presented::Unreadable);
        assert_eq!(both.headers_to_remove.len(), 2);
        // Behind a `;` (a separator to some frameworks) a credential cannot be stripped byte for
        // byte: the request is refused, also next to a Bearer key.
        for target in ["/x?a=1;_apikey=LEAK", "/x?_apikey;=LEAK", "/x?a=1&b=2;_APIKEY=LEAK&c=3"] {
            let with_bearer = extract_key(&KeySources::default(), &headers(&bearer), target);
            assert_eq!(with_bearer.presented, Presented::Unreadable, "{target}");
        }
        let harmless = extract_key(&KeySources::default(), &headers(&bearer), "/x?a=1;b=2");
        assert_eq!((harmless.presented, harmless.path_without_credentials), (found("k"), None));
        // Names that merely contain the credential's name are someone else's.
        for other in ["x_apikey", "_apikeys", "apikey"] {
            let extracted = extract_key(&KeySources::default(), &HashMap::new(), &format!("/x?{other}=v"));
            assert_eq!(extracted.presented, Presented::Absent, "{other}");
            assert_eq!(extracted.path_without_credentials, None, "{other}");
        }
    }

    #[test]
    fn hostile_authorization_values() {
        assert_eq!(key(&[("authorization", "bEaReR   aaa  ")], "/"), found("aaa"));
        assert_eq!(key(&[("authorization", "Bearer")], "/"), found(""), "Bearer with no key is an empty key");
        assert_eq!(key(&[("authorization", "Bearer ")], "/"), found(""));
        assert_eq!(key(&[("authorization", "")], "/"), Presented::Absent);
        // Several Authorization headers arrive joined by commas: never guessed at.
        assert_eq!(key(&[("authorization", "Bearer a,Bearer b")], "/"), Presented::Unreadable);
        let mixed = extract_key(&KeySources::default(), &headers(&[("authorization", "Basic eA==,Bearer k")]), "/");
        assert_eq!(mixed.presented, Presented::Unreadable);
        assert_eq!(mixed.headers_to_remove, ["authorization"], "a Bearer part is never forwarded");
        // Another scheme alone is not ours: fall through to the next source, and leave the header be.
        let extracted = extract_key(
            &KeySources::default(),
            &headers(&[("authorization", "Basic dXNlcjpwdw=="), ("x-api-key", "k")]),
            "/",
        );
        assert_eq!(extracted.presented, found("k"));
        assert_eq!(extracted.headers_to_remove, ["x-api-key"]);
        assert_eq!(key(&[("x-api-key", "a, b")], "/"), Presented::Unreadable);
        let huge = "k".repeat(100_000);
        assert_eq!(key(&[("x-api-key", &huge)], "/"), found(&huge));
        assert_eq!(key(&[("authorization", &format!("Bearer {huge}"))], "/"), found(&huge));
    }

    #[test]
    fn query_keys_are_exact_single_and_decodable() {
        assert_eq!(key(&[], "/x?_apikey=kg%5Flive"), found("kg_live"));
        assert_eq!(key(&[], "/x?x_apikey=nope"), Presented::Absent);
        assert_eq!(key(&[], "/x?_apikey"), found(""));
        for unreadable in
            ["/x?_apikey=%zz", "/x?_apikey=%ff", "/x?_apikey=a&_apikey=b", "/x?%5Fapikey=k", "/x?_api%6Bey=k"]
        {
            let extracted = extract_key(&KeySources::default(), &HashMap::new(), unreadable);
            assert_eq!(extracted.presented, Presented::Unreadable, "{unreadable}");
            assert_eq!(extracted.path_without_credentials.as_deref(), Some("/x"), "{unreadable} is stripped");
        }
    }

    #[test]
    fn key_sources_are_configurable() {
        let sources = KeySources::parse("header:X-Token, query:key").unwrap();
        let extracted = extract_key(&sources, &headers(&[("authorization", "Bearer a"), ("x-token", "t")]), "/?key=q");
        assert_eq!(extracted.presented, found("t"));
        assert_eq!(extracted.headers_to_remove, ["x-token"]);
        for bad in ["", "cookie:x", "header:", "header:a b", "query:a&b"] {
            assert!(KeySources::parse(bad).is_err(), "{bad}");
        }
    }

    fn site(context: &[(&str, &str)], headers_in: &[(&str, &str)], path: &str) -> Result<Option<String>, SiteError> {
        let context: HashMap<_, _> = context.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        extract_site(&SiteSource::from_context(&context), &headers(headers_in), path)
    }

    #[test]
    fn the_site_comes_from_the_first_named_source() {
        assert_eq!(
            site(&[("site", "shop"), ("site_header", "x-site")], &[("x-site", "h")], "/"),
            Ok(Some("shop".into()))
        );
        assert_eq!(site(&[("site_header", "X-Site")], &[("x-site", "h")], "/"), Ok(Some("h".into())));
        assert_eq!(
            site(&[("site_path", "/v1/sites/{site}/")], &[], "/v1/sites/shop/events?x=1"),
            Ok(Some("shop".into()))
        );
        assert_eq!(site(&[("site_path", "/v1/sites/{site}/")], &[], "/v1/sites/shop"), Ok(Some("shop".into())));
        assert_eq!(site(&[("site_query", "siteId")], &[], "/v1/stats?siteId=shop&x=2"), Ok(Some("shop".into())));
        assert_eq!(site(&[], &[], "/anything"), Ok(None));
    }

    #[test]
    fn missing_or_hostile_sites_are_errors() {
        let path = [("site_path", "/v1/sites/{site}/")];
        assert_eq!(site(&[("site_header", "x-site")], &[], "/"), Err(SiteError::Missing));
        assert_eq!(site(&path, &[], "/v2/other"), Err(SiteError::Missing));
        assert_eq!(site(&path, &[], "/v1/sites//events"), Err(SiteError::Missing));
        assert_eq!(site(&[("site_query", "siteId")], &[], "/v1/stats"), Err(SiteError::Missing));
        // Percent-encoding is decoded, and what it hides is validated.
        assert_eq!(site(&path, &[], "/v1/sites/shop%2Eexample/x"), Ok(Some("shop.example".into())));
        assert_eq!(site(&path, &[], "/v1/sites/a%2Fb/x"), Err(SiteError::Invalid));
        assert_eq!(site(&path, &[], "/v1/sites/%E0%A4/x"), Err(SiteError::Missing));
        // Dot segments could make a backend serve another site than the one checked.
        for traversal in
            ["/v1/sites/shop/../blog/x", "/v1/sites/shop/%2e%2e/blog/x", "/v1/sites/../x", "/v1/sites/./shop/"]
        {
            assert_eq!(site(&path, &[], traversal), Err(SiteError::Invalid), "{traversal}");
        }
        assert_eq!(site(&[("site_query", "siteId")], &[], "/s?siteId=a+b"), Err(SiteError::Invalid));
        assert_eq!(site(&[("site_query", "siteId")], &[], "/s?siteId=shop&siteId=blog"), Err(SiteError::Invalid));
        assert_eq!(site(&[("site_query", "siteId")], &[], "/s?site%49d=blog"), Err(SiteError::Invalid));
        // Another spelling next to the one keygate reads could be the one the upstream reads.
        assert_eq!(site(&[("site_query", "siteId")], &[], "/s?siteId=shop&SITEID=blog"), Err(SiteError::Invalid));
        assert_eq!(site(&[("site_query", "siteId")], &[], "/s?siteId=shop&siteId[]=blog"), Err(SiteError::Invalid));
        // PHP strips leading spaces and stops at a NUL; Rack 2 drops stray brackets.
        for spelling in ["%20siteId", "+siteId", "siteId%00x", "[siteId]", "siteId]", "]siteId"] {
            let target = format!("/s?siteId=shop&{spelling}=blog");
            assert_eq!(site(&[("site_query", "siteId")], &[], &target), Err(SiteError::Invalid), "{spelling}");
        }
        assert_eq!(site(&[("site_header", "x-site")], &[("x-site", &"s".repeat(65))], "/"), Err(SiteError::Invalid));
        assert_eq!(site(&[("site_header", "x-site")], &[("x-site", "a,b")], "/"), Err(SiteError::Invalid));
        let two_spellings = [("x-site", "shop"), ("x_site", "blog")];
        assert_eq!(site(&[("site_header", "x-site")], &two_spellings, "/"), Err(SiteError::Invalid));
        for target in ["/s?siteId=shop&x=1;siteId=blog", "/s?siteId=shop;x=1", "/s?x=1;siteid=blog"] {
            assert_eq!(site(&[("site_query", "siteId")], &[], target), Err(SiteError::Invalid), "{target}");
        }
        assert_eq!(site(&[("site_query", "siteId")], &[], "/s?siteId=shop&x=a;b"), Ok(Some("shop".into())));
    }
}
