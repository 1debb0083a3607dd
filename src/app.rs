//! Assembly: [`App::build`] turns a [`Config`] into a bound server with its shared context, and
//! [`App::run_until`] serves until a shutdown signal, then drains.
//!
//! One tonic server hosts the four services of the contract, `grpc.health.v1` (overall and per
//! service) and reflection v1 and v1alpha. Every call passes, outermost first: the tracing span
//! (`trace_fn`: [`crate::telemetry::grpc_span`], the child of the caller's `traceparent`), the
//! stream-shutdown wrapper, authentication, the global concurrency limit, the RPC metrics (with
//! `metrics_listen`), and the per-call timeout. The stores of [`App::build`] are wrapped once in
//! [`crate::store::instrumented`], so every backend's calls are timed and traced alike.
//!
//! # Operability
//!
//! **Metrics** are recorded through the `metrics` facade (a no-op until `metrics_listen` installs
//! the Prometheus exporter), so domain modules never see the exporter. Where each is counted: the
//! guide's `session_expired_total`, `session_hijack_detected_total` and
//! `revocations_issued_total{kind}` on the one end path (`SessionManager::end`), only when the call
//! made the change (a concurrent second end finds `AlreadyEnded` and counts nothing), so
//! ValidateSession's and DetectHijacking's hijack ends count alike; evictions in `create`;
//! `rate_limit_denied_total{rule}` and `rate_limit_denials_unrecorded_total{rule}` in `Limiter::check`; `revocations_delivered_total` and the
//! `revocation_watchers_connected` gauge in the watch stream (a guard held by the stream);
//! storage metrics in the instrumented wrapper (`Stores::instrumented`, applied once in
//! `App::build`, so every backend gets the same names); `sessions_active` by a task that calls
//! `SessionStore::count_active` every 15 s (a backend may answer `None`; the default method does).
//! Labels are static strings or configured names (rule, provider), never ids, tokens or addresses.
//!
//! **Overload.** Five ceilings, each answered at once rather than queued: calls in flight
//! (`server.concurrency_limit`, the load-shed permits of the request flow), open watch streams
//! (`revocation.max_watchers`), open health Watch streams (`server.max_health_watch_streams`:
//! health is never shed and needs no key), open reflection streams
//! (`server.max_reflection_streams`: no key either), and per watcher the live broadcast
//! (`revocation.watch_buffer`: a watcher that falls that far behind is ended with `ABORTED` and its cursor, so a client that
//! never reads costs the server at most one HTTP/2 flow-control window of buffered data). HTTP/2
//! `SETTINGS_MAX_CONCURRENT_STREAMS` is deliberately left unset (`App::run_until` says so
//! explicitly): sidecars multiplex many watch streams over few connections, and a client over a
//! per-connection limit would queue its calls locally instead of getting a quick
//! `RESOURCE_EXHAUSTED`. `tests/it/overload.rs` holds every permit with refreshes parked at the
//! test provider and checks the shed answers, the permits given back on completion, cancel and
//! deadline, 10 000 streams over 20 connections, and watchers that never read.
//!
//! **Traces.** One `tracing` subscriber carries logs and spans; the OpenTelemetry layer is added
//! only when an OTLP endpoint is configured. The SDK's batch processor exports from its own thread,
//! which has no Tokio runtime, so each export is spawned onto the server's runtime (`OnRuntime`);
//! `main` shuts the provider down after the server stops, which flushes buffered spans. Storage
//! spans carry the backend and operation only, never a key or an id.

