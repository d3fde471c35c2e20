//! Prometheus metrics: what keygate counts and measures, and the `/metrics` endpoint that
//! serves them on their own port.
//!
//! Metrics go through the `metrics` facade to one process-wide Prometheus recorder.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::telemetry::Throttle;

/// Seconds: from 50 µs (a cached Check) to 10 s (a stuck database).
const LATENCY_BUCKETS: [f64; 14] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 10.0];

/// The process-wide recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder =
            || PrometheusBuilder::new().set_buckets(&LATENCY_BUCKETS).unwrap_or_else(|_| PrometheusBuilder::new());
        let handle = builder().install_recorder().unwrap_or_else(|_| builder().build_recorder().handle());
        describe();
        handle
    })
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("keygate_decisions_total", "Check decisions, by decision (ALLOWED or a deny reason code)");
    describe_histogram!("keygate_check_duration_seconds", Unit::Seconds, "Time to decide a Check");
    describe_counter!("keygate_cache_hits_total", "Cache lookups answered from memory, by cache");
    describe_counter!("keygate_cache_misses_total", "Cache lookups that went to the store, by cache");
    describe_counter!("keygate_cache_evictions_total", "Entries pushed out of a full cache, by cache");
    describe_gauge!("keygate_cache_entries", "Entries held, by cache");
    describe_counter!("keygate_store_queries_total", "Statements sent to the database for API calls");
    describe_histogram!("keygate_store_lookup_duration_seconds", Unit::Seconds, "Store lookups of Check misses");
    describe_counter!("keygate_grpc_calls_total", "gRPC calls, by service, method and status code");
    describe_histogram!(
        "keygate_grpc_call_duration_seconds",
        Unit::Seconds,
        "gRPC call duration, by service and method"
    );
    describe_histogram!(
        "keygate_invalidation_lag_seconds",
        Unit::Seconds,
        "From an admin change on any replica to this replica dropping its cached copy"
    );
}

/// Scrapes served at once; more wait in the listen backlog.
pub const MAX_SCRAPE_CONNECTIONS: usize = 16;
/// The longest a scrape connection may stay open, request and response included, in seconds.
const SCRAPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `GET /metrics` in Prometheus text format (HTTP/1.1, one request a connection) until
/// `shutdown` completes. `before_render` refreshes gauges that are read rather than counted.
/// At most [`MAX_SCRAPE_CONNECTIONS`] connections are served at once, each for at most ten
/// seconds, and running out of file descriptors makes the accept loop back off instead of spin:
/// the metrics port cannot take resources from the gRPC one.
pub async fn serve<F, Refresh>(listener: TcpListener, before_render: F, shutdown: impl Future<Output = ()>)
where
    F: Fn() -> Refresh + Send + Sync + 'static,
    Refresh: Future<Output = ()> + Send + 'static,
{
    static ACCEPT_FAILED: Throttle = Throttle::every(Duration::from_secs(10));
    let before_render = Arc::new(before_render);
    let slots = Arc::new(Semaphore::new(MAX_SCRAPE_CONNECTIONS));
    let mut backoff = Duration::ZERO;
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            () = &mut shutdown => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = Duration::ZERO;
                stream
            }
            Err(error) if crate::server::is_per_connection(&error) => continue,
            Err(error) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                if let Some(suppressed) = ACCEPT_FAILED.allow() {
                    warn!(%error, retry_in_ms = backoff.as_millis() as u64, suppressed, "cannot accept metrics scrapes");
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => continue,
                    () = &mut shutdown => return,
                }
            }
        };
        let before_render = before_render.clone();
        let scrape = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let before_render = before_render.clone();
            async move { Ok::<_, std::convert::Infallible>(respond(&request, &*before_render).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(SCRAPE_TIMEOUT)
            .keep_alive(false)
            .serve_connection(TokioIo::new(stream), scrape);
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(SCRAPE_TIMEOUT, connection).await {
                Ok(Err(error)) => debug!(%error, "metrics scrape failed"),
                Err(_) => debug!("metrics scrape timed out"),
                Ok(Ok(())) => {}
            }
        });
    }
}

/// The response to one request of the metrics port: the metrics for `GET /metrics`, 404 for
/// any other path, 405 for any other method.
async fn respond<F, Refresh>(
    request: &http::Request<hyper::body::Incoming>,
    before_render: &F,
) -> http::Response<Full<Bytes>>
where
    F: Fn() -> Refresh,
    Refresh: Future<Output = ()>,
{
    let status = |status: http::StatusCode| {
        let mut response = http::Response::new(Full::new(Bytes::new()));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return status(http::StatusCode::NOT_FOUND);
    }
    if request.method() != http::Method::GET && request.method() != http::Method::HEAD {
        let mut response = status(http::StatusCode::METHOD_NOT_ALLOWED);
        response.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    before_render().await;
    let handle = handle();
    handle.run_upkeep();
    let mut response = http::Response::new(Full::new(Bytes::from(handle.render())));
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}

/// The name of a gRPC status code as a metric label (`Ok`, `InvalidArgument`, ...).
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// The series of the gRPC calls keygate serves, resolved once when the server starts (each
/// code's counter the first time a call ends with it): `keygate_grpc_calls_total` and
/// `keygate_grpc_call_duration_seconds`. Every label is a name keygate chose (see
/// [`CallLabels`](crate::grpc::CallLabels)), so clients cannot create series.
pub struct CallMetrics {
    series: std::collections::HashMap<crate::grpc::CallLabels, CallSeries, foldhash::fast::RandomState>,
}

struct CallSeries {
    duration: metrics::Histogram,
    /// By `tonic::Code` as a number (0 to 16).
    calls: [OnceLock<metrics::Counter>; 17],
}

impl CallMetrics {
    /// Series for each of `labels`; install the metrics recorder first.
    pub fn new(labels: impl IntoIterator<Item = crate::grpc::CallLabels>) -> Self {
        let series = labels
            .into_iter()
            .map(|labels| {
                let duration = metrics::histogram!(
                    "keygate_grpc_call_duration_seconds", "service" => labels.service, "method" => labels.method
                );
                (labels, CallSeries { duration, calls: std::array::from_fn(|_| OnceLock::new()) })
            })
            .collect();
        Self { series }
    }

    /// Counts and times one call.
    pub fn record(&self, labels: crate::grpc::CallLabels, code: tonic::Code, elapsed: std::time::Duration) {
        let Some(series) = self.series.get(&labels) else {
            return record_call(labels, code, elapsed);
        };
        let counter = series.calls.get(code as usize).map(|counter| {
            counter.get_or_init(|| {
                metrics::counter!(
                    "keygate_grpc_calls_total",
                    "service" => labels.service,
                    "method" => labels.method,
                    "code" => code_label(code)
                )
            })
        });
        match counter {
            Some(counter) => counter.increment(1),
            None => return record_call(labels, code, elapsed),
        }
        series.duration.record(elapsed.as_secs_f64());
    }
}

/// Counts and times one gRPC call whose series were not resolved beforehand.
fn record_call(labels: crate::grpc::CallLabels, code: tonic::Code, elapsed: std::time::Duration) {
    metrics::counter!(
        "keygate_grpc_calls_total",
        "service" => labels.service,
        "method" => labels.method,
        "code" => code_label(code)
    )
    .increment(1);
    metrics::histogram!("keygate_grpc_call_duration_seconds", "service" => labels.service, "method" => labels.method)
        .record(elapsed.as_secs_f64());
}
