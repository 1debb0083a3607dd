//! The Prometheus exporter on its own HTTP port (`metrics_listen`, off by default) and the
//! sampler of the `sessions_active` gauge. The metric names are in `crate::metrics`.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;

use crate::error::ConfigError;
use crate::metrics::*;
use crate::store::DynSessionStore;

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
        UPSTREAM_REVOCATIONS,
        "Upstream (RFC 7009) revocations the revocation queue made, by outcome"
    );
    metrics::gauge!(UPSTREAM_REVOCATIONS_PENDING).set(0.0);
    metrics::describe_gauge!(
        UPSTREAM_REVOCATIONS_PENDING,
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
                    ..SessionSettings::default()
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
