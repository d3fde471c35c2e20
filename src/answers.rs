//! What a denied client is told, and what the upstream is told of an allowed one: per deny
//! reason an HTTP status and a message template, the JSON body Envoy answers with, and the names
//! of the identity headers. keygate's own answers are the defaults; a deployment that takes over
//! a product's API sets the product's answers in the `[answers]` tables of its configuration
//! file, so that the product's published documentation stays true word for word.
//!
//! `Authorize.Check` and Envoy's Check give the same status and message for the same deny.

use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use crate::domain::decision::DenyReason;
use crate::limits::RateLimitState;

/// The name under which unknown, revoked and malformed keys are configured together: they share
/// one public answer, so that nobody can probe which keys exist.
pub const KEY_INVALID: &str = "KEY_INVALID";

/// Placeholders a message may hold.
const MESSAGE_PLACEHOLDERS: [&str; 2] = ["scope", "site_id"];
/// Placeholders the body may hold; see [`Answers::body`].
const BODY_PLACEHOLDERS: [&str; 10] =
    ["message", "code", "status", "scope", "site_id", "limit", "remaining", "reset", "retry_after", "window"];

/// The `[answers]` table of the configuration file, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswersFile {
    /// The Envoy deny body: JSON text with placeholders (see [`Answers::body`]).
    pub body: Option<String>,
    /// Names of the identity headers the upstream receives on an allow.
    #[serde(default)]
    pub headers: HeadersFile,
    /// Per deny reason (`KEY_MISSING`, `KEY_INVALID`, `KEY_EXPIRED`, `SCOPE_MISSING`,
    /// `SITE_FORBIDDEN`, `PLAN_REQUIRED`, `RATE_LIMITED`, `QUOTA_EXCEEDED`, `TENANT_MISMATCH`):
    /// status and message.
    #[serde(default)]
    pub deny: HashMap<String, ReasonFile>,
}

/// `[answers.headers]`: header names, each optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersFile {
    pub tenant_id: Option<String>,
    pub key_id: Option<String>,
    pub scopes: Option<String>,
    pub site_id: Option<String>,
}

/// `[answers.deny.<REASON>]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasonFile {
    /// HTTP status, 400 to 599.
    pub status: Option<u16>,
    /// Message template; `{scope}` and `{site_id}` are replaced, `{{` and `}}` are braces.
    pub message: Option<String>,
}

/// The identity headers keygate sets on allowed requests (always overwritten, so a client cannot
/// forge them); lowercase names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityHeaders {
    pub tenant_id: String,
    pub key_id: String,
    pub scopes: String,
    /// Set to the approved site when the route names one; removed otherwise.
    pub site_id: String,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        use crate::gateway::{KEY_ID_HEADER, SCOPES_HEADER, SITE_HEADER, TENANT_HEADER};
        Self {
            tenant_id: TENANT_HEADER.into(),
            key_id: KEY_ID_HEADER.into(),
            scopes: SCOPES_HEADER.into(),
            site_id: SITE_HEADER.into(),
        }
    }
}

/// A message with placeholders, parsed once.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Template(Vec<Piece>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Placeholder(String),
}

impl Template {
    /// Parses `text`; a placeholder not in `allowed`, or an unmatched brace, is an error.
    fn parse(text: &str, allowed: &[&str]) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(character) = chars.next() {
            match character {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for next in chars.by_ref() {
                        if next == '}' {
                            closed = true;
                            break;
                        }
                        name.push(next);
                    }
                    if !closed {
                        return Err("a lone `{`: write {{ for a brace".into());
                    }
                    if !allowed.contains(&name.as_str()) {
                        return Err(format!(
                            "{{{name}}} is no placeholder here; the placeholders are {}; write {{{{ and }}}} for braces",
                            allowed.iter().map(|name| format!("{{{name}}}")).collect::<Vec<_>>().join(", ")
                        ));
                    }
                    if !literal.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Placeholder(name));
                }
                '}' => return Err("a lone `}`: write }} for a brace".into()),
                other => literal.push(other),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(Self(pieces))
    }

    /// Whether the template holds the placeholder `name`.
    fn uses(&self, name: &str) -> bool {
        self.0.iter().any(|piece| matches!(piece, Piece::Placeholder(held) if held == name))
    }

    /// The one placeholder the whole template is, if it is exactly one.
    fn sole_placeholder(&self) -> Option<&str> {
        match self.0.as_slice() {
            [Piece::Placeholder(name)] => Some(name),
            _ => None,
        }
    }

    fn render(&self, value_of: impl Fn(&str) -> Option<String>) -> String {
        self.0
            .iter()
            .map(|piece| match piece {
                Piece::Text(text) => text.clone(),
                Piece::Placeholder(name) => value_of(name).unwrap_or_default(),
            })
            .collect()
    }
}

