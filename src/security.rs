//! Security: named rate limits, hijack detection, the security event log, summaries and the
//! user-level suspicious-activity signals. No tonic, no proto: `grpc::security` adapts this.
//!
//! Pieces, each usable alone:
//! - [`limiter`]: the pure GCRA-with-backoff function, and [`Limiter`], which applies a named
//!   rule through a [`RateLimitStore`](crate::store::RateLimitStore) and records denials. It is
//!   the session manager's [`LimitGuard`](crate::session::LimitGuard) (`session_create`, keyed by user id).
//! - [`hijack`]: the rule table and [`hijack::HijackDetector`], the session manager's
//!   [`HijackScorer`](crate::session::HijackScorer).
//! - [`events`]: event types, the [`events::Recorder`], and the pure summary and
//!   suspicious-activity computations. [`EventObserver`] turns the session lifecycle's
//!   exceptional events into security events (the common, valid validation records nothing).
//! - [`Security`]: what the SecurityService RPCs call.
//!
//! # Rate limits
//!
//! The GCRA rule, the backoff for repeat offenders, denial windows and the per-rule bound on held
//! keys are the pure function in [`limiter`] (`src/model/limiter.rs`), whose docs give the rule.
//! Rules are named and configured under `[security.rules.NAME]` (`limit`, `period`, `burst` =
//! `limit` by default, `backoff`, `backoff_multiplier`, `max_backoff`). Defaults:
//!
//! | rule | limit | period | max backoff | key | checked by |
//! |---|---|---|---|---|---|
//! | `token_refresh` | 10 | 60 s | 3600 s | caller's choice | CheckRateLimit (the token work) |
//! | `session_create` | 5 | 300 s | 3600 s | user id | CreateSession (`LimitGuard`) and CheckRateLimit |
//! | `login_attempt` | 5 | 300 s | 1800 s | caller's choice | CheckRateLimit |
//! | `validate_failure` | 30 | 60 s | 900 s | client IPv4 address, or IPv6 /64 | ValidateSession's "not valid" answers |
//!
//! With backoff, `session_create` waits 60 s after its first denial, then is blocked 300, 600,
//! 1200, 2400 and 3600 s. An unknown rule in CheckRateLimit is `INVALID_ARGUMENT` naming
//! `rule_name` (the library allowed it silently); a `cost` above the burst can never pass and is
//! `INVALID_ARGUMENT` too. The first denial of each denial window is a `rate_limit_exceeded`
//! event, with the key as `user_id`, or as `ip_address` when it is an address or a /64; the rest
//! of the window is only counted (`rate_limit_denials_unrecorded_total{rule}`), so a key hammering
//! a limit writes one event per window, not one per request (`Decision::repeat` is decided inside
//! the atomic check, so replicas agree on which denial is the first). GetSecuritySummary's
//! `rate_limit_hits` therefore counts windows. A new key refused because its rule is full
//! (`Decision::key_refused`: denied with the rule's period as retry hint, nothing stored, no event)
//! is counted in `rate_limit_keys_refused_total{rule}` and is `Error::LimiterFull`
//! (`RESOURCE_EXHAUSTED`, `RATE_LIMIT_KEYS_FULL`, naming the setting) where the service enforces the
//! rule. Redis and kv-rest keep limiter state in the server (bounded by its `maxmemory`; with
//! `noeviction` a full server fails the check, and the call, closed).
//!
//! # Hijack detection
//!
//! The rule table, its weights (`[security.hijack]`) and the threshold are in [`hijack`].
//! DetectHijacking uses the same table (whether or not ValidateSession runs it), by token, or by
//! `session_id` for admins; it ends the session above the threshold through the same end path.
//! Events: `session_hijack_attempt` when the session ends or the risk is above 0.5,
//! `ip_change_detected` for a weaker score with an IP change; a weak signal without an IP change (a
//! new user agent alone) is answered but not recorded, since it would repeat on every request.
//!
//! # Summary and suspicious activity
//!
//! GetSecuritySummary reads the user's events in the window through the per-user time index, 1000 at a time (so its cost grows with that user's events in the
//! window only; a unit test wraps the store and counts what it returns), the user's sessions
//! (`list_user`), and the newest `login_success` or `session_created` for `last_login_at`.
//! `suspicious_sessions` are active sessions named by a hijack, device or IP-change event in the
//! window. DetectSuspiciousActivity scores the user's 50 newest events with the library's signals
//! (more than 3 `session_created` in 300 s +0.4, more than 3 `login_failure` in 600 s +0.5, more than
//! 3 distinct IPs among the 10 newest +0.3, capped at 1) and records `suspicious_activity` when any
//! fires (the caller's metadata first; the service's `activity_type` wins a clash).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, Millis};
use crate::error::{Error, Result};
use crate::session::{
    HIJACK_REASON, HijackScore, RequestContext, SESSION_CREATE_RULE, SessionEvent, SessionManager, SessionObserver,
    SessionRecord, SessionRef, SessionState,
};
use crate::store::{EndOutcome, EventQuery, Stores};

