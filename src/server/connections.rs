//! Accepting and serving client connections under explicit limits.
//!
//! keygate runs its own accept loop over hyper's HTTP/2 server so that every limit a hostile
//! client could push against is set here, in one place: how many connections are served at
//! once and how many from one client address, how soon a new connection must begin its first
//! call, how many calls one connection may have in flight, how large headers may be, how many
//! request bytes it may hold ([`budget`](super::budget)), how long a connection may sit idle or
//! live at all, how quickly it must answer keep-alive pings, and how many stream resets it may
//! cause before it is closed. Running out of file descriptors makes the accept loop back off
//! instead of spinning, and the server recovers by itself when connections close.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, warn};

use super::budget::{BudgetedBody, CONNECTION_BUDGET_BYTES, CallCharge, ConnectionBudget};
use crate::telemetry::Throttle;

/// Client streams a connection may reset before keygate answers GOAWAY (the HTTP/2 "rapid
/// reset" attack, CVE-2023-44487): h2's own default, set explicitly.
pub const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams keygate may have to reset because of a client's protocol errors before it answers
/// GOAWAY (the "MadeYouReset" attack, CVE-2025-8671).
pub const MAX_LOCAL_ERROR_RESETS: usize = 256;
/// Largest HTTP/2 frame keygate accepts, in bytes (the protocol's minimum maximum).
pub const MAX_FRAME_BYTES: u32 = 16_384;
/// HTTP/2 flow-control window of one stream, in bytes: what a client may send on one call
/// before keygate reads it.
pub const STREAM_WINDOW_BYTES: u32 = 256 * 1024;
/// HTTP/2 flow-control window of one connection, in bytes: what a client may send on all of its
/// calls together before keygate reads them. Bounds the memory one connection can pin.
pub const CONNECTION_WINDOW_BYTES: u32 = 1024 * 1024;
/// File descriptors kept free for everything that is not a client connection (database
/// connections are added to this), when the open-file limit caps the connections.
const RESERVED_DESCRIPTORS: u64 = 64;
/// How long a connection closed for being idle has to go after its GOAWAY, unless a call
/// arrived in the meantime: enough for the GOAWAY to be written.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Health and reflection requests are a service or file name: their largest message, in bytes.
pub const MAX_SMALL_MESSAGE_BYTES: usize = 16 * 1024;

/// The limits of the gRPC listener; see the README's configuration table.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Most client connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Most connections from one client address (IPv6: its /64) at once; more are closed.
    pub max_connections_per_client: usize,
    /// Most calls in flight on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Largest request header list, in bytes (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_header_list_bytes: u32,
    /// Largest KeyAdmin request message, in bytes (larger ones are RESOURCE_EXHAUSTED).
    pub max_message_bytes: usize,
    /// Largest Authorize or Envoy Check request message, in bytes.
    pub max_check_message_bytes: usize,
    /// How often keygate pings a connection; `None`: never.
    pub keepalive_interval: Option<Duration>,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// How long a connection may have no call in flight before keygate closes it with GOAWAY.
    pub idle_timeout: Duration,
    /// How long a new connection has to finish its TLS handshake and begin its first call.
    pub handshake_timeout: Duration,
    /// When a connection is asked to close however busy it is; `None`: never.
    pub max_age: Option<Duration>,
    /// The longest a call may take to produce its response (a shorter client deadline wins).
    pub request_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_client: 256,
            max_concurrent_streams: 128,
            max_header_list_bytes: 16 * 1024,
            max_message_bytes: 4 * 1024 * 1024,
            max_check_message_bytes: 128 * 1024,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(10),
            max_age: Some(Duration::from_secs(3600)),
            request_timeout: Duration::from_secs(30),
        }
    }
}

