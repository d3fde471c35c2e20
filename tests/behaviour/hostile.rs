//! Hostile input against every RPC, on every backend: bytes a generated client cannot send
//! (invalid UTF-8, broken protobuf, oversized messages), 3 MB fields, NUL bytes and forged page
//! tokens. Each gets the code that names the client's mistake, never INTERNAL, and a short
//! message. And storage conditions (a read-only or full SQLite file) are UNAVAILABLE, which
//! clients retry, never INTERNAL.

use bytes::{Buf, BufMut, Bytes};
use keygate::proto::*;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_types::StatusExt;

use crate::support::*;

crate::trials!(
    every_backend: [
        undecodable_requests_are_invalid_argument_and_oversized_ones_resource_exhausted,
        huge_and_nul_fields_are_invalid_argument_with_a_short_message,
        forged_and_foreign_page_tokens_are_invalid_argument,
        an_unknown_site_is_reported_at_the_index_the_client_sent,
    ],
    once: [
        a_read_only_or_full_sqlite_file_is_unavailable,
        missing_and_cut_off_messages_are_invalid_argument_on_every_service,
        reflection_answers_bad_requests_with_a_status_and_a_short_message,
    ],
);

/// One gRPC call over a raw HTTP/2 stream: `body` as sent (framing and all, `None`: no body,
/// END_STREAM on the headers); returns grpc-status and grpc-message, from the headers of a
/// trailers-only response or from the trailers.
async fn raw_stream(app: &TestApp, path: &str, body: Option<&[u8]>, admin: bool) -> (String, String) {
    let tcp = tokio::net::TcpStream::connect(app.address).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut request = http::Request::post(format!("http://keygate{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if admin {
        request = request.header("authorization", format!("Bearer {ADMIN_TOKEN}"));
    }
    let (response, mut stream) = client.send_request(request.body(()).unwrap(), body.is_none()).unwrap();
    if let Some(body) = body {
        stream.send_data(Bytes::copy_from_slice(body), true).unwrap();
    }
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), response).await.unwrap().unwrap();
    let read = |headers: &http::HeaderMap, name: &str| {
        headers.get(name).map(|value| {
            let text = value.to_str().unwrap_or_default();
            percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned()
        })
    };
    if let Some(status) = read(response.headers(), "grpc-status") {
        return (status, read(response.headers(), "grpc-message").unwrap_or_default());
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    (read(&trailers, "grpc-status").unwrap_or_default(), read(&trailers, "grpc-message").unwrap_or_default())
}

/// A request with no message at all (END_STREAM on its headers, or an empty body) and one whose
/// message is cut off before its declared length are the client's mistakes: INVALID_ARGUMENT on
/// every service, not INTERNAL (which would page whoever watches keygate's error rate).
async fn missing_and_cut_off_messages_are_invalid_argument_on_every_service() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    let paths = [
        ("/keygate.v1.Authorize/Check", false),
        ("/keygate.v1.KeyAdmin/GetTenant", true),
        ("/envoy.service.auth.v3.Authorization/Check", false),
        ("/grpc.health.v1.Health/Check", false),
    ];
    for (path, admin) in paths {
        for (what, body) in [
            ("no body", None),
            ("an empty body", Some(&[][..])),
            ("a message cut off", Some(&[0, 0, 0, 0, 100, 10, 0][..])),
            ("half a length prefix", Some(&[0, 0, 0][..])),
        ] {
            let (status, message) = raw_stream(&app, path, body, admin).await;
            assert_eq!(status, "3", "{path} with {what}: {message}");
        }
    }
}

