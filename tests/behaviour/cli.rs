//! The admin CLI, black-box: the real `keygate` binary (through assert_cmd) against a started
//! server on each backend, as an operator or a script runs it. Covers every subcommand, the JSON
//! shapes scripts rely on, the exit codes, the output for people (tables, relative times, the
//! secret shown once), paging, `--help` examples and shell completions.

use std::collections::BTreeSet;
use std::time::Duration;

use clap::CommandFactory;
use keygate::proto::*;
use serde_json::Value;

use crate::support::*;

crate::trials!(
    every_backend: [
        the_cli_runs_a_tenant_from_start_to_finish,
        lists_and_the_audit_log_page_through_everything,
        errors_name_the_code_and_the_field_and_exit_codes_hold,
    ],
    once: [
        people_get_aligned_tables_relative_times_and_the_secret_once,
        every_subcommand_has_an_example_and_none_puts_a_token_on_the_command_line,
        bash_completions_offer_the_subcommands,
        zsh_completions_parse,
        fish_completions_offer_the_subcommands,
        check_never_prints_the_key_it_was_given,
        hostile_values_cannot_rewrite_the_terminal,
        bad_flags_are_refused_before_anything_is_sent,
        a_secret_that_cannot_be_shown_is_not_minted_or_is_named_for_revoking,
        an_address_that_is_not_keygate_is_named_as_such,
    ]
);

