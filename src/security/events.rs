//! Security events: the 21 types of the original library's audit log, the event record, the
//! [`Recorder`] that appends events and logs them, and the pure computations over a user's events
//! (the summary and the user-level suspicious-activity signals).
//!
//! The 21 types are the proto's `SecurityEventType`.
//! Recorded by the service: `session_created` (every CreateSession), `session_terminated` /
//! `_expired` / `_revoked` (every end that goes through `SessionManager::end_session`, evictions
//! included), `invalid_device`, `session_hijack_attempt`, `ip_change_detected`,
//! `rate_limit_exceeded`, `suspicious_activity` (DetectSuspiciousActivity), and `token_refreshed`
//! with `success=false` when the token work reports `SessionEvent::RefreshFailed` through
//! `SessionManager::report`. Callers log the rest (`login_success`, `login_failure`, `logout`, ...)
//! with LogSecurityEvent; UNSPECIFIED or unknown types are `INVALID_ARGUMENT`. Each event is also
//! logged at info with its type and ids. A failure to record is logged and does not fail the
//! operation it describes. Ids are `evt_<sequence><random>` so that events of one millisecond keep
//! their order. Events older than `security.event_retention` (30 days) are purged by the cleanup
//! task (every `session.cleanup_interval`), with rate-limit state that no longer matters.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::clock::{Clock, Millis};
use crate::error::Result;
use crate::store::DynSecurityEventStore;

pub use crate::model::security::*;

/// An event to record; the recorder adds the id and the time.
#[derive(Debug, Clone)]
pub struct EventDraft {
    /// What happened.
    pub event_type: EventType,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub ip_address: Option<String>,
    /// Severity; from the type and the risk when `None`.
    pub severity: Option<Severity>,
    pub details: String,
    /// Risk from 0 to 1.
    pub risk_score: f64,
    /// Structured details.
    pub metadata: BTreeMap<String, String>,
}

impl EventDraft {
    /// A draft of `event_type` with nothing else set.
    pub fn new(event_type: EventType) -> EventDraft {
        EventDraft {
            event_type,
            user_id: None,
            session_id: None,
            ip_address: None,
            severity: None,
            details: String::new(),
            risk_score: 0.0,
            metadata: BTreeMap::new(),
        }
    }

    /// Sets the user.
    pub fn user(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(user_id.into()).filter(|u: &String| !u.is_empty());
        self
    }

    /// Sets the session.
    pub fn session(mut self, session_id: impl Into<String>) -> Self {
        self.session_id = Some(session_id.into()).filter(|s: &String| !s.is_empty());
        self
    }

    /// Sets the IP address.
    pub fn ip(mut self, ip: Option<String>) -> Self {
        self.ip_address = ip.filter(|i| !i.is_empty());
        self
    }

    /// Sets the details.
    pub fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Sets the risk (clamped to [0, 1]).
    pub fn risk(mut self, risk: f64) -> Self {
        self.risk_score = if risk.is_finite() { risk.clamp(0.0, 1.0) } else { 0.0 };
        self
    }

    /// Sets the severity.
    pub fn severity(mut self, severity: Severity) -> Self {
        self.severity = Some(severity);
        self
    }

    /// Adds one metadata entry.
    pub fn meta(mut self, key: &str, value: impl ToString) -> Self {
        self.metadata.insert(key.to_owned(), value.to_string());
        self
    }

    fn severity_or_default(&self) -> Severity {
        self.severity.unwrap_or_else(|| {
            let by_risk = if self.risk_score > 0.7 {
                Severity::Critical
            } else if self.risk_score > SUSPICIOUS_RISK {
                Severity::Warning
            } else {
                Severity::Info
            };
            by_risk.max(self.event_type.default_severity())
        })
    }
}

