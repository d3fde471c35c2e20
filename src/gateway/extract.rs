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

/// The key found in a request, and every credential to strip before the request goes upstream.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExtractedKey {
    /// The key from the first source that is present; `None` when no source is present.
    /// Present but empty (`Bearer ` with nothing after it) is `Some("")`.
    pub key: Option<String>,
    /// Headers that carried a keygate credential (lower-case names).
    pub headers_to_remove: Vec<String>,
    /// Query parameters that carried a keygate credential.
    pub query_parameters_to_remove: Vec<String>,
}

/// Reads the key from the first configured source present in the request. Several values of one
/// header arrive joined by commas; such a value never parses as a key, so it is denied as
/// malformed rather than guessed at.
pub fn extract_key(sources: &KeySources, headers: &HashMap<String, String>, path: &str) -> ExtractedKey {
    let mut extracted = ExtractedKey::default();
    for source in &sources.0 {
        let found = match source {
            KeySource::Bearer => headers.get("authorization").and_then(|value| bearer_value(value)).inspect(|_| {
                extracted.headers_to_remove.push("authorization".into());
            }),
            KeySource::Header(name) => headers.get(name).map(|value| {
                extracted.headers_to_remove.push(name.clone());
                value.trim().to_owned()
            }),
            KeySource::Query(name) => query_parameter(path, name).inspect(|_| {
                extracted.query_parameters_to_remove.push(name.clone());
            }),
        };
        if extracted.key.is_none() {
            extracted.key = found;
        }
    }
    extracted
}

/// The credential of an `Authorization` value whose scheme is Bearer; `None` for other schemes
/// (which belong to someone else and are left alone).
fn bearer_value(value: &str) -> Option<String> {
    let value = value.trim();
    let (scheme, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim().to_owned())
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
        SiteSource::Path(template) => match_path(template, path_only(path)),
        SiteSource::Query(name) => query_parameter(path, name),
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

/// The value of the first `name` parameter in the query of a request target, percent-decoded
/// (`+` is a space, as in forms).
pub fn query_parameter(target: &str, name: &str) -> Option<String> {
    let query = target.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or_default();
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key, true).as_deref() == Some(name)).then(|| percent_decode(value, true)).flatten()
    })
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

    fn key(pairs: &[(&str, &str)], path: &str) -> Option<String> {
        extract_key(&KeySources::default(), &headers(pairs), path).key
    }

    #[test]
    fn the_first_present_source_wins() {
        assert_eq!(
            key(&[("authorization", "Bearer aaa"), ("x-api-key", "bbb")], "/x?_apikey=ccc").as_deref(),
            Some("aaa")
        );
        assert_eq!(key(&[("x-api-key", "bbb")], "/x?_apikey=ccc").as_deref(), Some("bbb"));
        assert_eq!(key(&[], "/x?a=1&_apikey=ccc").as_deref(), Some("ccc"));
        assert_eq!(key(&[], "/x"), None);
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
        assert_eq!(key(&[("authorization", "bEaReR   aaa  ")], "/").as_deref(), Some("aaa"));
        assert_eq!(key(&[("authorization", "Bearer")], "/").as_deref(), Some(""), "Bearer with no key is an empty key");
        assert_eq!(key(&[("authorization", "Bearer ")], "/").as_deref(), Some(""));
        assert_eq!(key(&[("authorization", "")], "/"), None);
        // Two Authorization headers arrive joined; the joined value is never a valid key.
        assert_eq!(key(&[("authorization", "Bearer a,Bearer b")], "/").as_deref(), Some("a,Bearer b"));
        // Another scheme is not ours: fall through to the next source, and leave the header be.
        let extracted = extract_key(
            &KeySources::default(),
            &headers(&[("authorization", "Basic dXNlcjpwdw=="), ("x-api-key", "k")]),
            "/",
        );
        assert_eq!(extracted.key.as_deref(), Some("k"));
        assert_eq!(extracted.headers_to_remove, ["x-api-key"]);
        let huge = "k".repeat(100_000);
        assert_eq!(key(&[("x-api-key", &huge)], "/").map(|k| k.len()), Some(100_000));
    }

    #[test]
    fn query_keys_are_percent_decoded_and_exact() {
        assert_eq!(key(&[], "/x?_apikey=kg%5Flive").as_deref(), Some("kg_live"));
        assert_eq!(key(&[], "/x?_APIKEY=nope"), None);
        assert_eq!(key(&[], "/x?x_apikey=nope"), None);
        assert_eq!(key(&[], "/x?_apikey=%zz"), None, "a broken escape is not a key");
        assert_eq!(key(&[], "/x?_apikey").as_deref(), Some(""));
    }

    #[test]
    fn key_sources_are_configurable() {
        let sources = KeySources::parse("header:X-Token, query:key").unwrap();
        let extracted = extract_key(&sources, &headers(&[("authorization", "Bearer a"), ("x-token", "t")]), "/?key=q");
        assert_eq!(extracted.key.as_deref(), Some("t"));
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
        assert_eq!(site(&[("site_header", "x-site")], &[], "/"), Err(SiteError::Missing));
        assert_eq!(site(&[("site_path", "/v1/sites/{site}/")], &[], "/v2/other"), Err(SiteError::Missing));
        assert_eq!(site(&[("site_path", "/v1/sites/{site}/")], &[], "/v1/sites//events"), Err(SiteError::Missing));
        assert_eq!(site(&[("site_query", "siteId")], &[], "/v1/stats"), Err(SiteError::Missing));
        // Percent-encoding is decoded, and what it hides is validated.
        assert_eq!(
            site(&[("site_path", "/v1/sites/{site}/")], &[], "/v1/sites/shop%2Eexample/x"),
            Ok(Some("shop.example".into()))
        );
        assert_eq!(site(&[("site_path", "/v1/sites/{site}/")], &[], "/v1/sites/a%2Fb/x"), Err(SiteError::Invalid));
        assert_eq!(site(&[("site_path", "/v1/sites/{site}/")], &[], "/v1/sites/%E0%A4/x"), Err(SiteError::Missing));
        assert_eq!(site(&[("site_query", "siteId")], &[], "/s?siteId=a+b"), Err(SiteError::Invalid));
        assert_eq!(site(&[("site_header", "x-site")], &[("x-site", &"s".repeat(65))], "/"), Err(SiteError::Invalid));
        assert_eq!(site(&[("site_header", "x-site")], &[("x-site", "a,b")], "/"), Err(SiteError::Invalid));
    }
}
