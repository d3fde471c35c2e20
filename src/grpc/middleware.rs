//! What every gRPC call passes through, whatever its service: a span named by known labels
//! only, a deadline, honest status codes, bounded error messages, and its metrics.
//!
//! - **Labels.** The service and method of a call are the ones keygate serves, or `unknown`:
//!   nothing a client chooses becomes a metric label or a log field.
//! - **Deadline.** A call must produce its response within `KEYGATE_REQUEST_TIMEOUT_SECONDS`, or
//!   the client's own `grpc-timeout` if that is shorter; then it is DEADLINE_EXCEEDED (a
//!   streaming response, such as Health.Watch, may then stream for as long as it likes).
//! - **Codes.** tonic answers a request it cannot decode (invalid UTF-8, a malformed message)
//!   with INTERNAL and an oversized one with OUT_OF_RANGE; both are the client's doing, so they
//!   become INVALID_ARGUMENT and RESOURCE_EXHAUSTED, as the gRPC status-code guide says.
//! - **Bounded messages.** `grpc-message` is cut to [`MAX_MESSAGE_CHARS`] characters and an
//!   oversized `grpc-status-details-bin` is dropped, so no client input comes back whole: in a
//!   trailers-only response and in the trailers of a streamed one alike.
//! - **Reflection requests checked.** tonic's reflection service ends its stream with OK when
//!   a request is not a valid message; keygate checks each one as it passes and answers
//!   INVALID_ARGUMENT instead.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use prost::Message;
use tonic::Code;
use tracing::Instrument;

use super::framing::{Framing, Piece};

/// The longest `grpc-message` keygate sends, in characters.
pub const MAX_MESSAGE_CHARS: usize = 512;
/// The largest `grpc-status-details-bin` keygate sends, in bytes (base64).
const MAX_DETAILS_BYTES: usize = 16 * 1024;

/// The service and method labels of one call: names keygate serves, or `unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CallLabels {
    pub service: &'static str,
    pub method: &'static str,
}

impl CallLabels {
    const UNKNOWN: Self = Self { service: "unknown", method: "unknown" };

    /// The labels of a request path such as `/keygate.v1.Authorize/Check`.
    pub fn of(path: &str) -> Self {
        if let Some(labels) = known_calls().get(path) {
            return *labels;
        }
        let service = path.trim_start_matches('/').split_once('/').map_or("", |(service, _)| service);
        match known_calls().values().find(|labels| labels.service == service) {
            Some(labels) => Self { service: labels.service, method: "unknown" },
            None => Self::UNKNOWN,
        }
    }
}

/// Every method keygate serves, by request path: its own services (from the descriptor set, so
/// new RPCs are known without a list to keep) plus health, reflection and Envoy's ext_authz.
fn known_calls() -> &'static HashMap<&'static str, CallLabels, foldhash::fast::RandomState> {
    static CALLS: OnceLock<HashMap<&'static str, CallLabels, foldhash::fast::RandomState>> = OnceLock::new();
    CALLS.get_or_init(|| {
        let mut methods: Vec<(String, String)> = vec![
            ("grpc.health.v1.Health".into(), "Check".into()),
            ("grpc.health.v1.Health".into(), "Watch".into()),
            ("grpc.reflection.v1.ServerReflection".into(), "ServerReflectionInfo".into()),
            ("grpc.reflection.v1alpha.ServerReflection".into(), "ServerReflectionInfo".into()),
            ("envoy.service.auth.v3.Authorization".into(), "Check".into()),
        ];
        let descriptors = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap_or_default();
        for file in &descriptors.file {
            for service in &file.service {
                let full_name = format!("{}.{}", file.package(), service.name());
                methods.extend(service.method.iter().map(|method| (full_name.clone(), method.name().to_owned())));
            }
        }
        // Leaked once: a bounded set of names that lives as long as the process.
        let leak = |text: String| -> &'static str { Box::leak(text.into_boxed_str()) };
        methods
            .into_iter()
            .map(|(service, method)| {
                let path = leak(format!("/{service}/{method}"));
                (path, CallLabels { service: leak(service), method: leak(method) })
            })
            .collect()
    })
}