impl ConnectionLimits {
    /// Raises the process's soft open-file limit to its hard limit (as Go's runtime does), and
    /// lowers `max_connections` so that connections cannot take the descriptors the database
    /// pool (`database_connections`) and the rest of keygate need. Returns the open-file limit.
    pub fn fit_to_open_file_limit(&mut self, database_connections: u32) -> Option<u64> {
        let limit = rlimit::increase_nofile_limit(u64::MAX).ok()?;
        let reserved = RESERVED_DESCRIPTORS + u64::from(database_connections);
        let fits = usize::try_from(limit.saturating_sub(reserved).max(1)).unwrap_or(usize::MAX);
        if fits < self.max_connections {
            warn!(
                configured = self.max_connections,
                open_file_limit = limit,
                serving = fits,
                "KEYGATE_MAX_CONNECTIONS is above what the open-file limit allows: serving fewer connections"
            );
            self.max_connections = fits;
            self.max_connections_per_client = self.max_connections_per_client.min(fits);
        }
        Some(limit)
    }

    fn http2(&self) -> http2::Builder<TokioExecutor> {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(self.max_header_list_bytes)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
            .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS)
            .max_frame_size(MAX_FRAME_BYTES)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .adaptive_window(false)
            .keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_timeout);
        builder
    }
}

/// Serves `service` on every connection `listener` accepts (through TLS when `tls` is set),
/// until `shutdown` completes; then stops accepting, asks every connection to finish its calls
/// (GOAWAY) and returns once all are closed.
pub async fn serve<S, B>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    service: S,
    limits: &ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) where
    S: tower_service::Service<
            http::Request<BudgetedBody<Incoming>>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    static ACCEPT_FAILED: Throttle = Throttle::every(Duration::from_secs(10));
    static CLIENT_REFUSED: Throttle = Throttle::every(Duration::from_secs(10));
    let clients = Arc::new(Clients::default());
    let builder = limits.http2();
    let slots = u32::try_from(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
    let permits = Arc::new(Semaphore::new(slots as usize));
    let (stop, stopping) = watch::channel(false);
    let mut backoff = Duration::ZERO;
    tokio::pin!(shutdown);
    loop {
        // A free slot first: at the limit, new clients wait in the kernel's backlog.
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = Duration::ZERO;
                accepted
            }
            Err(error) if is_per_connection(&error) => {
                debug!(%error, "a connection failed while it was accepted");
                continue;
            }
            Err(error) => {
                // Out of file descriptors or memory: wait for connections to close rather than
                // spin on an accept that fails at once.
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                if let Some(suppressed) = ACCEPT_FAILED.allow() {
                    warn!(%error, retry_in_ms = backoff.as_millis() as u64, suppressed, "cannot accept connections");
                }
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(backoff) => continue,
                }
            }
        };
        let Some(client_slot) = Clients::admit(&clients, peer, limits.max_connections_per_client) else {
            if let Some(suppressed) = CLIENT_REFUSED.allow() {
                warn!(
                    client = %client_of(peer),
                    limit = limits.max_connections_per_client,
                    suppressed,
                    "closed a connection: its client has KEYGATE_MAX_CONNECTIONS_PER_CLIENT open already"
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            builder: builder.clone(),
            service: service.clone(),
            idle_timeout: limits.idle_timeout,
            first_call_by: tokio::time::Instant::now() + limits.handshake_timeout,
            max_age: limits.max_age,
            close_grace: limits.request_timeout,
            stopping: stopping.clone(),
            _slots: (client_slot, permit),
        };
        match tls.clone() {
            None => {
                tokio::spawn(connection.serve(stream));
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    match tokio::time::timeout_at(connection.first_call_by, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => connection.serve(stream).await,
                        Ok(Err(error)) => debug!(%error, "TLS handshake failed"),
                        Err(_) => debug!("TLS handshake timed out"),
                    }
                });
            }
        }
    }
    drop(listener);
    let _ = stop.send(true);
    // Every slot back means every connection is closed.
    let _ = permits.acquire_many(slots).await;
}