async fn reflection_answers_bad_requests_with_a_status_and_a_short_message() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    let framed = |message: &[u8]| {
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(message);
        framed
    };
    for version in ["v1", "v1alpha"] {
        let path = format!("/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo");
        // Not protobuf; then invalid UTF-8 in `host`.
        for garbage in [&[0xff, 0xff, 0xff][..], &[0x0a, 0x02, 0xc3, 0x28][..]] {
            let (status, message) = raw_stream(&app, &path, Some(&framed(garbage)), false).await;
            assert_eq!(status, "3", "{version}: {garbage:?} is answered INVALID_ARGUMENT: {message}");
        }
        // file_by_filename (field 3) of 15 000 characters: NOT_FOUND, with a short message.
        let long_name = length_delimited(3, "x".repeat(15_000).as_bytes());
        let (status, message) = raw_stream(&app, &path, Some(&framed(&long_name)), false).await;
        assert_eq!(status, "5", "{version}: {message}");
        assert!(message.chars().count() <= 512, "{version}: a message of {} characters", message.chars().count());
        // A symbol over 16 KiB: RESOURCE_EXHAUSTED.
        let huge_symbol = length_delimited(4, "y".repeat(20_000).as_bytes());
        let (status, message) = raw_stream(&app, &path, Some(&framed(&huge_symbol)), false).await;
        assert_eq!(status, "8", "{version}: {message}");
        // And a good request still works.
        let list = length_delimited(7, b"*");
        let (status, message) = raw_stream(&app, &path, Some(&framed(&list)), false).await;
        assert_eq!(status, "0", "{version}: {message}");
    }
}

/// A codec that sends and receives raw message bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, buffer: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buffer.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, buffer: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(buffer.copy_to_bytes(buffer.remaining())))
    }
}

/// Every method a client can call, with the tokens it needs.
const METHODS: [(&str, bool); 16] = [
    ("/keygate.v1.KeyAdmin/PutTenant", true),
    ("/keygate.v1.KeyAdmin/GetTenant", true),
    ("/keygate.v1.KeyAdmin/PutSite", true),
    ("/keygate.v1.KeyAdmin/DeleteSite", true),
    ("/keygate.v1.KeyAdmin/ListSites", true),
    ("/keygate.v1.KeyAdmin/CreateKey", true),
    ("/keygate.v1.KeyAdmin/GetKey", true),
    ("/keygate.v1.KeyAdmin/ListKeys", true),
    ("/keygate.v1.KeyAdmin/UpdateKey", true),
    ("/keygate.v1.KeyAdmin/RevokeKey", true),
    ("/keygate.v1.KeyAdmin/RotateKey", true),
    ("/keygate.v1.KeyAdmin/GetKeyUsage", true),
    ("/keygate.v1.KeyAdmin/ListAuditEvents", true),
    ("/keygate.v1.Authorize/Check", false),
    ("/envoy.service.auth.v3.Authorization/Check", false),
    ("/grpc.health.v1.Health/Check", false),
];

/// Sends `message` as it is to `path`.
pub async fn raw_call(app: &TestApp, path: &str, message: Vec<u8>, admin: bool) -> Result<Bytes, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    let mut request = tonic::Request::new(Bytes::from(message));
    if admin {
        request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
    }
    grpc.unary(request, path.parse().unwrap(), RawCodec).await.map(tonic::Response::into_inner)
}

/// A protobuf field of wire type 2 (a string, bytes or a message).
fn length_delimited(number: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![number << 3 | 2];
    let mut length = bytes.len();
    while length >= 0x80 {
        out.push((length as u8 & 0x7f) | 0x80);
        length >>= 7;
    }
    out.push(length as u8);
    out.extend_from_slice(bytes);
    out
}

/// Asserts the code and that nothing of the request comes back whole.
#[track_caller]
fn assert_short(status: &tonic::Status, code: Code, what: &str) {
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert!(status.message().chars().count() <= 512, "{what}: a message of {} characters", status.message().len());
    assert!(status.details().len() <= 16 * 1024, "{what}: {} bytes of details", status.details().len());
}

