//! One wrapper that instruments every backend alike: with an OTLP exporter installed
//! ([`crate::telemetry::init`]), each call to the storage traits runs inside a `storage` tracing
//! span (exported as `storage <operation>`, a child of the RPC's span); every call records its
//! latency in `storage_operation_seconds` and its failures in `storage_operation_errors_total`,
//! labelled by `backend` and `operation` (the trait method).
//!
//! Doing it here rather than in each backend keeps the backends free of telemetry and gives
//! every backend, present and future, the same metric and span names. Labels are static strings,
//! so their cardinality is the number of backends times the number of trait methods. No key, token
//! hash, user id or session id is attached to the span.

use std::future::Future;
use std::time::Instant;

use async_trait::async_trait;
use tracing::Instrument as _;

use crate::clock::Millis;
use crate::error::Result;
use crate::metrics::{STORAGE_ERRORS, STORAGE_SECONDS};
use crate::model::limiter::{Decision, Rule};
use crate::model::{RefreshLease, RefreshRecord};
use crate::model::{RevocationEvent, SecurityEvent, SessionRecord};
use crate::store::{
    CasOutcome, CreateOutcome, CreateWith, DynRateLimitStore, DynSecurityEventStore, DynSessionStore, DynTokenStore,
    EndOutcome, EndSession, EventQuery, LeaseOutcome, LogRead, RateLimitStore, RevocationLog, RevocationPage,
    RevocationQuery, SecurityEventStore, SessionStore, Stores, TimedOut, TokenHash, TokenStore, Touch,
};

/// Wraps the stores of `stores`, labelling everything with `backend`; with `traced`, every call
/// runs inside a `storage` span.
pub(crate) fn wrap(stores: Stores, backend: &'static str, traced: bool) -> Stores {
    Stores {
        sessions: std::sync::Arc::new(Instrumented { inner: stores.sessions, backend, traced }),
        limits: std::sync::Arc::new(Instrumented { inner: stores.limits, backend, traced }),
        events: std::sync::Arc::new(Instrumented { inner: stores.events, backend, traced }),
        tokens: std::sync::Arc::new(Instrumented { inner: stores.tokens, backend, traced }),
        events_with_sessions: stores.events_with_sessions,
    }
}

/// A store handle whose every call is timed, counted on failure and traced.
#[derive(Debug)]
pub struct Instrumented<T> {
    inner: T,
    backend: &'static str,
    /// Whether calls run inside a `storage` span (only worth making for an exporter).
    traced: bool,
}

/// The target of the storage spans (log output leaves them out; traces keep them).
pub const SPAN_TARGET: &str = module_path!();

impl<T> Instrumented<T> {
    /// Wraps `inner`, labelling its calls with `backend`, each inside a `storage` span.
    pub fn new(inner: T, backend: &'static str) -> Instrumented<T> {
        Instrumented { inner, backend, traced: true }
    }

    async fn observe<R>(&self, operation: &'static str, call: impl Future<Output = Result<R>>) -> Result<R> {
        let backend = self.backend;
        let started = Instant::now();
        // The app traces storage only for an exporter: log output leaves storage spans out, and
        // making one (an entry in the span registry, entered and left on every poll) was a few
        // per cent of a rate-limit check's CPU.
        let result = if self.traced {
            let span = tracing::info_span!(
                "storage",
                otel.name = %format_args!("storage {operation}"),
                otel.kind = "client",
                db.system = backend,
                db.operation = operation,
            );
            call.instrument(span).await
        } else {
            call.await
        };
        metrics::histogram!(STORAGE_SECONDS, "backend" => backend, "operation" => operation)
            .record(started.elapsed().as_secs_f64());
        if result.is_err() {
            metrics::counter!(STORAGE_ERRORS, "backend" => backend, "operation" => operation).increment(1);
        }
        result
    }
}

#[async_trait]
impl RevocationLog for Instrumented<DynSessionStore> {
    fn log_id(&self) -> String {
        self.inner.log_id()
    }

    async fn read_revocations(&self, after: u64, limit: usize) -> Result<LogRead> {
        self.observe("read_revocations", self.inner.read_revocations(after, limit)).await
    }

