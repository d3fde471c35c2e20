//! OpenTelemetry traces: the real binary, switched on by the standard OTEL_* variables, sends
//! its spans over OTLP/gRPC to a collector the test runs, as children of the caller's trace.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keygate::proto::authorize_client::AuthorizeClient;
use keygate::proto::key_admin_client::KeyAdminClient;
use keygate::proto::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};

use crate::support::*;

crate::trials!(
    every_backend: [],
    once: [
        spans_reach_an_otlp_collector_with_the_decision_and_the_callers_trace,
    ],
);

/// A span as received: name, ids, attributes as text, and the service that sent it.
#[derive(Clone, Debug)]
struct Received {
    name: String,
    trace_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: Vec<(String, String)>,
    service: String,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let text = |value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match value
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(Value::StringValue(text)) => text.clone(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        };
        let mut received = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .map(|attribute| text(&attribute.value))
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans) {
                received.push(Received {
                    name: span.name,
                    trace_id: span.trace_id,
                    parent_span_id: span.parent_span_id,
                    attributes: span.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect(),
                    service: service.clone(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

async fn spans_reach_an_otlp_collector_with_the_decision_and_the_callers_trace() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_address = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    let address = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let _child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_keygate"))
            .env("KEYGATE_LISTEN", address.to_string())
            .env("KEYGATE_METRICS_LISTEN", "off")
            .env("KEYGATE_DATABASE_URL", format!("sqlite://{}?mode=rwc", dir.path().join("k.db").display()))
            .env("KEYGATE_ADMIN_TOKENS", format!("ops={ADMIN_TOKEN}"))
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector_address}"))
            .env("OTEL_SERVICE_NAME", "keygate-under-test")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect_lazy();
    let started = Instant::now();
    while !matches!(health(channel.clone()).await, Ok(tonic_health::pb::health_check_response::ServingStatus::Serving))
    {
        assert!(started.elapsed() < Duration::from_secs(20), "keygate never became SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut admin = KeyAdminClient::with_interceptor(channel.clone(), |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
        Ok(request)
    });
    admin.put_tenant(PutTenantRequest { tenant_id: "acme".into(), ..Default::default() }).await.unwrap();
    let created = admin.create_key(key_request("acme", &["events:read"])).await.unwrap().into_inner();
    let (key_id, secret) = (created.key.unwrap().key_id, created.secret);

    let (trace_id, parent_id) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut check = tonic::Request::new(CheckRequest {
        key: secret.clone(),
        scope: "events:read".into(),
        site_id: String::new(),
        ..Default::default()
    });
    check.metadata_mut().insert("traceparent", format!("00-{trace_id}-{parent_id}-01").parse().unwrap());
    assert!(AuthorizeClient::new(channel.clone()).check(check).await.unwrap().into_inner().allowed);

    let started = Instant::now();
    let spans = loop {
        let spans = collector.0.lock().unwrap().clone();
        if spans.iter().any(|span| span.name == "Authorize.Check") {
            break spans;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "no Check span reached the collector: {spans:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let check_span = spans.iter().find(|span| span.name == "Authorize.Check").unwrap();
    let attribute =
        |name: &str| check_span.attributes.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
    assert_eq!(attribute("reason"), Some("ALLOWED"));
    assert_eq!(attribute("tenant_id"), Some("acme"));
    assert_eq!(attribute("key_id"), Some(key_id.as_str()));
    assert_eq!(check_span.service, "keygate-under-test");
    assert_eq!(check_span.trace_id, hex(trace_id), "the caller's trace continues");
    assert!(
        spans.iter().any(|span| span.trace_id == hex(trace_id) && span.parent_span_id == hex(parent_id)),
        "keygate's request span is a child of the caller's span"
    );
    assert!(spans.iter().any(|span| span.name == "KeyAdmin.CreateKey"));
    assert!(!format!("{spans:?}").contains(&secret[8..]), "no key in any span");
}