/// The address a client is counted by: its IP, or for IPv6 its /64 (one host's share of a
/// network, which it can fill with addresses at will).
fn client_of(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(address) => match address.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(address) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

/// Open connections by client address.
#[derive(Debug, Default)]
struct Clients(Mutex<HashMap<IpAddr, usize>>);

impl Clients {
    /// A slot for one more connection of `peer`'s client, unless it has `limit` already.
    fn admit(clients: &Arc<Self>, peer: SocketAddr, limit: usize) -> Option<ClientSlot> {
        let client = client_of(peer);
        let mut open = clients.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(client).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(ClientSlot { clients: clients.clone(), client })
    }
}

/// One connection counted for its client, until it closes.
struct ClientSlot {
    clients: Arc<Clients>,
    client: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// Accept errors that concern one connection only: the next accept may well succeed.
pub(crate) fn is_per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset, Interrupted};
    matches!(error.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset | Interrupted)
}

/// One accepted connection and what serving it needs.
struct Connection<S> {
    builder: http2::Builder<TokioExecutor>,
    service: S,
    idle_timeout: Duration,
    /// When the connection must have begun its first call (TLS handshake included).
    first_call_by: tokio::time::Instant,
    max_age: Option<Duration>,
    /// How long a connection asked to close (GOAWAY) may take to finish before it is dropped:
    /// long enough for any call (the request timeout), and no longer, so that a client that
    /// never answers the GOAWAY's ping cannot keep its connection.
    close_grace: Duration,
    stopping: watch::Receiver<bool>,
    /// Released when the connection closes: the client's count first, so that the accept
    /// loop, woken by the server-wide slot, never sees the client's old count.
    _slots: (ClientSlot, tokio::sync::OwnedSemaphorePermit),
}

/// The transport as h2 sees it: without vectored writes. h2 copies a DATA frame smaller than
/// 1 KiB into its write buffer on such a transport (it chains one of 256 bytes or more on a
/// vectored one, and writes nothing else until that frame is out), so a Check's response,
/// whose message is often 300 bytes or more (Envoy's headers to add), leaves with its trailers
/// in one write instead of two. The price is paid by large responses (a ListKeys page): each
/// DATA frame of 1 KiB or more goes out in two writes, its first KiB with what precedes it.
struct OneWriteIo<IO>(IO);

impl<IO: AsyncRead + Unpin> AsyncRead for OneWriteIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(context, buffer)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for OneWriteIo<IO> {
    fn poll_write(mut self: Pin<&mut Self>, context: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(context, bytes)
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(context)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl<S> Connection<S> {
    async fn serve<IO, B>(mut self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: tower_service::Service<
                http::Request<BudgetedBody<Incoming>>,
                Response = http::Response<B>,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let activity = Arc::new(Activity::default());
        let budget = ConnectionBudget::new(CONNECTION_BUDGET_BYTES);
        let service = TowerToHyperService::new(Tracked { inner: self.service, activity: activity.clone(), budget });
        let connection = self.builder.serve_connection(TokioIo::new(OneWriteIo(io)), service);
        tokio::pin!(connection);
        let idle = activity.idle(self.idle_timeout);
        tokio::pin!(idle);
        let first_call = tokio::time::sleep_until(self.first_call_by);
        tokio::pin!(first_call);
        let aged = tokio::time::sleep(self.max_age.unwrap_or(Duration::MAX).min(Duration::from_secs(u32::MAX.into())));
        tokio::pin!(aged);
        let closed = tokio::time::sleep(Duration::MAX);
        tokio::pin!(closed);
        let mut closing: Option<tokio::time::Instant> = None;
        loop {
            let goaway = tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        debug!(%error, "connection closed with an error");
                    }
                    return;
                }
                () = &mut first_call, if activity.begun() == 0 => {
                    // The condition was checked when this select began: check it again.
                    if activity.begun() > 0 {
                        continue;
                    }
                    debug!("dropping a connection that began no call in time");
                    return;
                }
                _ = self.stopping.wait_for(|stopping| *stopping), if closing.is_none() => self.close_grace,
                () = &mut aged, if closing.is_none() => {
                    debug!("asking a connection to close: it reached KEYGATE_MAX_CONNECTION_AGE_SECONDS");
                    self.close_grace
                }
                () = &mut idle, if closing.is_none() => {
                    debug!(idle_seconds = self.idle_timeout.as_secs(), "closing an idle connection");
                    IDLE_CLOSE_GRACE
                }
                () = &mut closed, if closing.is_some() => {
                    // A call that arrived as the GOAWAY left gets the full grace.
                    let since = closing.unwrap_or_else(tokio::time::Instant::now);
                    if activity.in_flight() > 0 && since + self.close_grace > tokio::time::Instant::now() {
                        closed.as_mut().reset(since + self.close_grace);
                        continue;
                    }
                    debug!("dropping a connection that did not close after GOAWAY");
                    return;
                }
            };
            let now = tokio::time::Instant::now();
            closing = Some(now);
            connection.as_mut().graceful_shutdown();
            closed.as_mut().reset(now + goaway);
        }
    }
}

