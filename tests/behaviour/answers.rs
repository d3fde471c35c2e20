//! A product's own answers: deny statuses, messages and bodies and identity header names from
//! the configuration file, the same through Envoy and `Authorize.Check`; and `keygate config
//! check` on the real binary.

use keygate::proto::*;
use serde_json::json;

use crate::envoy_support::*;
use crate::support::*;

crate::trials!(
    every_backend: [],
    once: [
        a_products_answers_reach_clients_through_envoy_and_backends_alike,
        config_check_prints_the_effective_configuration_without_secrets,
    ],
);

/// Eventicat's answers (numbers as numbers in its 429 body, 404 for a site the account does not
/// own) and EngageTrack's one text for invalid and expired keys.
const PRODUCT: &str = r#"
[answers]
body = '{"error": "{message}", "limit": "{limit}", "remaining": "{remaining}", "resetTime": "{reset}"}'

[answers.headers]
tenant_id = "X-Account-Id"

[answers.deny.SITE_FORBIDDEN]
status = 404
message = "Invalid aggregator"

[answers.deny.KEY_INVALID]
message = "Invalid or expired API key"

[answers.deny.KEY_EXPIRED]
message = "Invalid or expired API key"
"#;

async fn a_products_answers_reach_clients_through_envoy_and_backends_alike() {
    let Some(binary) = envoy_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keygate.toml");
    std::fs::write(&file, PRODUCT).unwrap();
    let app = spawn_app_with(Backend::Sqlite, &["--config", file.to_str().unwrap()]).await.unwrap();
    put_tenant(&app, "acme").await;
    put_tenant(&app, "globex").await;
    put_site(&app, "globex", "globex.example").await.unwrap();
    let upstream = start_echo_upstream().await;
    let envoy = Envoy::start(&binary, app.address, upstream).await;
    let mut request = key_request("acme", &["stats:read", "account:read"]);
    request.rate_limit_per_minute = 1;
    let (_, secret) = create_key(&app, request).await.unwrap();
    let bearer = format!("Bearer {secret}");
    let auth = [("authorization", bearer.as_str())];

    let other = get(envoy.address, "/v1/stats?siteId=globex.example", &auth).await.unwrap();
    assert_eq!(other.status, 404, "{other:?}");
    assert_eq!(other.json(), json!({"error": "Invalid aggregator"}), "no limit applies: its fields are left out");
    let direct = check(&app, &secret, "stats:read", "globex.example").await;
    assert_eq!((direct.http_status, direct.message.as_str()), (404, "Invalid aggregator"), "Authorize says the same");

    let allowed = get(envoy.address, "/v1/account", &auth).await.unwrap();
    assert_eq!(allowed.status, 200, "{allowed:?}");
    let upstream_headers = allowed.upstream_headers();
    assert_eq!(upstream_headers.get("x-account-id").map(String::as_str), Some("acme"));
    assert!(!upstream_headers.contains_key("x-keygate-tenant-id"), "{upstream_headers:?}");

    let limited = get(envoy.address, "/v1/account", &auth).await.unwrap();
    assert_eq!(limited.status, 429, "{limited:?}");
    let body = limited.json();
    assert_eq!(body["error"], "Rate limit exceeded");
    assert_eq!((body["limit"].as_i64(), body["remaining"].as_i64()), (Some(1), Some(0)), "numbers: {body}");
    let reset = body["resetTime"].as_i64().expect("resetTime is a number");
    assert_eq!(limited.headers.get("x-ratelimit-reset"), Some(&reset.to_string()), "the header says the same");
    assert_eq!(body.as_object().unwrap().keys().collect::<Vec<_>>(), ["error", "limit", "remaining", "resetTime"]);

    // A request that names no valid site gets the product's SITE_FORBIDDEN answer too.
    let twice = get(envoy.address, "/v1/stats?siteId=globex.example&x=1;siteId=a", &auth).await.unwrap();
    assert_eq!((twice.status, twice.json()), (404, json!({"error": "Invalid aggregator"})));
    let unknown = crate::checks::well_formed_unknown_key();
    let invalid = get(envoy.address, "/v1/account", &[("authorization", &format!("Bearer {unknown}"))]).await.unwrap();
    assert_eq!((invalid.status, invalid.json()), (401, json!({"error": "Invalid or expired API key"})));
    assert!(invalid.headers.contains_key("www-authenticate"));
    let direct = check(&app, &unknown, "account:read", "").await;
    assert_eq!((direct.reason(), direct.message.as_str()), (DenyReason::KeyUnknown, "Invalid or expired API key"));
}

