//! `keygate import --tenant ID FILE`: existing keys, one JSON object a line, into a running
//! keygate through ImportKeys, in batches.
//!
//! A line holds `secret` (the key) or `secret_sha256` (its SHA-256, hex or base64, with
//! `display_prefix`), and `name`, `scopes`, and optionally `site_ids`, `environment` (`live` or
//! `test`), `metadata`, `rate_limit_per_minute`, `created_at`, `expires_at`, `last_used_at`
//! (RFC 3339). Nothing of a secret is ever printed.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::Args;
use prost_types::Timestamp;
use serde::Deserialize;
use tonic_types::StatusExt;

use super::{ConnectArgs, Exit, Failure, describe_status};
use crate::proto::key_admin_client::KeyAdminClient;
use crate::proto::{ImportKeysRequest, ImportedKey, KeyEnvironment, import_key_result, imported_key};

/// Flags of `keygate import`.
#[derive(Clone, Debug, Args)]
#[command(after_help = "Example:\n  export KEYGATE_ADDR=http://keygate:50051 KEYGATE_ADMIN_TOKEN=...\n  \
    keygate import --tenant acme keys.jsonl\n  \
    echo '{\"secret_sha256\": \"9f86d0…\", \"display_prefix\": \"tga_4f2a\", \"name\": \"CI\", \"scopes\": [\"events:read\"]}' \
    | keygate import --tenant acme -")]
pub struct ImportArgs {
    /// The tenant the keys belong to.
    #[arg(long, env = "KEYGATE_TENANT")]
    pub tenant: String,
    /// JSON Lines, one key a line; `-` reads standard input.
    pub file: PathBuf,
    /// Check every line and report what would happen, writing nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keys per ImportKeys call (1 to 1000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub batch_size: u16,
    /// Bytes per ImportKeys call at most (keys with much metadata make smaller batches); a call
    /// the server finds too large is split and sent again.
    #[arg(long, default_value_t = 3 * 1024 * 1024)]
    pub batch_bytes: usize,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// One line of the input.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    secret: Option<String>,
    secret_sha256: Option<String>,
    #[serde(default)]
    display_prefix: String,
    name: String,
    scopes: Vec<String>,
    #[serde(default)]
    site_ids: Vec<String>,
    environment: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    rate_limit_per_minute: u32,
    created_at: Option<String>,
    expires_at: Option<String>,
    last_used_at: Option<String>,
}

const NOT_AN_OBJECT: &str = "a line must be one JSON object";

/// One line as a [`Line`], or why not (in words that quote nothing of it).
fn parse_line(line: &str) -> Result<Line, String> {
    if !line.trim_start().starts_with('{') {
        return Err(NOT_AN_OBJECT.to_owned());
    }
    serde_json::from_str::<Line>(line).map_err(|error| without_quoted_values(&error))
}

/// The fields of a line, which error messages may name.
const FIELDS: [&str; 12] = [
    "secret",
    "secret_sha256",
    "display_prefix",
    "name",
    "scopes",
    "site_ids",
    "environment",
    "metadata",
    "rate_limit_per_minute",
    "created_at",
    "expires_at",
    "last_used_at",
];

/// A serde error without any text it quotes, in double quotes or backticks (a misplaced
/// secret would be one: a value, or an object keyed by the key). A line's own field names, and
/// a name of lowercase letters and underscores alone (`nmae`), cannot be a key and are kept.
fn without_quoted_values(error: &serde_json::Error) -> String {
    if error.to_string().contains("struct Line") {
        return NOT_AN_OBJECT.to_owned();
    }
    let text = error.to_string();
    let mut out = String::with_capacity(text.len());
    let mut open: Option<(char, String)> = None;
    for character in text.chars() {
        match &mut open {
            None if character == '"' || character == '`' => {
                open = Some((character, String::new()));
                out.push(character);
            }
            Some((quote, quoted)) if character == *quote => {
                let plain = character == '`'
                    && (FIELDS.contains(&quoted.as_str())
                        || (1..=32).contains(&quoted.len())
                            && quoted.bytes().all(|byte| byte.is_ascii_lowercase() || byte == b'_'));
                out.push_str(if plain { quoted.as_str() } else { "…" });
                out.push(character);
                open = None;
            }
            Some((_, quoted)) => quoted.push(character),
            None => out.push(character),
        }
    }
    out
}

fn timestamp(field: &str, value: Option<String>) -> Result<Option<Timestamp>, String> {
    value
        .map(|text| {
            DateTime::parse_from_rfc3339(&text)
                .map(|time| {
                    let time = time.with_timezone(&Utc);
                    Timestamp { seconds: time.timestamp(), nanos: time.timestamp_subsec_nanos() as i32 }
                })
                .map_err(|_| format!("{field}: not an RFC 3339 time"))
        })
        .transpose()
}

