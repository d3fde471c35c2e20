//! How the client commands print: aligned tables with relative times for people, and for
//! scripts (`--output json`) the RPC's response message in proto3 JSON.

use std::io::{IsTerminal, Write};
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use clap::ValueEnum;
use comfy_table::{Table, presets};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use prost_types::Timestamp;

use super::Failure;

/// What a client command prints on standard output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned tables and plain sentences, for people.
    #[default]
    Table,
    /// One JSON document: the RPC's response message in proto3 JSON with the proto field names
    /// (`key_id`), every field present, enums by name, times in RFC 3339 and 64-bit counts as
    /// numbers; a list command's pages joined into one message.
    Json,
}

/// keygate's messages, to print any of them as JSON.
static POOL: LazyLock<Option<DescriptorPool>> =
    LazyLock::new(|| DescriptorPool::decode(super::descriptor::descriptor_set().as_slice()).ok());

/// `message` (whose full name is `name`, such as `keygate.v1.ApiKey`) as proto3 JSON with proto
/// field names and every field present. A field left empty on purpose (a page token) can be
/// removed by the caller.
pub fn json<M: prost::Message>(message: &M, name: &str) -> Result<serde_json::Value, Failure> {
    let unknown = || Failure::usage(format!("no descriptor for {name}"));
    let descriptor = POOL.as_ref().and_then(|pool| pool.get_message_by_name(name)).ok_or_else(unknown)?;
    let dynamic = DynamicMessage::decode(descriptor.clone(), message.encode_to_vec().as_slice())
        .map_err(|error| Failure::usage(format!("{name}: {error}")))?;
    let options =
        SerializeOptions::new().use_proto_field_name(true).skip_default_fields(false).stringify_64_bit_integers(false);
    let mut value = dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|error| Failure::usage(format!("{name}: {error}")))?;
    fill_unset(&descriptor, &mut value);
    Ok(value)
}

/// Gives every unset message field (an unset time, an absent rate limit) a `null`, so each
/// command's JSON has the same fields whatever their values.
fn fill_unset(descriptor: &prost_reflect::MessageDescriptor, value: &mut serde_json::Value) {
    let serde_json::Value::Object(object) = value else { return };
    for field in descriptor.fields() {
        let Some(found) = object.get_mut(field.name()) else {
            object.insert(field.name().to_owned(), serde_json::Value::Null);
            continue;
        };
        let prost_reflect::Kind::Message(inner) = field.kind() else { continue };
        if field.is_map() || inner.full_name().starts_with("google.protobuf.") {
            continue;
        }
        match found {
            serde_json::Value::Array(items) => items.iter_mut().for_each(|item| fill_unset(&inner, item)),
            single => fill_unset(&inner, single),
        }
    }
}

/// `value` as pretty JSON and a newline.
pub fn json_text(value: &serde_json::Value) -> Result<String, Failure> {
    let text = serde_json::to_string_pretty(value).map_err(|error| Failure::usage(error.to_string()))?;
    Ok(format!("{text}\n"))
}

/// Prints `value` as pretty JSON and a newline on standard output.
pub fn print_json(value: &serde_json::Value) -> Result<(), Failure> {
    print_out(&json_text(value)?)
}

/// Writes `text` to standard output; a closed pipe (`| head`) is not an error worth a message.
pub fn print_out(text: &str) -> Result<(), Failure> {
    print_bytes(text.as_bytes())
}

/// [`print_out`] for bytes.
pub fn print_bytes(bytes: &[u8]) -> Result<(), Failure> {
    match write_out(bytes) {
        Err(failure) if failure.1 == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.map_err(|failure| failure.0),
    }
}

/// Writes what holds a new secret to standard output: a closed pipe is an error here, since
/// the secret is then lost.
pub fn print_secret(text: &str) -> Result<(), Failure> {
    write_out(text.as_bytes()).map_err(|failure| failure.0)
}

fn write_out(bytes: &[u8]) -> Result<(), (Failure, std::io::ErrorKind)> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|error| (Failure::usage(format!("cannot write to standard output: {error}")), error.kind()))
}

/// Whether standard output is a terminal (a person reads it) rather than a pipe or a file.
pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

/// `text` safe to print on a terminal: control and format characters (bidirectional controls,
/// zero-width spaces), which stored metadata may hold, are shown escaped (`\u{1b}`), never
/// sent to the terminal, so a value cannot move the cursor, rewrite a line, retitle the window
/// or hide text.
pub fn printable(text: &str) -> String {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    // Controls, and format characters (bidirectional controls, zero-width spaces) except the
    // zero-width joiner that emoji sequences are made of.
    let unsafe_char = |character: char| {
        character.is_control() || (character.general_category() == GeneralCategory::Format && character != '\u{200d}')
    };
    if !text.contains(unsafe_char) {
        return text.to_owned();
    }
    text.chars()
        .map(|character| match unsafe_char(character) {
            true => character.escape_unicode().to_string(),
            false => character.to_string(),
        })
        .collect()
}