tokio::task_local! {
    /// The call being served, for log lines that have no other way to say which call they
    /// belong to (logs carry no spans).
    static CURRENT_CALL: CallLabels;
}

/// The labels of the call this task serves (`unknown` outside one).
pub fn current_call() -> CallLabels {
    CURRENT_CALL.try_with(|labels| *labels).unwrap_or(CallLabels::UNKNOWN)
}

/// The layer that applies all of the above; see the module documentation.
#[derive(Clone)]
pub struct CallLayer {
    request_timeout: Duration,
    metrics: Arc<crate::metrics::CallMetrics>,
}

impl CallLayer {
    /// Calls may take at most `request_timeout` to answer. The metrics series of every known
    /// method are resolved here: install the metrics recorder first.
    pub fn new(request_timeout: Duration) -> Self {
        let mut labels: Vec<CallLabels> = known_calls().values().copied().collect();
        let services: Vec<&'static str> = labels.iter().map(|labels| labels.service).collect();
        labels.extend(services.into_iter().map(|service| CallLabels { service, method: "unknown" }));
        labels.push(CallLabels::UNKNOWN);
        labels.sort_by_key(|labels| (labels.service, labels.method));
        labels.dedup();
        Self { request_timeout, metrics: Arc::new(crate::metrics::CallMetrics::new(labels)) }
    }
}

impl<S> tower_layer::Layer<S> for CallLayer {
    type Service = Call<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Call { inner, request_timeout: self.request_timeout, metrics: self.metrics.clone() }
    }
}

/// See [`CallLayer`].
#[derive(Clone)]
pub struct Call<S> {
    inner: S,
    request_timeout: Duration,
    metrics: Arc<crate::metrics::CallMetrics>,
}

type Response = http::Response<tonic::body::Body>;

impl<S, RequestBody> tower_service::Service<http::Request<RequestBody>> for Call<S>
where
    S: tower_service::Service<http::Request<CheckedBody<RequestBody>>, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let labels = CallLabels::of(request.uri().path());
        let span = crate::telemetry::request_span(&request, labels);
        let deadline = client_timeout(request.headers()).map_or(self.request_timeout, |t| t.min(self.request_timeout));
        let started = Instant::now();
        let invalid = Arc::new(AtomicU8::new(FINE));
        let validate = (labels.service.starts_with("grpc.reflection.")).then_some(is_reflection_request as Validator);
        let request = request.map(|body| CheckedBody::new(body, validate, invalid.clone()));
        let call = CURRENT_CALL.sync_scope(labels, || span.in_scope(|| self.inner.call(request)));
        let metrics = self.metrics.clone();
        Box::pin(
            async move {
                let mut response = match tokio::time::timeout(deadline, CURRENT_CALL.scope(labels, call)).await {
                    Ok(Ok(response)) => response,
                    Err(_) => tonic::Status::deadline_exceeded(format!(
                        "the call did not complete within its deadline of {} ms",
                        deadline.as_millis()
                    ))
                    .into_http(),
                };
                let code = settle_status(response.headers_mut());
                metrics.record(labels, code, started.elapsed());
                Ok(response.map(|body| tonic::body::Body::new(SettledBody { inner: body, invalid })))
            }
            .instrument(span),
        )
    }
}

/// The client's deadline from `grpc-timeout` (up to 8 digits and a unit, as the gRPC protocol
/// defines it); `None` when absent or malformed.
fn client_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The starts of tonic's INTERNAL messages for requests that are the client's fault: a message
/// that is not valid protobuf (or UTF-8), a body with no message at all (END_STREAM on the
/// headers, or only empty DATA frames), a message cut off before its declared length, and a
/// compression flag that is neither 0 nor 1. (A compressed message without `grpc-encoding`
/// stays INTERNAL: the gRPC protocol says so.)
const CLIENT_DECODE_FAULTS: [&str; 4] = [
    "failed to decode Protobuf message",
    "Missing request message",
    "Unexpected EOF decoding stream",
    "protocol error: received message with invalid compression flag",
];

/// Characters `grpc-message` percent-encodes besides non-ASCII (the gRPC protocol's rule).
const MESSAGE_ESCAPES: &AsciiSet = &CONTROLS.add(b'%');

