//! The server: binds its listeners, serves KeyAdmin, Authorize, Envoy's ext_authz, health and
//! reflection under the limits of [`connections`], and connects and migrates the store in the
//! background while health says NOT_SERVING.

mod budget;
mod connections;
pub(crate) use connections::is_per_connection;
mod health;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tracing::{info, warn};

pub use budget::CONNECTION_BUDGET_BYTES;
pub use connections::{
    CONNECTION_WINDOW_BYTES, ConnectionLimits, MAX_FRAME_BYTES, MAX_LOCAL_ERROR_RESETS, MAX_PENDING_ACCEPT_RESETS,
    MAX_SMALL_MESSAGE_BYTES, STREAM_WINDOW_BYTES,
};
pub use health::{LIVENESS_SERVICE, SERVICE_NAMES};

use crate::cache::DecisionCache;
use crate::config::{Config, TlsFiles};
use crate::domain::clock::{Clock, SystemClock};
use crate::feed::FeedSettings;
use crate::gateway::Gateway;
use crate::grpc::{AuthorizeApi, BearerAuth, CallLayer, EnvoyAuthorizationApi, KeyAdminApi};
use crate::limits::{LimitSettings, Limiter};
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::authorize_server::AuthorizeServer;
use crate::proto::key_admin_server::KeyAdminServer;
use crate::service::{Authorizer, Core, KeyService, LookupLimit, ShapesCell, StoreSource};
use crate::store::Store;
use crate::usage::UsageRecorder;
use envoy_types::ext_authz::v3::pb::AuthorizationServer;

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
    pub async fn bind_with_clock(mut config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let store = Store::connect_lazy(&config.database)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {} (KEYGATE_LISTEN, the gRPC address)", config.listen))?;
        let metrics_listener = match config.metrics_listen {
            Some(address) => Some(TcpListener::bind(address).await.with_context(|| {
                format!(
                    "cannot listen on {address} (KEYGATE_METRICS_LISTEN, the Prometheus address; `off` disables it)"
                )
            })?),
            None => None,
        };
        let open_files = config.connections.fit_to_open_file_limit(config.database.max_connections);
        if let Some(open_files) = open_files {
            tracing::debug!(open_files, max_connections = config.connections.max_connections, "connection limit");
        }
        if config.metrics_listen.is_some() {
            // Installed before anything resolves its series (the cache, the authorizer).
            crate::metrics::handle();
        }
        let lookups = Arc::new(LookupLimit::new(config.max_lookups_in_flight as usize, config.database.query_timeout));
        let source = StoreSource { store: store.clone(), lookups: lookups.clone() };
        let core = Arc::new(Core {
            cache: DecisionCache::new(&config.cache, Arc::new(source)),
            store,
            clock,
            policy: config.policy.clone(),
            lookups,
            limiter: Limiter::new(config.limits.sync_interval),
            usage: UsageRecorder::default(),
            shapes: ShapesCell::new(config.policy.shapes.clone()),
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
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health = health::Health::new(reporter);
        health.starting().await;
        let store = self.core.store.clone();
        let readiness = tokio::spawn(become_ready(
            self.core.clone(),
            health.clone(),
            self.config.feed.clone(),
            self.config.cache.ttl + self.config.cache.stale_window,
        ));
        let (stop_writers, writers_stop) = tokio::sync::watch::channel(false);
        let counting = tokio::spawn(share_counts(self.core.clone(), self.config.limits.clone(), writers_stop.clone()));
        let recording =
            tokio::spawn(flush_usage(self.core.clone(), self.config.limits.usage_flush_interval, writers_stop));

        let limits = self.config.connections.clone();
        let (max_message, max_check) = (limits.max_message_bytes, limits.max_check_message_bytes);
        let admin = InterceptedService::new(
            KeyAdminServer::new(KeyAdminApi::new(KeyService::new(self.core.clone()), self.core.clock.clone()))
                .max_decoding_message_size(max_message),
            BearerAuth::required(self.config.admin_tokens.clone(), "KeyAdmin"),
        );
        let authorizer = Authorizer::new(self.core.clone());
        let gateway = Gateway::new(authorizer.clone(), self.config.gateway.clone(), self.core.clock.clone());
        let authorize = InterceptedService::new(
            AuthorizeServer::new(AuthorizeApi::new(authorizer, self.config.answers.clone()))
                .max_decoding_message_size(max_check),
            BearerAuth::when_configured(self.config.authorize_tokens.clone(), "Authorize"),
        );
        let envoy = InterceptedService::new(
            AuthorizationServer::new(EnvoyAuthorizationApi::new(gateway)).max_decoding_message_size(max_check),
            BearerAuth::when_configured(self.config.authorize_tokens.clone(), "envoy ext_authz"),
        );
        let routes = tonic::service::Routes::builder()
            .add_service(health_service.max_decoding_message_size(MAX_SMALL_MESSAGE_BYTES))
            .add_service(reflection().build_v1()?.max_decoding_message_size(MAX_SMALL_MESSAGE_BYTES))
            .add_service(reflection().build_v1alpha()?.max_decoding_message_size(MAX_SMALL_MESSAGE_BYTES))
            .add_service(admin)
            .add_service(authorize)
            .add_service(envoy)
            .clone()
            .routes()
            .prepare();
        let service = tower_layer::Layer::layer(&CallLayer::new(limits.request_timeout), routes);
        let tls = self.config.tls.as_ref().map(tls_acceptor).transpose()?;

        let address = self.local_addr();
        info!(
            grpc = %address,
            metrics = %self.metrics_addr().map_or_else(|| "off".to_owned(), |address| address.to_string()),
            tls = tls.is_some(),
            mutual_tls = self.config.tls.as_ref().is_some_and(|tls| tls.client_ca.is_some()),
            backend = store.backend().name(),
            max_connections = limits.max_connections,
            "keygate listening"
        );
        if self.config.authorize_tokens.is_empty() && !address.ip().is_loopback() {
            warn!(
                grpc = %address,
                "Authorize and Envoy's ext_authz take calls without a caller token (KEYGATE_AUTHORIZE_TOKENS is empty) \
                 on a listener that is not loopback-only: anyone who reaches it can test keys. Set caller tokens, \
                 or keep the port on a private network"
            );
        }
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
        let serving = connections::serve(self.listener, tls, service, &limits, async move {
            shutdown.await;
            stop_signal.notify_one();
            health_on_shutdown.stopping().await;
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
        {
            tokio::pin!(serving);
            tokio::select! {
                () = &mut serving => {}
                () = stopping.notified() => {
                    let drain_until = tokio::time::Instant::now() + deadline.saturating_sub(flush_budget);
                    if tokio::time::timeout_at(drain_until, &mut serving).await.is_err() {
                        warn!(deadline_seconds = deadline.as_secs(), "calls still in flight at the drain deadline: dropping them");
                    }
                }
            }
        }
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
        Ok(())
    }
}

/// The rustls acceptor of the gRPC listener: HTTP/2 by ALPN, client certificates required
/// when a client CA is configured.
fn tls_acceptor(tls: &TlsFiles) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
    let certificates = CertificateDer::pem_slice_iter(&tls.cert)
        .collect::<Result<Vec<_>, _>>()
        .context("KEYGATE_TLS_CERT is not a PEM certificate chain")?;
    let key = PrivateKeyDer::from_pem_slice(&tls.key).context("KEYGATE_TLS_KEY is not a PEM private key")?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for certificate in CertificateDer::pem_slice_iter(ca) {
                roots
                    .add(certificate.context("KEYGATE_TLS_CLIENT_CA is not a PEM certificate list")?)
                    .context("KEYGATE_TLS_CLIENT_CA holds an unusable certificate")?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("KEYGATE_TLS_CLIENT_CA")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certificates, key)
        .context("KEYGATE_TLS_CERT and KEYGATE_TLS_KEY do not make a usable identity")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
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
            let now = core.clock.now();
            let _ = core
                .store
                .prune_request_counts(now - chrono::Duration::hours(1), now - chrono::Duration::days(2))
                .await;
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
        .register_encoded_file_descriptor_set(crate::proto::ENVOY_EXT_AUTHZ_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

/// Connects and migrates, retrying with backoff; reads where to follow the change feed from;
/// reports SERVING; then follows the feed while health follows the store.
async fn become_ready(core: Arc<Core>, health: health::Health, feed: FeedSettings, servable_for: Duration) {
    let mut delay = Duration::from_millis(200);
    let head = loop {
        let minting = core.shapes.current().minting.notation().to_owned();
        let ready = match core.store.migrate().await {
            Ok(()) => match core.store.record_key_formats_at_start(&minting, core.clock.now()).await {
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
    health.ready().await;
    info!("store migrated and reachable: serving");
    tokio::spawn(health::follow_store(core.store.clone(), health, servable_for));
    crate::feed::follow(core, feed, head).await;
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

/// Runs migrations once (for `keygate migrate`) and says what it did. Errors say what to check:
/// keygate creates tables, never the database itself.
pub async fn migrate(database: &crate::config::DatabaseConfig) -> anyhow::Result<String> {
    let store = Store::connect_lazy(database)?;
    let target = format!("{} database of KEYGATE_DATABASE_URL", store.backend().name());
    // One connection first, so that a failure names its cause (a pool only says it timed out).
    if let Err(cause) = store.connect_once().await {
        anyhow::bail!(
            "cannot connect to the {target}: {cause}. Is the server running and the URL right? \
             On PostgreSQL and MySQL the database must exist: keygate creates its tables, not the database"
        );
    }
    let before = store.migrations_applied().await.unwrap_or(0);
    let migrated = store.migrate().await;
    let after = store.migrations_applied().await.unwrap_or(before);
    store.close().await;
    match migrated {
        Ok(()) if after == before => Ok(format!("the {target} is up to date ({after} migrations applied)")),
        Ok(()) => Ok(format!("applied {} migrations to the {target} ({after} in all)", after - before)),
        Err(crate::store::StoreError::Unreachable(cause)) => Err(anyhow::anyhow!(
            "cannot reach the {target}: {cause}. Is the server running and the URL right? \
             On PostgreSQL and MySQL the database must exist: keygate creates its tables, not the database"
        )),
        Err(error) => Err(anyhow::anyhow!("migrating the {target} failed: {error}")),
    }
}
