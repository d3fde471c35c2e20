//! The server: binds its listener, serves KeyAdmin, Authorize, health and reflection, and
//! connects and migrates the store in the background while health says NOT_SERVING.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::cache::DecisionCache;
use crate::config::Config;
use crate::domain::clock::{Clock, SystemClock};
use crate::feed::FeedSettings;
use crate::gateway::Gateway;
use crate::grpc::{AuthorizeApi, BearerAuth, EnvoyAuthorizationApi, KeyAdminApi};
use crate::limits::{LimitSettings, Limiter};
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::authorize_server::AuthorizeServer;
use crate::proto::key_admin_server::KeyAdminServer;
use crate::service::{Authorizer, Core, KeyService, LookupLimit};
use crate::store::Store;
use crate::usage::UsageRecorder;
use envoy_types::ext_authz::v3::pb::AuthorizationServer;

/// The fully qualified names health reports on, besides the overall "".
const SERVICE_NAMES: [&str; 3] = ["keygate.v1.KeyAdmin", "keygate.v1.Authorize", "envoy.service.auth.v3.Authorization"];

/// The health service name that is SERVING as long as the process answers (for liveness
/// probes; readiness uses "", which waits for the database).
pub const LIVENESS_SERVICE: &str = "keygate.liveness";

/// A bound, not yet running keygate server.
pub struct App {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    config: Config,
    core: Arc<Core>,
}

impl App {
    /// Binds the listener (port 0 picks a free port) and prepares the store without connecting.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        Self::bind_with_clock(config, Arc::new(SystemClock)).await
    }

    /// Like [`bind`](Self::bind) with a chosen clock; tests move time by hand.
    pub async fn bind_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let database = &config.database;
        let store = Store::connect_lazy(&database.url.0, database.max_connections, database.acquire_timeout)?;
        let listener = TcpListener::bind(config.listen).await?;
        let metrics_listener = match config.metrics_listen {
            Some(address) => Some(TcpListener::bind(address).await?),
            None => None,
        };
        let core = Arc::new(Core {
            store,
            cache: DecisionCache::new(&config.cache),
            clock,
            policy: config.policy.clone(),
            lookups: LookupLimit::new(config.max_lookups_in_flight as usize, database.acquire_timeout),
            limiter: Limiter::default(),
            usage: UsageRecorder::default(),
        });
        Ok(Self { listener, metrics_listener, config, core })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|listener| listener.local_addr().ok())
    }

    /// The store, for tests that count its queries.
    pub fn store(&self) -> Store {
        self.core.store.clone()
    }

    /// The shared state of the services, for tests that look inside (lookup bounds, say).
    pub fn core(&self) -> Arc<Core> {
        self.core.clone()
    }

    /// Serves until `shutdown` completes, then drains in-flight calls and closes the pool.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::NotServing).await;
        // For liveness probes: the process answers, whatever the database does.
        health.set_service_status(LIVENESS_SERVICE, ServingStatus::Serving).await;
        let store = self.core.store.clone();
        let readiness = tokio::spawn(become_ready(self.core.clone(), health.clone(), self.config.feed.clone()));
        let (stop_writers, writers_stop) = tokio::sync::watch::channel(false);
        let counting = tokio::spawn(share_counts(self.core.clone(), self.config.limits.clone(), writers_stop.clone()));
        let recording =
            tokio::spawn(flush_usage(self.core.clone(), self.config.limits.usage_flush_interval, writers_stop));

        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let admin = KeyAdminServer::with_interceptor(
            KeyAdminApi::new(KeyService::new(self.core.clone()), self.core.clock.clone()),
            BearerAuth::required(self.config.admin_tokens.clone(), "KeyAdmin"),
        );
        let authorizer = Authorizer::new(self.core.clone());
        let gateway = Gateway::new(authorizer.clone(), self.config.gateway.clone(), self.core.clock.clone());
        let authorize = AuthorizeServer::with_interceptor(
            AuthorizeApi::new(authorizer),
            BearerAuth::when_configured(self.config.authorize_tokens.clone(), "Authorize"),
        );
        let envoy = AuthorizationServer::with_interceptor(
            EnvoyAuthorizationApi::new(gateway),
            BearerAuth::when_configured(self.config.authorize_tokens.clone(), "envoy ext_authz"),
        );

        let address = self.local_addr();
        info!(%address, backend = store.backend().name(), "keygate listening");
        let health_on_shutdown = health.clone();
        let drain_delay = self.config.shutdown_drain_delay;
        let (stop_metrics, metrics_stop) = tokio::sync::watch::channel(false);
        if let Some(listener) = self.metrics_listener {
            let core = self.core.clone();
            let refresh = move || {
                let core = core.clone();
                async move {
                    for (cache, entries) in core.cache.sizes().await {
                        metrics::gauge!("keygate_cache_entries", "cache" => cache).set(entries as f64);
                    }
                }
            };
            let mut stop = metrics_stop;
            crate::metrics::handle();
            tokio::spawn(crate::metrics::serve(listener, refresh, async move {
                let _ = stop.changed().await;
            }));
        }
        let stopping = Arc::new(tokio::sync::Notify::new());
        let stop_signal = stopping.clone();
        let mut builder = Server::builder();
        if let Some(tls) = &self.config.tls {
            let mut settings = ServerTlsConfig::new().identity(Identity::from_pem(tls.cert.clone(), tls.key.clone()));
            if let Some(ca) = &tls.client_ca {
                settings = settings.client_ca_root(Certificate::from_pem(ca.clone()));
            }
            builder = builder.tls_config(settings)?;
            info!(mutual = tls.client_ca.is_some(), "TLS on the gRPC listener");
        }
        let serving = builder
            .trace_fn(crate::telemetry::request_span)
            .layer(crate::metrics::GrpcMetricsLayer)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(admin)
            .add_service(authorize)
            .add_service(envoy)
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.listener), async move {
                shutdown.await;
                stop_signal.notify_one();
                set_health(&health_on_shutdown, ServingStatus::NotServing).await;
                // Keep accepting while load balancers notice NOT_SERVING and stop routing here.
                if !drain_delay.is_zero() {
                    info!(delay_ms = drain_delay.as_millis() as u64, "shutting down: NOT_SERVING, still accepting");
                    tokio::time::sleep(drain_delay).await;
                }
                info!("shutting down: draining in-flight calls");
            });
        // Once shutdown begins, everything must be done within the deadline; the last part of it
        // (a third, at most 5 s) is kept for writing buffers, however long draining takes.
        let deadline = self.config.shutdown_timeout;
        let flush_budget = (deadline / 3).min(Duration::from_secs(5));
        let result = {
            tokio::pin!(serving);
            tokio::select! {
                result = &mut serving => result,
                () = stopping.notified() => {
                    let drain_until = tokio::time::Instant::now() + deadline.saturating_sub(flush_budget);
                    match tokio::time::timeout_at(drain_until, &mut serving).await {
                        Ok(result) => result,
                        Err(_) => {
                            warn!(deadline_seconds = deadline.as_secs(), "calls still in flight at the drain deadline: dropping them");
                            Ok(())
                        }
                    }
                }
            }
        };
        let deadline_at = tokio::time::Instant::now() + flush_budget;
        readiness.abort();
        // The writers finish the write they are in (never dropped halfway, which would lose
        // what it had taken), then what is still buffered is written before the pool closes.
        let _ = stop_writers.send(true);
        let finish = async {
            let _ = counting.await;
            let _ = recording.await;
            if let Err(error) = self.core.limiter.sync(&store, self.core.clock.now()).await {
                warn!(%error, "could not share the last request counts");
            }
            if let Err(error) = self.core.usage.flush(&store).await {
                warn!(%error, "could not write the last usage and audit records");
            }
            store.close().await;
        };
        if tokio::time::timeout_at(deadline_at, finish).await.is_err() {
            warn!("the shutdown deadline passed before buffered records were written");
        }
        let _ = stop_metrics.send(true);
        info!("keygate stopped");
        Ok(result?)
    }
}

