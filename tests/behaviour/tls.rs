//! TLS and mutual TLS on the gRPC listener, with certificates made by the test.

use std::time::Duration;

use clap::Parser;
use keygate::config::{Cli, Config};
use keygate::proto::GetTenantRequest;
use keygate::proto::key_admin_client::KeyAdminClient;
use keygate::server::App;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::ADMIN_TOKEN;

crate::trials!(
    every_backend: [],
    once: [
        with_mutual_tls_only_clients_with_a_certificate_get_through,
        with_tls_alone_clients_need_no_certificate_but_must_speak_tls,
        tls_settings_are_checked_at_startup,
        a_stalled_tls_handshake_is_dropped_after_the_handshake_timeout,
    ],
);

/// A CA, a server certificate for `localhost` and a client certificate, as PEM.
struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>, usage| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca: ca.pem(),
        server: leaf(vec!["localhost".into()], ExtendedKeyUsagePurpose::ServerAuth),
        client: leaf(vec!["gateway".into()], ExtendedKeyUsagePurpose::ClientAuth),
    }
}

/// Starts keygate with TLS (and mutual TLS when `mutual`); returns its port.
async fn start(pki: &Pki, mutual: bool, dir: &std::path::Path) -> (u16, tokio::sync::oneshot::Sender<()>) {
    start_with(pki, mutual, dir, &[]).await
}

/// [`start`] with more flags.
async fn start_with(
    pki: &Pki,
    mutual: bool,
    dir: &std::path::Path,
    extra: &[&str],
) -> (u16, tokio::sync::oneshot::Sender<()>) {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (cert, key, ca) =
        (write("server.pem", &pki.server.0), write("server.key", &pki.server.1), write("ca.pem", &pki.ca));
    let database = format!("sqlite://{}?mode=rwc", dir.join("keygate.db").display());
    let tokens = format!("tests={ADMIN_TOKEN}");
    let mut args = vec![
        "keygate",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        &database,
        "--admin-tokens",
        &tokens,
        "--metrics-listen",
        "off",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    if mutual {
        args.extend(["--tls-client-ca", &ca]);
    }
    args.extend_from_slice(extra);
    let config = Config::from_args(&Cli::try_parse_from(args).unwrap().serve).unwrap();
    let app = App::bind(config).await.unwrap();
    let port = app.local_addr().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run(async move {
        let _ = stopped.await;
    }));
    (port, stop)
}

async fn channel(port: u16, tls: Option<ClientTlsConfig>) -> Result<Channel, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint =
        Channel::from_shared(format!("{scheme}://localhost:{port}")).unwrap().timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    endpoint.connect().await
}

/// Whether a health check over `tls` answers SERVING, retrying while the server starts.
async fn answers(port: u16, tls: Option<ClientTlsConfig>) -> bool {
    for _ in 0..40 {
        if let Ok(channel) = channel(port, tls.clone()).await
            && HealthClient::new(channel)
                .check(HealthCheckRequest { service: String::new() })
                .await
                .is_ok_and(|answer| answer.into_inner().status() == ServingStatus::Serving)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn trusting(pki: &Pki) -> ClientTlsConfig {
    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca)).domain_name("localhost")
}

async fn with_mutual_tls_only_clients_with_a_certificate_get_through() {
    let (pki, dir) = (pki(), tempfile::tempdir().unwrap());
    let (port, _stop) = start(&pki, true, dir.path()).await;
    let with_identity = trusting(&pki).identity(Identity::from_pem(&pki.client.0, &pki.client.1));
    assert!(answers(port, Some(with_identity.clone())).await, "a client with a certificate gets through");
    let admin = channel(port, Some(with_identity)).await.unwrap();
    let mut admin = KeyAdminClient::with_interceptor(admin, |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
        Ok(request)
    });
    let status = admin.get_tenant(GetTenantRequest { tenant_id: "acme".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "the API answers over mutual TLS: {status:?}");

    assert!(!answers(port, Some(trusting(&pki))).await, "a client without a certificate is refused");
    assert!(!answers(port, None).await, "plaintext is refused");
}

async fn with_tls_alone_clients_need_no_certificate_but_must_speak_tls() {
    let (pki, dir) = (pki(), tempfile::tempdir().unwrap());
    let (port, _stop) = start(&pki, false, dir.path()).await;
    assert!(answers(port, Some(trusting(&pki))).await);
    assert!(!answers(port, None).await, "plaintext is refused");
}

async fn tls_settings_are_checked_at_startup() {
    let tokens = format!("tests={ADMIN_TOKEN}");
    let parse = |extra: &[&str]| {
        let mut args = vec!["keygate", "--admin-tokens", tokens.as_str()];
        args.extend_from_slice(extra);
        Config::from_args(&Cli::try_parse_from(args).unwrap().serve)
    };
    assert!(parse(&["--tls-cert", "/nonexistent.pem"]).unwrap_err().contains("go together"));
    assert!(
        parse(&["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"])
            .unwrap_err()
            .contains("cannot read")
    );
    assert!(parse(&["--tls-client-ca", "/ca.pem"]).unwrap_err().contains("KEYGATE_TLS_CLIENT_CA"));
}

async fn a_stalled_tls_handshake_is_dropped_after_the_handshake_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (pki, dir) = (pki(), tempfile::tempdir().unwrap());
    let (port, _stop) = start_with(&pki, false, dir.path(), &["--handshake-timeout-seconds", "1"]).await;
    assert!(answers(port, Some(trusting(&pki))).await);
    // The first 5 bytes of a ClientHello (a TLS record header announcing 80 bytes), then nothing.
    let mut stalled = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x00, 0x50]).await.unwrap();
    let started = std::time::Instant::now();
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buffer)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the connection is closed: {read:?}");
    assert!(started.elapsed() >= Duration::from_millis(900), "not before the timeout: {:?}", started.elapsed());
    assert!(answers(port, Some(trusting(&pki))).await, "and others are served");
}