#![warn(missing_docs)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::bootstrap::{self, Secrets};
use crate::clock::{AlignedClock, Clock};
use crate::config::{Config, ConfigError, StorageKind};
use crate::grpc::auth::AuthLayer;
use crate::grpc::envoy::{ExtAuthzAdapter, RateLimitAdapter};
use crate::grpc::layers::{LoadShedLayer, PublicStreamCapLayer, ShutdownStreamsLayer};
use crate::grpc::pb;
use crate::grpc::pb::security_service_server::SecurityServiceServer;
use crate::grpc::pb::session_service_server::SessionServiceServer;
use crate::grpc::pb::token_service_server::TokenServiceServer;
use crate::grpc::revocation::{RevocationAdapter, RevocationServer};
use crate::grpc::security::SecurityAdapter;
use crate::grpc::session::SessionAdapter;
use crate::grpc::token::TokenAdapter;
use crate::revocation::{Revocations, UpstreamQueue};
use crate::security::Security;
use crate::session::SessionManager;
use crate::store::embedded::EmbeddedStore;
use crate::store::memory::MemoryStore;
use crate::store::{DynSessionStore, Stores};
use crate::token::{ProviderRevoker, Providers, TokenManager};

/// The fully qualified names of the four services, as health and reflection report them.
pub const SERVICE_NAMES: [&str; 4] = [
    "atoms.session.v1.SessionService",
    "atoms.session.v1.TokenService",
    "atoms.session.v1.RevocationService",
    "atoms.session.v1.SecurityService",
];

/// A built server, bound to its address, not yet serving.
pub struct App {
    config: Arc<Config>,
    secrets: Secrets,
    sessions: SessionManager,
    revocations: Revocations,
    security: Security,
    tokens: TokenManager,
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    /// The clock kept aligned with shared storage's, when there is one.
    aligned: Option<Arc<AlignedClock>>,
}

