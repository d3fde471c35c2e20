//! Taking over an existing product's keys: any key shape minted, keys keygate did not mint
//! imported by plaintext or by hash, and `keygate import` against a running server.

use std::time::Duration;

use keygate::domain::clock::Clock;
use keygate::proto::*;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::*;

crate::trials!(
    every_backend: [
        each_reference_shape_is_minted_checked_and_rotated,
        keys_of_an_earlier_shape_keep_working_on_every_replica,
        keys_minted_before_shapes_were_recorded_survive_a_format_change,
        imported_keys_pass_check_with_their_settings,
        importing_is_idempotent_and_never_takes_another_tenants_key,
        a_key_presented_before_its_import_works_right_after_on_every_replica,
        a_flood_of_random_keys_in_an_imported_shape_stays_bounded,
        imports_are_not_refused_by_the_key_limit_but_count_toward_it,
    ],
    once: [
        display_prefixes_of_imported_keys_hide_enough_and_fit_a_shape,
        keygate_import_reads_json_lines_and_reports_every_line,
        keygate_import_splits_large_batches_and_rejects_repeated_keys,
        keygate_import_stopped_halfway_says_what_was_not_sent,
    ],
);

/// The shapes the reference products promise, with the length of their keys.
const SHAPES: [(&str, usize); 4] =
    [("et_{env}_{hex:32}", 40), ("tga_{hex:64}", 68), ("bj_{env}_{hex:64}", 72), ("zta_{env}_{alnum:36}", 45)];

/// The keys products issued before keygate: their shapes without keygate's checksum.
const IMPORTED: &str = "tga_{hex:64} bj_{env}_{hex:64} ^legacy_[A-Za-z0-9]{24}$";

fn random_hex(length: usize) -> String {
    let mut bytes = vec![0u8; length.div_ceil(2)];
    for byte in &mut bytes {
        *byte = rand_byte();
    }
    bytes.iter().map(|byte| format!("{byte:02x}")).collect::<String>()[..length].to_owned()
}

fn rand_byte() -> u8 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0x2545_f491_4f6c_dd1d);
    let mut x = STATE.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x ^ std::process::id() as u64) as u8
}

pub fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// An imported key with one scope, given by its plaintext.
fn by_secret(secret: &str, scopes: &[&str]) -> ImportedKey {
    ImportedKey {
        credential: Some(imported_key::Credential::Secret(secret.into())),
        name: "imported".into(),
        scopes: scopes.iter().map(|scope| scope.to_string()).collect(),
        ..Default::default()
    }
}

async fn import(app: &TestApp, tenant: &str, keys: Vec<ImportedKey>) -> Vec<Result<ApiKey, tonic::Status>> {
    let request = ImportKeysRequest { tenant_id: tenant.into(), keys, validate_only: false };
    let response = app.admin.clone().import_keys(request).await.expect("ImportKeys").into_inner();
    response
        .results
        .into_iter()
        .map(|result| match result.result.expect("a result per key") {
            import_key_result::Result::Key(key) => Ok(key),
            import_key_result::Result::Error(error) => Err(tonic::Status::with_details(
                Code::from_i32(error.code),
                error.message.clone(),
                prost::Message::encode_to_vec(&error).into(),
            )),
        })
        .collect()
}

fn reason_of(status: &tonic::Status) -> String {
    status.get_error_details().error_info().map(|info| info.reason.clone()).unwrap_or_default()
}