async fn undecodable_requests_are_invalid_argument_and_oversized_ones_resource_exhausted(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    for (path, admin) in METHODS {
        // Invalid UTF-8 in a string field (field 1 of every keygate request; a nested string
        // of Envoy's).
        let invalid_utf8 = if path.starts_with("/envoy") {
            length_delimited(1, &length_delimited(10, &length_delimited(1, &[0xff, 0xfe])))
        } else {
            length_delimited(1, &[0xff, 0xfe, 0xfd])
        };
        let status = raw_call(&app, path, invalid_utf8, admin).await.unwrap_err();
        assert_short(&status, Code::InvalidArgument, &format!("{path} with invalid UTF-8"));
        // A length that runs past the end of the message.
        let status = raw_call(&app, path, vec![0x0a, 0xff, 0xff, 0x01], admin).await.unwrap_err();
        assert_short(&status, Code::InvalidArgument, &format!("{path} with a broken message"));
        // Over the 4 MiB default.
        let status = raw_call(&app, path, length_delimited(1, &vec![b'a'; 5 << 20]), admin).await.unwrap_err();
        assert_short(&status, Code::ResourceExhausted, &format!("{path} with a 5 MiB message"));
    }
    // The server is fine afterwards.
    put_tenant(&app, "acme").await;
}