/// `evt_<16 hex: a process-wide sequence><16 hex: random>`. Events are ordered by
/// `(occurred_at, event_id)`; the sequence keeps events of one millisecond in the order this
/// process recorded them, the random part keeps ids of different replicas apart.
fn new_event_id() -> String {
    static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let sequence = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("evt_{sequence:016x}{:016x}", rand::random::<u64>())
}

/// Appends security events to the store and logs each at info (type and ids, no secrets).
#[derive(Debug, Clone)]
pub struct Recorder {
    store: DynSecurityEventStore,
    clock: Arc<dyn Clock>,
}

impl Recorder {
    /// A recorder over `store`.
    pub fn new(store: DynSecurityEventStore, clock: Arc<dyn Clock>) -> Recorder {
        Recorder { store, clock }
    }

    pub fn store(&self) -> &DynSecurityEventStore {
        &self.store
    }

    /// Records `draft` now and returns the stored event.
    pub async fn record(&self, draft: EventDraft) -> Result<SecurityEvent> {
        let event = self.build(draft);
        self.store.append(&event).await?;
        Self::recorded(&event);
        Ok(event)
    }

    /// The event `draft` describes, stamped now, not yet stored (a store that writes it together
    /// with what it describes takes it from here; [`Recorder::recorded`] logs it afterwards).
    pub fn build(&self, draft: EventDraft) -> SecurityEvent {
        let severity = draft.severity_or_default();
        SecurityEvent {
            event_id: new_event_id(),
            event_type: draft.event_type,
            user_id: draft.user_id,
            session_id: draft.session_id,
            ip_address: draft.ip_address,
            severity,
            details: draft.details,
            risk_score: draft.risk_score,
            metadata: draft.metadata,
            occurred_at: self.clock.now(),
        }
    }

    /// Logs a stored event at info (type and ids, no secrets).
    pub fn recorded(event: &SecurityEvent) {
        tracing::info!(
            event_type = event.event_type.as_str(),
            event_id = %event.event_id,
            user_id = event.user_id.as_deref().unwrap_or(""),
            session_id = event.session_id.as_deref().unwrap_or(""),
            risk_score = event.risk_score,
            "security event"
        );
    }

    /// Records `draft`; a storage failure is logged, not returned: the action the event describes
    /// has already happened and must not be reported as failed.
    pub async fn record_or_log(&self, draft: EventDraft) {
        let event_type = draft.event_type.as_str();
        if let Err(error) = self.record(draft).await {
            tracing::warn!(event_type, %error, "security event could not be recorded");
        }
    }
}

/// A user's security posture over a window (GetSecuritySummary).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub user_id: String,
    /// Window in hours.
    pub period_hours: u32,
    /// Events in the window.
    pub total_events: u64,
    /// Events with risk above 0.5.
    pub suspicious_events: u64,
    /// Counts by type.
    pub counts: BTreeMap<EventType, u64>,
    /// Active sessions now.
    pub active_sessions: u32,
    /// Active sessions with a hijack, device or IP-change event in the window.
    pub suspicious_sessions: u32,
    /// Rate-limit denials in the window.
    pub rate_limit_hits: u64,
    /// Distinct IP addresses in the window.
    pub distinct_ips: u32,
    /// Last login (`login_success` or `session_created`) in retention.
    pub last_login_at: Option<Millis>,
    /// `login_success` events in the window.
    pub successful_logins: u64,
    /// `login_failure` events in the window.
    pub failed_logins: u64,
    /// Mean risk of the window's events (0 when none).
    pub average_risk_score: f64,
    /// The ten newest events.
    pub recent_events: Vec<SecurityEvent>,
}

/// Folds a user's events, newest first, into a [`Summary`] page by page (so memory stays bounded
/// however many events the window holds).
#[derive(Debug, Default)]
pub struct SummaryBuilder {
    summary: Summary,
    risk_total: f64,
    ips: BTreeSet<String>,
    flagged_sessions: BTreeSet<String>,
}

