//! Prometheus metrics: the exporter on its own HTTP port (`metrics_listen`, off by default), the
//! tower layer that counts every RPC by method and status code, the names of every metric the
//! service records, and the helper that times calls to an upstream token endpoint.
//!
//! Domain code records through the `metrics` facade (`metrics::counter!`), which is a no-op
//! until an exporter is installed, so modules never depend on the exporter. Labels are bounded:
//! service, method, code, storage backend and operation, revocation kind, rate-limit rule name
//! and configured provider name; never a user id, session id, key or address.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body::Frame;
use metrics_exporter_prometheus::PrometheusBuilder;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::config::ConfigError;
use crate::store::DynSessionStore;

/// RPCs handled, by `grpc_service`, `grpc_method` and `grpc_code`.
pub const RPC_HANDLED: &str = "grpc_server_handled_total";
/// RPC latency to the end of the response, by `grpc_service` and `grpc_method`.
pub const RPC_SECONDS: &str = "grpc_server_handling_seconds";

/// The guide's counters, pre-registered at zero so dashboards and alerts see them at once.
pub const GUIDE_COUNTERS: [(&str, &str); 5] = [
    (SESSION_CREATED, "Sessions created"),
    (
        SESSION_EXPIRED,
        "Sessions recorded as expired (found past their idle or absolute timeout by the sweep or a request)",
    ),
    (TOKEN_REFRESHED, "Upstream token refreshes that succeeded"),
    (TOKEN_REFRESH_FAILED, "Upstream token refreshes that failed"),
    (SESSION_HIJACK_DETECTED, "Sessions ended by hijack detection (ValidateSession or DetectHijacking)"),
];

/// Sessions active now (sampled from the store every [`ACTIVE_SAMPLE_INTERVAL`]).
pub const SESSIONS_ACTIVE: &str = "sessions_active";
/// Revocation events this replica appended, by `kind` (revoked, terminated, evicted, hijack,
/// refresh_failed).
pub const REVOCATIONS_ISSUED: &str = "revocations_issued_total";
/// Revocation events sent on watch streams (one per event per watcher).
pub const REVOCATIONS_DELIVERED: &str = "revocations_delivered_total";
/// Watch streams open on this replica.
pub const WATCHERS_CONNECTED: &str = "revocation_watchers_connected";
/// Rate-limit denials, by `rule`.
pub const RATE_LIMIT_DENIED: &str = "rate_limit_denied_total";
/// Rate-limit denials not recorded as a security event because they repeat a denial window
/// whose first denial was recorded (a blocked key hammering on), by `rule`.
pub const RATE_LIMIT_DENIALS_UNRECORDED: &str = "rate_limit_denials_unrecorded_total";
/// Limiter checks refused because the rule already holds `security.max_limiter_keys` keys and
/// the key was not one of them, by `rule`.
pub const RATE_LIMIT_KEYS_REFUSED: &str = "rate_limit_keys_refused_total";
/// Storage operation latency, by `backend` and `operation` (the trait method).
pub const STORAGE_SECONDS: &str = "storage_operation_seconds";
/// Storage operations that failed, by `backend` and `operation`.
pub const STORAGE_ERRORS: &str = "storage_operation_errors_total";
/// Upstream (OAuth2 provider) request latency, by `provider`, `endpoint` and `outcome` (`ok` or
/// `error`); recorded by [`observe_upstream`].
pub const UPSTREAM_SECONDS: &str = "upstream_request_seconds";
/// The guide's counter of sessions created.
pub const SESSION_CREATED: &str = "session_created_total";
/// The guide's counter of sessions recorded as expired.
pub const SESSION_EXPIRED: &str = "session_expired_total";
/// The guide's counter of successful upstream refreshes (incremented by the token work).
pub const TOKEN_REFRESHED: &str = "token_refreshed_total";
/// The guide's counter of failed upstream refreshes (incremented by the token work).
pub const TOKEN_REFRESH_FAILED: &str = "token_refresh_failed_total";
/// The guide's counter of sessions ended by hijack detection.
pub const SESSION_HIJACK_DETECTED: &str = "session_hijack_detected_total";