/// Makes a trailers-only error response honest and bounded (see the module documentation) and
/// returns its code; a response whose status travels in trailers is OK so far.
fn settle_status(headers: &mut HeaderMap) -> Code {
    let Some(code) = headers.get("grpc-status").and_then(|value| value.to_str().ok()) else {
        return Code::Ok;
    };
    let mut code = Code::from_bytes(code.as_bytes());
    let message = headers
        .get("grpc-message")
        .and_then(|value| value.to_str().ok())
        .map(|value| percent_decode_str(value).decode_utf8_lossy().into_owned())
        .unwrap_or_default();
    let reclassified = match code {
        Code::Internal if CLIENT_DECODE_FAULTS.iter().any(|fault| message.starts_with(fault)) => {
            Some(Code::InvalidArgument)
        }
        Code::OutOfRange if message.starts_with("Error, decoded message length too large") => {
            Some(Code::ResourceExhausted)
        }
        _ => None,
    };
    if let Some(reclassified) = reclassified {
        code = reclassified;
        headers.insert("grpc-status", HeaderValue::from(code as i32));
    }
    if message.chars().nth(MAX_MESSAGE_CHARS).is_some() {
        let cut = super::status::bounded(&message, MAX_MESSAGE_CHARS);
        if let Ok(value) = HeaderValue::from_str(&utf8_percent_encode(&cut, MESSAGE_ESCAPES).to_string()) {
            headers.insert("grpc-message", value);
        }
    }
    if headers.get("grpc-status-details-bin").is_some_and(|details| details.len() > MAX_DETAILS_BYTES) {
        headers.remove("grpc-status-details-bin");
    }
    code
}

/// Whether a request message (its payload) is valid for the method.
type Validator = fn(&[u8]) -> bool;

/// What a [`CheckedBody`] found: nothing wrong, a message that is not valid (or compressed), a
/// message larger than [`MAX_SMALL_MESSAGE_BYTES`](crate::server::MAX_SMALL_MESSAGE_BYTES).
const FINE: u8 = 0;
const INVALID: u8 = 1;
const TOO_LARGE: u8 = 2;

/// A ServerReflectionRequest, v1 or v1alpha (the same message).
fn is_reflection_request(payload: &[u8]) -> bool {
    tonic_reflection::pb::v1::ServerReflectionRequest::decode(payload).is_ok()
}

pin_project_lite::pin_project! {
    /// A request body whose messages are checked with `validate`, if set, as they pass; what
    /// is wrong with them goes to `invalid` (`INVALID` or `TOO_LARGE`).
    pub struct CheckedBody<B> {
        #[pin]
        inner: B,
        validate: Option<Validator>,
        invalid: Arc<AtomicU8>,
        framing: Framing,
        message: Vec<u8>,
    }
}

impl<B> CheckedBody<B> {
    fn new(inner: B, validate: Option<Validator>, invalid: Arc<AtomicU8>) -> Self {
        Self { inner, validate, invalid, framing: Framing::default(), message: Vec::new() }
    }
}