/// Event types that flag the session they name as suspicious in a summary.
const SESSION_FLAGS: [EventType; 3] =
    [EventType::SessionHijackAttempt, EventType::InvalidDevice, EventType::IpChangeDetected];

impl SummaryBuilder {
    /// A summary of `user_id` over `period_hours`.
    pub fn new(user_id: &str, period_hours: u32) -> SummaryBuilder {
        SummaryBuilder {
            summary: Summary { user_id: user_id.to_owned(), period_hours, ..Summary::default() },
            ..SummaryBuilder::default()
        }
    }

    /// Adds one event of the window (newest first).
    pub fn add(&mut self, event: &SecurityEvent) {
        let s = &mut self.summary;
        s.total_events += 1;
        *s.counts.entry(event.event_type).or_default() += 1;
        if event.is_suspicious() {
            s.suspicious_events += 1;
        }
        match event.event_type {
            EventType::RateLimitExceeded => s.rate_limit_hits += 1,
            EventType::LoginSuccess => s.successful_logins += 1,
            EventType::LoginFailure => s.failed_logins += 1,
            _ => {}
        }
        if let Some(ip) = &event.ip_address {
            self.ips.insert(ip.clone());
        }
        if let Some(session) = &event.session_id
            && SESSION_FLAGS.contains(&event.event_type)
        {
            self.flagged_sessions.insert(session.clone());
        }
        self.risk_total += event.risk_score;
        if s.recent_events.len() < 10 {
            s.recent_events.push(event.clone());
        }
    }

    /// Completes the summary with the user's active session ids and last login.
    pub fn finish(mut self, active_session_ids: &[String], last_login_at: Option<Millis>) -> Summary {
        let s = &mut self.summary;
        s.active_sessions = u32::try_from(active_session_ids.len()).unwrap_or(u32::MAX);
        s.suspicious_sessions =
            u32::try_from(active_session_ids.iter().filter(|id| self.flagged_sessions.contains(*id)).count())
                .unwrap_or(u32::MAX);
        s.distinct_ips = u32::try_from(self.ips.len()).unwrap_or(u32::MAX);
        s.average_risk_score = if s.total_events == 0 { 0.0 } else { self.risk_total / s.total_events as f64 };
        s.last_login_at = last_login_at;
        self.summary
    }
}

/// How many recent events the user-level signals look at (the library's 50).
pub const ACTIVITY_LOOKBACK: usize = 50;