/// Why the service could not start or stopped serving: a configuration problem (it names the
/// setting), or a failure of the machine or a library at run time, with its source.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is wrong; fix the named setting.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Something failed that no setting fixes.
    #[error("{context}: {source}")]
    Runtime {
        /// What was being done.
        context: &'static str,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StartError {
    fn runtime(context: &'static str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StartError {
        StartError::Runtime { context, source: source.into() }
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl App {
    /// Validates what the configuration needs at start (keys, storage) and binds the listener.
    pub async fn build(config: Config) -> Result<App, StartError> {
        let listener = bind(&config).await?;
        if let Some(addr) = config.metrics_listen {
            crate::telemetry::prometheus::install(addr)?;
        }
        let secrets = bootstrap::prepare(&config)?;
        let stores = open_stores(&config)?;
        let clock = Arc::new(AlignedClock::new(clock_skew()?));
        let aligned = align_clock(&clock, &stores.sessions).await.is_some();
        let mut app = App::assemble(config, secrets, stores, clock.clone(), listener)?;
        // A store that reports no clock of its own (embedded, memory) has only this process.
        app.aligned = aligned.then_some(clock);
        Ok(app)
    }

    /// Builds around given stores and clock (tests use a manual clock).
    pub async fn build_with(config: Config, stores: Stores, clock: Arc<dyn Clock>) -> Result<App, StartError> {
        let listener = bind(&config).await?;
        let secrets = bootstrap::prepare(&config)?;
        App::assemble(config, secrets, stores, clock, listener)
    }

    fn assemble(
        config: Config,
        secrets: Secrets,
        stores: Stores,
        clock: Arc<dyn Clock>,
        listener: tokio::net::TcpListener,
    ) -> Result<App, StartError> {
        let local_addr = listener.local_addr().map_err(|e| ConfigError(format!("setting `listen`: {e}")))?;
        let sessions = SessionManager::new(
            stores.sessions.clone(),
            secrets.key_ring.clone(),
            clock.clone(),
            config.session.clone(),
        )
        .with_providers(config.providers.iter().map(|p| p.name.clone()).collect());
        // Security wraps the manager (create guard, hijack scorer, event observer); revocations
        // are built on the wrapped one so that every end they cause is observed too.
        let (sessions, security) = Security::install(config.security.clone(), &stores, clock.clone(), sessions);
        let http = crate::token::provider::http_client()
            .map_err(|e| StartError::runtime("building the HTTP client for OAuth2 providers", e))?;
        let providers = Arc::new(Providers::new(config.providers.clone(), http));
        let tokens = TokenManager::new(sessions.clone(), stores.tokens.clone(), providers, config.token.clone(), clock);
        let queue = UpstreamQueue::new(
            sessions.clone(),
            stores.tokens.clone(),
            Arc::new(ProviderRevoker(tokens.clone())),
            config.revocation.cascade,
        );
        let revocations = Revocations::new(sessions.clone(), config.revocation.clone()).with_upstream_queue(queue);
        Ok(App {
            config: Arc::new(config),
            secrets,
            sessions,
            revocations,
            security,
            tokens,
            listener,
            local_addr,
            shutdown: CancellationToken::new(),
            aligned: None,
        })
    }

    /// The session manager (for tests and tools that seed data in process).
    pub fn sessions(&self) -> &SessionManager {
        &self.sessions
    }

    /// Revocation (for tests and tools that act in process, such as a forced cleanup).
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// The live set of accepted API keys (replace its contents to rotate keys).
    pub fn api_keys(&self) -> crate::grpc::auth::ApiKeys {
        self.secrets.api_keys.clone()
    }

    /// The token work (for tests that act in process).
    pub fn tokens(&self) -> &TokenManager {
        &self.tokens
    }

    /// The address the server listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `signal` completes, then stops accepting, ends open streams with a
    /// "reconnect" status, and waits up to `server.shutdown_grace` for in-flight calls.
    pub async fn run_until(self, signal: impl Future<Output = ()> + Send) -> Result<(), StartError> {
        let App { config, secrets, sessions, revocations, security, tokens, listener, local_addr, shutdown, aligned } =
            self;
        let server_config = &config.server;
        let max_message = server_config.max_message_bytes;

        let (health, health_service) = tonic_health::server::health_reporter();
        let storage_ok = match sessions.store().ping().await {
            Ok(()) => {
                sessions.store().warn_about_settings().await;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "session storage unreachable at start; health is NOT_SERVING until it answers");
                false
            }
        };
        set_health(&health, storage_ok).await;
        let health_gate = Arc::new(tokio::sync::Mutex::new(()));
        if let Some(clock) = aligned {
            tokio::spawn(clock_alignment_loop(clock, sessions.store().clone(), shutdown.clone()));
        }
        let storage_health = tokio::spawn(storage_health_loop(
            sessions.store().clone(),
            health.clone(),
            storage_ok,
            health_gate.clone(),
            shutdown.clone(),
        ));

        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // google.rpc error details, so reflection clients (grpcurl) can decode the
                // ErrorInfo, BadRequest and RetryInfo every error status carries.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 =
            reflection().build_v1().map_err(|e| StartError::runtime("building the reflection descriptors", e))?;
        let reflection_v1alpha =
            reflection().build_v1alpha().map_err(|e| StartError::runtime("building the reflection descriptors", e))?;

        let client_cert_role =
            server_config.tls.as_ref().filter(|tls| tls.client_ca_pem.is_some()).map(|tls| tls.client_cert_role);

        // No per-connection stream limit (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS unset), stated
        // here rather than left to a default: sidecars multiplex many watch streams over few
        // connections, and a client over a per-connection limit queues its calls locally
        // instead of getting a quick RESOURCE_EXHAUSTED. The global ceilings are the load-shed
        // permits (`server.concurrency_limit`), `revocation.max_watchers`,
        // `server.max_health_watch_streams` and `server.max_reflection_streams`.
        let mut builder = Server::builder()
            .timeout(server_config.request_timeout)
            .max_concurrent_streams(None)
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .trace_fn(crate::telemetry::grpc_span);
        if let Some(tls) = &server_config.tls {
            let mut tls_config = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
            if let Some(ca) = &tls.client_ca_pem {
                tls_config = tls_config.client_ca_root(Certificate::from_pem(ca));
            }
            builder = builder.tls_config(tls_config).map_err(|e| ConfigError(format!("setting `tls.cert`: {e}")))?;
        }

        // Every service's messages are bounded by `server.max_message_bytes`, both ways (each
        // generated server type has its own methods for it, so this is a macro, not a function).
        macro_rules! sized {
            ($server:expr) => {
                $server.max_decoding_message_size(max_message).max_encoding_message_size(max_message)
            };
        }
        // The first layer is the outermost. Metrics come first so that every call is counted
        // with the status it ended with, those refused by the layers below included.
        let router = builder
            .layer(tower::util::option_layer(config.metrics_listen.map(|_| crate::grpc::rpc_metrics::RpcMetricsLayer)))
            .layer(ShutdownStreamsLayer::new(shutdown.clone()))
            .layer(AuthLayer::new(secrets.api_keys.clone(), client_cert_role))
            .layer(LoadShedLayer::new(server_config.concurrency_limit))
            .layer(PublicStreamCapLayer::new(
                server_config.max_health_watch_streams,
                server_config.max_reflection_streams,
            ))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(sized!(SessionServiceServer::new(SessionAdapter::new(sessions.clone()))))
            .add_service(sized!(TokenServiceServer::new(TokenAdapter::new(tokens.clone()))))
            .add_service(sized!(RevocationServer::new(RevocationAdapter::new(revocations.clone()))))
            .add_service(sized!(SecurityServiceServer::new(SecurityAdapter::new(security.clone()))))
            .add_service(sized!(AuthorizationServer::new(ExtAuthzAdapter::new(
                sessions.clone(),
                tokens.clone(),
                config.envoy.clone()
            ))))
            .add_service(sized!(RateLimitServiceServer::new(RateLimitAdapter::new(
                security.clone(),
                config.envoy.clone()
            ))));

        let sampler = config.metrics_listen.map(|_| {
            let clock = sessions.clone();
            tokio::spawn(crate::telemetry::prometheus::sample_active_sessions(
                sessions.store().clone(),
                move || clock.now(),
                shutdown.clone(),
            ))
        });
        let cleanup =
            tokio::spawn(cleanup_loop(sessions, security, tokens, config.session.cleanup_interval, shutdown.clone()));
        let feed = tokio::spawn(revocations.feed().clone().run(shutdown.clone()));
        let upstream_queue =
            revocations.upstream_queue().cloned().map(|queue| tokio::spawn(queue.run(shutdown.clone())));
        let revocation_cleanup =
            tokio::spawn(revocation_cleanup_loop(revocations, config.revocation.cleanup_interval, shutdown.clone()));
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        tracing::info!(%local_addr, storage = config.storage.kind.as_str(), storage_chosen_by = %config.storage.chosen_by, "serving");

        let stop = shutdown.clone();
        let health_on_stop = health.clone();
        let shutdown_signal = async move {
            signal.await;
            tracing::info!("shutdown requested; draining");
            let _gate = health_gate.lock().await;
            set_health(&health_on_stop, false).await;
            stop.cancel();
        };
        let serve = router.serve_with_incoming_shutdown(incoming, shutdown_signal);
        let grace = server_config.shutdown_grace;
        tokio::select! {
            result = serve => result.map_err(|e| StartError::runtime("the gRPC server failed", e))?,
            () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(?grace, "shutdown grace elapsed with calls still in flight; closing them");
            }
        }
        cleanup.abort();
        if let Some(sampler) = sampler {
            sampler.abort();
        }
        feed.abort();
        revocation_cleanup.abort();
        storage_health.abort();
        if let Some(queue) = upstream_queue {
            // It saw the shutdown: a moment to release its lease (another replica then takes
            // the queue at once instead of after the lease lapses); unfinished work stays in the
            // log for whoever leads next.
            let abort = queue.abort_handle();
            if tokio::time::timeout(std::time::Duration::from_secs(1), queue).await.is_err() {
                abort.abort();
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Binds the configured address first: a start that fails on its address must not leave
/// generated keys or a new database behind.
async fn bind(config: &Config) -> Result<tokio::net::TcpListener, ConfigError> {
    let listen = config.server.listen;
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| ConfigError(format!("setting `listen`: cannot listen on {listen}: {e}")))
}

/// Opens the configured stores (one backend serves sessions, rate limits and events).
fn open_stores(config: &Config) -> Result<Stores, ConfigError> {
    // Storage spans are made only for an exporter: log output leaves them out. A program
    // embedding the app gets them through `telemetry::init` before `App::build`.
    let traced = crate::telemetry::traces_exported();
    match config.storage.kind {
        StorageKind::Memory => {
            Ok(Stores::of(MemoryStore::new().with_max_limiter_keys(config.storage.max_limiter_keys))
                .instrumented(config.storage.kind.as_str(), traced))
        }
        StorageKind::Embedded => {
            EmbeddedStore::open_with_cache(&config.storage.data_dir, config.storage.embedded_cache_bytes)
                .map(|store| {
                    Stores::of(store.with_max_limiter_keys(config.storage.max_limiter_keys))
                        .instrumented(config.storage.kind.as_str(), traced)
                })
                .map_err(|e| ConfigError(format!("setting `data_dir`: {e}")))
        }
        StorageKind::Redis => {
            let url = config.storage.redis_url.as_deref().unwrap_or_default();
            crate::store::redis::open(url, &config.storage.key_prefix, config.storage.operation_timeout).map(|store| {
                Stores::of(store.with_record_format(config.storage.record_format))
                    .instrumented(config.storage.kind.as_str(), traced)
            })
        }
        StorageKind::KvRest => {
            let (Some(url), Some(token)) = (&config.storage.kv_rest_url, &config.storage.kv_rest_token) else {
                return Err(ConfigError(
                    "settings `kv_rest.url` and `kv_rest.token`: required when storage is kv-rest".into(),
                ));
            };
            crate::store::kv_rest::open(url, token, &config.storage.key_prefix, config.storage.operation_timeout).map(
                |store| {
                    Stores::of(store.with_record_format(config.storage.record_format))
                        .instrumented(config.storage.kind.as_str(), traced)
                },
            )
        }
    }
}

/// How often health checks storage.
const STORAGE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Pings storage every second and reports the result as the health of the server and of every
/// service, so a load balancer stops routing here while storage is unreachable and resumes
/// when it returns. `gate` orders these updates with the shutdown's NOT_SERVING: once shutdown
/// has taken it and cancelled, no later update can report SERVING again.
/// The test-only shift of the local clock, `SESSION_AUTHORITY_CLOCK_OFFSET` (a duration, `-`
/// for behind), which shows that replicas on shared storage agree on time whatever their clocks.
fn clock_skew() -> Result<crate::clock::Millis, ConfigError> {
    let Ok(text) = std::env::var("SESSION_AUTHORITY_CLOCK_OFFSET") else { return Ok(0) };
    let (sign, magnitude) = match text.trim().strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text.trim()),
    };
    let d = humantime::parse_duration(magnitude).map_err(|_| {
        ConfigError(format!("SESSION_AUTHORITY_CLOCK_OFFSET: expected a duration such as 600s or -2m, got {text:?}"))
    })?;
    let skew = sign * crate::clock::millis(d);
    tracing::warn!(
        skew_ms = skew,
        "SESSION_AUTHORITY_CLOCK_OFFSET shifts this process's clock (a test setting; shared storage's clock still rules)"
    );
    Ok(skew)
}

/// How often a replica on shared storage re-reads the storage's clock.
const CLOCK_ALIGN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// A reading over a longer round trip is too uncertain to move the clock by.
const CLOCK_ALIGN_MAX_TRIP: crate::clock::Millis = 1000;

/// One alignment of `clock` with the store's clock; the offset, or `None` when the store has no
/// clock of its own or did not answer (logged; the previous offset stays).
async fn align_clock(clock: &AlignedClock, store: &DynSessionStore) -> Option<crate::clock::Millis> {
    let sent = clock.local();
    let reading = store.server_time().await;
    let received = clock.local();
    match reading {
        Ok(Some(server)) if received - sent <= CLOCK_ALIGN_MAX_TRIP => {
            let before = clock.offset();
            let offset = clock.align(server, sent, received);
            if (offset - before).abs() > 1000 {
                tracing::info!(offset_ms = offset, "clock aligned with shared storage's");
            }
            if offset.abs() > 5000 {
                tracing::warn!(
                    offset_ms = offset,
                    "this host's clock differs from shared storage's by more than 5 s; decisions use storage's"
                );
            }
            Some(offset)
        }
        Ok(Some(_)) => Some(clock.offset()),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "could not read shared storage's clock; keeping the last offset");
            Some(clock.offset())
        }
    }
}