/// What a run of the binary printed, and how it ended.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl From<std::process::Output> for Run {
    fn from(output: std::process::Output) -> Self {
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl Run {
    /// stdout as JSON; fails the test (with what was printed) when it is not.
    fn json(&self) -> Value {
        assert_eq!(self.code, Some(0), "{self:#?}");
        serde_json::from_str(&self.stdout).unwrap_or_else(|error| panic!("not JSON ({error}): {self:#?}"))
    }
}

/// `keygate ARGS` against `address` with the admin token in the environment (never on the
/// command line), and `stdin` as its standard input.
async fn keygate_with(address: std::net::SocketAddr, args: &[&str], stdin: &str) -> Run {
    keygate_in(address, args, stdin, &[]).await
}

/// [`keygate_with`] with extra environment variables.
async fn keygate_in(address: std::net::SocketAddr, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Run {
    let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    let env: Vec<(String, String)> =
        env.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())).collect();
    let stdin = stdin.to_owned();
    tokio::task::spawn_blocking(move || {
        let output = assert_cmd::Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(&args)
            .env("KEYGATE_ADDR", format!("http://{address}"))
            .env("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env_remove("KEYGATE_TENANT")
            .env_remove("KEYGATE_OUTPUT")
            .env_remove("KEYGATE_AUTHORIZE_TOKEN")
            .envs(env)
            .write_stdin(stdin)
            .timeout(Duration::from_secs(60))
            .output()
            .expect("run keygate");
        Run::from(output)
    })
    .await
    .unwrap()
}

async fn keygate(app: &TestApp, args: &[&str]) -> Run {
    keygate_with(app.address, args, "").await
}

/// The names of an object's fields.
fn names(value: &Value) -> BTreeSet<String> {
    value.as_object().unwrap_or_else(|| panic!("an object: {value}")).keys().cloned().collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

/// The JSON shapes the README documents: every field, always, under its proto name.
fn key_fields() -> BTreeSet<String> {
    set(&[
        "key_id",
        "tenant_id",
        "name",
        "display_prefix",
        "scopes",
        "site_ids",
        "environment",
        "metadata",
        "rate_limit_per_minute",
        "state",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
        "rotated_from_key_id",
    ])
}

fn tenant_fields() -> BTreeSet<String> {
    set(&[
        "tenant_id",
        "display_name",
        "api_access_enabled",
        "max_keys",
        "rate_limit_per_minute",
        "daily_request_quota",
        "created_at",
        "updated_at",
        "effective_max_keys",
        "unlimited_keys",
        "shared_rate_limit",
        "shared_rate_limit_window",
    ])
}

async fn the_cli_runs_a_tenant_from_start_to_finish(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let put = keygate(
        &app,
        &[
            "tenants",
            "put",
            "acme",
            "--display-name",
            "Acme Inc",
            "--max-keys",
            "25",
            "--rate-limit-per-minute",
            "600",
            "-o",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(names(&put), set(&["tenant"]));
    assert_eq!(names(&put["tenant"]), tenant_fields());
    assert_eq!(put["tenant"]["max_keys"], 25);
    assert_eq!(put["tenant"]["shared_rate_limit_window"], "RATE_LIMIT_WINDOW_MINUTE");
    let got = keygate(&app, &["tenants", "get", "acme", "--output", "json"]).await.json();
    assert_eq!(got["tenant"]["display_name"], "Acme Inc");
    assert_eq!(got["tenant"]["rate_limit_per_minute"], 600);
    keygate(&app, &["tenants", "put", "acme", "--api-access", "false", "-o", "json"]).await.json();
    assert!(!get_tenant(&app, "acme").await.api_access_enabled, "the CLI's put reached the server");
    keygate(&app, &["tenants", "put", "acme", "--api-access", "true", "-o", "json"]).await.json();

    // Sites: put, list, delete.
    let site =
        keygate(&app, &["sites", "put", "--tenant", "acme", "shop.example", "--display-name", "Shop", "-o", "json"])
            .await
            .json();
    assert_eq!(names(&site["site"]), set(&["tenant_id", "site_id", "display_name", "created_at", "updated_at"]));
    keygate(&app, &["sites", "put", "--tenant", "acme", "blog.example", "-o", "json"]).await.json();
    let sites = keygate(&app, &["sites", "list", "--tenant", "acme", "-o", "json"]).await.json();
    assert_eq!(names(&sites), set(&["sites"]), "no page token in a joined list");
    let ids: Vec<&str> =
        sites["sites"].as_array().unwrap().iter().map(|site| site["site_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["blog.example", "shop.example"]);
    let deleted = keygate(&app, &["sites", "delete", "--tenant", "acme", "blog.example", "-o", "json"]).await.json();
    assert_eq!(deleted, serde_json::json!({}));
    let request = ListSitesRequest { tenant_id: "acme".into(), ..Default::default() };
    let remaining = app.admin.clone().list_sites(request).await.unwrap().into_inner().sites;
    assert_eq!(remaining.len(), 1);

    // Keys: create (the secret once), get, list, update.
    let created = keygate(
        &app,
        &[
            "keys",
            "create",
            "--tenant",
            "acme",
            "--name",
            "Data warehouse sync",
            "--scope",
            "analytics:read",
            "--scope",
            "goals:*",
            "--site",
            "shop.example",
            "--expires-in",
            "30d",
            "--metadata",
            "team=data",
            "--rate-limit-per-minute",
            "120",
            "-o",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(names(&created), set(&["key", "secret"]));
    assert_eq!(names(&created["key"]), key_fields());
    let secret = created["secret"].as_str().unwrap().to_owned();
    let key_id = created["key"]["key_id"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("kg_live_"), "{secret}");
    assert_eq!(created["key"]["scopes"], serde_json::json!(["analytics:read", "goals:*"]));
    assert_eq!(created["key"]["metadata"], serde_json::json!({"team": "data"}));
    assert_eq!(created["key"]["revoked_at"], Value::Null, "unset times are null, not missing");
    let expires = chrono::DateTime::parse_from_rfc3339(created["key"]["expires_at"].as_str().unwrap()).unwrap();
    let in_30_days = chrono::Utc::now() + chrono::Duration::days(30);
    assert!((expires.timestamp() - in_30_days.timestamp()).abs() < 120, "--expires-in 30d: {expires}");

    let got = keygate(&app, &["keys", "get", "--tenant", "acme", &key_id, "-o", "json"]).await;
    assert_eq!(names(&got.json()), set(&["key"]));
    assert!(!got.stdout.contains(&secret[8..]), "the secret is shown once only: {got:#?}");
    let listed = keygate(&app, &["keys", "list", "--tenant", "acme", "--site", "shop.example", "-o", "json"]).await;
    assert!(!listed.stdout.contains(&secret[8..]));
    let listed = listed.json();
    assert_eq!(names(&listed), set(&["keys"]));
    assert_eq!(listed["keys"][0]["key_id"], key_id.as_str());
    let updated = keygate(
        &app,
        &[
            "keys",
            "update",
            "--tenant",
            "acme",
            &key_id,
            "--name",
            "Warehouse (nightly)",
            "--scope",
            "analytics:read",
            "-o",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(updated["key"]["name"], "Warehouse (nightly)");
    let stored = get_key(&app, "acme", &key_id).await;
    assert_eq!(
        (stored.name.as_str(), stored.scopes.clone()),
        ("Warehouse (nightly)", vec!["analytics:read".to_owned()])
    );
    assert_eq!(stored.metadata.get("team").map(String::as_str), Some("data"), "fields not given are kept");

    // check: exit 0 when allowed, 5 when denied, and why.
    let allowed =
        keygate(&app, &["check", &secret, "--scope", "analytics:read", "--site", "shop.example", "-o", "json"]).await;
    let allowed = allowed.json();
    assert_eq!(
        names(&allowed),
        set(&[
            "allowed",
            "reason",
            "message",
            "http_status",
            "tenant_id",
            "key_id",
            "key_name",
            "scopes",
            "site_ids",
            "environment",
            "metadata",
            "expires_at",
            "rate_limit",
        ])
    );
    assert_eq!((allowed["allowed"].clone(), allowed["rate_limit"]["limit"].clone()), (Value::Bool(true), 120.into()));
    let denied = keygate_with(
        app.address,
        &["check", "-", "--scope", "billing:read", "--site", "shop.example", "-o", "json"],
        &secret,
    )
    .await;
    assert_eq!(denied.code, Some(5), "{denied:#?}");
    let denied: Value = serde_json::from_str(&denied.stdout).unwrap();
    assert_eq!(denied["reason"], "DENY_REASON_SCOPE_MISSING");
    assert_eq!(denied["http_status"], 403);
    let shown = keygate(&app, &["check", &secret, "--scope", "billing:read", "--site", "shop.example"]).await;
    assert_eq!(shown.code, Some(5));
    assert!(shown.stdout.contains("denied: DENY_REASON_SCOPE_MISSING"), "{shown:#?}");
    assert!(shown.stdout.contains("API key missing required scope: billing:read"), "{shown:#?}");

    // usage and audit.
    let today = chrono::Utc::now().date_naive();
    let usage = keygate(&app, &["usage", "--tenant", "acme", &key_id, "-o", "json"]).await.json();
    let days = usage["days"].as_array().unwrap();
    assert_eq!(days.len(), 30, "the last 30 days by default");
    assert_eq!(days[29]["date"], today.to_string());
    assert_eq!(names(&days[0]), set(&["date", "allowed", "denied", "denied_by_reason"]));
    let from = (today - chrono::Days::new(2)).to_string();
    let usage = keygate(&app, &["usage", "--tenant", "acme", &key_id, "--from", &from, "-o", "json"]).await.json();
    assert_eq!(usage["days"].as_array().unwrap().len(), 3);
    let audit =
        keygate(&app, &["audit", "--tenant", "acme", "--type", "key-created,key-updated", "-o", "json"]).await.json();
    let events = audit["events"].as_array().unwrap();
    let types: BTreeSet<&str> = events.iter().map(|event| event["event_type"].as_str().unwrap()).collect();
    assert_eq!(types, BTreeSet::from(["AUDIT_EVENT_TYPE_KEY_CREATED", "AUDIT_EVENT_TYPE_KEY_UPDATED"]));
    assert_eq!(events.len(), 2, "{audit}");
    assert_eq!(events[0]["actor"], "tests");
    assert_eq!(
        names(&events[0]),
        set(&["event_id", "tenant_id", "key_id", "event_type", "actor", "occurred_at", "details", "count"])
    );
    let future = keygate(&app, &["audit", "--tenant", "acme", "--since", "2999-01-01T00:00:00Z", "-o", "json"]).await;
    assert_eq!(future.json()["events"], serde_json::json!([]), "--since filters");

    // rotate, then revoke the old key.
    let rotated = keygate(&app, &["keys", "rotate", "--tenant", "acme", &key_id, "--grace-period", "1h", "-o", "json"])
        .await
        .json();
    assert_eq!(names(&rotated), set(&["key", "secret", "previous_key"]));
    assert_eq!(rotated["key"]["rotated_from_key_id"], key_id.as_str());
    let new_secret = rotated["secret"].as_str().unwrap();
    let check_new = keygate(&app, &["check", new_secret, "--scope", "analytics:read", "--site", "shop.example"]).await;
    assert_eq!(check_new.code, Some(0), "{check_new:#?}");
    let revoked = keygate(&app, &["keys", "revoke", "--tenant", "acme", &key_id, "-o", "json"]).await.json();
    assert_eq!(revoked["key"]["state"], "KEY_STATE_REVOKED");
    let check_old =
        keygate(&app, &["check", &secret, "--scope", "analytics:read", "--site", "shop.example", "-o", "json"]).await;
    assert_eq!(check_old.code, Some(5));
    assert!(check_old.stdout.contains("DENY_REASON_KEY_REVOKED"), "{check_old:#?}");
    let active = keygate(&app, &["keys", "list", "--tenant", "acme", "-o", "json"]).await.json();
    assert_eq!(active["keys"].as_array().unwrap().len(), 1, "revoked keys are left out without --include-revoked");
    let all = keygate(&app, &["keys", "list", "--tenant", "acme", "--include-revoked", "-o", "json"]).await.json();
    assert_eq!(all["keys"].as_array().unwrap().len(), 2);

    // import, from standard input.
    // A key in keygate's own shape (56 hex digits and a CRC-32 of what precedes them) that
    // another keygate minted.
    let body = format!("kg_live_{}", "5e".repeat(28));
    let moved = format!("{body}{:08x}", crc32fast::hash(body.as_bytes()));
    let line = format!(r#"{{"secret": "{moved}", "name": "Imported", "scopes": ["events:read"]}}"#);
    let imported = keygate_with(app.address, &["keys", "import", "--tenant", "acme", "-"], &line).await;
    assert_eq!(imported.code, Some(0), "{imported:#?}");
    assert!(imported.stdout.contains("imported 1 keys"), "{imported:#?}");
    assert!(!imported.stdout.contains(&moved[8..]) && !imported.stderr.contains(&moved[8..]));
    let check_imported = keygate_with(app.address, &["check", "-", "--scope", "events:read"], &moved).await;
    assert_eq!(check_imported.code, Some(0), "the imported key works: {check_imported:#?}");
}

async fn get_tenant(app: &TestApp, tenant_id: &str) -> Tenant {
    let response = app.admin.clone().get_tenant(GetTenantRequest { tenant_id: tenant_id.into() }).await.unwrap();
    response.into_inner().tenant.unwrap()
}

/// `count` keys imported by their hashes, created `age` ago.
async fn import_keys(app: &TestApp, tenant_id: &str, count: usize, age: chrono::Duration) {
    let created = chrono::Utc::now() - age;
    let keys: Vec<ImportedKey> = (0..count)
        .map(|index| ImportedKey {
            credential: Some(imported_key::Credential::SecretSha256(format!("{:064x}", index + 1))),
            display_prefix: format!("kg_live_{index:04x}"),
            name: format!("Imported {index}"),
            scopes: vec!["events:read".into()],
            created_at: Some(prost_types::Timestamp { seconds: created.timestamp(), nanos: 0 }),
            ..Default::default()
        })
        .collect();
    for batch in keys.chunks(1000) {
        let request = ImportKeysRequest { tenant_id: tenant_id.into(), keys: batch.to_vec(), validate_only: false };
        let results = app.admin.clone().import_keys(request).await.unwrap().into_inner().results;
        for result in results {
            assert!(matches!(result.result, Some(import_key_result::Result::Key(_))), "{result:?}");
        }
    }
}

async fn lists_and_the_audit_log_page_through_everything(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant_with(
        &app,
        PutTenantRequest { tenant_id: "big".into(), unlimited_keys: Some(true), ..Default::default() },
    )
    .await;
    import_keys(&app, "big", 1_205, chrono::Duration::days(3)).await;
    let listed = keygate(&app, &["keys", "list", "--tenant", "big", "-o", "json"]).await.json();
    let ids: BTreeSet<&str> =
        listed["keys"].as_array().unwrap().iter().map(|key| key["key_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1_205, "every key once, across pages of 1 000");
    let table = keygate(&app, &["keys", "list", "--tenant", "big"]).await;
    assert_eq!(table.stdout.lines().count(), 1_206, "a header and a line per key");
    let audit = keygate(&app, &["audit", "--tenant", "big", "--type", "key-imported", "-o", "json"]).await.json();
    let events: BTreeSet<&str> =
        audit["events"].as_array().unwrap().iter().map(|event| event["event_id"].as_str().unwrap()).collect();
    assert_eq!(events.len(), 1_205);
}

async fn errors_name_the_code_and_the_field_and_exit_codes_hold(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    put_tenant(&app, "other").await;
    put_site(&app, "other", "theirs.example").await.unwrap();

    // 1: the server refused the input; the message names the field and the code.
    let bad_scope = keygate(&app, &["keys", "create", "--tenant", "acme", "--name", "x", "--scope", "Bad Scope"]).await;
    assert_eq!(bad_scope.code, Some(1), "{bad_scope:#?}");
    assert!(
        bad_scope.stderr.contains("scopes[0]: ") && bad_scope.stderr.contains("(INVALID_ARGUMENT)"),
        "{bad_scope:#?}"
    );
    assert!(bad_scope.stdout.is_empty(), "nothing on stdout for a script to mistake: {bad_scope:#?}");
    let bad_site = keygate(
        &app,
        &["keys", "create", "--tenant", "acme", "--name", "x", "--scope", "a:b", "--site", "a:b", "--site", "nope"],
    )
    .await;
    assert_eq!(bad_site.code, Some(1));
    assert!(bad_site.stderr.contains("site_ids[0]"), "{bad_site:#?}");
    let taken = keygate(&app, &["sites", "put", "--tenant", "acme", "theirs.example"]).await;
    assert_eq!(taken.code, Some(1));
    assert!(taken.stderr.contains("(ALREADY_EXISTS)"), "{taken:#?}");
    // 4: what the command names does not exist.
    let missing = keygate(&app, &["keys", "get", "--tenant", "acme", "key_0000000000000000000000"]).await;
    assert_eq!(missing.code, Some(4), "{missing:#?}");
    assert!(missing.stderr.contains("(NOT_FOUND)"), "{missing:#?}");
    let no_tenant = keygate(&app, &["tenants", "get", "nobody"]).await;
    assert_eq!(no_tenant.code, Some(4), "{no_tenant:#?}");
    // 2: the command line is wrong, before anything is sent.
    for args in [
        &["keys", "create", "--tenant", "acme", "--name", "x"][..],
        &["keys", "update", "--tenant", "acme", "key_1"],
        &["keys", "create", "--tenant", "acme", "--name", "x", "--scope", "a:b", "--expires-in", "soon"],
        &["keys", "create", "--tenant", "acme", "--name", "x", "--scope", "a:b", "--metadata", "novalue"],
        &["usage", "--tenant", "acme", "key_1", "--from", "yesterday"],
        &["audit", "--tenant", "acme", "--type", "key-exploded"],
        &["keys", "frobnicate"],
    ] {
        let run = keygate(&app, args).await;
        assert_eq!(run.code, Some(2), "{args:?}: {run:#?}");
        assert!(run.stderr.starts_with("keygate: "), "{args:?}: {run:#?}");
    }
    // 3: keygate refused the caller, or is not there.
    let wrong_token = tokio::task::spawn_blocking({
        let address = app.address;
        move || {
            assert_cmd::Command::new(env!("CARGO_BIN_EXE_keygate"))
                .args(["tenants", "get", "acme"])
                .env("KEYGATE_ADDR", format!("http://{address}"))
                .env("KEYGATE_ADMIN_TOKEN", "not-a-token")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(wrong_token.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&wrong_token.stderr).contains("(UNAUTHENTICATED)"));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let unreachable = keygate_with(closed, &["tenants", "get", "acme"], "").await;
    assert_eq!(unreachable.code, Some(3), "{unreachable:#?}");
    assert!(unreachable.stderr.contains("is keygate running"), "{unreachable:#?}");
    // Nothing was created by any of it.
    let request = ListKeysRequest { tenant_id: "acme".into(), ..Default::default() };
    assert!(app.admin.clone().list_keys(request).await.unwrap().into_inner().keys.is_empty());
}

/// `command` run under a pseudo-terminal (util-linux `script`), as a person at a terminal sees
/// its standard output.
async fn at_a_terminal(address: std::net::SocketAddr, command: &str) -> String {
    let command = format!("{} {command}", env!("CARGO_BIN_EXE_keygate"));
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .env("KEYGATE_ADDR", format!("http://{address}"))
            .env("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("util-linux `script`");
        assert!(output.status.success(), "{command}: {output:?}");
        String::from_utf8_lossy(&output.stdout).replace("\r\n", "\n")
    })
    .await
    .unwrap()
}

async fn people_get_aligned_tables_relative_times_and_the_secret_once() {
    let Some(app) = spawn_app(Backend::Sqlite).await else { return };
    put_tenant(&app, "acme").await;
    import_keys(&app, "acme", 3, chrono::Duration::days(3) + chrono::Duration::minutes(5)).await;

    // A table: a header, aligned columns, times relative to now.
    let listed = keygate(&app, &["keys", "list", "--tenant", "acme"]).await;
    assert_eq!(listed.code, Some(0), "{listed:#?}");
    let lines: Vec<&str> = listed.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{listed:#?}");
    assert!(lines[0].starts_with("KEY ID") && lines[0].contains("CREATED"), "{listed:#?}");
    let column = lines[0].find("CREATED").unwrap();
    for line in &lines[1..] {
        // Columns line up as characters (the prefix ends with a three-byte `…`).
        let from: String = line.chars().skip(column).take("3 days ago".len()).collect();
        assert_eq!(from, "3 days ago", "aligned, relative: {listed:#?}");
        assert!(line.contains("never"), "never used, never expires: {line}");
    }

    // Piped (a script): the secret alone on stdout; the details and the note on stderr.
    let piped = keygate(&app, &["keys", "create", "--tenant", "acme", "--name", "CI", "--scope", "events:write"]).await;
    assert_eq!(piped.code, Some(0), "{piped:#?}");
    let secret = piped.stdout.trim_end();
    assert!(secret.starts_with("kg_live_") && !secret.contains(char::is_whitespace), "{piped:#?}");
    assert_eq!(piped.stdout, format!("{secret}\n"));
    assert!(piped.stderr.contains("shown once") && piped.stderr.contains("key id"), "{piped:#?}");
    assert!(!piped.stderr.contains(&secret[8..]), "the secret is printed once: {piped:#?}");
    let check = keygate_with(app.address, &["check", "-", "--scope", "events:write"], secret).await;
    assert_eq!(check.code, Some(0), "the printed secret is the key: {check:#?}");

    // At a terminal: the details, the secret and the note, all on stdout.
    let shown = at_a_terminal(app.address, "keys create --tenant acme --name Laptop --scope events:read").await;
    assert!(shown.contains("key id") && shown.contains("created"), "{shown}");
    let secret_line = shown.lines().find(|line| line.starts_with("secret")).unwrap_or_else(|| panic!("{shown}"));
    assert!(secret_line.contains("kg_live_"), "{shown}");
    assert!(shown.contains("This secret is shown once"), "{shown}");
    let created_line = shown.lines().find(|line| line.starts_with("created")).unwrap();
    assert!(created_line.ends_with("(now)") || created_line.contains("seconds ago"), "{shown}");
    let tenant = at_a_terminal(app.address, "tenants get acme").await;
    assert!(tenant.lines().any(|line| line.starts_with("api access") && line.ends_with("enabled")), "{tenant}");
}

/// Every subcommand path of `keygate` (`keys create`, ...), leaves only.
fn subcommand_paths(command: &clap::Command, prefix: Vec<String>, paths: &mut Vec<Vec<String>>) {
    for subcommand in command.get_subcommands() {
        let mut path = prefix.clone();
        path.push(subcommand.get_name().to_owned());
        if subcommand.has_subcommands() {
            subcommand_paths(subcommand, path, paths);
        } else {
            paths.push(path);
        }
    }
}

async fn every_subcommand_has_an_example_and_none_puts_a_token_on_the_command_line() {
    let mut paths = Vec::new();
    subcommand_paths(&keygate::config::Cli::command(), Vec::new(), &mut paths);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    for wanted in
        [&["tenants", "put"][..], &["sites", "delete"], &["keys", "rotate"], &["usage"], &["audit"], &["check"]]
    {
        assert!(paths.iter().any(|path| path == wanted), "{wanted:?} is a subcommand: {paths:?}");
    }
    for path in paths.iter().filter(|path| path[0] != "help") {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let help = keygate_with(closed, &args, "").await;
        assert_eq!(help.code, Some(0), "{args:?}: {help:#?}");
        assert!(help.stdout.contains("Example"), "`keygate {}` shows an example: {}", path.join(" "), help.stdout);
        let examples = &help.stdout[help.stdout.find("Example").unwrap()..];
        assert!(
            !examples.contains("--admin-token") && !examples.contains("Bearer "),
            "an example puts a token on the command line: {examples}"
        );
    }
}

/// `keygate completions SHELL`, and that `check` (the shell's `-n`) parses it.
async fn completions_parse(shell: &str, check: &[&str]) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let script = keygate_with(closed, &["completions", shell], "").await;
    assert_eq!(script.code, Some(0), "{script:#?}");
    for word in ["tenants", "rotate", "include-revoked", "output"] {
        assert!(script.stdout.contains(word), "{shell} completes {word}");
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &script.stdout).unwrap();
    let parsed = std::process::Command::new(shell).args(check).arg(file.path()).output().unwrap();
    assert!(parsed.status.success(), "{shell} cannot parse its completions: {parsed:?}");
}

/// The shell's path, or a skip (with the reason) when it is not installed here.
fn shell(name: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        crate::harness::skip(format!("no {name} here (.ci/run installs it)"));
    }
    found
}

/// What `shell` offers after `keygate keys ` (bash and fish can be asked without a terminal).
async fn offered_after_keygate_keys(shell_name: &str) -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let script = keygate_with(closed, &["completions", shell_name], "").await;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &script.stdout).unwrap();
    let path = file.path().display().to_string();
    let (program, ask) = match shell_name {
        "bash" => (
            "bash",
            format!(
                "source {path}; COMP_WORDS=(keygate keys ''); COMP_CWORD=2; COMP_LINE='keygate keys '; COMP_POINT=13; _keygate keygate '' keys; printf '%s\\n' \"${{COMPREPLY[@]}}\""
            ),
        ),
        _ => ("fish", format!("source {path}; complete -C 'keygate keys '")),
    };
    let output = std::process::Command::new(program).args(["-c", &ask]).output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn bash_completions_offer_the_subcommands() {
    if shell("bash") {
        completions_parse("bash", &["-n"]).await;
        let offered = offered_after_keygate_keys("bash").await;
        for word in ["create", "list", "rotate", "import"] {
            assert!(offered.lines().any(|line| line.trim() == word), "bash offers {word}: {offered}");
        }
    }
}

async fn zsh_completions_parse() {
    if shell("zsh") {
        completions_parse("zsh", &["-n"]).await;
    }
}

async fn fish_completions_offer_the_subcommands() {
    if shell("fish") {
        completions_parse("fish", &["--no-execute"]).await;
        let offered = offered_after_keygate_keys("fish").await;
        for word in ["create", "list", "rotate", "import"] {
            assert!(offered.lines().any(|line| line.split('\t').next() == Some(word)), "fish offers {word}: {offered}");
        }
    }
}

async fn check_never_prints_the_key_it_was_given() {
    let Some(app) = spawn_app(Backend::Sqlite).await else { return };
    let made_up = "kg_live_0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab";
    for key in [made_up, "kg_live_not-hex-SECRETSECRET", "SECRETSECRET"] {
        let run = keygate(&app, &["check", key, "--scope", "events:read"]).await;
        assert_eq!(run.code, Some(5), "{run:#?}");
        assert!(!run.stdout.contains(&key[2..]) && !run.stderr.contains(&key[2..]), "{run:#?}");
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let run = keygate_with(closed, &["check", made_up, "--scope", "events:read"], "").await;
    assert_eq!(run.code, Some(3));
    assert!(!run.stderr.contains(&made_up[8..]), "{run:#?}");
    let flood = "k".repeat(100_000);
    let long = keygate_with(closed, &["check", "-", "--scope", "events:read"], &flood).await;
    assert_eq!(long.code, Some(2), "more than a key on stdin is refused before sending: {long:#?}");
    let bad = keygate_with(closed, &["check", made_up], "").await;
    assert_eq!(bad.code, Some(2));
    assert!(!bad.stderr.contains(&made_up[8..]), "a usage error does not echo the key: {bad:#?}");
}

async fn hostile_values_cannot_rewrite_the_terminal() {
    let Some(app) = spawn_app(Backend::Sqlite).await else { return };
    put_tenant(&app, "acme").await;
    let hostile = "x\u{1b}]0;pwned\u{7}\u{1b}[2J\rstate         revoked";
    let mut request = key_request("acme", &["events:read"]);
    request.metadata.insert("note".into(), hostile.into());
    let (key, secret) = create_key(&app, request).await.unwrap();
    let shown = keygate(&app, &["keys", "get", "--tenant", "acme", &key.key_id]).await;
    assert_eq!(shown.code, Some(0), "{shown:#?}");
    assert!(!shown.stdout.contains(['\u{1b}', '\u{7}', '\r']), "{shown:#?}");
    assert!(shown.stdout.contains("note=x\\u{1b}]0;pwned"), "shown escaped: {shown:#?}");
    let json = keygate(&app, &["keys", "get", "--tenant", "acme", &key.key_id, "-o", "json"]).await.json();
    assert_eq!(json["key"]["metadata"]["note"], hostile, "JSON keeps the value itself");
    let checked = keygate_with(app.address, &["check", "-", "--scope", "events:read"], &secret).await;
    assert!(checked.stdout.contains("metadata") && !checked.stdout.contains('\u{1b}'), "{checked:#?}");
    // A value that looks like more entries is quoted; a zero-width space is shown.
    let mut request = key_request("acme", &["events:read"]);
    request.metadata.insert("note".into(), "x, team=admin".into());
    request.metadata.insert("owner".into(), "a\u{200b}b".into());
    let (key, _) = create_key(&app, request).await.unwrap();
    let shown = keygate(&app, &["keys", "get", "--tenant", "acme", &key.key_id]).await;
    assert!(shown.stdout.contains(r#"note="x, team=admin""#), "{shown:#?}");
    assert!(shown.stdout.contains(r"owner=a\u{200b}b"), "{shown:#?}");
}

async fn bad_flags_are_refused_before_anything_is_sent() {
    let Some(app) = spawn_app(Backend::Sqlite).await else { return };
    put_tenant(&app, "acme").await;
    let (key, _) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let key_id = key.key_id.as_str();
    let today = chrono::Utc::now().date_naive().to_string();
    for args in [
        &[
            "keys",
            "create",
            "--tenant",
            "acme",
            "--name",
            "x",
            "--scope",
            "a:b",
            "--metadata",
            "a=1",
            "--metadata",
            "a=2",
        ][..],
        &["keys", "update", "--tenant", "acme", key_id, "--expires-in", "999999999d"],
        &["audit", "--tenant", "acme", "--since", "2030-01-01T00:00:00Z", "--until", "2020-01-01T00:00:00Z"],
        &["usage", "--tenant", "acme", key_id, "--from", "26-1-1"],
        &["usage", "--tenant", "acme", key_id, "--from", &today, "--to", "2020-01-01"],
    ] {
        let run = keygate(&app, args).await;
        assert_eq!(run.code, Some(2), "{args:?}: {run:#?}");
    }
    assert_eq!(get_key(&app, "acme", key_id).await.expires_at, None, "a refused --expires-in changed nothing");
    for (addr, ca) in [
        ("ftp://127.0.0.1:1", None),
        ("grpcs://127.0.0.1:1", None),
        (&*format!("http://{}", app.address), Some("/dev/null")),
    ] {
        let mut env = vec![("KEYGATE_ADDR", addr)];
        env.extend(ca.map(|ca| ("KEYGATE_CA_CERT", ca)));
        let run = keygate_in(app.address, &["tenants", "get", "acme"], "", &env).await;
        assert_eq!(run.code, Some(2), "{env:?} is refused, the token never sent in plaintext: {run:#?}");
    }
    // The server's bound on an expiry, in the same words however far past it a flag goes.
    for far in ["36600d", "999999d"] {
        let args = ["keys", "create", "--tenant", "acme", "--name", "x", "--scope", "a:b", "--expires-in", far];
        let run = keygate(&app, &args).await;
        assert_eq!(run.code, Some(1), "{run:#?}");
        assert!(run.stderr.contains("within 100 years"), "{far}: {run:#?}");
    }
    // A day works where a time does, and KEYGATE_TENANT where --tenant does.
    let since_today = keygate(&app, &["audit", "--tenant", "acme", "--since", &today, "-o", "json"]).await.json();
    assert!(!since_today["events"].as_array().unwrap().is_empty());
    let body = format!("kg_live_{}", "7a".repeat(28));
    let line = format!(
        r#"{{"secret": "{body}{:08x}", "name": "Moved", "scopes": ["events:read"]}}"#,
        crc32fast::hash(body.as_bytes())
    );
    let imported = keygate_in(app.address, &["import", "-"], &line, &[("KEYGATE_TENANT", "acme")]).await;
    assert_eq!(imported.code, Some(0), "{imported:#?}");
}

/// `keygate ARGS` under `sh`, with `redirect` applied to its standard output.
async fn keygate_redirected(app: &TestApp, args: &str, redirect: &str) -> Run {
    let script = format!("{} {args} {redirect}", env!("CARGO_BIN_EXE_keygate"));
    let address = app.address;
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new("sh")
            .args(["-c", &script])
            .env("KEYGATE_ADDR", format!("http://{address}"))
            .env("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap();
        Run::from(output)
    })
    .await
    .unwrap()
}

async fn a_secret_that_cannot_be_shown_is_not_minted_or_is_named_for_revoking() {
    let Some(app) = spawn_app(Backend::Sqlite).await else { return };
    put_tenant(&app, "acme").await;
    let create = "keys create --tenant acme --name Lost --scope events:read";
    for redirect in [">&-", ">/dev/null"] {
        let run = keygate_redirected(&app, create, redirect).await;
        assert_eq!(run.code, Some(2), "{redirect}: {run:#?}");
        assert!(run.stderr.contains("the new secret would be lost"), "{run:#?}");
    }
    let request = ListKeysRequest { tenant_id: "acme".into(), ..Default::default() };
    assert!(app.admin.clone().list_keys(request.clone()).await.unwrap().into_inner().keys.is_empty(), "nothing minted");
    let full = keygate_redirected(&app, create, ">/dev/full").await;
    assert_eq!(full.code, Some(2), "{full:#?}");
    let keys = app.admin.clone().list_keys(request).await.unwrap().into_inner().keys;
    assert_eq!(keys.len(), 1);
    let revoke = format!("keygate keys revoke --tenant acme {}", keys[0].key_id);
    assert!(full.stderr.contains(&revoke), "the message names the key to revoke: {full:#?}");
    assert!(!full.stderr.contains("shown once"), "no note for a secret that was not shown: {full:#?}");
    // A lost rotation: the old key may be revoked already, so the way out is to rotate again.
    let rotate = format!("keys rotate --tenant acme {}", keys[0].key_id);
    let lost = keygate_redirected(&app, &rotate, ">/dev/full").await;
    assert_eq!(lost.code, Some(2), "{lost:#?}");
    let request = ListKeysRequest { tenant_id: "acme".into(), ..Default::default() };
    let keys = app.admin.clone().list_keys(request).await.unwrap().into_inner().keys;
    let successor = keys.iter().find(|key| !key.rotated_from_key_id.is_empty()).expect("the rotation happened");
    let again = format!("keygate keys rotate --tenant acme {}", successor.key_id);
    assert!(lost.stderr.contains(&again) && !lost.stderr.contains("keys revoke"), "{lost:#?}");
}

async fn an_address_that_is_not_keygate_is_named_as_such() {
    // Something that answers HTTP/1.1 where keygate's gRPC port should be.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(1) {
            use std::io::{Read, Write};
            let Ok(mut stream) = stream else { continue };
            let _ = stream.read(&mut [0; 1024]);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            // Left open until the client gives up, so that it reads the answer rather than
            // finding the connection closed.
            while stream.read(&mut [0; 1024]).is_ok_and(|read| read > 0) {}
        }
    });
    let run = keygate_with(address, &["tenants", "get", "acme"], "").await;
    assert_eq!(run.code, Some(3), "{run:#?}");
    assert!(run.stderr.contains("does not speak gRPC"), "{run:#?}");
}
