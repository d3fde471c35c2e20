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
    /// Headers that carried a keygate credential (lower-case names).
    pub headers_to_remove: Vec<String>,
    /// Query parameters that carried a keygate credential, by their raw names (Envoy removes
    /// parameters by raw name).
    pub query_parameters_to_remove: Vec<String>,
}

/// Reads the key from the first configured source present in the request, and lists every
/// source present so that none reaches the upstream.
pub fn extract_key(sources: &KeySources, headers: &HashMap<String, String>, target: &str) -> ExtractedKey {
    let mut extracted = ExtractedKey {
        presented: Presented::Absent,
        headers_to_remove: Vec::new(),
        query_parameters_to_remove: Vec::new(),
    };
    for source in &sources.0 {
        let found = match source {
            KeySource::Bearer => headers.get("authorization").and_then(|value| bearer_value(value)).inspect(|_| {
                extracted.headers_to_remove.push("authorization".into());
            }),
            KeySource::Header(name) => headers.get(name).map(|value| {
                extracted.headers_to_remove.push(name.clone());
                if value.contains(',') { Presented::Unreadable } else { Presented::Key(value.trim().to_owned()) }
            }),
            KeySource::Query(name) => {
                let parameter = query_parameter(target, name);
                extracted.query_parameters_to_remove.extend(parameter.raw_names);
                match parameter.value {
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
    extracted
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

/// How a route names the site of a request, from its `context_extensions`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SiteSource {
    /// The route touches no single site.
    None,
    /// `site`: a literal site id.
    Literal(String),
    /// `site_header`: the name of a request header.
    Header(String),
    /// `site_path`: a template such as `/v1/sites/{site}/` matched against the path.
    Path(String),
    /// `site_query`: a query parameter.
    Query(String),
}

impl SiteSource {
    /// The first of `site`, `site_header`, `site_path`, `site_query` that the route sets.
    pub fn from_context(context: &HashMap<String, String>) -> Self {
        let get = |name: &str| context.get(name).filter(|value| !value.is_empty()).cloned();
        if let Some(site) = get("site") {
            Self::Literal(site)
        } else if let Some(header) = get("site_header") {
            Self::Header(header.to_ascii_lowercase())
        } else if let Some(template) = get("site_path") {
            Self::Path(template)
        } else if let Some(parameter) = get("site_query") {
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

/// The site id of a request, `Ok(None)` when the route touches no single site.
pub fn extract_site(
    source: &SiteSource,
    headers: &HashMap<String, String>,
    path: &str,
) -> Result<Option<String>, SiteError> {
    let raw = match source {
        SiteSource::None => return Ok(None),
        SiteSource::Literal(site) => Some(site.clone()),
        SiteSource::Header(name) => headers.get(name).map(|value| value.trim().to_owned()),
        SiteSource::Path(_) if has_dot_segments(path_only(path)) => return Err(SiteError::Invalid),
        SiteSource::Path(template) => match_path(template, path_only(path)),
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
fn match_path(template: &str, path: &str) -> Option<String> {
    let (before, after) = template.split_once("{site}")?;
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

/// A parameter's value and the raw names under which it occurs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryParameter {
    pub value: QueryValue,
    pub raw_names: Vec<String>,
}

/// Looks up `name` in the query of a request target. Names are matched both as written and
/// percent-decoded, so `%5Fapikey` cannot slip past a check of `_apikey`.
pub fn query_parameter(target: &str, name: &str) -> QueryParameter {
    let query = target.split_once('?').map_or("", |(_, query)| query);
    let query = query.split('#').next().unwrap_or_default();
    let occurrences: Vec<(&str, &str)> = query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .filter(|(raw, _)| *raw == name || percent_decode(raw, true).as_deref() == Some(name))
        .collect();
    let raw_names = occurrences.iter().map(|(raw, _)| (*raw).to_owned()).collect();
    let value = match occurrences.as_slice() {
        [] => QueryValue::Absent,
        [(raw, value)] if *raw == name => percent_decode(value, true).map_or(QueryValue::Unreadable, QueryValue::One),
        _ => QueryValue::Unreadable,
    };
    QueryParameter { value, raw_names }
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
        assert_eq!(extracted.query_parameters_to_remove, ["_apikey"]);
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
        assert_eq!(key(&[], "/x?_APIKEY=nope"), Presented::Absent);
        assert_eq!(key(&[], "/x?x_apikey=nope"), Presented::Absent);
        assert_eq!(key(&[], "/x?_apikey"), found(""));
        for unreadable in
            ["/x?_apikey=%zz", "/x?_apikey=%ff", "/x?_apikey=a&_apikey=b", "/x?%5Fapikey=k", "/x?_api%6Bey=k"]
        {
            let extracted = extract_key(&KeySources::default(), &HashMap::new(), unreadable);
            assert_eq!(extracted.presented, Presented::Unreadable, "{unreadable}");
            assert!(!extracted.query_parameters_to_remove.is_empty(), "{unreadable} is stripped");
        }
        let encoded = extract_key(&KeySources::default(), &HashMap::new(), "/x?%5Fapikey=k&_apikey=j");
        assert_eq!(
            encoded.query_parameters_to_remove,
            ["%5Fapikey", "_apikey"],
            "removed by raw name, as Envoy matches"
        );
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
        assert_eq!(site(&[("site_header", "x-site")], &[("x-site", &"s".repeat(65))], "/"), Err(SiteError::Invalid));
        assert_eq!(site(&[("site_header", "x-site")], &[("x-site", "a,b")], "/"), Err(SiteError::Invalid));
    }
}