async fn each_reference_shape_is_minted_checked_and_rotated(backend: Backend) {
    for (shape, length) in SHAPES {
        let Some(app) = spawn_app_with(backend, &["--key-format", shape]).await else { return };
        put_tenant(&app, "acme").await;
        let (key, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
        let literal = shape.split('{').next().unwrap();
        assert!(secret.starts_with(literal) && secret.len() == length, "{shape}: {secret}");
        assert_eq!(key.display_prefix, secret[..12], "{shape}: 12 characters are shown");
        assert!(check(&app, &secret, "events:read", "").await.allowed, "{shape}");
        let typo = format!("{}{}", &secret[..secret.len() - 1], if secret.ends_with('0') { '1' } else { '0' });
        assert_eq!(check(&app, &typo, "events:read", "").await.reason(), DenyReason::KeyMalformed, "{shape}");
        let rotation = RotateKeyRequest { tenant_id: "acme".into(), key_id: key.key_id.clone(), grace_period: None };
        let rotated = app.admin.clone().rotate_key(rotation).await.unwrap().into_inner();
        assert!(rotated.secret.starts_with(literal) && rotated.secret.len() == length, "{shape}");
        assert!(check(&app, &rotated.secret, "events:read", "").await.allowed);
        assert_eq!(check(&app, &secret, "events:read", "").await.reason(), DenyReason::KeyRevoked);
    }
}

async fn keys_of_an_earlier_shape_keep_working_on_every_replica(backend: Backend) {
    let Some(app) = spawn_app_with(backend, &["--key-format", "et_{env}_{hex:32}"]).await else { return };
    let old_replica = spawn_replica(&app, &["--key-format", "et_{env}_{hex:32}"]).await;
    put_tenant(&app, "acme").await;
    let (_, old) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    // The deployment moves to another shape; the replica that still runs the old configuration
    // keeps serving next to it (a rolling update).
    let app = app.restart_with(&["--key-format", "tga_{hex:64}", "--display-prefix-chars", "8"]).await;
    let (key, new) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    assert!(new.starts_with("tga_") && key.display_prefix == new[..8]);
    assert!(check(&app, &old, "events:read", "").await.allowed, "a key of the earlier shape still works");
    let started = std::time::Instant::now();
    while !check(&old_replica, &new, "events:read", "").await.allowed {
        assert!(started.elapsed() < Duration::from_secs(5), "the other replica never learned the new shape");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A database from a release that did not record key shapes (every key `{prefix}_{env}_` + 64
/// hex, the prefix from KEYGATE_KEY_PREFIX): upgrading and changing the format in the same
/// restart keeps those keys working, and so does a format change after a start that minted
/// nothing.
async fn keys_minted_before_shapes_were_recorded_survive_a_format_change(backend: Backend) {
    let Some(app) = spawn_app_with(backend, &["--key-prefix", "et"]).await else { return };
    put_tenant(&app, "acme").await;
    let (_, old) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let url = app.database_url.clone();
    let app = app.restart_with(&["--key-prefix", "et"]).await;
    // What the earlier release left: keys, and no recorded shapes.
    let mut connection = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.unwrap();
    sqlx::query("DELETE FROM key_formats").execute(&mut connection).await.unwrap();
    let app = app.restart_with(&["--key-format", "et_{env}_{hex:32}"]).await;
    assert!(check(&app, &old, "events:read", "").await.allowed, "a key of the earlier release still works");
    // A start that mints nothing records its shape all the same.
    let app = app.restart_with(&["--key-format", "zta_{env}_{alnum:36}"]).await;
    let app = app.restart_with(&["--key-format", "tga_{hex:64}"]).await;
    assert!(check(&app, &old, "events:read", "").await.allowed);
    let (_, newer) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let app = app.restart_with(&["--key-format", "bj_{env}_{hex:64}"]).await;
    assert!(check(&app, &newer, "events:read", "").await.allowed);
    let _ = <sqlx::AnyConnection as sqlx::Connection>::close(connection).await;
}

async fn imported_keys_pass_check_with_their_settings(backend: Backend) {
    let Some(app) = spawn_app_with(backend, &["--imported-key-formats", IMPORTED]).await else { return };
    put_tenant(&app, "acme").await;
    put_site(&app, "acme", "shop.example").await.unwrap();
    let trackagoat = format!("tga_{}", random_hex(64));
    let jetrack = format!("bj_test_{}", random_hex(64));
    let legacy = format!("legacy_{}", "aB3".repeat(8));
    let now = app.clock.now();
    let at = |time: chrono::DateTime<chrono::Utc>| Some(prost_types::Timestamp { seconds: time.timestamp(), nanos: 0 });
    let keys = vec![
        // trackagoat stores SHA-256 hashes: the key itself never reaches keygate.
        ImportedKey {
            credential: Some(imported_key::Credential::SecretSha256(sha256_hex(&trackagoat))),
            display_prefix: trackagoat[..12].into(),
            name: "from trackagoat".into(),
            scopes: vec!["events:read".into()],
            site_ids: vec!["shop.example".into()],
            rate_limit_per_minute: 2,
            created_at: at(now - chrono::Duration::days(400)),
            last_used_at: at(now - chrono::Duration::days(1)),
            ..Default::default()
        },
        ImportedKey {
            expires_at: at(now + chrono::Duration::hours(1)),
            metadata: [("plan".to_owned(), "pro".to_owned())].into(),
            ..by_secret(&jetrack, &["stats:*"])
        },
        by_secret(&legacy, &["*"]),
    ];
    let results = import(&app, "acme", keys).await;
    let imported: Vec<ApiKey> = results.into_iter().map(|result| result.expect("imported")).collect();
    assert_eq!(imported[0].display_prefix, trackagoat[..12]);
    assert_eq!(imported[1].environment(), KeyEnvironment::Test, "the environment the key states");
    assert_eq!(imported[1].display_prefix, jetrack[..12]);
    assert!(imported[0].last_used_at.is_some() && imported[0].key_id < imported[1].key_id, "ids sort by age");

    // Scopes, sites, limits and expiry hold as for minted keys.
    assert!(check(&app, &trackagoat, "events:read", "shop.example").await.allowed);
    assert_eq!(check(&app, &trackagoat, "events:write", "shop.example").await.reason(), DenyReason::ScopeMissing);
    assert_eq!(check(&app, &trackagoat, "events:read", "").await.reason(), DenyReason::SiteForbidden);
    assert!(check(&app, &trackagoat, "events:read", "shop.example").await.allowed);
    assert_eq!(check(&app, &trackagoat, "events:read", "shop.example").await.reason(), DenyReason::RateLimited);
    let response = check(&app, &jetrack, "stats:read", "").await;
    assert!(response.allowed && response.metadata["plan"] == "pro");
    assert!(check(&app, &legacy, "anything:at_all", "").await.allowed);
    // A string of an imported shape that was never imported is an unknown key.
    let stranger = format!("tga_{}", random_hex(64));
    assert_eq!(check(&app, &stranger, "events:read", "").await.reason(), DenyReason::KeyUnknown);
    app.clock.advance(chrono::Duration::hours(2));
    assert_eq!(check(&app, &jetrack, "stats:read", "").await.reason(), DenyReason::KeyExpired);

    // Rotating an imported key mints one of the deployment's own shape.
    let rotation =
        RotateKeyRequest { tenant_id: "acme".into(), key_id: imported[2].key_id.clone(), grace_period: None };
    let rotated = app.admin.clone().rotate_key(rotation).await.unwrap().into_inner();
    assert!(rotated.secret.starts_with("kg_live_"), "{}", &rotated.secret[..8]);
    assert!(check(&app, &rotated.secret, "anything:at_all", "").await.allowed);
    assert_eq!(check(&app, &legacy, "anything:at_all", "").await.reason(), DenyReason::KeyRevoked);

    // Each import is in the audit log, with its actor.
    let request = ListAuditEventsRequest {
        tenant_id: "acme".into(),
        event_types: vec![AuditEventType::KeyImported as i32],
        ..Default::default()
    };
    let events = app.admin.clone().list_audit_events(request).await.unwrap().into_inner().events;
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|event| event.actor == "tests"));
    assert!(!format!("{events:?}").contains(&trackagoat[12..]), "no secret in the audit log");
}

async fn importing_is_idempotent_and_never_takes_another_tenants_key(backend: Backend) {
    let Some(app) = spawn_app_with(backend, &["--imported-key-formats", IMPORTED]).await else { return };
    put_tenant(&app, "acme").await;
    put_tenant(&app, "globex").await;
    let secret = format!("tga_{}", random_hex(64));
    let (_, minted) = create_key(&app, key_request("globex", &["events:read"])).await.unwrap();
    let first = import(&app, "acme", vec![by_secret(&secret, &["events:read"])]).await;
    assert!(first[0].is_ok());
    let by_hash = ImportedKey {
        credential: Some(imported_key::Credential::SecretSha256(sha256_hex(&secret))),
        display_prefix: "tga_".into(),
        ..by_secret("", &["events:read"])
    };
    let again = import(
        &app,
        "acme",
        vec![
            by_secret(&secret, &["events:read"]),
            by_hash,
            by_secret(&minted, &["events:read"]),
            by_secret(&format!("tga_{}", random_hex(64)), &["bad scope"]),
            by_secret("not-a-key-shape", &["events:read"]),
        ],
    )
    .await;
    let status = |index: usize| again[index].as_ref().unwrap_err();
    assert_eq!((status(0).code(), reason_of(status(0)).as_str()), (Code::AlreadyExists, "KEY_ALREADY_IMPORTED"));
    assert_eq!((status(1).code(), reason_of(status(1)).as_str()), (Code::AlreadyExists, "KEY_REPEATED"));
    assert_eq!((status(2).code(), reason_of(status(2)).as_str()), (Code::AlreadyExists, "KEY_TAKEN"));
    assert!(!status(2).message().contains("globex"), "another tenant is never named: {}", status(2).message());
    assert_eq!(status(3).code(), Code::InvalidArgument);
    let fields: Vec<String> =
        status(3).get_error_details().bad_request().unwrap().field_violations.iter().map(|v| v.field.clone()).collect();
    assert_eq!(fields, ["scopes[0]"]);
    assert_eq!(status(4).code(), Code::InvalidArgument);
    assert!(!status(4).message().contains("not-a-key-shape"), "a secret is never echoed");
    // The key still works for acme, and globex's key for globex.
    assert_eq!(check(&app, &secret, "events:read", "").await.tenant_id, "acme");
    assert_eq!(check(&app, &minted, "events:read", "").await.tenant_id, "globex");
    // A dry run writes nothing.
    let fresh = format!("tga_{}", random_hex(64));
    let request = ImportKeysRequest {
        tenant_id: "acme".into(),
        keys: vec![by_secret(&fresh, &["events:read"])],
        validate_only: true,
    };
    let results = app.admin.clone().import_keys(request).await.unwrap().into_inner().results;
    assert!(matches!(results[0].result, Some(import_key_result::Result::Key(_))));
    assert_eq!(check(&app, &fresh, "events:read", "").await.reason(), DenyReason::KeyUnknown);
    // More than 1 000 keys, or none, is refused as a whole.
    let too_many = ImportKeysRequest {
        tenant_id: "acme".into(),
        keys: vec![by_secret(&fresh, &["events:read"]); 1001],
        validate_only: true,
    };
    assert_status(app.admin.clone().import_keys(too_many).await, Code::InvalidArgument, Some("keys"));
    let unknown_tenant = ImportKeysRequest {
        tenant_id: "initech".into(),
        keys: vec![by_secret(&fresh, &["events:read"])],
        validate_only: false,
    };
    assert_status(app.admin.clone().import_keys(unknown_tenant).await, Code::NotFound, None);
}

async fn a_key_presented_before_its_import_works_right_after_on_every_replica(backend: Backend) {
    let flags = ["--imported-key-formats", IMPORTED];
    let Some(app) = spawn_app_with(backend, &flags).await else { return };
    let replica = spawn_replica(&app, &flags).await;
    put_tenant(&app, "acme").await;
    let secret = format!("tga_{}", random_hex(64));
    // Cached as unknown on both (the negative cache lives 60 s in these tests).
    for server in [&app, &replica] {
        assert_eq!(check(server, &secret, "events:read", "").await.reason(), DenyReason::KeyUnknown);
    }
    assert!(import(&app, "acme", vec![by_secret(&secret, &["events:read"])]).await[0].is_ok());
    assert!(check(&app, &secret, "events:read", "").await.allowed, "at once where it was imported");
    let started = std::time::Instant::now();
    while !check(&replica, &secret, "events:read", "").await.allowed {
        assert!(started.elapsed() < Duration::from_secs(2), "within a feed poll on the other replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_flood_of_random_keys_in_an_imported_shape_stays_bounded(backend: Backend) {
    let flags = ["--imported-key-formats", IMPORTED, "--db-max-connections", "4", "--max-lookups-in-flight", "2"];
    let Some(app) = spawn_app_with(backend, &flags).await else { return };
    put_tenant(&app, "acme").await;
    let known = format!("tga_{}", random_hex(64));
    import(&app, "acme", vec![by_secret(&known, &["events:read"])]).await[0].as_ref().unwrap();
    assert!(check(&app, &known, "events:read", "").await.allowed);
    let unknown: Vec<String> = (0..300).map(|_| format!("tga_{}", random_hex(64))).collect();
    let before = app.store.query_count();
    let flood: Vec<_> = unknown
        .chunks(30)
        .map(|chunk| {
            let (mut authorize, chunk) = (app.authorize.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for key in chunk.iter().chain(chunk.iter()) {
                    let request = CheckRequest {
                        key: key.clone(),
                        scope: "events:read".into(),
                        site_id: String::new(),
                        ..Default::default()
                    };
                    let _ = authorize.check(request).await;
                }
            })
        })
        .collect();
    for _ in 0..20 {
        assert!(check(&app, &known, "events:read", "").await.allowed, "the imported key keeps working");
    }
    for task in flood {
        task.await.unwrap();
    }
    let queries = app.store.query_count() - before;
    assert!(queries <= unknown.len() as u64 + 5, "{queries} queries for {} distinct unknown keys", unknown.len());
    assert!(app.core.lookups.peak() <= 2, "at most the configured lookups at once");
}

async fn imports_are_not_refused_by_the_key_limit_but_count_toward_it(backend: Backend) {
    let Some(app) = spawn_app_with(backend, &["--imported-key-formats", IMPORTED]).await else { return };
    put_tenant_with(&app, PutTenantRequest { tenant_id: "acme".into(), max_keys: Some(2), ..Default::default() }).await;
    let keys: Vec<ImportedKey> =
        (0..5).map(|_| by_secret(&format!("tga_{}", random_hex(64)), &["events:read"])).collect();
    assert!(import(&app, "acme", keys).await.iter().all(Result::is_ok), "five keys over a limit of two");
    let refused = create_key(&app, key_request("acme", &["events:read"])).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("has 5 active keys and a limit of 2; revoke 4 keys first"),
        "the message counts the keys the tenant really has: {}",
        refused.message()
    );
}

async fn keygate_import_reads_json_lines_and_reports_every_line() {
    let keygate = Binary::start(&[("KEYGATE_IMPORTED_KEY_FORMATS", IMPORTED)], None).await;
    let mut admin = keygate.admin();
    admin.put_tenant(PutTenantRequest { tenant_id: "acme".into(), ..Default::default() }).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good: Vec<String> = (0..3).map(|_| format!("tga_{}", random_hex(64))).collect();
    let hashed = format!("tga_{}", random_hex(64));
    let lines = [
        format!(
            r#"{{"secret": "{}", "name": "CI", "scopes": ["events:read"], "created_at": "2024-05-01T10:00:00Z"}}"#,
            good[0]
        ),
        String::new(),
        format!(r#"{{"secret": "{}", "name": "Export", "scopes": ["events:read"], "environment": "test"}}"#, good[1]),
        format!(
            r#"{{"secret_sha256": "{}", "display_prefix": "tga_9f8e", "name": "Hashed", "scopes": ["events:*"]}}"#,
            sha256_hex(&hashed)
        ),
        r#"{"secret": "tga_0000", "name": "Short", "scopes": ["events:read"]}"#.to_owned(),
        format!(r#"{{"secret": "{}", "name": "Typo", "scopes": "events:read"}}"#, good[2]),
        format!(r#"{{"secret": "{}", "name": "Bad scope", "scopes": ["Events"]}}"#, good[2]),
    ];
    let file = dir.path().join("keys.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let env = |command: &mut std::process::Command| {
        command
            .env("KEYGATE_ADDR", format!("http://{}", keygate.address))
            .env("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_BACKTRACE", "1");
    };
    let run = |args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"));
        command.args(args);
        env(&mut command);
        let output = command.output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let path = file.to_str().unwrap();

    let (code, stdout, stderr) = run(&["import", "--tenant", "acme", "--dry-run", path]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stdout.starts_with("would import 3 keys, 0 already there, 3 rejected:"), "{stdout}");
    let checked = keygate::proto::CheckRequest {
        key: good[0].clone(),
        scope: "events:read".into(),
        site_id: String::new(),
        ..Default::default()
    };
    let mut authorize = keygate::proto::authorize_client::AuthorizeClient::new(keygate.channel.clone());
    let dry = authorize.check(checked.clone()).await.unwrap().into_inner();
    assert_eq!(dry.reason(), DenyReason::KeyUnknown, "a dry run writes nothing");

    let (code, stdout, _) = run(&["import", "--tenant", "acme", path]);
    assert_eq!(code, Some(1), "rejected lines make the exit code 1: {stdout}");
    assert!(stdout.starts_with("imported 3 keys, 0 already there, 3 rejected:"), "{stdout}");
    for (line, why) in [(5, "secret"), (6, "line 1"), (7, "scopes[0]")] {
        assert!(stdout.contains(&format!("line {line}: ")) && stdout.contains(why), "line {line}: {stdout}");
    }
    for secret in &good {
        assert!(!stdout.contains(&secret[8..]), "no secret is printed");
    }
    assert!(authorize.check(checked).await.unwrap().into_inner().allowed);
    let hashed_check = keygate::proto::CheckRequest {
        key: hashed.clone(),
        scope: "events:write".into(),
        site_id: String::new(),
        ..Default::default()
    };
    assert!(authorize.check(hashed_check).await.unwrap().into_inner().allowed);

    // Only the good lines, again: all already there, exit 0 (a retry is safe).
    std::fs::write(&file, lines[..4].join("\n")).unwrap();
    let (code, stdout, _) = run(&["import", "--tenant", "acme", path]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.starts_with("imported 0 keys, 3 already there, 0 rejected"), "{stdout}");

    // No token: exit 2, saying what to set. No server: exit 3.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["import", "--tenant", "acme", path])
        .env("KEYGATE_ADDR", format!("http://{}", keygate.address))
        .env_remove("KEYGATE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("KEYGATE_ADMIN_TOKEN"));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["import", "--tenant", "acme", "--addr", &format!("http://{closed}"), path])
        .env("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", String::from_utf8_lossy(&output.stderr));
}

/// Runs the real `keygate import` against `keygate`; exit code, stdout, stderr.
fn run_import(keygate: &Binary, args: &[&str]) -> (Option<i32>, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("import")
        .args(args)
        .env("KEYGATE_ADDR", format!("http://{}", keygate.address))
        .env("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn key_line(secret: &str, metadata_value_chars: usize) -> String {
    let metadata: Vec<String> =
        (0..16).map(|index| format!(r#""m{index}": "{}""#, "v".repeat(metadata_value_chars))).collect();
    format!(
        r#"{{"secret": "{secret}", "name": "k", "scopes": ["events:read"], "metadata": {{{}}}}}"#,
        metadata.join(", ")
    )
}

async fn keygate_import_splits_large_batches_and_rejects_repeated_keys() {
    // 64 KiB messages at most; 40 keys of 8 KiB of metadata each make 320 KiB.
    let keygate =
        Binary::start(&[("KEYGATE_IMPORTED_KEY_FORMATS", IMPORTED), ("KEYGATE_MAX_MESSAGE_BYTES", "65536")], None)
            .await;
    keygate.admin().put_tenant(PutTenantRequest { tenant_id: "acme".into(), ..Default::default() }).await.unwrap();
    let secrets: Vec<String> = (0..40).map(|_| format!("tga_{}", random_hex(64))).collect();
    let mut file = b"\xEF\xBB\xBF".to_vec();
    for secret in &secrets {
        file.extend_from_slice(key_line(secret, 500).as_bytes());
        file.push(b'\n');
    }
    file.extend_from_slice(key_line(&secrets[2], 1).as_bytes());
    file.push(b'\n');
    // One key larger than a whole call may be: rejected alone.
    file.extend_from_slice(key_line(&format!("tga_{}", random_hex(64)), 9_000).as_bytes());
    file.extend_from_slice(b"\n{\"name\": \"caf\xE9\"}\n");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.jsonl");
    std::fs::write(&path, file).unwrap();

    let (code, stdout, stderr) =
        run_import(&keygate, &["--tenant", "acme", "--batch-bytes", "10000000", path.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("imported 40 keys, 0 already there, 3 rejected:"),
        "the first line, after a BOM, counts: {stdout}"
    );
    assert!(stdout.contains("line 41: the same key as line 3"), "{stdout}");
    assert!(stdout.contains("line 42: the key is"), "{stdout}");
    assert!(stdout.contains("line 43: the line is not UTF-8 text"), "{stdout}");
    let mut authorize = keygate::proto::authorize_client::AuthorizeClient::new(keygate.channel.clone());
    for secret in [&secrets[0], &secrets[39]] {
        let check = CheckRequest {
            key: secret.clone(),
            scope: "events:read".into(),
            site_id: String::new(),
            ..Default::default()
        };
        let answer = authorize.check(check).await.unwrap().into_inner();
        assert!(answer.allowed, "{answer:?}");
        assert_eq!(answer.metadata.len(), 16, "the metadata of the first line, not the repeat's");
    }
}

async fn keygate_import_stopped_halfway_says_what_was_not_sent() {
    let mut keygate = Binary::start(&[("KEYGATE_IMPORTED_KEY_FORMATS", IMPORTED)], None).await;
    let mut admin = keygate.admin();
    admin
        .put_tenant(PutTenantRequest { tenant_id: "acme".into(), max_keys: Some(100_000), ..Default::default() })
        .await
        .unwrap();
    let total = 20_000;
    let lines: Vec<String> = (0..total).map(|_| key_line(&format!("tga_{}", random_hex(64)), 1)).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"));
    command
        .args(["import", "--tenant", "acme", "--batch-size", "1", path.to_str().unwrap()])
        .env("KEYGATE_ADDR", format!("http://{}", keygate.address))
        .env("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let import = command.spawn().unwrap();
    // Stop keygate once some keys are in.
    loop {
        let page = ListKeysRequest { tenant_id: "acme".into(), page_size: 50, ..Default::default() };
        if admin.list_keys(page).await.unwrap().into_inner().keys.len() >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    keygate.process.0.kill().unwrap();
    let output = tokio::task::spawn_blocking(move || import.wait_with_output()).await.unwrap().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(3), "keygate gone: {stdout}{stderr}");
    let imported: usize = stdout
        .strip_prefix("imported ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("a summary: {stdout}"));
    assert!((20..total).contains(&imported), "{stdout}");
    assert!(
        stderr.contains(&format!("lines {} to {total} were not sent", imported + 1)),
        "the lines to send again: {stderr}"
    );
}

async fn display_prefixes_of_imported_keys_hide_enough_and_fit_a_shape() {
    let app = spawn_app_with(Backend::Sqlite, &["--imported-key-formats", IMPORTED]).await.unwrap();
    put_tenant(&app, "acme").await;
    let legacy = format!("legacy_{}", random_hex(24));
    let trackagoat = format!("tga_{}", random_hex(64));
    let by_hash = |secret: &str, display_prefix: &str| ImportedKey {
        credential: Some(imported_key::Credential::SecretSha256(sha256_hex(secret))),
        display_prefix: display_prefix.into(),
        ..by_secret("", &["events:read"])
    };
    let whole = format!("legacy_{}", random_hex(24));
    let results = import(
        &app,
        "acme",
        vec![
            by_secret(&legacy, &["events:read"]),
            by_hash(&whole, &whole),
            by_hash(&trackagoat, "sk_live_4f2a"),
            by_hash(&trackagoat, &trackagoat[..10]),
        ],
    )
    .await;
    let shown = &results[0].as_ref().unwrap().display_prefix;
    assert_eq!(shown, &legacy[..11], "a 31-character key keeps 20 characters hidden, not 12 shown");
    for (index, why) in [(1, "whole key"), (2, "no accepted key shape")] {
        let status = results[index].as_ref().unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(why), "{status:?}");
        let details = status.get_error_details();
        let fields: Vec<_> =
            details.bad_request().unwrap().field_violations.iter().map(|violation| violation.field.clone()).collect();
        assert_eq!(fields, ["display_prefix"], "{status:?}");
        assert!(!status.message().contains(&whole[7..]), "the key is not echoed");
    }
    assert_eq!(results[3].as_ref().unwrap().display_prefix, trackagoat[..10]);

    // A prefix that shows too much; the environment a prefix states.
    let legacy_hashed = format!("legacy_{}", random_hex(24));
    let jetrack_test = format!("bj_test_{}", random_hex(64));
    let contradicted = format!("bj_test_{}", random_hex(64));
    let results = import(
        &app,
        "acme",
        vec![
            by_hash(&legacy_hashed, &legacy_hashed[..20]),
            by_hash(&jetrack_test, &jetrack_test[..12]),
            ImportedKey { environment: KeyEnvironment::Live.into(), ..by_hash(&contradicted, &contradicted[..12]) },
        ],
    )
    .await;
    let status = results[0].as_ref().unwrap_err();
    assert!(status.message().contains("shows too much of the key: at most 12"), "{status:?}");
    assert_eq!(results[1].as_ref().unwrap().environment(), KeyEnvironment::Test, "bj_test_ states a test key");
    let status = results[2].as_ref().unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("test"), "{status:?}");
}