    async fn renew_log_id(&self, seen: &str) -> Result<()> {
        self.observe("renew_log_id", self.inner.renew_log_id(seen)).await
    }

    async fn revocation_entry(&self, session_id: &str, now: Millis) -> Result<Option<RevocationEvent>> {
        self.observe("revocation_entry", self.inner.revocation_entry(session_id, now)).await
    }

    async fn list_revocations(&self, query: RevocationQuery<'_>) -> Result<RevocationPage> {
        self.observe("list_revocations", self.inner.list_revocations(query)).await
    }

    async fn purge_revocations(&self, now: Millis, limit: usize) -> Result<usize> {
        self.observe("purge_revocations", self.inner.purge_revocations(now, limit)).await
    }
}

#[async_trait]
impl SessionStore for Instrumented<DynSessionStore> {
    async fn create(&self, record: SessionRecord, cap: u32, eviction: EndSession) -> Result<Vec<SessionRecord>> {
        self.observe("create", self.inner.create(record, cap, eviction)).await
    }

    async fn create_recorded(
        &self,
        record: SessionRecord,
        cap: u32,
        eviction: EndSession,
        with: CreateWith,
    ) -> Result<CreateOutcome> {
        self.observe("create", self.inner.create_recorded(record, cap, eviction, with)).await
    }

    async fn get_by_token(&self, token_hash: &TokenHash) -> Result<Option<SessionRecord>> {
        self.observe("get_by_token", self.inner.get_by_token(token_hash)).await
    }

    async fn get_by_upstream(&self, upstream_hash: &TokenHash) -> Result<Option<SessionRecord>> {
        self.observe("get_by_upstream", self.inner.get_by_upstream(upstream_hash)).await
    }

    async fn get_by_id(&self, session_id: &str) -> Result<Option<SessionRecord>> {
        self.observe("get_by_id", self.inner.get_by_id(session_id)).await
    }

    async fn list_user(&self, user_id: &str) -> Result<Vec<SessionRecord>> {
        self.observe("list_user", self.inner.list_user(user_id)).await
    }

    async fn touch(&self, token_hash: &TokenHash, touch: Touch) -> Result<()> {
        self.observe("touch", self.inner.touch(token_hash, touch)).await
    }

    async fn compare_and_swap(&self, record: &SessionRecord, expected_version: u64) -> Result<CasOutcome> {
        self.observe("compare_and_swap", self.inner.compare_and_swap(record, expected_version)).await
    }

    async fn end(&self, token_hash: &TokenHash, end: EndSession) -> Result<EndOutcome> {
        self.observe("end", self.inner.end(token_hash, end)).await
    }

    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<usize> {
        self.observe("purge_expired", self.inner.purge_expired(now, limit)).await
    }

    async fn take_timed_out(&self, now: Millis, limit: usize) -> Result<TimedOut> {
        self.observe("take_timed_out", self.inner.take_timed_out(now, limit)).await
    }

    async fn count(&self) -> Result<u64> {
        self.observe("count", self.inner.count()).await
    }

    async fn count_active(&self, now: Millis) -> Result<Option<u64>> {
        self.observe("count_active", self.inner.count_active(now)).await
    }

    async fn ping(&self) -> Result<()> {
        self.observe("ping", self.inner.ping()).await
    }

    async fn server_time(&self) -> Result<Option<Millis>> {
        self.observe("server_time", self.inner.server_time()).await
    }

    async fn warn_about_settings(&self) {
        self.inner.warn_about_settings().await;
    }
}

#[async_trait]
impl RateLimitStore for Instrumented<DynRateLimitStore> {
    async fn check(&self, rule: &Rule, key: &str, cost: u32, now: Millis) -> Result<Decision> {
        self.observe("rate_limit_check", self.inner.check(rule, key, cost, now)).await
    }

    async fn peek(&self, rule: &Rule, key: &str, cost: u32, now: Millis) -> Result<Decision> {
        self.observe("rate_limit_peek", self.inner.peek(rule, key, cost, now)).await
    }

    async fn purge_limits(&self, now: Millis, limit: usize) -> Result<usize> {
        self.observe("purge_limits", self.inner.purge_limits(now, limit)).await
    }
}

