//! Prometheus metrics: what keygate counts and measures, and the `/metrics` endpoint that
//! serves them on their own port.
//!
//! Metrics go through the `metrics` facade to one process-wide Prometheus recorder.

use std::future::Future;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::debug;

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

/// Serves `GET /metrics` in Prometheus text format until `shutdown` completes. `before_render`
/// refreshes gauges that are read rather than counted.
pub async fn serve<F, Refresh>(listener: TcpListener, before_render: F, shutdown: impl Future<Output = ()>)
where
    F: Fn() -> Refresh + Send + Sync + 'static,
    Refresh: Future<Output = ()> + Send,
{
    let before_render = std::sync::Arc::new(before_render);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let Ok((mut stream, _)) = accepted else { continue };
        let before_render = before_render.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 2048];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut request)).await;
            let Ok(Ok(read)) = read else { return };
            let head = String::from_utf8_lossy(&request[..read]);
            let target = head.split_whitespace().nth(1).unwrap_or_default();
            let response = if head.starts_with("GET ") && (target == "/metrics" || target.starts_with("/metrics?")) {
                before_render().await;
                let handle = handle();
                handle.run_upkeep();
                let body = handle.render();
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned()
            };
            if let Err(error) = stream.write_all(response.as_bytes()).await {
                debug!(%error, "metrics scrape failed");
            }
        });
    }
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

/// Counts and times one gRPC call. Every label is a name keygate chose (see
/// [`CallLabels`](crate::grpc::CallLabels)), so clients cannot create series.
pub fn record_call(labels: crate::grpc::CallLabels, code: tonic::Code, elapsed: std::time::Duration) {
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
