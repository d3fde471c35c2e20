//! One client cannot exhaust keygate: every connection and request limit, attacked with a raw
//! HTTP/2 client that ignores what the server advertises, while a well-behaved client keeps
//! being served. The figures of these attacks (memory, CPU) are measured by
//! `bench/hardening.py`; the bounds asserted here are loose guards against the faults coming
//! back (hundreds of MiB, a spinning accept loop), not benchmarks.

use std::time::{Duration, Instant};

use keygate::proto::*;
use tonic::Code;
use tonic::transport::Channel;

use crate::raw_h2::*;
use crate::support::*;

crate::trials!(
    every_backend: [],
    once: [
        streams_beyond_the_advertised_limit_are_refused_and_memory_stays_bounded,
        a_flood_of_stream_errors_is_answered_with_goaway,
        idle_connections_are_closed_with_goaway_but_a_streaming_call_keeps_its_connection,
        a_connection_that_does_not_answer_pings_is_closed,
        running_out_of_file_descriptors_neither_spins_nor_stops_the_server,
        connections_beyond_the_limit_wait_until_one_closes,
        oversized_headers_and_messages_are_refused_and_the_connection_keeps_working,
        a_call_that_never_finishes_its_request_ends_at_its_deadline,
        made_up_method_names_create_no_metric_series,
        unfinished_messages_on_many_streams_pin_a_bounded_number_of_bytes,
        one_client_cannot_take_every_connection,
        a_connection_must_begin_a_call_soon_after_it_opens,
        connections_are_asked_to_close_at_their_maximum_age,
        the_metrics_port_takes_few_connections_and_never_spins,
    ],
    current_thread: [rejected_calls_and_an_outage_write_a_bounded_amount_of_log],
);

const CHECK: &str = "/keygate.v1.Authorize/Check";