/// How often [`SESSIONS_ACTIVE`] is sampled from the store.
pub const ACTIVE_SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);

const LATENCY_BUCKETS: &[f64] =
    &[0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Starts the `/metrics` listener on `addr` and installs the process-wide recorder.
pub fn install(addr: SocketAddr) -> Result<(), ConfigError> {
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(LATENCY_BUCKETS)
        .and_then(|b| b.build())
        .map_err(|e| ConfigError(format!("setting `metrics_listen`: cannot serve metrics on {addr}: {e}")))?;
    metrics::set_global_recorder(recorder)
        .map_err(|_| ConfigError("setting `metrics_listen`: a metrics recorder is already installed".into()))?;
    tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!(error = ?e, "the metrics listener stopped");
        }
    });
    metrics::describe_counter!(RPC_HANDLED, "RPCs completed, by service, method and gRPC status code");
    metrics::describe_histogram!(RPC_SECONDS, metrics::Unit::Seconds, "RPC handling time to the end of the response");
    metrics::describe_counter!(
        "token_refresh_failed_total",
        "Upstream token refreshes that failed, by cause (timeout, network, server_error, rate_limited, invalid_grant, rejected, malformed, not_configured, superseded)"
    );
    for (name, help) in GUIDE_COUNTERS {
        metrics::describe_counter!(name, help);
        metrics::counter!(name).absolute(0);
    }
    metrics::describe_gauge!(SESSIONS_ACTIVE, "Sessions active now, sampled from the store");
    metrics::describe_counter!(REVOCATIONS_ISSUED, "Revocation events appended by this replica, by kind");
    metrics::counter!(REVOCATIONS_DELIVERED).absolute(0);
    metrics::describe_counter!(REVOCATIONS_DELIVERED, "Revocation events sent on watch streams");
    metrics::gauge!(WATCHERS_CONNECTED).set(0.0);
    metrics::describe_gauge!(WATCHERS_CONNECTED, "WatchRevocations streams open on this replica");
    metrics::describe_counter!(RATE_LIMIT_DENIED, "Rate-limit denials, by rule");
    metrics::describe_counter!(
        crate::revocation::upstream::UPSTREAM_REVOCATIONS,
        "Upstream (RFC 7009) revocations the revocation queue made, by outcome"
    );
    metrics::gauge!(crate::revocation::upstream::UPSTREAM_REVOCATIONS_PENDING).set(0.0);
    metrics::describe_gauge!(
        crate::revocation::upstream::UPSTREAM_REVOCATIONS_PENDING,
        "Revoked sessions whose upstream tokens the queue on this replica has still to revoke"
    );
    metrics::describe_counter!(
        RATE_LIMIT_DENIALS_UNRECORDED,
        "Rate-limit denials not recorded as security events (repeats within a denial window), by rule"
    );
    metrics::describe_counter!(
        RATE_LIMIT_KEYS_REFUSED,
        "Limiter checks refused because the rule holds security.max_limiter_keys keys, by rule"
    );
    metrics::describe_histogram!(
        STORAGE_SECONDS,
        metrics::Unit::Seconds,
        "Storage operation latency, by backend and operation"
    );
    metrics::describe_counter!(STORAGE_ERRORS, "Storage operations that failed, by backend and operation");
    metrics::describe_histogram!(
        UPSTREAM_SECONDS,
        metrics::Unit::Seconds,
        "Upstream token-endpoint latency, by provider, endpoint and outcome"
    );
    Ok(())
}

/// Samples the number of active sessions into [`SESSIONS_ACTIVE`] every
/// [`ACTIVE_SAMPLE_INTERVAL`] until `shutdown`. The count is one store call off the request
/// path; a backend that cannot count cheaply answers `None` and the gauge is not exported.
pub async fn sample_active_sessions(
    store: DynSessionStore,
    now: impl Fn() -> crate::clock::Millis + Send + 'static,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut ticker = tokio::time::interval(ACTIVE_SAMPLE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match store.count_active(now()).await {
            Ok(Some(active)) => metrics::gauge!(SESSIONS_ACTIVE).set(active as f64),
            Ok(None) => return,
            Err(e) => tracing::warn!(error = %e, "cannot count active sessions; will retry"),
        }
    }
}