impl Line {
    fn into_key(self) -> Result<ImportedKey, String> {
        let credential = match (self.secret, self.secret_sha256) {
            (Some(secret), None) => imported_key::Credential::Secret(secret),
            (None, Some(hash)) => imported_key::Credential::SecretSha256(hash),
            _ => return Err("give exactly one of secret and secret_sha256".into()),
        };
        let environment = match self.environment.as_deref() {
            None => KeyEnvironment::Unspecified,
            Some("live") => KeyEnvironment::Live,
            Some("test") => KeyEnvironment::Test,
            Some(_) => return Err("environment: live or test".into()),
        };
        Ok(ImportedKey {
            credential: Some(credential),
            display_prefix: self.display_prefix,
            name: self.name,
            scopes: self.scopes,
            site_ids: self.site_ids,
            environment: environment.into(),
            metadata: self.metadata.into_iter().collect(),
            rate_limit_per_minute: self.rate_limit_per_minute,
            created_at: timestamp("created_at", self.created_at)?,
            expires_at: timestamp("expires_at", self.expires_at)?,
            last_used_at: timestamp("last_used_at", self.last_used_at)?,
        })
    }
}

/// What happened to the lines, for the summary.
#[derive(Debug, Default)]
pub struct Summary {
    pub imported: usize,
    /// The tenant had them already (a retry).
    pub already_there: usize,
    /// Line numbers and why.
    pub rejected: Vec<(usize, String)>,
}

/// Runs `keygate import`; prints a summary to standard output, progress to a terminal's
/// standard error. When a call fails halfway, the summary still says what was imported, and
/// which lines were not sent.
pub async fn run(mut args: ImportArgs) -> Result<Exit, Failure> {
    let lines = read_lines(&args.file)?;
    let mut summary = Summary::default();
    let mut keys: Vec<(usize, ImportedKey)> = Vec::new();
    let mut first_line_of: HashMap<String, usize> = HashMap::new();
    for (number, line) in lines {
        let parsed = line.and_then(|line| parse_line(&line).and_then(Line::into_key));
        let key = match parsed {
            Ok(key) => key,
            Err(why) => {
                summary.rejected.push((number, why));
                continue;
            }
        };
        // The same key twice: in one batch the server would refuse both, across batches it
        // would count the second as already there and drop its settings.
        if let Some(hash) = credential_hash(&key) {
            if let Some(first) = first_line_of.get(&hash) {
                summary.rejected.push((number, format!("the same key as line {first}")));
                continue;
            }
            first_line_of.insert(hash, number);
        }
        keys.push((number, key));
    }
    let channel = args.connect.channel()?;
    let bearer = args.connect.bearer()?;
    let address = args.connect.address();
    let mut client = KeyAdminClient::new(channel).max_decoding_message_size(64 << 20);
    let progress = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(keys.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} keys, {per_sec}, {eta} left")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut pending: &[(usize, ImportedKey)] = &keys;
    let mut failure = None;
    while !pending.is_empty() {
        let batch = next_batch(pending, usize::from(args.batch_size), args.batch_bytes);
        let mut request = tonic::Request::new(ImportKeysRequest {
            tenant_id: args.tenant.clone(),
            keys: batch.iter().map(|(_, key)| key.clone()).collect(),
            validate_only: args.dry_run,
        });
        request.metadata_mut().insert("authorization", bearer.clone());
        // keygate bounds a call by KEYGATE_REQUEST_TIMEOUT_SECONDS; a server that stopped
        // answering altogether must not hold the import forever.
        request.set_timeout(std::time::Duration::from_secs(120));
        let response = match client.import_keys(request).await {
            Ok(response) => response,
            Err(status) if status.code() == tonic::Code::ResourceExhausted && batch.len() > 1 => {
                // Larger than the server takes: smaller batches from here on.
                args.batch_bytes = (encoded_size(batch) / 2).max(1);
                continue;
            }
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                // One key alone is larger than the server takes: that line is rejected, the
                // others go on.
                let (number, key) = &batch[0];
                summary.rejected.push((
                    *number,
                    format!(
                        "the key is {} bytes, more than the server accepts in one call (KEYGATE_MAX_MESSAGE_BYTES)",
                        prost::Message::encoded_len(key)
                    ),
                ));
                pending = &pending[1..];
                continue;
            }
            Err(status) => {
                let mut error = Failure::from_call(&status, &address);
                error.message = format!("ImportKeys failed: {}", error.message);
                failure = Some(error);
                break;
            }
        };
        for ((number, _), result) in batch.iter().zip(response.into_inner().results) {
            match result.result {
                Some(import_key_result::Result::Key(_)) => summary.imported += 1,
                Some(import_key_result::Result::Error(error)) => {
                    let status = tonic::Status::with_details(
                        tonic::Code::from_i32(error.code),
                        error.message.clone(),
                        prost::Message::encode_to_vec(&error).into(),
                    );
                    let retry = status
                        .get_error_details()
                        .error_info()
                        .is_some_and(|info| info.reason == "KEY_ALREADY_IMPORTED");
                    if retry {
                        summary.already_there += 1;
                    } else {
                        summary.rejected.push((*number, describe_status(&status)));
                    }
                }
                None => summary.rejected.push((*number, "no result from the server".into())),
            }
        }
        if let Some(bar) = &progress {
            bar.inc(batch.len() as u64);
        }
        pending = &pending[batch.len()..];
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    summary.rejected.sort_by_key(|(number, _)| *number);
    print_summary(&summary, args.dry_run);
    match failure {
        Some(mut failure) => {
            if let (Some((first, _)), Some((last, _))) = (pending.first(), pending.last()) {
                failure.message = format!(
                    "{}; lines {first} to {last} were not sent (running the import again is safe)",
                    failure.message
                );
            }
            Err(failure)
        }
        None => Ok(if summary.rejected.is_empty() { Exit::Ok } else { Exit::Rejected }),
    }
}