async fn huge_and_nul_fields_are_invalid_argument_with_a_short_message(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    let (key, _) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let key_id = key.key_id.clone();
    let huge = "é".repeat(1_500_000);
    // Each request with one bad field: 3 MB of text, a NUL inside an id, a lone NUL.
    for value in [huge.as_str(), "acme\0", "\0"] {
        let v = || value.to_owned();
        let what = |rpc: &str| format!("{rpc} with a {}-byte field", value.len());
        // Check requests are small: over KEYGATE_MAX_CHECK_MESSAGE_BYTES (128 KiB), the message
        // is refused before it is read.
        let check_code = if value.len() > 128 * 1024 { Code::ResourceExhausted } else { Code::InvalidArgument };
        let mut admin = app.admin.clone();
        let mut authorize = app.authorize.clone();
        for (field, tenant_id, key_id) in [("tenant_id", v(), key_id.clone()), ("key_id", "acme".to_owned(), v())] {
            let request = GetKeyRequest { tenant_id: tenant_id.clone(), key_id: key_id.clone() };
            assert_short(&admin.get_key(request).await.unwrap_err(), Code::InvalidArgument, &what(field));
            let request = RevokeKeyRequest { tenant_id: tenant_id.clone(), key_id: key_id.clone() };
            assert_short(&admin.revoke_key(request).await.unwrap_err(), Code::InvalidArgument, &what("RevokeKey"));
            let request = RotateKeyRequest { tenant_id, key_id, grace_period: None };
            assert_short(&admin.rotate_key(request).await.unwrap_err(), Code::InvalidArgument, &what("RotateKey"));
        }
        let requests = [
            PutTenantRequest { tenant_id: v(), ..Default::default() },
            PutTenantRequest { tenant_id: "acme".into(), display_name: Some(v()), ..Default::default() },
        ];
        for request in requests {
            assert_short(&admin.put_tenant(request).await.unwrap_err(), Code::InvalidArgument, &what("PutTenant"));
        }
        let status = admin.get_tenant(GetTenantRequest { tenant_id: v() }).await.unwrap_err();
        assert_short(&status, Code::InvalidArgument, &what("GetTenant"));
        let requests = [
            PutSiteRequest { tenant_id: "acme".into(), site_id: v(), display_name: String::new() },
            PutSiteRequest { tenant_id: "acme".into(), site_id: "s.example".into(), display_name: v() },
        ];
        for request in requests {
            assert_short(&admin.put_site(request).await.unwrap_err(), Code::InvalidArgument, &what("PutSite"));
        }
        let delete = DeleteSiteRequest { tenant_id: "acme".into(), site_id: v() };
        assert_short(&admin.delete_site(delete).await.unwrap_err(), Code::InvalidArgument, &what("DeleteSite"));
        let sites = ListSitesRequest { tenant_id: "acme".into(), page_size: 0, page_token: v() };
        assert_short(&admin.list_sites(sites).await.unwrap_err(), Code::InvalidArgument, &what("ListSites"));
        let creates = [
            CreateKeyRequest { name: v(), ..key_request("acme", &["events:read"]) },
            key_request("acme", &[value]),
            CreateKeyRequest { site_ids: vec![v()], ..key_request("acme", &["events:read"]) },
            CreateKeyRequest { metadata: [(v(), "x".into())].into(), ..key_request("acme", &["events:read"]) },
            CreateKeyRequest { metadata: [("x".into(), v())].into(), ..key_request("acme", &["events:read"]) },
        ];
        for (index, request) in creates.into_iter().enumerate() {
            let status = admin.create_key(request).await;
            if value.len() < 10 && index == 4 {
                // A metadata value may hold any text, a NUL too; it is stored and given back.
                assert!(status.is_ok(), "{status:?}");
                continue;
            }
            assert_short(&status.unwrap_err(), Code::InvalidArgument, &what(&format!("CreateKey #{index}")));
        }
        let lists = [
            ListKeysRequest { tenant_id: "acme".into(), page_token: v(), ..Default::default() },
            ListKeysRequest { tenant_id: "acme".into(), site_id: v(), ..Default::default() },
        ];
        for request in lists {
            assert_short(&admin.list_keys(request).await.unwrap_err(), Code::InvalidArgument, &what("ListKeys"));
        }
        let update = |paths: Vec<String>, name: String| UpdateKeyRequest {
            tenant_id: "acme".into(),
            key_id: key_id.clone(),
            name,
            update_mask: Some(prost_types::FieldMask { paths }),
            ..Default::default()
        };
        for request in [update(vec![v()], String::new()), update(vec!["name".into()], v())] {
            assert_short(&admin.update_key(request).await.unwrap_err(), Code::InvalidArgument, &what("UpdateKey"));
        }
        let usage = GetKeyUsageRequest {
            tenant_id: "acme".into(),
            key_id: key_id.clone(),
            start_date: v(),
            end_date: "2026-11-01".into(),
        };
        assert_short(&admin.get_key_usage(usage).await.unwrap_err(), Code::InvalidArgument, &what("GetKeyUsage"));
        let audits = [
            ListAuditEventsRequest { tenant_id: "acme".into(), key_id: v(), ..Default::default() },
            ListAuditEventsRequest { tenant_id: "acme".into(), page_token: v(), ..Default::default() },
        ];
        for request in audits {
            let status = admin.list_audit_events(request).await.unwrap_err();
            assert_short(&status, Code::InvalidArgument, &what("ListAuditEvents"));
        }
        // A short bad key is what end users send: a KEY_MALFORMED deny, not an error.
        let short_key =
            CheckRequest { key: v(), scope: "events:read".into(), site_id: String::new(), ..Default::default() };
        if value.len() < 10 {
            let response = authorize.check(short_key).await.unwrap().into_inner();
            assert_eq!(response.reason(), DenyReason::KeyMalformed);
        } else {
            assert_short(&authorize.check(short_key).await.unwrap_err(), check_code, &what("Check"));
        }
        let checks = [
            CheckRequest { key: String::new(), scope: v(), site_id: String::new(), ..Default::default() },
            CheckRequest { key: String::new(), scope: "events:read".into(), site_id: v(), ..Default::default() },
        ];
        for request in checks {
            assert_short(&authorize.check(request).await.unwrap_err(), check_code, &what("Check"));
        }
    }
}

