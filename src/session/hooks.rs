//! What the security and token work plug into the session lifecycle: the limit guard, the
//! hijack scorer and the observer of session events.

use super::*;

/// The rate limits of the lifecycle: [`SESSION_CREATE_RULE`] per user before a creation, and
/// [`VALIDATE_FAILURE_RULE`] per client network after a validation that counts against the
/// client ([`InvalidReason::counts_against_client`]). The security work plugs its limiter in
/// here; until then [`NoRateLimit`] allows everything.
#[async_trait::async_trait]
pub trait LimitGuard: Send + Sync + std::fmt::Debug + 'static {
    /// `Ok` to proceed, `Err(Error::RateLimited { .. })` to refuse.
    async fn check(&self, rule: &str, key: &str) -> Result<()>;

    /// The store-level check that [`LimitGuard::check`] of `rule` for `key` makes now, for a
    /// store to decide in the same write as the action it guards
    /// ([`crate::store::SessionStore::create_recorded`]); `None` (the default) when the guard
    /// decides itself (or nothing: the rule is not configured, limiting is off), and the caller
    /// calls `check` instead.
    fn planned(&self, _rule: &str, _key: &str) -> Option<LimitCheck> {
        None
    }

    /// Completes a check whose refusal a store decided: what [`LimitGuard::check`] does with a
    /// refusal (its metrics and security event), and the error it returns.
    async fn refused(&self, rule: &str, _key: &str, _decision: Decision) -> Error {
        Error::internal(format!("rate limit {rule:?} was decided by the store but this guard plans no checks"))
    }
}

/// A [`LimitGuard`] that allows everything.
#[derive(Debug, Default)]
pub struct NoRateLimit;

#[async_trait::async_trait]
impl LimitGuard for NoRateLimit {
    async fn check(&self, _rule: &str, _key: &str) -> Result<()> {
        Ok(())
    }
}

/// Scores a validation request for hijacking; see `security::hijack`.
pub trait HijackScorer: Send + Sync + std::fmt::Debug + 'static {
    /// Risk in [0, 1] and reasons, comparing `request` with what `session` stored.
    fn score(&self, session: &SessionRecord, request: &RequestContext) -> (f64, Vec<String>);
    /// Scores strictly above this end the session.
    fn threshold(&self) -> f64;
}

/// What the lifecycle reports to a [`SessionObserver`] (the security event log).
#[derive(Debug, Clone, Copy)]
pub enum SessionEvent<'a> {
    /// A session was created.
    Created(&'a SessionRecord),
    /// A session ended (the record in its ended form: state, reason, time).
    Ended(&'a SessionRecord),
    /// A presented device did not match the session's.
    DeviceMismatch {
        /// The session as stored.
        session: &'a SessionRecord,
        /// The client IP of the request.
        ip: Option<IpAddr>,
    },
    /// Hijack scoring found at least one signal.
    HijackScored {
        /// The session as stored before the request.
        session: &'a SessionRecord,
        /// The client IP of the request.
        ip: Option<IpAddr>,
        /// The score.
        risk_score: f64,
        /// The reasons.
        reasons: &'a [String],
        /// Whether the score ended the session.
        ended: bool,
    },
    /// An upstream refresh failed (reported by the token work).
    RefreshFailed {
        /// The session.
        session: &'a SessionRecord,
        /// What failed, without secrets.
        error: &'a str,
    },
    /// Revoking a revoked session's tokens at its provider failed (best effort; reported by the
    /// token work).
    UpstreamRevocationFailed {
        /// The session (already ended).
        session: &'a SessionRecord,
        /// What failed, without secrets.
        error: &'a str,
    },
}

/// Told about lifecycle events that are not the common case; the security work records them.
/// Observation never fails the operation it describes.
#[async_trait::async_trait]
pub trait SessionObserver: Send + Sync + std::fmt::Debug + 'static {
    /// Called after the event happened.
    async fn observe(&self, event: SessionEvent<'_>);

    /// The security event a creation of `session` records, built before the session is stored so
    /// that the store writes both in one step ([`crate::store::SessionStore::create_recorded`]);
    /// `None` (the default) records nothing and the creation is reported to
    /// [`SessionObserver::observe`] afterwards instead.
    fn creation_event(&self, _session: &SessionRecord) -> Option<SecurityEvent> {
        None
    }

    /// Called once the store holds `event`, from [`SessionObserver::creation_event`].
    fn creation_recorded(&self, _event: &SecurityEvent) {}
}

/// A [`SessionObserver`] that ignores everything.
#[derive(Debug, Default)]
pub struct NoObserver;

#[async_trait::async_trait]
impl SessionObserver for NoObserver {
    async fn observe(&self, _event: SessionEvent<'_>) {}
}
