//! keygate as operators run it: the real binary, JSON logs, and SIGTERM with calls in flight.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keygate::proto::key_admin_client::KeyAdminClient;
use keygate::proto::*;
use sqlx::Connection;
use tonic::transport::Channel;

use crate::support::*;

crate::trials!(
    every_backend: [],
    once: [
        start_up_errors_name_the_setting_and_never_print_a_backtrace,
        a_new_sqlite_file_is_created_and_an_open_authorize_on_a_public_address_is_warned_about,
        migrate_says_what_it_did_and_what_to_check,
        sigterm_finishes_calls_in_flight_writes_buffers_and_logs_no_secret,
    ],
);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn sigterm_finishes_calls_in_flight_writes_buffers_and_logs_no_secret() {
    sqlx::any::install_default_drivers();
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}?mode=rwc", dir.path().join("keygate.db").display());
    let log_path = dir.path().join("keygate.log");
    let address = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .env("KEYGATE_LISTEN", &address)
        .env("KEYGATE_DATABASE_URL", &database_url)
        .env("KEYGATE_ADMIN_TOKENS", format!("ops={ADMIN_TOKEN}"))
        .env("KEYGATE_LOG_FORMAT", "json")
        .env("KEYGATE_USAGE_FLUSH_INTERVAL_MS", "600000")
        .env("KEYGATE_SHUTDOWN_DRAIN_DELAY_SECONDS", "1")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::from(std::fs::File::create(&log_path).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .expect("start the keygate binary");
    let mut child = KillOnDrop(child);
    let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect_lazy();
    let started = Instant::now();
    while !matches!(health(channel.clone()).await, Ok(tonic_health::pb::health_check_response::ServingStatus::Serving))
    {
        assert!(started.elapsed() < Duration::from_secs(20), "the binary never became SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin = KeyAdminClient::with_interceptor(channel.clone(), move |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
        Ok(request)
    });
    let authorize = keygate::proto::authorize_client::AuthorizeClient::new(channel.clone());
    let check = |key: String, scope: &str| {
        let request = CheckRequest { key, scope: scope.into(), site_id: String::new(), ..Default::default() };
        let mut authorize = authorize.clone();
        async move { authorize.check(request).await.unwrap().into_inner() }
    };

    // A full scenario: create, check, rotate, revoke, denied checks.
    admin.clone().put_tenant(PutTenantRequest { tenant_id: "acme".into(), ..Default::default() }).await.unwrap();
    let created = admin.clone().create_key(key_request("acme", &["events:read"])).await.unwrap().into_inner();
    let (key, secret) = (created.key.unwrap(), created.secret);
    for _ in 0..3 {
        assert!(check(secret.clone(), "events:read").await.allowed);
    }
    assert!(!check(secret.clone(), "goals:read").await.allowed);
    let rotate = RotateKeyRequest { tenant_id: "acme".into(), key_id: key.key_id.clone(), grace_period: None };
    let rotated = admin.clone().rotate_key(rotate).await.unwrap().into_inner();
    let revoke = RevokeKeyRequest { tenant_id: "acme".into(), key_id: rotated.key.unwrap().key_id };
    admin.clone().revoke_key(revoke).await.unwrap();
    assert!(!check(rotated.secret.clone(), "events:read").await.allowed);

    // Hold the database's write lock so that admin calls stay in flight across the signal.
    let mut blocker = sqlx::AnyConnection::connect(&database_url).await.unwrap();
    sqlx::raw_sql("BEGIN EXCLUSIVE").execute(&mut blocker).await.unwrap();
    let in_flight: Vec<_> = (0..5)
        .map(|index| {
            let mut admin = admin.clone();
            tokio::spawn(async move {
                admin.put_tenant(PutTenantRequest { tenant_id: format!("late-{index}"), ..Default::default() }).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        health(channel.clone()).await.unwrap(),
        tonic_health::pb::health_check_response::ServingStatus::NotServing,
        "right after SIGTERM health says NOT_SERVING while calls are still accepted"
    );
    assert!(child.0.try_wait().unwrap().is_none(), "keygate waits for the calls in flight");
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await.unwrap();
    blocker.close().await.unwrap();
    for call in in_flight {
        call.await.unwrap().expect("a call in flight at SIGTERM completes");
    }
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "keygate did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0), "a clean shutdown exits 0");

    // What was buffered (usage, last use, denials) is in the database.
    let mut database = sqlx::AnyConnection::connect(&database_url).await.unwrap();
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT count FROM key_usage WHERE key_id = '{}' AND outcome = 'ALLOWED'",
        key.key_id
    ));
    let allowed: Vec<i64> = sqlx::query_scalar(sql).fetch_all(&mut database).await.unwrap();
    assert_eq!(allowed.iter().sum::<i64>(), 3);
    let used: Vec<Option<i64>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT last_used_at FROM api_keys WHERE key_id = '{}'",
        key.key_id
    )))
    .fetch_all(&mut database)
    .await
    .unwrap();
    assert!(used[0].is_some(), "the buffered last use was written");
    let denials: Vec<i64> = sqlx::query_scalar("SELECT count FROM audit_events WHERE event_type = 'CHECK_DENIED'")
        .fetch_all(&mut database)
        .await
        .unwrap();
    assert!(denials.iter().sum::<i64>() >= 2, "the buffered denied Checks were written");
    let late: Vec<String> = sqlx::query_scalar("SELECT tenant_id FROM tenants WHERE tenant_id LIKE 'late-%'")
        .fetch_all(&mut database)
        .await
        .unwrap();
    assert_eq!(late.len(), 5);

    // The logs are JSON lines, tell the story, and hold no key and no token.
    let logs = std::fs::read_to_string(&log_path).unwrap();
    for line in logs.lines().filter(|line| !line.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
    }
    for story in ["key created", "key rotated", "key revoked", "check denied", "shutting down", "keygate stopped"] {
        assert!(logs.contains(story), "the logs never say {story:?}");
    }
    // Every admin change names its caller.
    for story in ["tenant saved", "key created", "key rotated", "key revoked"] {
        let lines: Vec<&str> = logs.lines().filter(|line| line.contains(&format!("\"{story}\""))).collect();
        assert!(!lines.is_empty(), "{story}");
        for line in lines {
            assert!(line.contains("\"caller\":\"ops\""), "{story} without its caller: {line}");
        }
    }
    for secret_text in [&secret[8..], &rotated.secret[8..], ADMIN_TOKEN] {
        assert!(!logs.contains(secret_text), "a secret reached the logs");
    }
}