#[async_trait]
impl SecurityEventStore for Instrumented<DynSecurityEventStore> {
    async fn append(&self, event: &SecurityEvent) -> Result<()> {
        self.observe("append_event", self.inner.append(event)).await
    }

    async fn user_events(&self, query: &EventQuery) -> Result<Vec<SecurityEvent>> {
        self.observe("user_events", self.inner.user_events(query)).await
    }

    async fn purge_events(&self, cutoff: Millis, limit: usize) -> Result<usize> {
        self.observe("purge_events", self.inner.purge_events(cutoff, limit)).await
    }
}

#[async_trait]
impl TokenStore for Instrumented<DynTokenStore> {
    async fn acquire_lease(&self, lease: &RefreshLease, now: Millis) -> Result<LeaseOutcome> {
        self.observe("acquire_lease", self.inner.acquire_lease(lease, now)).await
    }

    async fn renew_lease(&self, session_id: &str, holder: &str, expires_at: Millis, now: Millis) -> Result<bool> {
        self.observe("renew_lease", self.inner.renew_lease(session_id, holder, expires_at, now)).await
    }

    async fn release_lease(&self, session_id: &str, holder: &str) -> Result<()> {
        self.observe("release_lease", self.inner.release_lease(session_id, holder)).await
    }

    async fn append_refresh_record(&self, record: &RefreshRecord, keep: usize) -> Result<()> {
        self.observe("append_refresh_record", self.inner.append_refresh_record(record, keep)).await
    }

    async fn refresh_history(&self, session_id: &str, limit: usize) -> Result<Vec<RefreshRecord>> {
        self.observe("refresh_history", self.inner.refresh_history(session_id, limit)).await
    }

    async fn purge_refresh_records(&self, now: Millis, limit: usize) -> Result<usize> {
        self.observe("purge_refresh_records", self.inner.purge_refresh_records(now, limit)).await
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>> {
        self.observe("checkpoint", self.inner.checkpoint(name)).await
    }

    async fn save_checkpoint(&self, name: &str, value: &str) -> Result<()> {
        self.observe("save_checkpoint", self.inner.save_checkpoint(name, value)).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::error::Error;

    /// A store whose every call fails, to see failures counted.
    #[derive(Debug)]
    struct Down;

    #[async_trait]
    impl RateLimitStore for Down {
        async fn check(&self, _rule: &Rule, _key: &str, _cost: u32, _now: Millis) -> Result<Decision> {
            Err(Error::unavailable("down"))
        }
        async fn peek(&self, _rule: &Rule, _key: &str, _cost: u32, _now: Millis) -> Result<Decision> {
            Err(Error::unavailable("down"))
        }
        async fn purge_limits(&self, _now: Millis, _limit: usize) -> Result<usize> {
            Ok(0)
        }
    }

    #[test]
    fn calls_are_timed_and_failures_counted_by_backend_and_operation() {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let store = Instrumented::new(Arc::new(Down) as DynRateLimitStore, "test");
                let rule = Rule {
                    name: "r".into(),
                    limit: 1,
                    period: std::time::Duration::from_secs(1),
                    burst: 1,
                    backoff: None,
                };
                assert!(store.check(&rule, "k", 1, 0).await.is_err());
                assert_eq!(store.purge_limits(0, 10).await.unwrap(), 0);
            })
        });
        let snapshot = snapshotter.snapshot().into_vec();
        let find = |name: &str, operation: &str| {
            snapshot.iter().find(|(key, ..)| {
                key.key().name() == name
                    && key.key().labels().any(|l| l.key() == "operation" && l.value() == operation)
                    && key.key().labels().any(|l| l.key() == "backend" && l.value() == "test")
            })
        };
        use metrics_util::debugging::DebugValue;
        assert!(matches!(find(STORAGE_ERRORS, "rate_limit_check"), Some((_, _, _, DebugValue::Counter(1)))));
        assert!(find(STORAGE_ERRORS, "purge_limits").is_none(), "a success is not an error");
        assert!(
            matches!(find(STORAGE_SECONDS, "purge_limits"), Some((_, _, _, DebugValue::Histogram(v))) if v.len() == 1)
        );
        assert!(
            matches!(find(STORAGE_SECONDS, "rate_limit_check"), Some((_, _, _, DebugValue::Histogram(v))) if v.len() == 1)
        );
    }
}