async fn forged_and_foreign_page_tokens_are_invalid_argument(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    for tenant in ["acme", "globex"] {
        put_tenant(&app, tenant).await;
        for index in 0..3 {
            put_site(&app, tenant, &format!("{tenant}-{index}.example")).await.unwrap();
            create_key(&app, key_request(tenant, &["events:read"])).await.unwrap();
        }
    }
    let mut admin = app.admin.clone();
    let keys = |tenant: &str, include_revoked: bool, token: String| ListKeysRequest {
        tenant_id: tenant.into(),
        page_size: 1,
        page_token: token,
        include_revoked,
        site_id: String::new(),
    };
    let token = admin.list_keys(keys("acme", false, String::new())).await.unwrap().into_inner().next_page_token;
    assert!(!token.is_empty());
    assert_eq!(admin.list_keys(keys("acme", false, token.clone())).await.unwrap().into_inner().keys.len(), 1);
    let foreign = [keys("globex", false, token.clone()), keys("acme", true, token.clone())];
    for request in foreign {
        assert_status(admin.list_keys(request).await, Code::InvalidArgument, Some("page_token"));
    }
    let sites = ListSitesRequest { tenant_id: "acme".into(), page_size: 1, page_token: token.clone() };
    assert_status(admin.list_sites(sites).await, Code::InvalidArgument, Some("page_token"));
    // Hand-made tokens in the old format, with a NUL, with SQL: never reach the database.
    let hex = |text: &str| text.bytes().map(|byte| format!("{byte:02x}")).collect::<String>();
    for forged in [hex("keys:key_\0"), hex("keys:' OR 1=1 --"), hex("v1:keys:0000000000000000:key_0"), "zz".into()] {
        assert_status(
            admin.list_keys(keys("acme", false, forged.clone())).await,
            Code::InvalidArgument,
            Some("page_token"),
        );
        let audit = ListAuditEventsRequest { tenant_id: "acme".into(), page_token: forged, ..Default::default() };
        assert_status(admin.list_audit_events(audit).await, Code::InvalidArgument, Some("page_token"));
    }
}

async fn an_unknown_site_is_reported_at_the_index_the_client_sent(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    put_site(&app, "acme", "b.example").await.unwrap();
    let mut request = key_request("acme", &["events:read"]);
    request.site_ids = vec!["b.example".into(), "b.example".into(), "a-unknown.example".into()];
    let status = create_key(&app, request).await.unwrap_err();
    let details = status.get_error_details();
    let fields: Vec<_> = details.bad_request().unwrap().field_violations.iter().map(|v| v.field.clone()).collect();
    assert_eq!(fields, ["site_ids[2]"], "{status:?}");
}

async fn a_read_only_or_full_sqlite_file_is_unavailable() {
    // Read-only: a second server opens the first one's database file read-only.
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    put_tenant(&app, "acme").await;
    let (key, _) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let path = app.database_url.trim_start_matches("sqlite://").split('?').next().unwrap().to_owned();
    let readonly = spawn_replica_at(&app, &format!("sqlite://{path}?mode=ro")).await;
    expect_writes_unavailable(&readonly, &key.key_id).await;

    // Full: the database on a 2 MiB file system, filled up.
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|status| status.success());
    if !mounted {
        crate::harness::skip("cannot mount a 2 MiB tmpfs (needs root) to fill a SQLite file");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.path().to_owned());
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("keygate.db").display());
    let full = spawn_replica_at(&app, &url).await;
    put_tenant(&full, "acme").await;
    let (key, _) = create_key(&full, key_request("acme", &["events:read"])).await.unwrap();
    // Fill what is left of the file system.
    let filler = dir.path().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 4 << 20]);
    expect_writes_unavailable(&full, &key.key_id).await;
    let _ = std::fs::remove_file(filler);
    put_tenant(&full, "recovered").await;
}

async fn expect_writes_unavailable(app: &TestApp, key_id: &str) {
    let mut admin = app.admin.clone();
    let metadata = (0..16).map(|index| (format!("k{index}"), "v".repeat(500))).collect();
    let mut create = key_request("acme", &["events:read"]);
    create.metadata = metadata;
    let status = admin.create_key(create).await.unwrap_err();
    assert_short(&status, Code::Unavailable, "CreateKey");
    let site =
        PutSiteRequest { tenant_id: "acme".into(), site_id: "new.example".into(), display_name: "x".repeat(200) };
    assert_short(&admin.put_site(site).await.unwrap_err(), Code::Unavailable, "PutSite");
    let revoke = RevokeKeyRequest { tenant_id: "acme".into(), key_id: key_id.into() };
    assert_short(&admin.revoke_key(revoke).await.unwrap_err(), Code::Unavailable, "RevokeKey");
}