/// Re-aligns the clock every [`CLOCK_ALIGN_INTERVAL`] until shutdown.
async fn clock_alignment_loop(clock: Arc<AlignedClock>, store: DynSessionStore, shutdown: CancellationToken) {
    let mut ticker = sweep_ticker(CLOCK_ALIGN_INTERVAL).await;
    while next_sweep(&mut ticker, &shutdown).await {
        align_clock(&clock, &store).await;
    }
}

async fn storage_health_loop(
    store: DynSessionStore,
    health: tonic_health::server::HealthReporter,
    mut serving: bool,
    gate: Arc<tokio::sync::Mutex<()>>,
    shutdown: CancellationToken,
) {
    let mut ticker = sweep_ticker(STORAGE_CHECK_INTERVAL).await;
    while next_sweep(&mut ticker, &shutdown).await {
        let result = store.ping().await;
        let now_serving = result.is_ok();
        let _gate = gate.lock().await;
        if shutdown.is_cancelled() {
            return;
        }
        if now_serving != serving {
            match &result {
                Ok(()) => tracing::info!("session storage reachable again; serving"),
                Err(e) => tracing::warn!(error = %e, "session storage unreachable; health is NOT_SERVING"),
            }
            set_health(&health, now_serving).await;
            serving = now_serving;
        }
    }
}