/// The keys of the next call: at most `count`, and at most `bytes` encoded (at least one key).
fn next_batch(pending: &[(usize, ImportedKey)], count: usize, bytes: usize) -> &[(usize, ImportedKey)] {
    let mut size = 0;
    let mut taken = 0;
    for (_, key) in pending.iter().take(count) {
        size += prost::Message::encoded_len(key) + 4;
        if taken > 0 && size > bytes {
            break;
        }
        taken += 1;
    }
    &pending[..taken.max(1).min(pending.len())]
}

fn encoded_size(batch: &[(usize, ImportedKey)]) -> usize {
    batch.iter().map(|(_, key)| prost::Message::encoded_len(key) + 4).sum()
}

/// The SHA-256 a key's credential stands for (hex), to find the same key on two lines.
fn credential_hash(key: &ImportedKey) -> Option<String> {
    match key.credential.as_ref()? {
        imported_key::Credential::Secret(secret) => Some(crate::domain::key::KeyHash::of(secret).as_str().to_owned()),
        imported_key::Credential::SecretSha256(hash) => {
            crate::domain::key::KeyHash::from_given(hash).map(|hash| hash.as_str().to_owned())
        }
    }
}

/// A line number (from 1) and the line's text, or why it is not text.
type NumberedLine = (usize, Result<String, String>);

/// The non-empty lines of a file (or standard input), numbered from 1; a line that is not
/// UTF-8 is an error of that line alone. A byte-order mark at the start is skipped.
fn read_lines(file: &PathBuf) -> Result<Vec<NumberedLine>, Failure> {
    let mut bytes = Vec::new();
    let read = if file.as_os_str() == "-" {
        std::io::stdin().lock().read_to_end(&mut bytes)
    } else {
        std::fs::File::open(file).and_then(|mut opened| opened.read_to_end(&mut bytes))
    };
    read.map_err(|error| Failure::usage(format!("cannot read {}: {error}", file.display())))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut lines = Vec::new();
    for (index, line) in bytes.split(|byte| *byte == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let text = std::str::from_utf8(line).map(str::to_owned).map_err(|_| "the line is not UTF-8 text".to_owned());
        lines.push((index + 1, text));
    }
    Ok(lines)
}

fn print_summary(summary: &Summary, dry_run: bool) {
    let mut out = std::io::stdout().lock();
    let verb = if dry_run { "would import" } else { "imported" };
    let _ = writeln!(
        out,
        "{verb} {} keys, {} already there, {} rejected{}",
        summary.imported,
        summary.already_there,
        summary.rejected.len(),
        if summary.rejected.is_empty() { "" } else { ":" }
    );
    for (number, why) in &summary.rejected {
        let _ = writeln!(out, "  line {number}: {why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_never_quote_a_field_name_either() {
        let Err(error) = serde_json::from_str::<Line>(r#"{"tga_d35efsecretsecret": {"name": "x"}}"#) else {
            panic!("an unknown field");
        };
        let shown = without_quoted_values(&error);
        assert!(!shown.contains("secretsecret"), "{shown}");
    }

    #[test]
    fn a_misspelled_field_is_named() {
        let Err(error) = serde_json::from_str::<Line>(r#"{"nmae": "x"}"#) else { panic!("an unknown field") };
        let shown = without_quoted_values(&error);
        assert!(shown.contains("unknown field `nmae`") && shown.contains("`name`"), "{shown}");
        assert!(shown.contains("`secret_sha256`"), "every field is listed: {shown}");
    }

    #[test]
    fn a_line_that_is_no_object_says_so() {
        for line in [r#"["kg_live_secretsecret"]"#, "42", r#""kg_live_secretsecret""#] {
            let Err(shown) = parse_line(line) else { panic!("not an object") };
            assert!(shown.starts_with("a line must be one JSON object"), "{shown}");
            assert!(!shown.contains("secretsecret") && !shown.contains("struct"), "{shown}");
        }
    }

    #[test]
    fn parse_errors_never_quote_a_value() {
        let Err(error) = serde_json::from_str::<Line>(r#"{"name": "x", "scopes": "kg_live_secretsecret"}"#) else {
            panic!("a string is no list of scopes");
        };
        let shown = without_quoted_values(&error);
        assert!(!shown.contains("secretsecret"), "{shown}");
        assert!(shown.contains("line 1"), "{shown}");
    }
}