async fn streams_beyond_the_advertised_limit_are_refused_and_memory_stays_bounded() {
    let keygate = Binary::start(&[], None).await;
    let secret = keygate.key().await;
    let before = resident_mib(keygate.pid());

    let mut raw = RawH2::connect(keygate.address).await;
    let mut seen = Vec::new();
    let settings = raw
        .read_until(Duration::from_secs(5), &mut seen, |frame| frame.kind == SETTINGS && frame.flags & ACK == 0)
        .await
        .expect("the server's SETTINGS");
    let settings = settings.settings();
    assert!(settings.contains(&(SETTINGS_MAX_CONCURRENT_STREAMS, 128)), "{settings:?}");
    assert!(settings.contains(&(SETTINGS_MAX_HEADER_LIST_SIZE, 16_384)), "{settings:?}");

    // 100 000 Check streams, each a complete request, written as fast as connection flow control
    // allows and without regard for the stream limit; what the server sends is read meanwhile.
    let RawH2 { mut reader, mut writer } = raw;
    let (window_tx, mut window_rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let counting = tokio::spawn(async move {
        let (mut resets, mut goaway) = (0u32, None);
        loop {
            match reader.read(Duration::from_secs(10)).await {
                Read::Frame(frame) if frame.kind == WINDOW_UPDATE && frame.stream == 0 => {
                    let increment = u32::from_be_bytes(frame.payload[..4].try_into().unwrap()) & 0x7fff_ffff;
                    let _ = window_tx.send(increment);
                }
                Read::Frame(frame) if frame.kind == RST_STREAM => resets += 1,
                Read::Frame(frame) if frame.kind == GOAWAY => {
                    goaway = Some(u32::from_be_bytes(frame.payload[4..8].try_into().unwrap()));
                }
                Read::Frame(_) => {}
                Read::Closed | Read::Silent => return (resets, goaway),
            }
        }
    });
    let sampling = tokio::spawn({
        let pid = keygate.pid();
        async move {
            let mut peak: f64 = 0.0;
            for _ in 0..600 {
                peak = peak.max(resident_mib(pid));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        }
    });
    let message = grpc_message(&prost::Message::encode_to_vec(&CheckRequest {
        key: secret.clone(),
        scope: "events:read".into(),
        site_id: String::new(),
        ..Default::default()
    }));
    let block = header_block(CHECK, &[]);
    let mut window: u64 = 65_535;
    let mut written = 0u32;
    'flood: for batch in 0..1000u32 {
        let mut bytes = Vec::new();
        for index in 0..100u32 {
            let stream = 1 + 2 * (batch * 100 + index);
            bytes.extend(frame(HEADERS, END_HEADERS, stream, &block));
            bytes.extend(frame(DATA, END_STREAM, stream, &message));
        }
        let needed = 100 * message.len() as u64;
        while window < needed {
            match tokio::time::timeout(Duration::from_secs(5), window_rx.recv()).await {
                Ok(Some(increment)) => window += u64::from(increment),
                _ => break 'flood,
            }
        }
        window -= needed;
        if tokio::io::AsyncWriteExt::write_all(&mut writer, &bytes).await.is_err() {
            break;
        }
        written += 100;
    }
    assert!(keygate.serves(&secret, Duration::from_secs(10)).await, "a well-behaved client is served during the flood");
    drop(writer);
    let (resets, goaway) = counting.await.unwrap();
    let goaway = goaway.map(|code| format!("GOAWAY with error code {code}")).unwrap_or_else(|| "no GOAWAY".into());
    let peak = sampling.await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = resident_mib(keygate.pid());
    eprintln!(
        "stream flood: {written} streams written, {resets} refused, {goaway}; \
         resident memory {before:.1} MiB before, {peak:.1} MiB peak, {after:.1} MiB after"
    );
    assert!(resets > 0 || goaway.starts_with("GOAWAY"), "streams beyond the limit are refused");
    assert!(peak - before < 64.0, "memory stays within tens of MiB: {before:.1} -> {peak:.1} MiB");
    assert!(after - before < 32.0, "memory is given back: {before:.1} -> {after:.1} MiB");
    assert!(keygate.serves(&secret, Duration::from_secs(5)).await, "and after it");
}

async fn a_flood_of_stream_errors_is_answered_with_goaway() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    put_tenant(&app, "acme").await;
    let (_, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let mut raw = RawH2::connect(app.address).await;
    let mut seen = Vec::new();
    let mut opened = 0u32;
    // Each stream is opened and then made to fail: a WINDOW_UPDATE that overflows its window
    // is a stream error the server must reset ("MadeYouReset", CVE-2025-8671).
    for index in 0..5_000u32 {
        let stream = 1 + 2 * index;
        let overflow = 0x7fff_ffffu32.to_be_bytes();
        let mut bytes = frame(HEADERS, END_HEADERS, stream, &header_block(CHECK, &[]));
        bytes.extend(frame(WINDOW_UPDATE, 0, stream, &overflow));
        if !raw.write(&bytes).await {
            break;
        }
        opened += 1;
    }
    let closed = raw.closed_within(Duration::from_secs(10), &mut seen).await;
    let resets = seen.iter().filter(|frame| frame.kind == RST_STREAM).count();
    let goaway = seen.iter().any(|frame| frame.kind == GOAWAY);
    assert!(goaway && closed, "GOAWAY and a closed connection after {resets} resets of {opened} streams");
    assert!(resets <= keygate::server::MAX_LOCAL_ERROR_RESETS + 1, "{resets} resets before GOAWAY");
    assert!(check(&app, &secret, "events:read", "").await.allowed, "other clients are served");
}

async fn idle_connections_are_closed_with_goaway_but_a_streaming_call_keeps_its_connection() {
    let flags = ["--connection-idle-timeout-seconds", "1", "--request-timeout-seconds", "1"];
    let app = spawn_app_with(Backend::Sqlite, &flags).await.unwrap();
    // An HTTP/2 connection with no call: GOAWAY, then closed.
    let mut raw = RawH2::connect(app.address).await;
    let mut seen = Vec::new();
    let started = Instant::now();
    assert!(raw.closed_within(Duration::from_secs(5), &mut seen).await, "an idle connection is closed");
    assert!(seen.iter().any(|frame| frame.kind == GOAWAY), "with a GOAWAY first");
    assert!(started.elapsed() >= Duration::from_secs(1), "not before the idle timeout");
    // A TCP connection that never says anything: closed too.
    let mut silent = RawH2::tcp(app.address).await;
    assert!(silent.closed_within(Duration::from_secs(5), &mut Vec::new()).await, "a silent connection is closed");

    // A connection with a Health.Watch stream open is not idle.
    let channel = Channel::from_shared(format!("http://{}", app.address)).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut watch =
        health.watch(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    watch.message().await.unwrap().expect("the current status");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still_open = tokio::time::timeout(Duration::from_millis(200), watch.message()).await;
    assert!(still_open.is_err(), "the watch is still open and silent: {still_open:?}");
    let request =
        CheckRequest { key: String::new(), scope: "events:read".into(), site_id: String::new(), ..Default::default() };
    let answered = keygate::proto::authorize_client::AuthorizeClient::new(channel).check(request).await;
    assert!(answered.is_ok(), "the same connection serves calls: {answered:?}");
}

async fn a_connection_that_does_not_answer_pings_is_closed() {
    let flags = ["--http2-keepalive-interval-seconds", "1", "--http2-keepalive-timeout-seconds", "1"];
    let app = spawn_app_with(Backend::Sqlite, &flags).await.unwrap();
    let mut raw = RawH2::connect(app.address).await;
    // A call in flight (its request never ends), so the connection is not idle; its PINGs are
    // never acknowledged.
    raw.open(1, CHECK, &[], false).await;
    let mut seen = Vec::new();
    let started = Instant::now();
    assert!(raw.closed_within(Duration::from_secs(10), &mut seen).await, "the connection is closed");
    assert!(seen.iter().any(|frame| frame.kind == PING && frame.flags & ACK == 0), "keygate pinged first");
    assert!(started.elapsed() < Duration::from_secs(6), "within interval plus timeout: {:?}", started.elapsed());
}

async fn running_out_of_file_descriptors_neither_spins_nor_stops_the_server() {
    let env = [("KEYGATE_CONNECTION_IDLE_TIMEOUT_SECONDS", "2"), ("KEYGATE_REQUEST_TIMEOUT_SECONDS", "2")];
    let keygate = Binary::start(&env, Some("ulimit -n 128;")).await;
    let secret = keygate.key().await;
    // More idle connections than the process has descriptors.
    let mut idle = Vec::new();
    for _ in 0..150 {
        idle.push(tokio::net::TcpStream::connect(keygate.address).await.unwrap());
    }
    let cpu_before = cpu_time(keygate.pid());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_time(keygate.pid()) - cpu_before;
    assert!(used < Duration::from_millis(1500), "keygate used {used:?} of CPU in 3 s: it spins");
    // Idle connections time out, and the server gets to a new client by itself.
    assert!(keygate.serves(&secret, Duration::from_secs(20)).await, "a new client is served while they are open");
    drop(idle);
    assert!(keygate.serves(&secret, Duration::from_secs(5)).await, "and once they are closed");
}

async fn connections_beyond_the_limit_wait_until_one_closes() {
    let app = spawn_app_with(Backend::Sqlite, &["--max-connections", "2", "--max-connections-per-client", "2"])
        .await
        .unwrap();
    // The test's own client holds one connection; one more fills the limit.
    let mut second = RawH2::connect(app.address).await;
    let mut seen = Vec::new();
    assert!(second.read_until(Duration::from_secs(5), &mut seen, |frame| frame.kind == SETTINGS).await.is_some());
    let mut third = RawH2::connect(app.address).await;
    let waiting = third.read_until(Duration::from_secs(1), &mut Vec::new(), |frame| frame.kind == SETTINGS).await;
    assert!(waiting.is_none(), "a connection beyond the limit is not served yet");
    drop(second);
    let served = third.read_until(Duration::from_secs(5), &mut Vec::new(), |frame| frame.kind == SETTINGS).await;
    assert!(served.is_some(), "it is served once another connection closes");
}

async fn oversized_headers_and_messages_are_refused_and_the_connection_keeps_working() {
    let flags = ["--max-header-list-bytes", "4096", "--max-message-bytes", "65536"];
    let app = spawn_app_with(Backend::Sqlite, &flags).await.unwrap();
    let mut raw = RawH2::connect(app.address).await;
    let mut seen = Vec::new();
    let settings = raw
        .read_until(Duration::from_secs(5), &mut seen, |frame| frame.kind == SETTINGS && frame.flags & ACK == 0)
        .await
        .unwrap();
    assert!(settings.settings().contains(&(SETTINGS_MAX_HEADER_LIST_SIZE, 4096)));
    let big = "x".repeat(8192);
    raw.open(1, CHECK, &[("x-padding", &big)], true).await;
    let answer = raw
        .read_until(Duration::from_secs(5), &mut seen, |frame| {
            frame.stream == 1 && (frame.kind == RST_STREAM || (frame.kind == HEADERS && frame.flags & END_STREAM != 0))
        })
        .await;
    assert!(answer.is_some(), "the stream is refused: {seen:?}");
    assert!(!seen.iter().any(|frame| frame.stream == 1 && frame.kind == DATA), "and never answered with data");
    // The connection itself still works.
    raw.open(3, "/grpc.health.v1.Health/Check", &[], false).await;
    raw.send(DATA, END_STREAM, 3, &grpc_message(&[])).await;
    let served =
        raw.read_until(Duration::from_secs(5), &mut seen, |frame| frame.stream == 3 && frame.kind == DATA).await;
    assert!(served.is_some(), "a normal call on the same connection is answered");

    // A message over the limit: RESOURCE_EXHAUSTED with a short message, not OUT_OF_RANGE.
    let status = try_check(&app, &"k".repeat(100_000), "events:read", "").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().len() < 300, "{}", status.message());
}

async fn a_call_that_never_finishes_its_request_ends_at_its_deadline() {
    let app = spawn_app_with(Backend::Sqlite, &["--request-timeout-seconds", "1"]).await.unwrap();
    let status_of = |response: &http::Response<h2::RecvStream>| {
        response.headers().get("grpc-status").and_then(|value| value.to_str().ok()).map(str::to_owned)
    };
    let tcp = tokio::net::TcpStream::connect(app.address).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    for (grpc_timeout, within) in [(None, Duration::from_secs(4)), (Some("200m"), Duration::from_millis(900))] {
        let mut request = http::Request::post(format!("http://keygate{CHECK}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(timeout) = grpc_timeout {
            request = request.header("grpc-timeout", timeout);
        }
        let (response, mut body) = client.send_request(request.body(()).unwrap(), false).unwrap();
        // A message that announces 100 bytes and sends 2.
        body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 100, 10, 0]), false).unwrap();
        let started = Instant::now();
        let response = tokio::time::timeout(Duration::from_secs(10), response).await.unwrap().unwrap();
        assert_eq!(status_of(&response).as_deref(), Some("4"), "DEADLINE_EXCEEDED ({grpc_timeout:?})");
        assert!(started.elapsed() < within, "{grpc_timeout:?}: {:?}", started.elapsed());
        client = client.ready().await.unwrap();
    }
}