/// A configured answer of one deny reason.
#[derive(Clone, Debug, Default)]
struct ReasonAnswer {
    status: Option<u16>,
    message: Option<Template>,
}

/// What one deny is about, for the templates.
pub struct DenyFacts<'a> {
    pub reason: DenyReason,
    /// The scope the endpoint requires (empty when unknown).
    pub scope: &'a str,
    /// The site the request touches (empty when none).
    pub site_id: &'a str,
    /// The limit that denied, for RATE_LIMITED and QUOTA_EXCEEDED.
    pub limit: Option<&'a RateLimitState>,
    pub now: DateTime<Utc>,
}

/// Every answer keygate gives, validated at start.
#[derive(Clone, Default)]
pub struct Answers {
    reasons: HashMap<DenyReason, ReasonAnswer>,
    /// `None`: `{"error": message, "code": code}`.
    body: Option<BodyNode>,
    pub headers: IdentityHeaders,
}

impl fmt::Debug for Answers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Answers")
            .field("configured_reasons", &self.reasons.len())
            .field("body", &self.body.as_ref().map(|body| body.source().to_string()))
            .field("headers", &self.headers)
            .finish()
    }
}

/// The reasons a name in `[answers.deny]` stands for.
fn reasons_named(name: &str) -> Result<&'static [DenyReason], String> {
    Ok(match name {
        "KEY_MISSING" => &[DenyReason::KeyMissing],
        KEY_INVALID => &[DenyReason::KeyUnknown, DenyReason::KeyRevoked, DenyReason::KeyMalformed],
        "KEY_EXPIRED" => &[DenyReason::KeyExpired],
        "SCOPE_MISSING" => &[DenyReason::ScopeMissing],
        "SITE_FORBIDDEN" => &[DenyReason::SiteForbidden],
        "PLAN_REQUIRED" => &[DenyReason::PlanRequired],
        "RATE_LIMITED" => &[DenyReason::RateLimited],
        "QUOTA_EXCEEDED" => &[DenyReason::QuotaExceeded],
        "TENANT_MISMATCH" => &[DenyReason::TenantMismatch],
        "KEY_UNKNOWN" | "KEY_REVOKED" | "KEY_MALFORMED" => {
            return Err(format!(
                "{name}: configure KEY_INVALID, which answers unknown, revoked and malformed keys alike so that \
                 nobody can probe which keys exist"
            ));
        }
        other => {
            return Err(format!(
                "{other:?} is no deny reason; the reasons are KEY_MISSING, KEY_INVALID, KEY_EXPIRED, SCOPE_MISSING, \
                 SITE_FORBIDDEN, PLAN_REQUIRED, RATE_LIMITED, QUOTA_EXCEEDED, TENANT_MISMATCH"
            ));
        }
    })
}

/// A header name the upstream can receive: an RFC 9110 token, lowercase (HTTP/2), and none that
/// would change how the request is routed or authenticated.
fn header_name(field: &str, name: &str) -> Result<String, String> {
    let lower = name.to_ascii_lowercase();
    let token = !lower.is_empty()
        && lower.len() <= 64
        && lower.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte));
    if !token {
        return Err(format!("answers.headers.{field}: {name:?} is no header name (letters, digits and -, at most 64)"));
    }
    // Routing, credentials, framing, and the hop-by-hop headers of RFC 9110 section 7.6.1.
    let reserved = [
        "host",
        "authorization",
        "proxy-authorization",
        "proxy-authenticate",
        "cookie",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ];
    if reserved.contains(&lower.as_str()) {
        return Err(format!("answers.headers.{field}: {name:?} is a header keygate must not overwrite"));
    }
    Ok(lower)
}

