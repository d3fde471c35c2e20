//! Logs and traces. Logs: human-readable or JSON lines, filtered by `RUST_LOG` (default `info`).
//! Traces: OpenTelemetry over OTLP/gRPC, switched on by the standard `OTEL_EXPORTER_OTLP_*`
//! variables (endpoint, headers, timeout) and named by `OTEL_SERVICE_NAME` (default
//! `keygate`); incoming W3C trace context (`traceparent`) makes keygate's spans children of the
//! caller's.

use std::io::IsTerminal;

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Keeps the trace exporter alive; [`shutdown`](Telemetry::shutdown) flushes it.
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered. Call before the process exits.
    pub fn shutdown(self) {
        if let Some(traces) = self.traces
            && let Err(error) = traces.shutdown()
        {
            eprintln!("keygate: could not flush traces: {error}");
        }
    }
}

/// Whether the OTLP trace exporter is configured by the standard variables.
fn traces_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.is_empty());
    let disabled = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|value| value == "none");
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs the global subscriber (logs, and traces when configured). Must run inside the
/// Tokio runtime: the OTLP exporter uses it. A second call changes nothing.
pub fn init(format: LogFormat) -> Telemetry {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stdout().is_terminal();
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_target(false).with_ansi(ansi).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_target(false)
            .boxed(),
    };
    let mut traces = None;
    let trace_layer = if traces_configured() {
        match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
            Ok(exporter) => {
                let mut resource = opentelemetry_sdk::Resource::builder();
                if std::env::var("OTEL_SERVICE_NAME").is_err() {
                    resource = resource.with_service_name("keygate");
                }
                let provider =
                    SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build();
                let tracer = provider.tracer("keygate");
                traces = Some(provider);
                // Spans have their own filter: a quiet log level must not switch tracing off.
                let spans = std::env::var("KEYGATE_TRACE_FILTER").unwrap_or_else(|_| "info".to_owned());
                let spans = EnvFilter::try_new(spans).unwrap_or_else(|_| EnvFilter::new("info"));
                Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(spans))
            }
            Err(error) => {
                eprintln!("keygate: OTLP trace export is configured but cannot start: {error}");
                None
            }
        }
    } else {
        None
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let _ = tracing_subscriber::registry().with(logs.with_filter(filter())).with(trace_layer).try_init();
    Telemetry { traces }
}

/// Reads W3C trace context from gRPC request metadata (HTTP/2 headers).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

/// The span of one gRPC call, a child of the caller's trace when it sent `traceparent`.
pub fn request_span<B>(request: &http::Request<B>) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!("grpc", path = %request.uri().path());
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    let _ = span.set_parent(parent);
    span
}