async fn made_up_method_names_create_no_metric_series() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    let series = |body: &str| body.lines().filter(|line| line.starts_with("keygate_grpc_")).count();
    let scrape = || async {
        let mut stream = tokio::net::TcpStream::connect(app.metrics_address).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut body = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut body).await.unwrap();
        body
    };
    // Warm up the series a client can legitimately reach.
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    for path in ["/keygate.v1.KeyAdmin/Nope", "/made.up.Service/Nope"] {
        grpc.ready().await.unwrap();
        let _ =
            grpc.unary(tonic::Request::new(bytes::Bytes::new()), path.parse().unwrap(), crate::hostile::RawCodec).await;
    }
    let before = series(&scrape().await);
    for index in 0..2_000 {
        let path = match index % 2 {
            0 => format!("/keygate.v1.KeyAdmin/MadeUp{index}"),
            _ => format!("/attacker{index}.Service/Method{index}"),
        };
        grpc.ready().await.unwrap();
        let _ =
            grpc.unary(tonic::Request::new(bytes::Bytes::new()), path.parse().unwrap(), crate::hostile::RawCodec).await;
    }
    let body = scrape().await;
    assert_eq!(series(&body), before, "no new series for made-up names");
    assert!(body.len() < 200_000, "/metrics is {} bytes", body.len());
}