/// Runs the binary with `env` until it exits (at most 20 s); returns its exit code, stdout and
/// stderr.
fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keygate"));
    command.args(args).env("KEYGATE_ADMIN_TOKENS", format!("ops={ADMIN_TOKEN}")).env("RUST_BACKTRACE", "1");
    for (name, value) in env {
        command.env(name, value);
    }
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        let _ = Command::new("kill").arg(pid.to_string()).status();
    });
    let output = child.wait_with_output().unwrap();
    drop(killer);
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code(), text(&output.stdout), text(&output.stderr))
}

async fn start_up_errors_name_the_setting_and_never_print_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("k.db").display());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_address = taken.local_addr().unwrap().to_string();
    let free = format!("127.0.0.1:{}", free_port());
    for (setting, env) in [
        ("KEYGATE_LISTEN", vec![("KEYGATE_LISTEN", taken_address.as_str()), ("KEYGATE_METRICS_LISTEN", "off")]),
        (
            "KEYGATE_METRICS_LISTEN",
            vec![("KEYGATE_LISTEN", free.as_str()), ("KEYGATE_METRICS_LISTEN", taken_address.as_str())],
        ),
    ] {
        let mut env = env;
        env.push(("KEYGATE_DATABASE_URL", &database));
        let (code, _, stderr) = run_binary(&[], &env);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains(setting) && stderr.contains(&taken_address), "{setting}: {stderr}");
        assert!(!stderr.contains("backtrace"), "{stderr}");
    }
    let (code, _, stderr) = run_binary(&[], &[("KEYGATE_LISTEN", "nowhere")]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("KEYGATE_LISTEN") && stderr.contains("--listen"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
    let (code, _, stderr) =
        run_binary(&[], &[("KEYGATE_DB_MAX_CONNECTIONS", "0"), ("KEYGATE_DATABASE_URL", &database)]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("KEYGATE_DB_MAX_CONNECTIONS") && !stderr.contains("backtrace"), "{stderr}");
}

async fn a_new_sqlite_file_is_created_and_an_open_authorize_on_a_public_address_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("new.db");
    let keygate = Binary::start(
        &[("KEYGATE_DATABASE_URL", &format!("sqlite://{}", file.display())), ("KEYGATE_LOG_FORMAT", "json")],
        None,
    )
    .await;
    assert!(file.exists(), "the SQLite file was created without ?mode=rwc");
    drop(keygate);
    // On 0.0.0.0 without caller tokens, the start-up log says Authorize is open.
    let log = dir.path().join("log");
    let address = format!("0.0.0.0:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .env("KEYGATE_LISTEN", &address)
        .env("KEYGATE_METRICS_LISTEN", "off")
        .env("KEYGATE_DATABASE_URL", format!("sqlite://{}", file.display()))
        .env("KEYGATE_ADMIN_TOKENS", format!("ops={ADMIN_TOKEN}"))
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _child = KillOnDrop(child);
    let started = Instant::now();
    loop {
        let logs = std::fs::read_to_string(&log).unwrap_or_default();
        if logs.contains("keygate listening") {
            assert!(logs.contains("KEYGATE_AUTHORIZE_TOKENS is empty"), "{logs}");
            assert!(logs.contains("metrics"), "the start-up line lists every listener: {logs}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{logs}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn migrate_says_what_it_did_and_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("k.db").display());
    let (code, stdout, _) = run_binary(&["migrate", "--database-url", &database], &[]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("applied") && stdout.contains("migrations"), "{stdout}");
    let (code, stdout, _) = run_binary(&["migrate", "--database-url", &database], &[]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("up to date"), "{stdout}");
    let refused = format!("postgres://postgres@127.0.0.1:{}/keygate", free_port());
    let (code, _, stderr) = run_binary(&["migrate", "--database-url", &refused], &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot connect") && stderr.contains("refused"), "{stderr}");
    assert!(stderr.contains("database must exist"), "{stderr}");
    assert!(!stderr.contains("migration failed"), "{stderr}");
}