/// The user-level signals of DetectSuspiciousActivity over the user's newest events (newest
/// first, at most [`ACTIVITY_LOOKBACK`]): more than 3 `session_created` in 300 s (+0.4), more
/// than 3 `login_failure` in 600 s (+0.5), more than 3 distinct IPs among the 10 newest events
/// (+0.3); capped at 1.
pub fn suspicious_activity(recent: &[SecurityEvent], now: Millis) -> (f64, Vec<String>) {
    let within = |event: &SecurityEvent, seconds: i64| now - event.occurred_at <= seconds * 1000;
    let count = |event_type: EventType, seconds: i64| {
        recent.iter().filter(|e| e.event_type == event_type && within(e, seconds)).count()
    };
    let mut score: f64 = 0.0;
    let mut reasons = Vec::new();
    let created = count(EventType::SessionCreated, 300);
    if created > 3 {
        score += 0.4;
        reasons.push(format!("Rapid session creation: {created} sessions in 5 minutes"));
    }
    let failures = count(EventType::LoginFailure, 600);
    if failures > 3 {
        score += 0.5;
        reasons.push(format!("Repeated login failures: {failures} in 10 minutes"));
    }
    let ips: BTreeSet<&str> = recent.iter().take(10).filter_map(|e| e.ip_address.as_deref()).collect();
    if ips.len() > 3 {
        score += 0.3;
        reasons.push(format!("Activity from {} different IP addresses", ips.len()));
    }
    (score.min(1.0), reasons)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: EventType, at: Millis, ip: Option<&str>, session: Option<&str>, risk: f64) -> SecurityEvent {
        SecurityEvent {
            event_id: format!("evt_{at}_{}", event_type.as_str()),
            event_type,
            user_id: Some("u".into()),
            session_id: session.map(str::to_owned),
            ip_address: ip.map(str::to_owned),
            severity: Severity::Info,
            details: String::new(),
            risk_score: risk,
            metadata: BTreeMap::new(),
            occurred_at: at,
        }
    }

    #[test]
    fn the_summary_counts_by_type_and_flags_active_sessions() {
        let events = [
            event(EventType::SessionHijackAttempt, 900, Some("203.0.113.9"), Some("s1"), 0.8),
            event(EventType::RateLimitExceeded, 800, None, None, 0.2),
            event(EventType::LoginFailure, 700, Some("198.51.100.1"), None, 0.0),
            event(EventType::LoginSuccess, 600, Some("198.51.100.1"), Some("s1"), 0.0),
            event(EventType::InvalidDevice, 500, None, Some("s2"), 0.6),
            event(EventType::SessionCreated, 400, Some("198.51.100.1"), Some("s1"), 0.0),
        ];
        let mut b = SummaryBuilder::new("u", 24);
        events.iter().for_each(|e| b.add(e));
        let s = b.finish(&["s1".into(), "s3".into()], Some(600));
        assert_eq!(s.total_events, 6);
        assert_eq!(s.suspicious_events, 2);
        assert_eq!(s.rate_limit_hits, 1);
        assert_eq!((s.successful_logins, s.failed_logins), (1, 1));
        assert_eq!(s.distinct_ips, 2);
        assert_eq!(s.active_sessions, 2);
        // s2 was flagged but is not active; s1 is both.
        assert_eq!(s.suspicious_sessions, 1);
        assert_eq!(s.counts[&EventType::LoginSuccess], 1);
        assert!((s.average_risk_score - 1.6 / 6.0).abs() < 1e-9);
        assert_eq!(s.recent_events[0].event_type, EventType::SessionHijackAttempt);
        assert_eq!(SummaryBuilder::new("x", 1).finish(&[], None).average_risk_score, 0.0);
    }

    #[test]
    fn suspicious_activity_signals_follow_the_library() {
        let now = 1_000_000;
        let mut events: Vec<SecurityEvent> =
            (0..4).map(|i| event(EventType::SessionCreated, now - i * 1000, None, None, 0.0)).collect();
        let (score, reasons) = suspicious_activity(&events, now);
        assert_eq!(score, 0.4);
        assert_eq!(reasons.len(), 1);
        // Three are not a burst; older than 300 s do not count.
        events[3].occurred_at = now - 301_000;
        assert_eq!(suspicious_activity(&events, now).0, 0.0);

        let mut events: Vec<SecurityEvent> = (0..4)
            .map(|i| event(EventType::LoginFailure, now - i * 1000, Some(&format!("192.0.2.{i}")), None, 0.0))
            .collect();
        events.extend((0..4).map(|i| event(EventType::SessionCreated, now - 5000 - i, None, None, 0.0)));
        let (score, reasons) = suspicious_activity(&events, now);
        assert_eq!(score, 1.0, "{reasons:?}");
        assert_eq!(reasons.len(), 3);
    }

    #[test]
    fn drafts_take_severity_from_type_and_risk() {
        assert_eq!(EventDraft::new(EventType::Logout).severity_or_default(), Severity::Info);
        assert_eq!(EventDraft::new(EventType::Logout).risk(0.6).severity_or_default(), Severity::Warning);
        assert_eq!(EventDraft::new(EventType::InvalidDevice).risk(0.9).severity_or_default(), Severity::Critical);
        assert_eq!(EventDraft::new(EventType::Logout).risk(f64::NAN).risk_score, 0.0);
        let names: BTreeSet<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(names.len(), 21);
    }
}