async fn config_check_prints_the_effective_configuration_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keygate.toml");
    let token = "file-token-0123456789abcdef";
    std::fs::write(
        &file,
        format!(
            "admin_tokens = \"ops={token}\"\nkey_format = \"tga_{{hex:64}}\"\ncache_ttl_seconds = 7\n\
             database_url = \"postgres://keygate:hunter2secret@db/keygate\"\n{PRODUCT}"
        ),
    )
    .unwrap();
    let database = format!("sqlite://{}/keygate.db", dir.path().display());
    let run = |file: &std::path::Path| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["config", "check"])
            .arg(file)
            .env("KEYGATE_CACHE_TTL_SECONDS", "9")
            .env("KEYGATE_DATABASE_URL", &database)
            .env_remove("KEYGATE_ADMIN_TOKENS")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(&file);
    assert_eq!(code, Some(0), "{stderr}");
    for line in [
        "key_format = \"tga_{hex:64}\"  # file",
        "cache_ttl_seconds = \"9\"  # environment",
        "negative_cache_ttl_seconds = \"5\"  # default",
        "admin_tokens = \"[redacted]\"  # file",
        "database_url = \"[redacted]\"  # environment",
        "tenant_id = \"x-account-id\"",
    ] {
        assert!(stdout.lines().any(|shown| shown == line), "{line:?} in:\n{stdout}");
    }
    assert!(
        stdout.contains("[answers.deny.SITE_FORBIDDEN]  # file\nstatus = 404\nmessage = \"Invalid aggregator\""),
        "{stdout}"
    );
    assert!(stdout.contains("[answers.deny.SCOPE_MISSING]  # default\nstatus = 403"), "{stdout}");
    assert!(!stdout.contains(token) && !stdout.contains("hunter2secret"), "no secret is printed");

    // The commented example of the README is valid.
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/keygate.toml");
    let (code, stdout, stderr) = run(&example);
    assert_eq!(code, Some(0), "examples/keygate.toml: {stderr}");
    assert!(stdout.contains("key_format = \"tga_{hex:64}\"  # file"), "{stdout}");

    std::fs::write(&file, format!("admin_tokens = \"ops={token}\"\n[answers.deny.KEY_UNKNOWN]\nstatus = 404\n"))
        .unwrap();
    let (code, stdout, stderr) = run(&file);
    assert_eq!(code, Some(2), "{stdout}");
    assert!(stderr.contains("configure KEY_INVALID"), "{stderr}");
    // `keygate migrate` migrates the file's database; `gen-token` does not read the file at all.
    let migrated = dir.path().join("from-the-file.db");
    std::fs::write(&file, format!("database_url = \"sqlite://{}\"\n", migrated.display())).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("migrate")
        .env("KEYGATE_CONFIG", &file)
        .env_remove("KEYGATE_DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(migrated.exists(), "the database of the file was migrated");
    std::fs::write(&file, "broken = = =").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("gen-token")
        .env("KEYGATE_CONFIG", &file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    std::fs::write(&file, "cache_ttl = 5\n").unwrap();
    let (code, _, stderr) = run(&file);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("\"cache_ttl\" is no setting (did you mean cache_ttl_seconds?)"), "{stderr}");
}