/// Times one call to an upstream token endpoint (`endpoint`: `token`, `introspection`,
/// `revocation`, `discovery`, ...) of the configured provider `provider`, inside an `upstream`
/// span (a child of the current one, so it is exported with the caller's trace), and records
/// [`UPSTREAM_SECONDS`] with `outcome` `ok` or `error`. `provider` must be a configured provider
/// name, never a value taken from a request, so that the label stays bounded.
pub async fn observe_upstream<T, E>(
    provider: &str,
    endpoint: &'static str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    use tracing::Instrument as _;
    let span = tracing::info_span!(
        "upstream",
        otel.name = %format_args!("upstream {endpoint}"),
        otel.kind = "client",
        provider,
        endpoint,
    );
    let started = Instant::now();
    let result = call.instrument(span).await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::histogram!(UPSTREAM_SECONDS, "provider" => provider.to_owned(), "endpoint" => endpoint, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    result
}

/// The `grpc_service` and `grpc_method` labels of a call to `path`: the method's own when the
/// server serves it, `unknown` for both otherwise, so that a caller inventing paths (no key is
/// needed to reach the public prefixes) adds no series.
fn call_labels(path: &str) -> (&'static str, &'static str) {
    crate::grpc::auth::method(path)
        .and_then(|(known, _)| known.trim_start_matches('/').split_once('/'))
        .unwrap_or(("unknown", "unknown"))
}

/// Counts every RPC once it has finished, with the status code it ended with. It is the
/// outermost layer, so calls refused by authentication, by load shedding or as unknown methods
/// are counted too.
#[derive(Clone, Debug, Default)]
pub struct RpcMetricsLayer;

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner }
    }
}

/// The service [`RpcMetricsLayer`] produces.
#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
}

/// The labels of one call, shared by the response body that reports its end. Both come from
/// the role table's own copy of the path, so they are one of its entries or `unknown`.
struct CallLabels {
    service: &'static str,
    method: &'static str,
    started: Instant,
}

impl CallLabels {
    fn record(&self, code: &'static str) {
        metrics::counter!(RPC_HANDLED, "grpc_service" => self.service, "grpc_method" => self.method, "grpc_code" => code)
            .increment(1);
        metrics::histogram!(RPC_SECONDS, "grpc_service" => self.service, "grpc_method" => self.method)
            .record(self.started.elapsed().as_secs_f64());
    }
}

fn code_name(status: &http::HeaderValue) -> &'static str {
    let code = status.to_str().ok().and_then(|s| s.parse::<i32>().ok()).unwrap_or(2);
    match tonic::Code::from_i32(code) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "Canceled",
        tonic::Code::Unknown => "Unknown",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::DeadlineExceeded => "DeadlineExceeded",
        tonic::Code::NotFound => "NotFound",
        tonic::Code::AlreadyExists => "AlreadyExists",
        tonic::Code::PermissionDenied => "PermissionDenied",
        tonic::Code::ResourceExhausted => "ResourceExhausted",
        tonic::Code::FailedPrecondition => "FailedPrecondition",
        tonic::Code::Aborted => "Aborted",
        tonic::Code::OutOfRange => "OutOfRange",
        tonic::Code::Unimplemented => "Unimplemented",
        tonic::Code::Internal => "Internal",
        tonic::Code::Unavailable => "Unavailable",
        tonic::Code::DataLoss => "DataLoss",
        tonic::Code::Unauthenticated => "Unauthenticated",
    }
}

impl<S> Service<Request<Body>> for RpcMetrics<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let (service, method) = call_labels(request.uri().path());
        let labels = Arc::new(CallLabels { service, method, started: Instant::now() });
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            // A trailers-only response (every error, and any empty stream) carries the status in
            // its headers; otherwise the status arrives in the body's trailers.
            if let Some(status) = response.headers().get("grpc-status") {
                labels.record(code_name(status));
                return Ok(response);
            }
            Ok(response.map(|body| Body::new(ObservedBody { inner: body, labels: Some(labels) })))
        })
    }
}

