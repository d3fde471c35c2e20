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
    use tracing_subscriber::filter::FilterExt;
    // Log lines are events, each with its own fields (tenant_id, key_id, reason, ...): spans go
    // to traces only. So with traces off no span is ever built, and a Check formats nothing
    // unless it logs a line.
    let filter = || {
        let levels = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        levels.and(EventsOnly)
    };
    let ansi = std::io::stdout().is_terminal();
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_target(false).with_ansi(ansi).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
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
    let logs = tracing_subscriber::registry().with(logs.with_filter(filter()));
    // No `Option` layer: a `None` one would ask for every span, and spans would be built for
    // nobody.
    let _ = match trace_layer {
        Some(traces) => logs.with(traces).try_init(),
        None => logs.try_init(),
    };
    Telemetry { traces }
}

/// The log layer's filter: events only, decided once per callsite (spans are never built for
/// logs), with no say on levels (`RUST_LOG` decides those).
struct EventsOnly;

impl<S> tracing_subscriber::layer::Filter<S> for EventsOnly {
    fn enabled(&self, metadata: &tracing::Metadata<'_>, _: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        metadata.is_event()
    }

    fn callsite_enabled(&self, metadata: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        if metadata.is_event() {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
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

/// The span of one gRPC call, a child of the caller's trace when it sent `traceparent`. Named by
/// its known labels, never by the raw path: a client's path can be long, or hold a secret.
pub fn request_span<B>(request: &http::Request<B>, labels: crate::grpc::CallLabels) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!("grpc", service = labels.service, method = labels.method);
    if span.is_disabled() {
        // No trace is exported: nothing to read the caller's context for.
        return span;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    let _ = span.set_parent(parent);
    span
}

/// Text a client chose, fit for a log line: at most 64 characters of it, with control,
/// quote and non-ASCII characters escaped as Rust escapes them, so that it can neither flood a
/// line nor forge one.
pub fn client_text(text: &str) -> String {
    const MAX_CHARS: usize = 64;
    let mut shown: String = text.chars().take(MAX_CHARS).flat_map(char::escape_default).collect();
    if text.chars().nth(MAX_CHARS).is_some() {
        shown.push('…');
    }
    shown
}

/// Lets a recurring log line through at most once per interval, and counts the ones it held
/// back, so that a flood of bad calls or an outage cannot flood the log.
///
/// ```ignore
/// static REJECTED: Throttle = Throttle::every(Duration::from_secs(10));
/// if let Some(suppressed) = REJECTED.allow() {
///     warn!(suppressed, "rejected a call");
/// }
/// ```
#[derive(Debug)]
pub struct Throttle {
    interval_ms: u64,
    /// Milliseconds since [`process_start`] before which nothing is logged.
    next_ms: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

/// The process's first moment, as far as [`Throttle`] is concerned.
fn process_start() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

impl Throttle {
    /// At most one line per `interval`.
    pub const fn every(interval: std::time::Duration) -> Self {
        Self {
            interval_ms: interval.as_millis() as u64,
            next_ms: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be logged now, else `None`.
    pub fn allow(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let now = process_start().elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self.next_ms.compare_exchange(next, now + self.interval_ms, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::AcqRel));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::{Throttle, client_text};

    #[test]
    fn client_text_is_short_and_on_one_line() {
        assert_eq!(client_text("checkout"), "checkout");
        assert_eq!(client_text("a\nERROR forged line"), "a\\nERROR forged line");
        let long = client_text(&"x".repeat(1 << 20));
        assert_eq!(long.chars().count(), 65);
    }

    #[test]
    fn a_throttle_lets_one_line_through_per_interval_and_counts_the_rest() {
        let throttle = Throttle::every(std::time::Duration::from_secs(3600));
        assert_eq!(throttle.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(throttle.allow(), None);
        }
        let open = Throttle::every(std::time::Duration::ZERO);
        assert_eq!(open.allow(), Some(0));
        assert_eq!(open.allow(), Some(0));
    }
}