/// The calls of one connection: how many are in flight, and how many began.
#[derive(Debug, Default)]
struct Activity {
    in_flight: AtomicUsize,
    begun: AtomicU64,
}

impl Activity {
    fn begun(&self) -> u64 {
        self.begun.load(Ordering::Relaxed)
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn begin(self: &Arc<Self>) -> CallGuard {
        self.begun.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.clone())
    }

    /// Completes once the connection has had no call in flight for `timeout` (detected within
    /// a quarter of it more): every quarter counts only if it began and ended with no call in
    /// flight and no call began in between.
    async fn idle(&self, timeout: Duration) {
        let tick = (timeout / 4).max(Duration::from_millis(10));
        let mut quiet = Duration::ZERO;
        let mut was_idle = self.in_flight.load(Ordering::Acquire) == 0;
        let mut last_begun = self.begun.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(tick).await;
            let begun = self.begun.load(Ordering::Relaxed);
            let is_idle = self.in_flight.load(Ordering::Acquire) == 0;
            if was_idle && is_idle && begun == last_begun {
                quiet += tick;
                if quiet >= timeout {
                    return;
                }
            } else {
                quiet = Duration::ZERO;
            }
            (was_idle, last_begun) = (is_idle, begun);
        }
    }
}

/// One call in flight, until its response body is finished or dropped.
struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a connection's calls for its idle timeout, and their request bytes against its
/// budget.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    budget: Arc<ConnectionBudget>,
}

impl<S, RequestBody, B> tower_service::Service<http::Request<RequestBody>> for Tracked<S>
where
    S: tower_service::Service<http::Request<BudgetedBody<RequestBody>>, Response = http::Response<B>>,
{
    type Response = http::Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let guard = self.activity.begin();
        let charge = CallCharge::new(self.budget.clone());
        let request = request.map(|body| BudgetedBody::new(body, charge.clone()));
        TrackedFuture { inner: self.inner.call(request), guard: Some(guard), charge: Some(charge) }
    }
}

pin_project_lite::pin_project! {
    /// A call's response future, holding its place among the calls in flight, and its request
    /// bytes until it has answered (the handler has the decoded request until then).
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        guard: Option<CallGuard>,
        charge: Option<Arc<CallCharge>>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(context))?;
        this.charge.take();
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|body| TrackedBody { inner: body, _guard: guard })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its call in flight until it is finished or dropped (a
    /// streaming call such as Health.Watch is in flight as long as it streams).
    struct TrackedBody<B> {
        #[pin]
        inner: B,
        _guard: Option<CallGuard>,
    }
}

impl<B: http_body::Body> http_body::Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(context)
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

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_without_calls_for_the_whole_timeout() {
        let activity = Arc::new(Activity::default());
        let timeout = Duration::from_secs(8);
        let started = tokio::time::Instant::now();
        let call = activity.begin();
        let watcher = {
            let activity = activity.clone();
            tokio::spawn(async move { activity.idle(timeout).await })
        };
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!watcher.is_finished(), "a call in flight keeps the connection busy");
        drop(call);
        watcher.await.unwrap();
        let idle_for = started.elapsed() - Duration::from_secs(20);
        assert!(idle_for >= timeout && idle_for <= timeout + timeout / 4, "{idle_for:?}");
    }
}