/// A response body that records the call when its trailers (or its end) pass through.
struct ObservedBody {
    inner: Body,
    labels: Option<Arc<CallLabels>>,
}

impl http_body::Body for ObservedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(labels) = self.labels.take()
                {
                    labels.record(trailers.get("grpc-status").map_or("Unknown", code_name));
                }
            }
            Poll::Ready(Some(Err(status))) => {
                if let Some(labels) = self.labels.take() {
                    labels.record(code_name(&http::HeaderValue::from(status.code() as i32)));
                }
            }
            Poll::Ready(None) => {
                if let Some(labels) = self.labels.take() {
                    labels.record("Unknown");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        // The client went away before the call finished.
        if let Some(labels) = self.labels.take() {
            labels.record("Canceled");
        }
    }
}

/// The resident set size (`VmRSS` of `/proc/<pid>/status`) of process `pid`, in bytes, when
/// `/proc` has it. The benchmark seeding, the load generator and the tests measure memory with it.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use secrecy::SecretString;

    use super::*;
    use crate::clock::{Clock as _, ManualClock};
    use crate::crypto::KeyRing;
    use crate::session::{NewSession, SessionManager, SessionSettings};
    use crate::store::memory::MemoryStore;

    #[test]
    fn call_labels_are_a_served_method_or_unknown() {
        assert_eq!(
            call_labels("/atoms.session.v1.SessionService/ValidateSession"),
            ("atoms.session.v1.SessionService", "ValidateSession")
        );
        assert_eq!(call_labels("/grpc.health.v1.Health/Check"), ("grpc.health.v1.Health", "Check"));
        for made_up in
            ["", "/", "/grpc.health.v1.Health/MadeUp", "/grpc.reflection.x/Y", "/a/b/c", "/x.Y/ValidateSession"]
        {
            assert_eq!(call_labels(made_up), ("unknown", "unknown"), "{made_up:?}");
        }
    }

    #[test]
    fn the_active_sessions_gauge_follows_the_store_at_each_sample() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let gauge = || {
            snapshotter.snapshot().into_vec().into_iter().find_map(|(key, _, _, value)| match value {
                DebugValue::Gauge(v) if key.key().name() == SESSIONS_ACTIVE => Some(v.into_inner()),
                _ => None,
            })
        };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let clock = Arc::new(ManualClock::new(1_000_000));
                let settings = SessionSettings {
                    idle_timeout: Duration::from_secs(60),
                    absolute_timeout: Duration::from_secs(3600),
                    max_sessions_per_user: 5,
                    device_validation: true,
                    device_match_threshold: 0.8,
                    device_fingerprint_required: true,
                    idle_slide_step: Duration::from_secs(60),
                    tombstone_ttl: Duration::from_secs(86400),
                    proactive_refresh: Duration::from_secs(300),
                };
                let manager = SessionManager::new(
                    Arc::new(MemoryStore::new()),
                    Arc::new(KeyRing::new(&[1; 32], &[])),
                    clock.clone(),
                    settings,
                );
                let shutdown = tokio_util::sync::CancellationToken::new();
                let now = clock.clone();
                let sampler =
                    tokio::spawn(sample_active_sessions(manager.store().clone(), move || now.now(), shutdown.clone()));
                tokio::task::yield_now().await;
                assert_eq!(gauge(), Some(0.0), "sampled at start");
                for user in ["a", "b", "c"] {
                    let new = NewSession {
                        user_id: user.into(),
                        access_token: SecretString::from("t".to_string()),
                        ..Default::default()
                    };
                    manager.create(new).await.unwrap();
                }
                assert_eq!(gauge(), Some(0.0), "not on the request path");
                tokio::time::sleep(ACTIVE_SAMPLE_INTERVAL).await;
                tokio::task::yield_now().await;
                assert_eq!(gauge(), Some(3.0));
                // Idle past the timeout: no longer active, though still stored.
                clock.advance(Duration::from_secs(61));
                tokio::time::sleep(ACTIVE_SAMPLE_INTERVAL).await;
                tokio::task::yield_now().await;
                assert_eq!(gauge(), Some(0.0));
                shutdown.cancel();
                sampler.await.unwrap();
            })
        });
    }
}
