//! The names of every metric the service records, and the helper that times calls to an upstream
//! token endpoint. The Prometheus exporter is in `telemetry::prometheus`, the tower layer that
//! counts every RPC in `grpc::rpc_metrics`.
//!
//! Domain code records through the `metrics` facade (`metrics::counter!`), which is a no-op
//! until an exporter is installed, so modules never depend on the exporter. Labels are bounded:
//! service, method, code, storage backend and operation, revocation kind, rate-limit rule name
//! and configured provider name; never a user id, session id, key or address.

use std::time::Instant;

/// RPCs handled, by `grpc_service`, `grpc_method` and `grpc_code`.
pub const RPC_HANDLED: &str = "grpc_server_handled_total";
/// RPC latency to the end of the response, by `grpc_service` and `grpc_method`.
pub const RPC_SECONDS: &str = "grpc_server_handling_seconds";

/// Upstream (RFC 7009) revocations made by the revocation queue, by `outcome`.
pub const UPSTREAM_REVOCATIONS: &str = "upstream_revocations_total";
/// Revoked sessions whose upstream tokens the queue on this replica has still to revoke.
pub const UPSTREAM_REVOCATIONS_PENDING: &str = "upstream_revocations_pending";

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

/// Sessions active now (sampled from the store every 15 s by `telemetry::prometheus`).
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
/// The resident set size (`VmRSS` of `/proc/<pid>/status`) of process `pid`, in bytes, when
/// `/proc` has it. The benchmark seeding, the load generator and the tests measure memory with it.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