impl<B: http_body::Body<Data = bytes::Bytes>> http_body::Body for CheckedBody<B> {
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(context));
        if let (Some(validate), Some(Ok(frame))) = (this.validate, &frame)
            && let Some(data) = frame.data_ref()
        {
            let (framing, message, invalid) = (this.framing, this.message, &**this.invalid);
            let mut pieces = Vec::new();
            framing.split(data, |piece| pieces.push(piece));
            const LIMIT: usize = crate::server::MAX_SMALL_MESSAGE_BYTES + 5;
            for piece in pieces {
                match piece {
                    Piece::Bytes(bytes) if message.len() < LIMIT => {
                        message.extend_from_slice(bytes);
                        // tonic stops reading a message whose prefix declares too much.
                        if message.len() >= 5
                            && u32::from_be_bytes([message[1], message[2], message[3], message[4]]) as usize > LIMIT - 5
                        {
                            invalid.store(TOO_LARGE, Ordering::Release);
                        }
                    }
                    Piece::Bytes(_) => {}
                    Piece::End => {
                        let compressed = message.first().is_some_and(|flag| *flag != 0);
                        if message.len() <= LIMIT && (compressed || !validate(message.get(5..).unwrap_or_default())) {
                            let _ = invalid.compare_exchange(FINE, INVALID, Ordering::AcqRel, Ordering::Acquire);
                        }
                        message.clear();
                    }
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A response body whose trailers are settled as a trailers-only response's headers are.
    struct SettledBody<B> {
        #[pin]
        inner: B,
        invalid: Arc<AtomicU8>,
    }
}

impl<B: http_body::Body<Data = bytes::Bytes>> http_body::Body for SettledBody<B> {
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(context));
        Poll::Ready(frame.map(|frame| {
            frame.map(|frame| match frame.into_trailers() {
                Ok(mut trailers) => {
                    let code = settle_status(&mut trailers);
                    let found = this.invalid.load(Ordering::Acquire);
                    if code == Code::Ok && found != FINE {
                        let status = match found {
                            TOO_LARGE => tonic::Status::resource_exhausted("a request message is larger than 16 KiB"),
                            _ => tonic::Status::invalid_argument(
                                "a request message is not a valid message of the method (or is compressed)",
                            ),
                        };
                        trailers.insert("grpc-status", HeaderValue::from(status.code() as i32));
                        if let Ok(message) =
                            HeaderValue::from_str(&utf8_percent_encode(status.message(), MESSAGE_ESCAPES).to_string())
                        {
                            trailers.insert("grpc-message", message);
                        }
                    }
                    http_body::Frame::trailers(trailers)
                }
                Err(frame) => frame,
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_known_names_or_unknown() {
        assert_eq!(
            CallLabels::of("/keygate.v1.KeyAdmin/CreateKey"),
            CallLabels { service: "keygate.v1.KeyAdmin", method: "CreateKey" }
        );
        assert_eq!(CallLabels::of("/keygate.v1.KeyAdmin/MadeUp123").method, "unknown");
        assert_eq!(CallLabels::of("/keygate.v1.KeyAdmin/MadeUp123").service, "keygate.v1.KeyAdmin");
        assert_eq!(CallLabels::of("/attacker.Service/x"), CallLabels::UNKNOWN);
        assert_eq!(CallLabels::of(&format!("/{}", "a".repeat(10_000))), CallLabels::UNKNOWN);
        assert_eq!(CallLabels::of("/envoy.service.auth.v3.Authorization/Check").method, "Check");
    }

    #[test]
    fn grpc_timeouts_are_parsed_as_the_protocol_defines_them() {
        let timeout = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", HeaderValue::from_str(value).unwrap());
            client_timeout(&headers)
        };
        assert_eq!(timeout("1000m"), Some(Duration::from_secs(1)));
        assert_eq!(timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(timeout("123456789S"), None, "at most 8 digits");
        assert_eq!(timeout("5x"), None);
        assert_eq!(timeout("S"), None);
    }

    #[test]
    fn decode_and_size_errors_become_client_errors_and_messages_are_cut() {
        let settle = |code: Code, message: &str| {
            let mut headers = tonic::Status::new(code, message).into_http::<()>().headers().clone();
            let code = settle_status(&mut headers);
            let message = headers
                .get("grpc-message")
                .map(|value| percent_decode_str(value.to_str().unwrap()).decode_utf8_lossy().into_owned());
            (code, message.unwrap_or_default())
        };
        let (code, _) = settle(Code::Internal, "failed to decode Protobuf message: invalid string value");
        assert_eq!(code, Code::InvalidArgument);
        let (code, _) = settle(Code::OutOfRange, "Error, decoded message length too large: found 5 bytes");
        assert_eq!(code, Code::ResourceExhausted);
        assert_eq!(settle(Code::Internal, "internal error").0, Code::Internal, "keygate's own INTERNAL stays");
        let (code, message) = settle(Code::InvalidArgument, &format!("field: {}", "é".repeat(3_000_000)));
        assert_eq!(code, Code::InvalidArgument);
        assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS, "with the ellipsis");
        assert!(message.ends_with('…'));
        for fault in ["Missing request message.", "Unexpected EOF decoding stream."] {
            assert_eq!(settle(Code::Internal, fault).0, Code::InvalidArgument, "{fault}");
        }
    }
}