/// Captured log output, shared with the subscriber's writer.
#[derive(Clone, Default)]
struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn rejected_calls_and_an_outage_write_a_bounded_amount_of_log() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    // 1 000 unauthenticated calls with long paths.
    let long = "a".repeat(4_000);
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    for index in 0..1_000 {
        let path = format!("/keygate.v1.KeyAdmin/{long}{index}");
        grpc.ready().await.unwrap();
        let _ =
            grpc.unary(tonic::Request::new(bytes::Bytes::new()), path.parse().unwrap(), crate::hostile::RawCodec).await;
    }
    // 1 000 calls while the database cannot be written (its file is gone read-only).
    let store_path = app.database_url.trim_start_matches("sqlite://").split('?').next().unwrap().to_owned();
    let readonly = format!("sqlite://{store_path}?mode=ro");
    let replica = spawn_replica_at(&app, &readonly).await;
    for index in 0..1_000 {
        let request = PutTenantRequest { tenant_id: format!("t{index}"), ..Default::default() };
        let status = replica.admin.clone().put_tenant(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    // 20 Envoy Checks on a "route" of 100 KB with no scope, then 1 000 denied Checks.
    let started = Instant::now();
    let route = "r".repeat(100_000);
    for _ in 0..20 {
        use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest as EnvoyCheck};
        let request = EnvoyCheck {
            attributes: Some(AttributeContext {
                context_extensions: [("route".to_owned(), route.clone())].into(),
                ..Default::default()
            }),
        };
        let path = "/envoy.service.auth.v3.Authorization/Check";
        crate::hostile::raw_call(&app, path, prost::Message::encode_to_vec(&request), false).await.unwrap();
    }
    put_tenant(&app, "acme").await;
    let (_, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    for _ in 0..500 {
        assert!(!check(&app, &secret, "events:write", "").await.allowed);
        let unknown = crate::checks::well_formed_unknown_key();
        assert!(!check(&app, &unknown, "events:read", "").await.allowed);
    }
    let seconds = started.elapsed().as_secs() as usize + 1;
    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    let count = |text: &str| logs.lines().filter(|line| line.contains(text)).count();
    assert!(!logs.contains(&route[..100]), "no route of that length reaches the log");
    assert!(count("context extension") <= seconds + 1, "{} lines about the route", count("context extension"));
    assert!(count("check denied") <= 10 * seconds + 1, "{} denied-Check lines in {seconds} s", count("check denied"));
    assert!(count("rejected a call") <= 2, "{} lines about rejected calls", count("rejected a call"));
    assert!(count("store unavailable") <= 2, "{} lines about the store", count("store unavailable"));
    assert!(!logs.contains(&long[..100]), "no path reaches the log");
    let bound = 20_000 + 300 * 10 * seconds;
    assert!(logs.len() < bound, "3 000 bad calls wrote {} bytes of log:\n{logs}", logs.len());
}

/// The client's view of HTTP/2 flow control on one connection: what it may still send.
struct SendWindow {
    connection: i64,
    streams: std::collections::HashMap<u32, i64>,
    stream_initial: i64,
}

impl SendWindow {
    fn credit(&mut self, frame: &Frame) {
        match frame.kind {
            WINDOW_UPDATE => {
                let increment = i64::from(u32::from_be_bytes(frame.payload[..4].try_into().unwrap()) & 0x7fff_ffff);
                match frame.stream {
                    0 => self.connection += increment,
                    stream => *self.streams.entry(stream).or_insert(self.stream_initial) += increment,
                }
            }
            SETTINGS if frame.flags & ACK == 0 => {
                if let Some((_, size)) = frame.settings().into_iter().find(|(id, _)| *id == 0x4) {
                    self.stream_initial = i64::from(size);
                }
            }
            _ => {}
        }
    }
}

/// Many Check streams each send all but the last byte of a large message (under the Check
/// limit): keygate stops reading the connection once it holds about its budget (1 MiB), so the
/// client, held by flow control, gets no further; a well-behaved client is served meanwhile.
/// Before, tonic gave the window back as it buffered: 40 streams pinned 4.8 MB here (and 128
/// streams of 4 MiB messages, 530 MB).
async fn unfinished_messages_on_many_streams_pin_a_bounded_number_of_bytes() {
    let app = spawn_app_with(Backend::Sqlite, &["--request-timeout-seconds", "20"]).await.unwrap();
    put_tenant(&app, "acme").await;
    let (_, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let RawH2 { mut reader, mut writer } = RawH2::connect(app.address).await;
    let mut window = SendWindow { connection: 65_535, streams: Default::default(), stream_initial: 65_535 };
    let (streams, message_bytes) = (40u32, 120 * 1024usize);
    let mut sent: usize = 0;
    let mut unsent: std::collections::HashMap<u32, usize> =
        (0..streams).map(|index| (1 + 2 * index, message_bytes + 5 - 1)).collect();
    // Streams open in increasing order, as HTTP/2 requires.
    for stream in (0..streams).map(|index| 1 + 2 * index) {
        tokio::io::AsyncWriteExt::write_all(
            &mut writer,
            &frame(HEADERS, END_HEADERS, stream, &header_block(CHECK, &[])),
        )
        .await
        .unwrap();
    }
    let mut prefix_sent = std::collections::HashSet::new();
    loop {
        // Read what the server sends; give up once it has said nothing new for two seconds.
        let mut progressed = false;
        let mut order: Vec<u32> = unsent.keys().copied().collect();
        order.sort();
        for stream in order {
            let left = unsent[&stream];
            let stream_window = *window.streams.entry(stream).or_insert(window.stream_initial);
            let chunk = left.min(16_384).min(stream_window.max(0) as usize).min(window.connection.max(0) as usize);
            if chunk == 0 {
                continue;
            }
            let mut payload = vec![7u8; chunk];
            if prefix_sent.insert(stream) {
                payload[0] = 0;
                payload[1..5].copy_from_slice(&(message_bytes as u32).to_be_bytes());
            }
            if tokio::io::AsyncWriteExt::write_all(&mut writer, &frame(DATA, 0, stream, &payload)).await.is_err() {
                let mut seen = Vec::new();
                reader.closed_within(Duration::from_secs(1), &mut seen).await;
                panic!(
                    "keygate closed the connection after {sent} bytes: {:?}",
                    seen.iter().filter(|frame| frame.kind == GOAWAY).collect::<Vec<_>>()
                );
            }
            window.connection -= chunk as i64;
            *window.streams.get_mut(&stream).unwrap() -= chunk as i64;
            sent += chunk;
            progressed = true;
            if left == chunk {
                unsent.remove(&stream);
            } else {
                unsent.insert(stream, left - chunk);
            }
        }
        if unsent.is_empty() {
            break;
        }
        let wait = if progressed { Duration::from_millis(10) } else { Duration::from_secs(2) };
        let mut credited = false;
        loop {
            match reader.read(wait).await {
                Read::Frame(frame) => {
                    credited |= frame.kind == WINDOW_UPDATE;
                    window.credit(&frame);
                    if frame.kind == GOAWAY || frame.kind == RST_STREAM {
                        panic!("keygate ended a stream or the connection after {sent} bytes: {frame:?}");
                    }
                }
                Read::Silent => break,
                Read::Closed => panic!("keygate closed the connection after {sent} bytes"),
            }
        }
        if !progressed && !credited {
            break;
        }
    }
    eprintln!("unfinished messages: {sent} bytes sent of {}", streams as usize * (message_bytes + 4));
    assert!(!unsent.is_empty(), "keygate read every unfinished message ({sent} bytes): nothing bounds them");
    let bound = keygate::server::CONNECTION_BUDGET_BYTES + keygate::server::CONNECTION_WINDOW_BYTES as usize + 65_535;
    assert!(sent <= bound + 64 * 1024, "the client got {sent} bytes in; the bound is about {bound}");
    assert!(check(&app, &secret, "events:read", "").await.allowed, "another connection is served meanwhile");
}

/// Whether the server sends its SETTINGS on `raw` soon: it serves the connection.
async fn server_settings(raw: &mut RawH2) -> bool {
    raw.read_until(Duration::from_secs(2), &mut Vec::new(), |frame| frame.kind == SETTINGS && frame.flags & ACK == 0)
        .await
        .is_some()
}

async fn one_client_cannot_take_every_connection() {
    let flags = ["--max-connections", "8", "--max-connections-per-client", "3"];
    let app = spawn_app_with(Backend::Sqlite, &flags).await.unwrap();
    let localhost: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    // The test's own client holds one connection from 127.0.0.1; two more reach the limit.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut raw = RawH2::connect_from(app.address, localhost).await;
        assert!(server_settings(&mut raw).await, "connections within the client's share are served");
        held.push(raw);
    }
    let mut beyond = RawH2::connect_from(app.address, localhost).await;
    assert!(beyond.closed_within(Duration::from_secs(2), &mut Vec::new()).await, "a fourth one is closed at once");
    let mut other = RawH2::connect_from(app.address, "127.0.0.2".parse().unwrap()).await;
    assert!(server_settings(&mut other).await, "a client at another address is served");
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = RawH2::connect_from(app.address, localhost).await;
    assert!(server_settings(&mut again).await, "once the client closes some, it may open others");
}

async fn a_connection_must_begin_a_call_soon_after_it_opens() {
    let flags = ["--handshake-timeout-seconds", "1"];
    let app = spawn_app_with(Backend::Sqlite, &flags).await.unwrap();
    put_tenant(&app, "acme").await;
    let (_, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let started = Instant::now();
    let mut silent = RawH2::tcp(app.address).await;
    let mut preface_only = RawH2::connect(app.address).await;
    for (what, raw) in [("a silent connection", &mut silent), ("a connection with no call", &mut preface_only)] {
        assert!(raw.closed_within(Duration::from_secs(4), &mut Vec::new()).await, "{what} is closed");
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "closed after {took:?}");
    // A connection that began a call within the time is not.
    let mut busy = RawH2::connect(app.address).await;
    busy.open(1, "/grpc.health.v1.Health/Check", &[], false).await;
    busy.send(DATA, END_STREAM, 1, &grpc_message(&[])).await;
    let mut seen = Vec::new();
    let closed = busy.closed_within(Duration::from_secs(2), &mut seen).await;
    assert!(!closed, "a connection in use stays open: {seen:?}");
    assert!(check(&app, &secret, "events:read", "").await.allowed);
}

async fn connections_are_asked_to_close_at_their_maximum_age() {
    let flags = ["--max-connection-age-seconds", "1", "--request-timeout-seconds", "1"];
    let app = spawn_app_with(Backend::Sqlite, &flags).await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", app.address)).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut watch =
        health.watch(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    watch.message().await.unwrap().expect("the current status");
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(6), watch.message()).await;
    assert!(matches!(ended, Ok(Err(_)) | Ok(Ok(None))), "the watch ends with its connection: {ended:?}");
    assert!(started.elapsed() < Duration::from_secs(4), "at the age plus the grace: {:?}", started.elapsed());
    // Clients reconnect: the channel's next calls work (the first may see the old connection go).
    let mut answered = Err(tonic::Status::unknown("not tried"));
    for _ in 0..3 {
        answered = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await;
        if answered.is_ok() {
            break;
        }
    }
    assert!(answered.is_ok(), "{answered:?}");
}

/// Idle connections to the metrics port, more than the process has descriptors: the accept
/// loop backs off instead of spinning, and gRPC and scrapes are served once they go.
async fn the_metrics_port_takes_few_connections_and_never_spins() {
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let metrics_listen = metrics.to_string();
    let keygate = Binary::start(&[("KEYGATE_METRICS_LISTEN", metrics_listen.as_str())], Some("ulimit -n 128;")).await;
    let secret = keygate.key().await;
    let mut idle = Vec::new();
    for _ in 0..150 {
        idle.push(tokio::net::TcpStream::connect(metrics).await.unwrap());
    }
    let cpu_before = cpu_time(keygate.pid());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_time(keygate.pid()) - cpu_before;
    assert!(used < Duration::from_millis(1500), "keygate used {used:?} of CPU in 3 s: it spins");
    assert!(keygate.serves(&secret, Duration::from_secs(10)).await, "gRPC is served meanwhile");
    drop(idle);
    let scrape = async {
        let mut stream = tokio::net::TcpStream::connect(metrics).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut body = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut body).await.unwrap();
        body
    };
    let body = tokio::time::timeout(Duration::from_secs(15), scrape).await.expect("a scrape is answered");
    assert!(body.starts_with("HTTP/1.1 200"), "{}", &body[..body.len().min(200)]);
    assert!(body.contains("keygate_decisions_total") || body.contains("keygate_grpc_calls_total"), "metrics");
}
