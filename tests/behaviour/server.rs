//! Server lifecycle: health follows the store, an unreachable store fails closed.

use std::time::Duration;

use clap::Parser;
use keygate::config::{Cli, Config};
use keygate::proto::key_admin_client::KeyAdminClient;
use keygate::proto::*;
use keygate::server::App;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::*;

crate::trials!(
    every_backend: [calls_before_the_database_is_migrated_are_unavailable_not_internal],
    once: [
        health_is_not_serving_and_calls_fail_closed_while_the_store_is_unreachable,
        the_server_stops_gracefully_and_reports_serving_until_then,
        keygate_refuses_to_start_without_admin_tokens,
    ],
);

/// A server whose database never answers: a TCP port that accepts nothing.
async fn spawn_without_database() -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    spawn_on(&format!("postgres://postgres@127.0.0.1:{port}/keygate"), &["--db-acquire-timeout-seconds", "1"]).await
}

/// A server on `database_url` with `extra` flags, not waiting for it to be SERVING; stops when
/// the sender is dropped.
async fn spawn_on(database_url: &str, extra: &[&str]) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let tokens = format!("tests={ADMIN_TOKEN}");
    let mut args = vec![
        "keygate",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        database_url,
        "--admin-tokens",
        &tokens,
        "--metrics-listen",
        "off",
    ];
    args.extend_from_slice(extra);
    let cli = Cli::try_parse_from(args).unwrap();
    let app = App::bind(Config::from_args(&cli.serve).unwrap()).await.unwrap();
    let address = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run(async move {
        let _ = stopped.await;
    }));
    (address, stop)
}

async fn health_is_not_serving_and_calls_fail_closed_while_the_store_is_unreachable() {
    let (address, _stop) = spawn_without_database().await;
    let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect_lazy();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(health(channel.clone()).await.unwrap(), ServingStatus::NotServing);
    let liveness = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: keygate::server::LIVENESS_SERVICE.into() })
        .await
        .unwrap();
    assert_eq!(liveness.into_inner().status(), ServingStatus::Serving, "alive, though not ready");

    let mut admin = KeyAdminClient::with_interceptor(channel.clone(), WithTokenPublic::admin());
    let status = admin.get_tenant(GetTenantRequest { tenant_id: "acme".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!status.message().contains("127.0.0.1"), "no internals in client errors: {status:?}");

    let mut authorize = keygate::proto::authorize_client::AuthorizeClient::new(channel.clone());
    let key = crate::checks::well_formed_unknown_key();
    let request = CheckRequest { key, scope: "events:read".into(), site_id: String::new(), ..Default::default() };
    let status = authorize.check(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "an unknown key is never allowed without the store");
    // A malformed key needs no store and is still denied.
    let request =
        CheckRequest { key: "nope".into(), scope: "events:read".into(), site_id: String::new(), ..Default::default() };
    assert_eq!(authorize.check(request).await.unwrap().into_inner().reason(), DenyReason::KeyMalformed);
}

/// A database that answers but cannot be migrated (another version's `_sqlx_migrations`):
/// every call is UNAVAILABLE, as while keygate starts, never an INTERNAL "no such table"; once
/// the database is fixed keygate migrates and serves by itself.
async fn calls_before_the_database_is_migrated_are_unavailable_not_internal(backend: Backend) {
    use sqlx::Connection;
    let Some(database) = TestDatabase::create(backend).await else { return };
    sqlx::any::install_default_drivers();
    let mut connection = sqlx::AnyConnection::connect(&database.url).await.unwrap();
    sqlx::raw_sql("CREATE TABLE _sqlx_migrations (unrelated INTEGER)").execute(&mut connection).await.unwrap();
    let (address, _stop) = spawn_on(&database.url, &[]).await;
    let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect_lazy();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(health(channel.clone()).await.unwrap(), ServingStatus::NotServing);
    let mut admin = KeyAdminClient::with_interceptor(channel.clone(), WithTokenPublic::admin());
    let status = admin.get_tenant(GetTenantRequest { tenant_id: "acme".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let mut authorize = keygate::proto::authorize_client::AuthorizeClient::new(channel.clone());
    let request = CheckRequest {
        key: crate::checks::well_formed_unknown_key(),
        scope: "events:read".into(),
        site_id: String::new(),
        ..Default::default()
    };
    assert_eq!(authorize.check(request).await.unwrap_err().code(), Code::Unavailable);

    sqlx::raw_sql("DROP TABLE _sqlx_migrations").execute(&mut connection).await.unwrap();
    let _ = connection.close().await;
    for _ in 0..150 {
        if health(channel.clone()).await.unwrap() == ServingStatus::Serving {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = admin.get_tenant(GetTenantRequest { tenant_id: "acme".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "migrated and serving once the database is fixed: {status:?}");
}

async fn the_server_stops_gracefully_and_reports_serving_until_then() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    assert_eq!(health(app.channel.clone()).await.unwrap(), ServingStatus::Serving);
    put_tenant(&app, "acme").await;
    let address = app.address;
    app.stop().await;
    let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect().await;
    assert!(channel.is_err(), "the listener is closed after shutdown");
}

async fn keygate_refuses_to_start_without_admin_tokens() {
    let cli = Cli::try_parse_from(["keygate", "--admin-tokens", ""]).unwrap();
    let error = Config::from_args(&cli.serve).unwrap_err();
    assert!(error.contains("KEYGATE_ADMIN_TOKENS"), "{error}");
    let cli = Cli::try_parse_from(["keygate", "--admin-tokens", "ops=short"]).unwrap();
    assert!(Config::from_args(&cli.serve).is_err());
    let cli = Cli::try_parse_from(["keygate", "--admin-tokens", &format!("ops={ADMIN_TOKEN}"), "--key-prefix", "Bad_"])
        .unwrap();
    assert!(Config::from_args(&cli.serve).unwrap_err().contains("KEYGATE_KEY_PREFIX"));
}

/// Presents the test admin token.
struct WithTokenPublic;

impl WithTokenPublic {
    fn admin() -> impl tonic::service::Interceptor + Clone {
        |mut request: tonic::Request<()>| {
            request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
            Ok(request)
        }
    }
}