pub mod events;
pub mod hijack;
pub use crate::model::limiter;
mod limits;
pub use crate::session::{VALIDATE_FAILURE_RULE, client_network_key};
pub use limits::{Limiter, default_rules};

use events::{EventDraft, EventType, Recorder, SecurityEvent, Severity, Summary, SummaryBuilder};
use hijack::{HijackDetector, HijackRules};
use limiter::{Decision, Rule};

/// The risk of a recorded device mismatch (the library's value): above
/// [`events::SUSPICIOUS_RISK`], so GetSecuritySummary counts it as suspicious.
pub const DEVICE_MISMATCH_RISK: f64 = 0.8;

/// Settings of the security work (the configuration builds them from `security.*`, with
/// `session.device_match_threshold` in the hijack table; [`Default`] is its defaults).
#[derive(Debug, Clone)]
pub struct SecuritySettings {
    /// Enforce rate limits.
    pub rate_limiting: bool,
    /// Score every ValidateSession.
    pub hijack_detection: bool,
    /// Rules by name.
    pub rules: BTreeMap<String, Rule>,
    /// The hijack rule table.
    pub hijack: HijackRules,
    /// How long events are kept.
    pub event_retention: Duration,
}

impl Default for SecuritySettings {
    fn default() -> Self {
        SecuritySettings {
            rate_limiting: true,
            hijack_detection: true,
            rules: limits::default_rules(),
            hijack: HijackRules::default(),
            event_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Records the session lifecycle's exceptional events as security events.
#[derive(Debug, Clone)]
pub struct EventObserver {
    recorder: Recorder,
    with_sessions: bool,
}

impl EventObserver {
    /// An observer writing through `recorder`.
    pub fn new(recorder: Recorder) -> EventObserver {
        EventObserver { recorder, with_sessions: false }
    }

    /// With `yes`, the recorder's store is the session store's own log
    /// ([`Stores::events_with_sessions`]): a creation's event is handed to the session store to
    /// write with the session.
    pub fn recording_with_sessions(mut self, yes: bool) -> EventObserver {
        self.with_sessions = yes;
        self
    }
}

/// The `session_created` event of `s`.
fn created_draft(s: &SessionRecord) -> EventDraft {
    EventDraft::new(EventType::SessionCreated)
        .user(&s.user_id)
        .session(&s.session_id)
        .ip(s.ip_address.clone())
        .details("Session created")
        .meta("provider", &s.provider)
}

#[async_trait::async_trait]
impl SessionObserver for EventObserver {
    fn creation_event(&self, session: &SessionRecord) -> Option<SecurityEvent> {
        self.with_sessions.then(|| self.recorder.build(created_draft(session)))
    }

    fn creation_recorded(&self, event: &SecurityEvent) {
        Recorder::recorded(event);
    }

    async fn observe(&self, event: SessionEvent<'_>) {
        let draft = match event {
            SessionEvent::Created(s) => created_draft(s),
            SessionEvent::Ended(s) => {
                let event_type = match s.state {
                    SessionState::Expired => EventType::SessionExpired,
                    SessionState::Revoked => EventType::SessionRevoked,
                    SessionState::Active | SessionState::Terminated => EventType::SessionTerminated,
                };
                let reason = s.end_reason.clone().unwrap_or_default();
                let mut draft = EventDraft::new(event_type)
                    .user(&s.user_id)
                    .session(&s.session_id)
                    .ip(s.ip_address.clone())
                    .details(format!("Session ended: {reason}"))
                    .meta("reason", &reason);
                if reason == HIJACK_REASON {
                    draft = draft.severity(Severity::Critical);
                }
                draft
            }
            SessionEvent::DeviceMismatch { session, ip } => EventDraft::new(EventType::InvalidDevice)
                .user(&session.user_id)
                .session(&session.session_id)
                .ip(ip.map(|ip| ip.to_string()))
                .details("The presented device does not match the session's device")
                .risk(DEVICE_MISMATCH_RISK),
            SessionEvent::HijackScored { session, ip, risk_score, reasons, ended } => {
                let current = ip.map(|ip| ip.to_string());
                let ip_changed = current.is_some() && current != session.ip_address;
                let event_type = if ended || risk_score > events::SUSPICIOUS_RISK {
                    EventType::SessionHijackAttempt
                } else if ip_changed {
                    EventType::IpChangeDetected
                } else {
                    // A weak signal without an IP change (a new user agent alone, a slightly
                    // changed fingerprint) is answered in the response but not recorded: it
                    // would repeat on every request until the session is updated.
                    return;
                };
                let mut draft = EventDraft::new(event_type)
                    .user(&session.user_id)
                    .session(&session.session_id)
                    .ip(current)
                    .risk(risk_score)
                    .details(reasons.join("; "))
                    .meta("session_terminated", ended);
                if let Some(stored) = &session.ip_address {
                    draft = draft.meta("previous_ip", stored);
                }
                draft
            }
            SessionEvent::RefreshFailed { session, error } => EventDraft::new(EventType::TokenRefreshed)
                .user(&session.user_id)
                .session(&session.session_id)
                .severity(Severity::Warning)
                .details(format!("Token refresh failed: {error}"))
                .meta("success", false),
            SessionEvent::UpstreamRevocationFailed { session, error } => EventDraft::new(EventType::TokenRevoked)
                .user(&session.user_id)
                .session(&session.session_id)
                .severity(Severity::Warning)
                .details(format!("Upstream token revocation failed: {error}"))
                .meta("success", false),
        };
        self.recorder.record_or_log(draft).await;
    }
}

/// The answer of [`Security::detect_hijacking`].
#[derive(Debug, Clone, PartialEq)]
pub struct HijackAnswer {
    /// Any signal fired.
    pub is_suspicious: bool,
    /// Risk in [0, 1].
    pub risk_score: f64,
    pub reasons: Vec<String>,
    /// The score passed the threshold and this call ended the session.
    pub session_terminated: bool,
}

/// The answer of [`Security::detect_suspicious_activity`].
#[derive(Debug, Clone, PartialEq)]
pub struct ActivityAnswer {
    /// Any signal fired.
    pub is_suspicious: bool,
    /// Risk in [0, 1].
    pub risk_score: f64,
    pub reasons: Vec<String>,
}

/// A query of ListSecurityEvents.
#[derive(Debug, Clone, Default)]
pub struct ListEvents {
    pub user_id: String,
    /// At or after (default: the start of retention).
    pub start: Option<Millis>,
    /// Before (default: now, inclusive of this millisecond).
    pub end: Option<Millis>,
    /// Only these types.
    pub types: Vec<EventType>,
    pub page_size: usize,
    /// A token from a previous page.
    pub page_token: Option<String>,
}

/// A page of events.
#[derive(Debug, Clone)]
pub struct EventPage {
    /// Newest first.
    pub events: Vec<SecurityEvent>,
    /// Token of the next page.
    pub next_page_token: Option<String>,
}

/// What the SecurityService RPCs call.
#[derive(Debug, Clone)]
pub struct Security {
    settings: Arc<SecuritySettings>,
    limiter: Limiter,
    recorder: Recorder,
    detector: Arc<HijackDetector>,
    sessions: SessionManager,
    clock: Arc<dyn Clock>,
}

impl Security {
    /// Builds the security work over `stores` and installs its hooks in `sessions`: the
    /// `session_create` guard, the event observer, and (with `hijack_detection`) the scorer.
    /// Returns the session manager to use and the security facade.
    pub fn install(
        settings: SecuritySettings,
        stores: &Stores,
        clock: Arc<dyn Clock>,
        sessions: SessionManager,
    ) -> (SessionManager, Security) {
        let recorder = Recorder::new(stores.events.clone(), clock.clone());
        let limiter = Limiter::new(
            settings.rate_limiting,
            settings.rules.clone(),
            stores.limits.clone(),
            recorder.clone(),
            clock.clone(),
        );
        let detector = Arc::new(HijackDetector::new(settings.hijack.clone(), clock.clone()));
        let mut sessions = sessions.with_limit_guard(Arc::new(limiter.clone())).with_observer(Arc::new(
            EventObserver::new(recorder.clone()).recording_with_sessions(stores.events_with_sessions),
        ));
        if settings.hijack_detection {
            sessions = sessions.with_hijack_scorer(detector.clone());
        }
        let security =
            Security { settings: Arc::new(settings), limiter, recorder, detector, sessions: sessions.clone(), clock };
        (sessions, security)
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// CheckRateLimit. `consume` unset: a peek for the rules the service enforces itself
    /// ([`SESSION_CREATE_RULE`], [`VALIDATE_FAILURE_RULE`]), so that a check before the call
    /// the service limits costs nothing more; a consuming check for every other rule. A
    /// [`VALIDATE_FAILURE_RULE`] key that is an address is taken as the service takes it
    /// ([`client_network_key`]), so a look by a client's IPv6 address sees its /64.
    pub async fn check_rate_limit(
        &self,
        rule_name: &str,
        key: &str,
        cost: u32,
        consume: Option<bool>,
    ) -> Result<Decision> {
        let enforced = rule_name == SESSION_CREATE_RULE || rule_name == VALIDATE_FAILURE_RULE;
        let network_key;
        let key = match key.parse::<IpAddr>() {
            Ok(ip) if rule_name == VALIDATE_FAILURE_RULE => {
                network_key = client_network_key(ip);
                network_key.as_str()
            }
            _ => key,
        };
        if consume.unwrap_or(!enforced) {
            self.limiter.check(rule_name, key, cost).await
        } else {
            self.limiter.peek(rule_name, key, cost).await
        }
    }

    /// DetectHijacking: scores `request` against the stored session (with the same rule table as
    /// ValidateSession, whether or not that runs it) and ends the session above the threshold.
    /// With `security.hijack_detection` off: `FAILED_PRECONDITION`, and nothing is scored or ended.
    pub async fn detect_hijacking(&self, by: &SessionRef, request: &RequestContext) -> Result<HijackAnswer> {
        if !self.settings.hijack_detection {
            return Err(Error::FailedPrecondition("hijack detection is off (security.hijack_detection)".into()));
        }
        let session = self.sessions.find(by).await?;
        if !session.is_active_at(self.clock.now()) {
            return Err(Error::FailedPrecondition("the session has already ended".into()));
        }
        // The same judgement as ValidateSession's: the event, and above the threshold the end.
        let scored = self.sessions.score_hijack(&session, request, self.detector.as_ref()).await?;
        let session_terminated = matches!(scored.ended, Some(EndOutcome::Ended(_)));
        let HijackScore { risk_score, reasons, .. } = scored;
        Ok(HijackAnswer { is_suspicious: !reasons.is_empty(), risk_score, reasons, session_terminated })
    }

    /// DetectSuspiciousActivity: the user-level signals over the user's 50 newest events; when
    /// any fires, a `suspicious_activity` event is recorded.
    pub async fn detect_suspicious_activity(
        &self,
        user_id: &str,
        activity_type: &str,
        metadata: BTreeMap<String, String>,
    ) -> Result<ActivityAnswer> {
        let now = self.clock.now();
        let query = EventQuery {
            user_id: user_id.to_owned(),
            from: 0,
            until: now.saturating_add(1),
            limit: events::ACTIVITY_LOOKBACK,
            ..EventQuery::default()
        };
        let recent = self.recorder.store().user_events(&query).await?;
        let (risk_score, reasons) = events::suspicious_activity(&recent, now);
        let is_suspicious = !reasons.is_empty();
        if is_suspicious {
            let mut draft = EventDraft::new(EventType::SuspiciousActivity)
                .user(user_id)
                .risk(risk_score)
                .details(reasons.join("; "));
            // The caller's context first; the service's own keys win on a clash.
            draft.metadata = metadata;
            draft = draft.meta("activity_type", activity_type);
            self.recorder.record(draft).await?;
        }
        Ok(ActivityAnswer { is_suspicious, risk_score, reasons })
    }

    /// LogSecurityEvent.
    pub async fn log_event(&self, draft: EventDraft) -> Result<SecurityEvent> {
        self.recorder.record(draft).await
    }

    /// ListSecurityEvents: one user's events in a time range, newest first, paged.
    pub async fn list_events(&self, list: &ListEvents) -> Result<EventPage> {
        let now = self.clock.now();
        let page_size = list.page_size.max(1);
        let after = list.page_token.as_deref().map(crate::paging::decode).transpose()?;
        let query = EventQuery {
            user_id: list.user_id.clone(),
            from: list.start.unwrap_or(0),
            until: list.end.unwrap_or(now.saturating_add(1)),
            types: list.types.clone(),
            after,
            limit: page_size + 1,
        };
        let mut events = self.recorder.store().user_events(&query).await?;
        let next_page_token = (events.len() > page_size).then(|| {
            let last = &events[page_size - 1];
            crate::paging::encode(last.occurred_at, &last.event_id)
        });
        events.truncate(page_size);
        Ok(EventPage { events, next_page_token })
    }

    /// GetSecuritySummary over the last `hours` (0 means 24). Reads only this user's events in
    /// the window (through the per-user time index, a page at a time), the user's sessions, and
    /// the newest login in retention.
    /// An explicit `hours` longer than `security.event_retention` is `INVALID_ARGUMENT`.
    pub async fn summary(&self, user_id: &str, hours: u32) -> Result<Summary> {
        let retention = self.settings.event_retention;
        if u128::from(hours) * 3_600_000 > retention.as_millis() {
            return Err(Error::invalid(
                "hours",
                format!(
                    "{hours} hours is longer than event retention (security.event_retention = {}); ask for at most {} hours",
                    humantime::format_duration(retention),
                    retention.as_secs() / 3600
                ),
            ));
        }
        let hours = if hours == 0 { 24 } else { hours };
        let now = self.clock.now();
        let store = self.recorder.store();
        let mut builder = SummaryBuilder::new(user_id, hours);
        let mut query = EventQuery {
            user_id: user_id.to_owned(),
            from: now.saturating_sub(i64::from(hours) * 3_600_000),
            until: now.saturating_add(1),
            limit: 1000,
            ..EventQuery::default()
        };
        loop {
            let page = store.user_events(&query).await?;
            page.iter().for_each(|e| builder.add(e));
            match page.last() {
                Some(last) if page.len() == query.limit => {
                    query.after = Some((last.occurred_at, last.event_id.clone()))
                }
                _ => break,
            }
        }
        let active: Vec<String> = self
            .sessions
            .store()
            .list_user(user_id)
            .await?
            .into_iter()
            .filter(|s| s.is_active_at(now))
            .map(|s| s.session_id)
            .collect();
        let login = EventQuery {
            user_id: user_id.to_owned(),
            from: 0,
            until: now.saturating_add(1),
            types: vec![EventType::LoginSuccess, EventType::SessionCreated],
            limit: 1,
            ..EventQuery::default()
        };
        let last_login_at = store.user_events(&login).await?.first().map(|e| e.occurred_at);
        Ok(builder.finish(&active, last_login_at))
    }

    /// Deletes events past retention and rate-limit state that no longer matters.
    pub async fn cleanup(&self) -> Result<usize> {
        let cutoff = self.clock.now().saturating_sub(crate::clock::millis(self.settings.event_retention));
        let mut total = 0;
        loop {
            let removed = self.recorder.store().purge_events(cutoff, 1000).await?;
            total += removed;
            if removed < 1000 {
                break;
            }
        }
        Ok(total + self.limiter.cleanup().await?)
    }
}

#[cfg(test)]
mod tests;