/// Sets the overall status and every service's.
async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
    for name in SERVICE_NAMES.into_iter().chain([""]) {
        health.set_service_status(name, status).await;
    }
}

/// A ticker for a periodic task (a sweep, the clock alignment, the storage check) whose first
/// tick is one `interval` from now.
async fn sweep_ticker(interval: std::time::Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    ticker
}

/// Waits for the next tick; `false` once shutdown begins.
async fn next_sweep(ticker: &mut tokio::time::Interval, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = ticker.tick() => true,
        () = shutdown.cancelled() => false,
    }
}

/// Logs one sweep's outcome. A failed sweep is retried at the next tick: the loop goes on.
fn log_sweep(what: &'static str, result: crate::error::Result<usize>) {
    match result {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, what, "purged"),
        Err(e) => tracing::warn!(error = %e, what, "cleanup failed; will retry at the next sweep"),
    }
}

/// Ends sessions that timed out unused, then sweeps expired sessions, security events past retention, stale rate-limit state and old
/// refresh records every `interval` until shutdown; each sweep's cost grows with what expired.
async fn cleanup_loop(
    sessions: SessionManager,
    security: Security,
    tokens: TokenManager,
    interval: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = sweep_ticker(interval).await;
    while next_sweep(&mut ticker, &shutdown).await {
        match sessions.expire_timed_out().await {
            Ok(0) => {}
            Ok(ended) => tracing::info!(ended, "ended sessions that timed out unused"),
            Err(e) => tracing::warn!(error = %e, "ending timed-out sessions failed; will retry at the next sweep"),
        }
        log_sweep("expired sessions", sessions.cleanup().await);
        log_sweep("old security events and rate-limit state", security.cleanup().await);
        log_sweep("old refresh records", tokens.cleanup().await);
    }
}

/// Purges revocation-list entries whose TTL passed, every `interval` until shutdown. The sweep
/// walks the list's expiry index, so its cost grows with what expired.
async fn revocation_cleanup_loop(revocations: Revocations, interval: std::time::Duration, shutdown: CancellationToken) {
    let mut ticker = sweep_ticker(interval).await;
    while next_sweep(&mut ticker, &shutdown).await {
        log_sweep("expired revocation-list entries", revocations.cleanup().await);
    }
}