/// Shares request counts every sync interval, and prunes old counters now and then.
async fn share_counts(core: Arc<Core>, settings: LimitSettings, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(settings.sync_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = tokio::time::Instant::now();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        match core.limiter.sync(&core.store, core.clock.now()).await {
            Ok(()) => failing = false,
            Err(error) if !failing => {
                warn!(%error, "cannot share request counts; they stay pending");
                failing = true;
            }
            Err(_) => {}
        }
        if last_prune.elapsed() >= Duration::from_secs(600) {
            last_prune = tokio::time::Instant::now();
            let _ = core.store.prune_request_counts(core.clock.now() - chrono::Duration::days(2)).await;
        }
    }
}

/// Writes last use, usage and denied-Check events every flush interval.
async fn flush_usage(core: Arc<Core>, interval: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        match core.usage.flush(&core.store).await {
            Ok(()) => failing = false,
            Err(error) if !failing => {
                warn!(%error, "cannot write usage and audit records; they stay pending");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// Reflection over keygate's services, health, and google.rpc's error details (so grpcurl can
/// print the BadRequest of an INVALID_ARGUMENT).
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

/// Connects and migrates, retrying with backoff; reads where to follow the change feed from;
/// reports SERVING; then follows the feed.
async fn become_ready(core: Arc<Core>, health: HealthReporter, feed: FeedSettings) {
    let mut delay = Duration::from_millis(200);
    let head = loop {
        let ready = match core.store.migrate().await {
            Ok(()) => match core.store.ping().await {
                Ok(()) => crate::feed::start(&core).await,
                Err(error) => Err(error),
            },
            Err(error) => Err(error),
        };
        match ready {
            Ok(head) => break head,
            Err(error) => {
                warn!(%error, retry_in_ms = delay.as_millis() as u64, "store not ready");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    };
    set_health(&health, ServingStatus::Serving).await;
    info!("store migrated and reachable: serving");
    crate::feed::follow(core, feed, head).await;
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    for name in SERVICE_NAMES {
        health.set_service_status(name, status).await;
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// Runs migrations once and returns (for `keygate migrate`).
pub async fn migrate(database: &crate::config::DatabaseConfig) -> anyhow::Result<()> {
    let store = Store::connect_lazy(&database.url.0, database.max_connections, database.acquire_timeout)?;
    store.migrate().await?;
    store.close().await;
    Ok(())
}