/// The body template, parsed once at start: JSON whose strings are templates.
#[derive(Clone, Debug)]
enum BodyNode {
    Text(Template),
    Array(Vec<BodyNode>),
    Object(Vec<(String, BodyNode)>),
    /// Numbers, booleans, null.
    Literal(Value),
}

impl BodyNode {
    /// Parses every string of `value` as a template of [`BODY_PLACEHOLDERS`].
    fn parse(value: &Value) -> Result<Self, String> {
        Ok(match value {
            Value::String(text) => Self::Text(Template::parse(text, &BODY_PLACEHOLDERS)?),
            Value::Array(items) => Self::Array(items.iter().map(Self::parse).collect::<Result<_, _>>()?),
            Value::Object(fields) => Self::Object(
                fields
                    .iter()
                    .map(|(name, field)| Ok((name.clone(), Self::parse(field)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => Self::Literal(other.clone()),
        })
    }

    /// `None` when the node is one placeholder that does not apply: its field is left out.
    fn render(&self, value_of: &dyn Fn(&str) -> Option<Value>) -> Option<Value> {
        match self {
            Self::Text(template) => match template.sole_placeholder() {
                Some(name) => value_of(name),
                None => Some(Value::String(template.render(|name| {
                    value_of(name).map(|value| match value {
                        Value::String(text) => text,
                        other => other.to_string(),
                    })
                }))),
            },
            Self::Array(items) => Some(Value::Array(items.iter().filter_map(|item| item.render(value_of)).collect())),
            Self::Object(fields) => Some(Value::Object(
                fields.iter().filter_map(|(name, field)| Some((name.clone(), field.render(value_of)?))).collect(),
            )),
            Self::Literal(value) => Some(value.clone()),
        }
    }

    /// The template as JSON, placeholders written back, for `keygate config check`.
    fn source(&self) -> Value {
        match self {
            Self::Text(template) => Value::String(template.render(|name| Some(format!("{{{name}}}")))),
            Self::Array(items) => Value::Array(items.iter().map(Self::source).collect()),
            Self::Object(fields) => {
                Value::Object(fields.iter().map(|(name, field)| (name.clone(), field.source())).collect())
            }
            Self::Literal(value) => value.clone(),
        }
    }
}

impl Answers {
    /// Validates the `[answers]` table. Errors name the offending entry.
    pub fn from_file(file: &AnswersFile) -> Result<Self, String> {
        let mut reasons = HashMap::new();
        for (name, answer) in &file.deny {
            let covered = reasons_named(name).map_err(|error| format!("answers.deny.{error}"))?;
            if let Some(status) = answer.status
                && !(400..=599).contains(&status)
            {
                return Err(format!("answers.deny.{name}.status: {status} is no error status (400 to 599)"));
            }
            let message = answer
                .message
                .as_deref()
                .map(|text| Template::parse(text, &MESSAGE_PLACEHOLDERS))
                .transpose()
                .map_err(|error| format!("answers.deny.{name}.message: {error}"))?;
            if message.as_ref().is_some_and(|message| message.0.is_empty()) {
                return Err(format!("answers.deny.{name}.message: must not be empty"));
            }
            for reason in covered {
                reasons.insert(*reason, ReasonAnswer { status: answer.status, message: message.clone() });
            }
        }
        let body = match &file.body {
            None => None,
            Some(text) => {
                let value: Value = serde_json::from_str(text)
                    .map_err(|error| format!("answers.body: not JSON ({error}); placeholders go inside strings"))?;
                if !value.is_object() {
                    return Err("answers.body: must be a JSON object".into());
                }
                Some(BodyNode::parse(&value).map_err(|error| format!("answers.body: {error}"))?)
            }
        };
        let defaults = IdentityHeaders::default();
        let named = |field: &str, given: &Option<String>, default: &str| match given {
            Some(name) => header_name(field, name),
            None => Ok(default.to_owned()),
        };
        let headers = IdentityHeaders {
            tenant_id: named("tenant_id", &file.headers.tenant_id, &defaults.tenant_id)?,
            key_id: named("key_id", &file.headers.key_id, &defaults.key_id)?,
            scopes: named("scopes", &file.headers.scopes, &defaults.scopes)?,
            site_id: named("site_id", &file.headers.site_id, &defaults.site_id)?,
        };
        let names = [&headers.tenant_id, &headers.key_id, &headers.scopes, &headers.site_id];
        if names.iter().enumerate().any(|(index, name)| names[..index].contains(name)) {
            return Err("answers.headers: the four header names must differ".into());
        }
        Ok(Self { reasons, body, headers })
    }

    /// The answers as `keygate config check` prints them: every deny reason's status and
    /// message, the body template and the header names, as TOML.
    pub fn describe(&self) -> String {
        let mut out = String::from("\n[answers]\n");
        let quoted = |text: &str| serde_json::Value::from(text).to_string();
        let body = self
            .body
            .as_ref()
            .map_or_else(|| r#"{"error": "{message}", "code": "{code}"}"#.to_owned(), |body| body.source().to_string());
        out.push_str(&format!("body = {}\n", quoted(&body)));
        out.push_str("\n[answers.headers]\n");
        for (name, value) in [
            ("tenant_id", &self.headers.tenant_id),
            ("key_id", &self.headers.key_id),
            ("scopes", &self.headers.scopes),
            ("site_id", &self.headers.site_id),
        ] {
            out.push_str(&format!("{name} = {}\n", quoted(value)));
        }
        let reasons = [
            ("KEY_MISSING", DenyReason::KeyMissing),
            (KEY_INVALID, DenyReason::KeyUnknown),
            ("KEY_EXPIRED", DenyReason::KeyExpired),
            ("SCOPE_MISSING", DenyReason::ScopeMissing),
            ("SITE_FORBIDDEN", DenyReason::SiteForbidden),
            ("PLAN_REQUIRED", DenyReason::PlanRequired),
            ("RATE_LIMITED", DenyReason::RateLimited),
            ("QUOTA_EXCEEDED", DenyReason::QuotaExceeded),
            ("TENANT_MISMATCH", DenyReason::TenantMismatch),
        ];
        for (name, reason) in reasons {
            let configured = self.reasons.get(&reason);
            let source = if configured.is_some() { "file" } else { "default" };
            let message = match configured.and_then(|answer| answer.message.as_ref()) {
                Some(template) => template.render(|name| Some(format!("{{{name}}}"))),
                None => reason.message("{scope}", "{site_id}"),
            };
            out.push_str(&format!(
                "\n[answers.deny.{name}]  # {source}\nstatus = {}\nmessage = {}\n",
                self.status(reason),
                quoted(&message)
            ));
        }
        out
    }

    /// The HTTP status of a deny: the configured one, or keygate's (401, 402, 403, 429).
    pub fn status(&self, reason: DenyReason) -> u16 {
        self.reasons.get(&reason).and_then(|answer| answer.status).unwrap_or_else(|| reason.http_status())
    }

    /// The configured message of a deny, if `[answers.deny]` sets one that does not need
    /// `{site_id}` (a request that names no valid site has none to put there).
    pub fn configured_message_without_site(&self, reason: DenyReason, scope: &str) -> Option<String> {
        let template = self.reasons.get(&reason).and_then(|answer| answer.message.as_ref())?;
        (!template.uses("site_id")).then(|| self.message(reason, scope, ""))
    }

    /// The message of a deny, for end users: the configured template, or keygate's text.
    /// A template that needs `{site_id}` where there is none (a site-restricted key on an
    /// endpoint that touches no single site) gives keygate's text instead of a sentence with a
    /// hole in it.
    pub fn message(&self, reason: DenyReason, scope: &str, site_id: &str) -> String {
        let template = self.reasons.get(&reason).and_then(|answer| answer.message.as_ref());
        match template.filter(|template| !(site_id.is_empty() && template.uses("site_id"))) {
            Some(template) => template.render(|name| match name {
                "scope" => Some(scope.to_owned()),
                "site_id" => Some(site_id.to_owned()),
                _ => None,
            }),
            None => reason.message(scope, site_id),
        }
    }

    /// The JSON body of an Envoy deny. In the configured template, a string that is exactly one
    /// placeholder becomes the value itself, a number for `{status}`, `{limit}`, `{remaining}`,
    /// `{reset}` (Unix seconds, rounded up) and `{retry_after}` (seconds, rounded up, as RFC 9110
    /// defines Retry-After), a string for `{message}`, `{code}` (the public reason code),
    /// `{scope}`, `{site_id}` and `{window}` (`second`, `minute`, `hour` or `day`); a field whose
    /// value does not apply (no limit, no site) is left out. Placeholders inside longer strings
    /// are replaced by their text, or by nothing. Values are JSON-escaped.
    pub fn body(&self, facts: &DenyFacts<'_>, code: &str, message: &str) -> String {
        let status = self.status(facts.reason);
        let Some(template) = &self.body else {
            return serde_json::json!({ "error": message, "code": code }).to_string();
        };
        let value_of = |name: &str| -> Option<Value> {
            let limit = facts.limit;
            match name {
                "message" => Some(Value::from(message)),
                "code" => Some(Value::from(code)),
                "status" => Some(Value::from(status)),
                "scope" => Some(facts.scope).filter(|scope| !scope.is_empty()).map(Value::from),
                "site_id" => Some(facts.site_id).filter(|site| !site.is_empty()).map(Value::from),
                "limit" => limit.map(|limit| Value::from(limit.limit)),
                "remaining" => limit.map(|limit| Value::from(limit.remaining)),
                "reset" => limit.map(|limit| Value::from(unix_seconds_up(limit.reset_at))),
                "retry_after" => limit.map(|limit| Value::from(seconds_until(limit.reset_at, facts.now).max(1))),
                "window" => limit.map(|limit| Value::from(limit.window.name())),
                _ => None,
            }
        };
        template.render(&value_of).unwrap_or(Value::Null).to_string()
    }
}

/// Whole seconds from `now` until `at`, rounded up: a client that waits this long is not early.
pub fn seconds_until(at: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    let micros = (at - now).num_microseconds().unwrap_or(i64::MAX).max(0);
    micros.div_euclid(1_000_000) + i64::from(micros.rem_euclid(1_000_000) > 0)
}

/// Unix seconds of `at`, rounded up.
pub fn unix_seconds_up(at: DateTime<Utc>) -> i64 {
    at.timestamp() + i64::from(at.timestamp_subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;
    use crate::limits::{RateLimitSubject, RateLimitWindow};

    fn answers(toml_text: &str) -> Result<Answers, String> {
        let file: AnswersFile = toml::from_str(toml_text).map_err(|error| error.to_string())?;
        Answers::from_file(&file)
    }

    fn facts(reason: DenyReason, limit: Option<&RateLimitState>) -> DenyFacts<'_> {
        DenyFacts { reason, scope: "analytics:read", site_id: "", limit, now: Utc::now() }
    }

    fn body_of(answers: &Answers, reason: DenyReason, limit: Option<&RateLimitState>, code: &str) -> String {
        answers.body(&facts(reason, limit), code, &answers.message(reason, "analytics:read", ""))
    }

    #[test]
    fn products_get_their_own_status_message_and_body() {
        let eventicat = answers(
            r#"
            body = '{"error": "{message}", "limit": "{limit}", "remaining": "{remaining}", "resetTime": "{reset}"}'
            [deny.SITE_FORBIDDEN]
            status = 404
            message = "Invalid aggregator"
            "#,
        )
        .unwrap();
        assert_eq!(eventicat.status(DenyReason::SiteForbidden), 404);
        let now = Utc::now();
        let limit = RateLimitState {
            limit: 60,
            remaining: 0,
            reset_at: now + Duration::milliseconds(1_500),
            window: RateLimitWindow::Minute,
            subject: RateLimitSubject::Key,
        };
        let body: Value =
            serde_json::from_str(&body_of(&eventicat, DenyReason::RateLimited, Some(&limit), "RATE_LIMITED")).unwrap();
        assert_eq!(body["limit"], 60, "numbers as numbers");
        assert_eq!(body["remaining"], 0);
        assert_eq!(body["resetTime"], unix_seconds_up(limit.reset_at));
        assert_eq!(
            body.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["error", "limit", "remaining", "resetTime"],
            "fields in the template's order"
        );
        let forbidden: Value =
            serde_json::from_str(&body_of(&eventicat, DenyReason::SiteForbidden, None, "SITE_FORBIDDEN")).unwrap();
        assert_eq!(forbidden, serde_json::json!({"error": "Invalid aggregator"}), "no limit: its fields left out");

        let jetrack = answers(
            r#"
            body = '{"success": false, "data": null, "meta": {"status": "{status}", "message": "{message}"}}'
            [deny.KEY_INVALID]
            message = "Invalid API key \"{scope}\""
            "#,
        )
        .unwrap();
        let body: Value =
            serde_json::from_str(&body_of(&jetrack, DenyReason::KeyRevoked, None, "KEY_INVALID")).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"success": false, "data": null, "meta": {"status": 401, "message": "Invalid API key \"analytics:read\""}})
        );
        assert_eq!(
            jetrack.message(DenyReason::KeyUnknown, "a:b", ""),
            jetrack.message(DenyReason::KeyMalformed, "a:b", "")
        );
    }

    #[test]
    fn a_message_that_needs_a_site_where_there_is_none_falls_back_to_keygates() {
        let zta = answers("[deny.SITE_FORBIDDEN]\nmessage = \"This API key cannot access {site_id}\"").unwrap();
        assert_eq!(zta.message(DenyReason::SiteForbidden, "a:b", "site_1"), "This API key cannot access site_1");
        assert_eq!(zta.message(DenyReason::SiteForbidden, "a:b", ""), DenyReason::SiteForbidden.message("a:b", ""));
    }

    #[test]
    fn unconfigured_answers_are_keygates_own() {
        let default = Answers::default();
        for reason in [DenyReason::KeyExpired, DenyReason::ScopeMissing, DenyReason::QuotaExceeded] {
            assert_eq!(default.status(reason), reason.http_status());
            assert_eq!(default.message(reason, "a:b", "s1"), reason.message("a:b", "s1"));
        }
        let body: Value =
            serde_json::from_str(&body_of(&default, DenyReason::KeyMissing, None, "KEY_MISSING")).unwrap();
        assert_eq!(body, serde_json::json!({"error": "API key is required", "code": "KEY_MISSING"}));
        assert_eq!(default.headers.tenant_id, "x-keygate-tenant-id");
    }

    #[test]
    fn mistakes_in_answers_are_refused_with_their_place() {
        for (text, expected) in [
            ("[deny.KEY_UNKNOWN]\nstatus = 404", "configure KEY_INVALID"),
            ("[deny.NOPE]\nstatus = 404", "no deny reason"),
            ("[deny.KEY_EXPIRED]\nstatus = 200", "400 to 599"),
            ("[deny.KEY_EXPIRED]\nmessage = \"{key}\"", "{key} is no placeholder"),
            ("[deny.KEY_EXPIRED]\nmessage = \"a } b\"", "lone"),
            ("[deny.KEY_EXPIRED]\nmessage = \"\"", "must not be empty"),
            ("body = '{\"error\": {message}}'", "not JSON"),
            ("body = '[1]'", "JSON object"),
            ("body = '{\"e\": \"{secret}\"}'", "{secret} is no placeholder"),
            ("[headers]\ntenant_id = \"x org\"", "no header name"),
            ("[headers]\ntenant_id = \"Authorization\"", "must not overwrite"),
            ("[headers]\nscopes = \"Keep-Alive\"", "must not overwrite"),
            ("[headers]\ntenant_id = \"upgrade\"", "must not overwrite"),
            ("[deny.KEY_EXPIRED]\nmessage = \"x {scope\"", "lone `{`"),
            ("[headers]\ntenant_id = \"x-a\"\nkey_id = \"X-A\"", "must differ"),
            ("colour = 1", "unknown field"),
        ] {
            let error = answers(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
        assert_eq!(
            answers("[deny.KEY_EXPIRED]\nmessage = \"{{literal}}\"").unwrap().message(DenyReason::KeyExpired, "", ""),
            "{literal}"
        );
    }
}