/// Rows under a header, in columns aligned with spaces, no borders; lines end without spaces.
/// Cells are [`printable`].
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(header.to_vec());
    table.add_rows(rows.into_iter().map(|row| row.iter().map(|cell| printable(cell)).collect::<Vec<_>>()));
    for column in table.column_iter_mut() {
        column.set_padding((0, 3));
    }
    table.lines().map(|line| line.trim_end().to_owned() + "\n").collect()
}

/// One record as `name  value` lines, names aligned; values are [`printable`].
pub fn fields(rows: Vec<(&str, String)>) -> String {
    let width = rows.iter().map(|(name, _)| name.chars().count()).max().unwrap_or(0);
    rows.iter().map(|(name, value)| format!("{name:<width$}   {}\n", printable(value))).collect()
}

/// A protobuf time as a `DateTime`; `None` when unset or out of range.
pub fn time_of(timestamp: Option<&Timestamp>) -> Option<DateTime<Utc>> {
    let timestamp = timestamp?;
    DateTime::from_timestamp(timestamp.seconds, u32::try_from(timestamp.nanos).ok()?)
}

/// "3 days ago", "in 2 hours", "now"; `absent` when unset.
pub fn relative(timestamp: Option<&Timestamp>, absent: &str) -> String {
    match time_of(timestamp) {
        Some(time) => chrono_humanize::HumanTime::from(time).to_string(),
        None => absent.to_owned(),
    }
}

/// "2026-11-30 14:02:11 UTC (3 days ago)"; `absent` when unset.
pub fn absolute(timestamp: Option<&Timestamp>, absent: &str) -> String {
    match time_of(timestamp) {
        Some(time) => format!("{} ({})", time.format("%Y-%m-%d %H:%M:%S UTC"), relative(timestamp, absent)),
        None => absent.to_owned(),
    }
}

/// An enum's proto name without its prefix, in lower case: `KEY_STATE_ACTIVE` → `active`.
pub fn enum_word(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_ascii_lowercase().replace('_', " ")
}

/// Items joined with ", ", or `empty` when there are none.
pub fn list(items: &[String], empty: &str) -> String {
    match items.is_empty() {
        true => empty.to_owned(),
        false => items.join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_aligns_its_columns_without_trailing_spaces() {
        let shown =
            table(&["KEY ID", "NAME"], vec![vec!["key_1".into(), "a".into()], vec!["key_22".into(), "".into()]]);
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 3, "{shown}");
        assert_eq!(lines[0].find("NAME"), lines[1].find('a'), "{shown}");
        assert!(lines.iter().all(|line| !line.ends_with(' ')), "{shown:?}");
    }

    #[test]
    fn control_characters_reach_no_terminal() {
        let hostile = "note\u{1b}]0;pwned\u{7}\u{1b}[2J\rstate revoked\u{202e}";
        for shown in [fields(vec![("metadata", hostile.to_owned())]), table(&["M"], vec![vec![hostile.to_owned()]])] {
            assert!(!shown.contains(['\u{1b}', '\u{7}', '\r', '\u{202e}']), "{shown:?}");
            assert!(shown.contains("\\u{1b}]0;pwned") && shown.contains("\\u{202e}"), "{shown:?}");
        }
        assert_eq!(printable("Acme ✓ 日本 👨\u{200d}👩"), "Acme ✓ 日本 👨\u{200d}👩");
        assert_eq!(printable("a\u{200b}b\u{9b}"), "a\\u{200b}b\\u{9b}");
    }

    #[test]
    fn times_read_relative_to_now() {
        let three_days_ago = Timestamp { seconds: Utc::now().timestamp() - 3 * 86_400 - 60, nanos: 0 };
        assert_eq!(relative(Some(&three_days_ago), "never"), "3 days ago");
        let in_two_hours = Timestamp { seconds: Utc::now().timestamp() + 2 * 3_600 + 60, nanos: 0 };
        assert_eq!(relative(Some(&in_two_hours), "never"), "in 2 hours");
        assert_eq!(relative(None, "never"), "never");
    }

    #[test]
    fn json_keeps_every_field_under_its_proto_name() {
        let key = crate::proto::ApiKey { key_id: "key_1".into(), ..Default::default() };
        let shown = json(&key, "keygate.v1.ApiKey").unwrap();
        assert_eq!(shown["key_id"], "key_1");
        assert_eq!(shown["state"], "KEY_STATE_UNSPECIFIED");
        assert_eq!(shown["scopes"], serde_json::json!([]));
        assert_eq!(shown["expires_at"], serde_json::Value::Null);
        assert!(shown.as_object().unwrap().contains_key("expires_at"));
    }
}
