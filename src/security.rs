//! Security: named rate limits, hijack detection, the security event log, summaries and the
//! user-level suspicious-activity signals. No tonic, no proto: `grpc::security` adapts this.
//!
//! Pieces, each usable alone:
//! - [`limiter`]: the pure GCRA-with-backoff function, and [`Limiter`], which applies a named
//!   rule through a [`RateLimitStore`](crate::store::RateLimitStore) and records denials. It is
//!   the session manager's [`CreateGuard`] (`session_create`, keyed by user id).
//! - [`hijack`]: the rule table and [`hijack::HijackDetector`], the session manager's
//!   [`HijackScorer`](crate::session::HijackScorer).
//! - [`events`]: event types, the [`events::Recorder`], and the pure summary and
//!   suspicious-activity computations. [`EventObserver`] turns the session lifecycle's
//!   exceptional events into security events (the common, valid validation records nothing).
//! - [`Security`]: what the SecurityService RPCs call.
//!
//! # Security
//!
//! **Rate limits** (`src/model/limiter.rs`). Rules are named and configured under
//! `[security.rules.NAME]` (`limit`, `period`, `burst` = `limit` by default, `backoff`,
//! `backoff_multiplier`, `max_backoff`). Defaults:
//!
//! | rule | limit | period | max backoff | key | checked by |
//! |---|---|---|---|---|---|
//! | `token_refresh` | 10 | 60 s | 3600 s | caller's choice | CheckRateLimit (the token work) |
//! | `session_create` | 5 | 300 s | 3600 s | user id | CreateSession (`CreateGuard`) and CheckRateLimit |
//! | `login_attempt` | 5 | 300 s | 1800 s | caller's choice | CheckRateLimit |
//! | `validate_failure` | 30 | 60 s | 900 s | client IPv4 address, or IPv6 /64 | ValidateSession's "not valid" answers |
//!
//! The limiter is GCRA: per (rule, key) one theoretical arrival time (TAT); a unit costs
//! `T = period / limit`; a request of `cost` units passes when `max(TAT, now) + cost·T − burst·T ≤ now`
//! and moves the TAT by `cost·T`. So `burst` requests pass at once and one unit returns every `T`
//! (no window edges to game). Backoff for repeat offenders: the first denial only waits for the
//! GCRA; each further denial blocks the key for `period × multiplier^(v−2)` capped at `max_backoff`
//! (session_create: 60 s wait, then 300, 600, 1200, 2400, 3600 s); blocked requests are denied
//! uncounted; the violation count decays after `max_backoff` of good behaviour (the library never
//! forgot). Arithmetic is integer microseconds, so the same function is a Lua script. An unknown
//! rule in CheckRateLimit is `INVALID_ARGUMENT` naming `rule_name` (the library allowed it
//! silently); a `cost` above the burst can never pass and is `INVALID_ARGUMENT` too. The first
//! denial of each *denial window* is a `rate_limit_exceeded` event, with the key as `user_id`, or as
//! `ip_address` when it is an address or a /64; the rest of the window is only counted
//! (`rate_limit_denials_unrecorded_total{rule}`), so a key hammering a limit writes one event per
//! window, not one per request. With backoff each counted denial opens a window (the first one's
//! GCRA wait, then each block) and the denials while blocked are its repeats; without backoff the
//! first denial after a grant opens one and the denials until the next grant repeat it
//! (`Decision::repeat`, decided inside the atomic check, so replicas agree on which denial is the
//! first). GetSecuritySummary's `rate_limit_hits` therefore counts windows.
//!
//! *Bounded state.* The memory and embedded stores hold at most `security.max_limiter_keys`
//! (100 000) keys per rule (memory: a count per rule beside the states; embedded: the
//! `rate_limit_counts` table, kept in the check's and the purge's transaction). A check or peek of a
//! new key at the bound first drops up to 1000 states that decide nothing any more (the forget
//! index, as the purge does); if the rule is still full the key is refused: `Decision::key_refused`,
//! denied with the rule's period as retry hint, nothing stored, no event, counted in
//! `rate_limit_keys_refused_total{rule}`, and `Error::LimiterFull` (`RESOURCE_EXHAUSTED`,
//! `RATE_LIMIT_KEYS_FULL`, naming the setting) where the service enforces the rule. Held keys are
//! never evicted: evicting one that is not limiting right now would still hand a partly spent key,
//! or an offender's violation count, a fresh start, which is exactly what a flood of new keys would
//! be sent for. The cost of the choice is availability for new keys of that one rule while it is
//! full of live state. Redis and kv-rest keep limiter state in the server (its `maxmemory`; with
//! `noeviction` a full server fails the check, and the call, closed).
//!
//! **Hijack detection** (`src/security/hijack.rs`): a rule table, weights under `[security.hijack]`:
//!
//! | signal | condition | weight |
//! |---|---|---|
//! | IP change, same network | same /24 (IPv4) or /64 (IPv6) | 0.1 |
//! | IP change, new network | otherwise | 0.3 |
//! | user agent | both known, different | 0.2 |
//! | fingerprint mismatch | digests differ and the device rule fails | 0.5 |
//! | fingerprint changed | digests differ, the device rule still matches | 0.1 |
//! | accept-language | differs while the device still matches (a mismatch already counts it) | 0.1 |
//! | IP velocity | more than 3 distinct IPs within 5 min for the session | 0.3 |
//!
//! Capped at 1; the session ends strictly above `security.hijack_threshold` (0.7), so the library's
//! "fingerprint + user agent = 0.7" does not end it, new network + new device (0.8) and everything
//! at once (1.0) do. The recent IPs for velocity live in process memory (at most 8 per session, two
//! generations of 50 000 sessions), never in the store: each replica sees the traffic it serves.
//! DetectHijacking uses the same table (whether or not ValidateSession runs it), by token, or by
//! `session_id` for admins; it ends the session above the threshold through the same end path.
//! Events: `session_hijack_attempt` when the session ends or the risk is above 0.5,
//! `ip_change_detected` for a weaker score with an IP change; a weak signal without an IP change (a
//! new user agent alone) is answered but not recorded, since it would repeat on every request.
//!
//! **Security events** (`src/security/events.rs`). The 21 types are the proto's `SecurityEventType`.
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
//!
//! **Summary and suspicious activity.** GetSecuritySummary reads the user's events in the window
//! through the per-user time index, 1000 at a time (so its cost grows with that user's events in the
//! window only; a unit test wraps the store and counts what it returns), the user's sessions
//! (`list_user`), and the newest `login_success` or `session_created` for `last_login_at`.
//! `suspicious_sessions` are active sessions named by a hijack, device or IP-change event in the
//! window. DetectSuspiciousActivity scores the user's 50 newest events with the library's signals
//! (more than 3 `session_created` in 300 s +0.4, more than 3 `login_failure` in 600 s +0.5, more than
//! 3 distinct IPs among the 10 newest +0.3, capped at 1) and records `suspicious_activity` when any
//! fires (the caller's metadata first; the service's `activity_type` wins a clash).
//!
//! **Storage.** Two more traits, each operation one atomic step:
//!
//! | operation | guarantee | memory | embedded (redb) | Redis (one Lua script each) |
//! |---|---|---|---|---|
//! | `RateLimitStore::check(rule, key, cost, now)` | load, `limiter::apply`, store: concurrent checks of one key are serialised | one mutex | one write transaction (`Durability::None`: a crash may forget the last counts) on `rate_limits`, `rate_limit_forget` and `rate_limit_counts` | compare-and-set around the Rust `limiter::apply` (below): `HGET P{limits}:states <field>`, apply, script `limit_cas` writes the new state and its `forget_at` in `P{limits}:forget` only if the state is still what was read, else returns the current one and the check runs again on it |
//! | `RateLimitStore::purge_limits(now, limit)` | drop states that decide nothing any more | forget index | `rate_limit_forget` range | script `purge_limits`: `ZRANGEBYSCORE forget -inf now LIMIT 0 n`, `HDEL` + `ZREM` each |
//! | `SecurityEventStore::append(event)` | durable before returning | by-time map + per-user set | one transaction on `security_events` and `user_security_events` | `ZADD P{events}:time <occurred_at> u\|T\|<user hex>\|<id>` first (the purge's index, its own slot), then script `event_append` on the user's slot: `HSET P{T}:ev:<user> <id> "<type>\n<json>"`, `ZADD P{T}:evi:<user> <occurred_at> <id>`; user-less events: `HSET P{events}:nouser` and the time index in one script |
//! | `SecurityEventStore::user_events(query)` | newest first by `(occurred_at, event_id)`, `[from, until)`, types, resume after a position, limit; cost grows with the user's events in range | `BTreeSet` range | `user_security_events` range, reversed | script `user_events` on one slot: `ZREVRANGEBYSCORE evi` from the upper bound down to `from`, 128 at a time, skipping ids at the resume time that are not below the resume id (compared bytewise: Lua's `<` follows the server's locale), `HGET` each, type filter on the `<type>` prefix (no JSON decoding in Lua), stop at `limit` |
//! | `SecurityEventStore::purge_events(cutoff, limit)` | delete events before `cutoff` with index entries | by-time range | `security_events` range | `ZRANGEBYSCORE time -inf (cutoff LIMIT 0 n`, then per entry script `event_delete` on its slot (`HDEL` + `ZREM`, counts what existed) and `ZREM` of the time entry |
//!
//! *Why the limiter is a compare-and-set, not `apply` in Lua.* Exactness across replicas needs one
//! serialisation point per key, which the script gives; it does not need the arithmetic in Lua.
//! `apply`'s backoff uses `f64` (`powi`, `Duration::from_secs_f64`), whose last-bit behaviour a Lua
//! copy would have to match exactly to keep every backend's decisions identical. So Rust computes,
//! and the script only commits if nobody committed in between. Every conflict follows another
//! check's success (lock-free), and within one replica checks of one key first take turns on a
//! striped async mutex, so N concurrent checks cost about N round trips rather than N²/2 conflicts.
//! All limiter state is in the `{limits}` slot: on a cluster that is one node's work, the price of
//! an atomic forget index; a check is bounded by `storage_timeout` like every operation.
//!
//! *No Redis TTLs here either*: rate-limit states and events are deleted by the purges, which
//! take `now` / `cutoff` from the service's clock (tests move it), with their own indexes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, Millis};
use crate::error::{Error, Result};
use crate::revocation::RevocationKind;
use crate::session::{
    CreateGuard, HIJACK_REASON, RequestContext, SESSION_CREATE_RULE, SessionEvent, SessionManager, SessionObserver,
    SessionRef, SessionState,
};
use crate::store::{DynRateLimitStore, EndOutcome, EventQuery, Stores};

pub mod events;
pub mod hijack;
pub use crate::model::limiter;

use events::{EventDraft, EventType, Recorder, SecurityEvent, Severity, Summary, SummaryBuilder};
use hijack::{HijackDetector, HijackRules};
use limiter::{Decision, Rule};

/// The rule checked per client IP when ValidateSession answers "not valid".
pub const VALIDATE_FAILURE_RULE: &str = "validate_failure";

/// The key of a client address in [`VALIDATE_FAILURE_RULE`]: an IPv4 address as it is (also when
/// written as an IPv4-mapped IPv6 address), an IPv6 address as its /64, for example
/// `2001:db8:1:2::/64`. A /64 is what one subscriber, one LAN or one host is given, and any
/// address in it is the client's to pick, so an exact IPv6 key would hand a guesser 2^64 fresh
/// allowances.
pub fn client_network_key(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let network = std::net::Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX));
            format!("{network}/64")
        }
    }
}

/// The address a limiter key names, for the `ip_address` of its denial events: an address, or
/// an IPv6 /64 as [`client_network_key`] writes it.
fn key_address(key: &str) -> Option<String> {
    if let Ok(ip) = key.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    let network = key.strip_suffix("/64")?.parse::<std::net::Ipv6Addr>().ok()?;
    Some(format!("{network}/64"))
}

/// The risk of a recorded device mismatch (the library's value): above
/// [`events::SUSPICIOUS_RISK`], so GetSecuritySummary counts it as suspicious.
pub const DEVICE_MISMATCH_RISK: f64 = 0.8;

/// Settings of the security work (from `security.*`).
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

impl SecuritySettings {
    /// The settings a configuration describes.
    pub fn from_config(config: &crate::Config) -> SecuritySettings {
        let s = &config.security;
        let rules = s
            .rules
            .iter()
            .map(|(name, r)| {
                let rule = Rule {
                    name: name.clone(),
                    limit: r.limit,
                    period: r.period,
                    burst: r.burst,
                    backoff: r
                        .backoff
                        .then_some(limiter::Backoff { multiplier: r.backoff_multiplier, max: r.max_backoff }),
                };
                (name.clone(), rule)
            })
            .collect();
        let h = &s.hijack;
        SecuritySettings {
            rate_limiting: s.rate_limiting,
            hijack_detection: s.hijack_detection,
            rules,
            hijack: HijackRules {
                ip_same_network: h.ip_same_network,
                ip_new_network: h.ip_new_network,
                user_agent: h.user_agent,
                fingerprint_mismatch: h.fingerprint_mismatch,
                fingerprint_changed: h.fingerprint_changed,
                accept_language: h.accept_language,
                ip_velocity: h.ip_velocity,
                velocity_window: h.velocity_window,
                velocity_max_ips: h.velocity_max_ips,
                device_match_threshold: config.session.device_match_threshold,
                threshold: s.hijack_threshold,
            },
            event_retention: s.event_retention,
        }
    }
}

/// Named rate-limit rules over a [`RateLimitStore`](crate::store::RateLimitStore).
#[derive(Debug, Clone)]
pub struct Limiter {
    enabled: bool,
    rules: Arc<BTreeMap<String, Rule>>,
    store: DynRateLimitStore,
    recorder: Recorder,
    clock: Arc<dyn Clock>,
    warned_full_at: Arc<std::sync::atomic::AtomicI64>,
}

impl Limiter {
    /// A limiter; with `enabled` false every check is allowed and nothing is stored.
    pub fn new(
        enabled: bool,
        rules: BTreeMap<String, Rule>,
        store: DynRateLimitStore,
        recorder: Recorder,
        clock: Arc<dyn Clock>,
    ) -> Limiter {
        Limiter { enabled, rules: Arc::new(rules), store, recorder, clock, warned_full_at: Arc::default() }
    }

    /// The rule named `name`, or `INVALID_ARGUMENT` naming `rule_name`.
    pub fn rule(&self, name: &str) -> Result<&Rule> {
        self.rules.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.rules.keys().map(String::as_str).collect();
            Error::invalid("rule_name", format!("no rule named {name:?}; configured rules: {}", known.join(", ")))
        })
    }

    /// Consumes `cost` units of rule `rule_name` for `key`. The first denial of each denial window
    /// (see [`Decision::repeat`]) is recorded as a `rate_limit_exceeded` event (with the key as
    /// user id, or as IP address when it is one); the repeats are counted in
    /// [`crate::metrics::RATE_LIMIT_DENIALS_UNRECORDED`], so a key hammering a limit cannot turn
    /// each request into an event write. Every denial counts in
    /// [`crate::metrics::RATE_LIMIT_DENIED`].
    pub async fn check(&self, rule_name: &str, key: &str, cost: u32) -> Result<Decision> {
        self.decide(rule_name, key, cost, true).await
    }

    /// The decision [`Limiter::check`] would give, consuming nothing and recording nothing.
    pub async fn peek(&self, rule_name: &str, key: &str, cost: u32) -> Result<Decision> {
        self.decide(rule_name, key, cost, false).await
    }

    async fn decide(&self, rule_name: &str, key: &str, cost: u32, consume: bool) -> Result<Decision> {
        let rule = self.rule(rule_name)?;
        let cost = cost.max(1);
        if cost > rule.burst {
            return Err(Error::invalid(
                "cost",
                format!("{cost} is more than rule {rule_name:?} can ever grant at once ({})", rule.burst),
            ));
        }
        if !self.enabled {
            return Ok(Decision {
                allowed: true,
                limit: rule.limit,
                remaining: rule.burst,
                retry_after: Duration::ZERO,
                reset_after: Duration::ZERO,
                blocked: false,
                violations: 0,
                repeat: false,
                key_refused: false,
            });
        }
        if !consume {
            return self.store.peek(rule, key, cost, self.clock.now()).await;
        }
        let decision = self.store.check(rule, key, cost, self.clock.now()).await?;
        if decision.key_refused {
            // Neither an event nor a denial of this key: a flood of new keys must not become
            // event writes, and the operator needs the count and a (rate-limited) warning.
            metrics::counter!(crate::metrics::RATE_LIMIT_KEYS_REFUSED, "rule" => rule.name.clone()).increment(1);
            self.warn_full(rule);
            return Ok(decision);
        }
        if !decision.allowed {
            // Rule names come from the configuration (an unknown name was refused above), so the
            // label is bounded; the key (a user id or an address) is never a label.
            metrics::counter!(crate::metrics::RATE_LIMIT_DENIED, "rule" => rule.name.clone()).increment(1);
            if decision.repeat {
                metrics::counter!(crate::metrics::RATE_LIMIT_DENIALS_UNRECORDED, "rule" => rule.name.clone())
                    .increment(1);
                return Ok(decision);
            }
            let mut draft = EventDraft::new(EventType::RateLimitExceeded)
                .details(format!("Rate limit {rule_name:?} exceeded"))
                .risk((0.2 * f64::from(decision.violations)).min(1.0))
                .meta("rule", rule_name)
                .meta("violations", decision.violations)
                .meta("blocked", decision.blocked)
                .meta("retry_after_ms", decision.retry_after.as_millis());
            draft = match key_address(key) {
                Some(address) => draft.ip(Some(address)),
                None => draft.user(key),
            };
            self.recorder.record_or_log(draft).await;
        }
        Ok(decision)
    }

    /// Logs that `rule` refuses new keys, at most once a minute per limiter.
    fn warn_full(&self, rule: &Rule) {
        let now = self.clock.now();
        let last = self.warned_full_at.load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) >= 60_000
            && self
                .warned_full_at
                .compare_exchange(last, now, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                rule = %rule.name,
                "rate limit holds as many keys as security.max_limiter_keys allows: new keys are refused until held state expires (raise the setting if this is ordinary traffic)"
            );
        }
    }

    /// [`Limiter::check`] with one unit, as an error when denied (`RESOURCE_EXHAUSTED` with
    /// `RetryInfo` on the wire; [`Error::LimiterFull`] when the rule refused a new key). A rule
    /// that is not configured allows.
    pub async fn enforce(&self, rule_name: &str, key: &str) -> Result<()> {
        if !self.rules.contains_key(rule_name) {
            return Ok(());
        }
        let decision = self.check(rule_name, key, 1).await?;
        if decision.allowed {
            Ok(())
        } else if decision.key_refused {
            Err(Error::LimiterFull { rule: rule_name.to_owned(), retry_after: decision.retry_after })
        } else {
            Err(Error::RateLimited { rule: rule_name.to_owned(), retry_after: decision.retry_after })
        }
    }

    /// Deletes rate-limit state that no longer matters.
    pub async fn cleanup(&self) -> Result<usize> {
        let now = self.clock.now();
        let mut total = 0;
        loop {
            let removed = self.store.purge_limits(now, 1000).await?;
            total += removed;
            if removed < 1000 {
                return Ok(total);
            }
        }
    }
}

#[async_trait::async_trait]
impl CreateGuard for Limiter {
    async fn check(&self, rule: &str, key: &str) -> Result<()> {
        self.enforce(rule, key).await
    }
}

/// Records the session lifecycle's exceptional events as security events.
#[derive(Debug, Clone)]
pub struct EventObserver {
    recorder: Recorder,
}

impl EventObserver {
    /// An observer writing through `recorder`.
    pub fn new(recorder: Recorder) -> EventObserver {
        EventObserver { recorder }
    }
}

#[async_trait::async_trait]
impl SessionObserver for EventObserver {
    async fn observe(&self, event: SessionEvent<'_>) {
        let draft = match event {
            SessionEvent::Created(s) => EventDraft::new(EventType::SessionCreated)
                .user(&s.user_id)
                .session(&s.session_id)
                .ip(s.ip_address.clone())
                .details("Session created")
                .meta("provider", &s.provider),
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
    /// Reasons.
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
    /// Reasons.
    pub reasons: Vec<String>,
}

/// A query of ListSecurityEvents.
#[derive(Debug, Clone, Default)]
pub struct ListEvents {
    /// The user.
    pub user_id: String,
    /// At or after (default: the start of retention).
    pub start: Option<Millis>,
    /// Before (default: now, inclusive of this millisecond).
    pub end: Option<Millis>,
    /// Only these types.
    pub types: Vec<EventType>,
    /// Page size.
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
        let mut sessions = sessions
            .with_create_guard(Arc::new(limiter.clone()))
            .with_observer(Arc::new(EventObserver::new(recorder.clone())));
        if settings.hijack_detection {
            sessions = sessions.with_hijack_scorer(detector.clone());
        }
        let security =
            Security { settings: Arc::new(settings), limiter, recorder, detector, sessions: sessions.clone(), clock };
        (sessions, security)
    }

    /// The limiter.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// The recorder.
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

    /// Counts a "not valid" ValidateSession answer against the client (its IPv4 address, or its
    /// IPv6 /64: [`client_network_key`]); beyond the `validate_failure` rule the caller gets
    /// `RESOURCE_EXHAUSTED`.
    pub async fn validation_refused(&self, ip: Option<IpAddr>) -> Result<()> {
        match ip {
            Some(ip) => self.limiter.enforce(VALIDATE_FAILURE_RULE, &client_network_key(ip)).await,
            None => Ok(()),
        }
    }

    /// DetectHijacking: scores `request` against the stored session (with the same rule table as
    /// ValidateSession, whether or not that runs it) and ends the session above the threshold.
    /// With `security.hijack_detection` off: `FAILED_PRECONDITION`, and nothing is scored or ended.
    pub async fn detect_hijacking(&self, by: &SessionRef, request: &RequestContext) -> Result<HijackAnswer> {
        use crate::session::HijackScorer as _;
        if !self.settings.hijack_detection {
            return Err(Error::FailedPrecondition("hijack detection is off (security.hijack_detection)".into()));
        }
        let session = self.sessions.find(by).await?;
        if !session.is_active_at(self.clock.now()) {
            return Err(Error::FailedPrecondition("the session has already ended".into()));
        }
        let (risk_score, reasons) = self.detector.score(&session, request);
        let over = risk_score > self.detector.threshold();
        if risk_score > 0.0 {
            let scored = SessionEvent::HijackScored {
                session: &session,
                ip: request.ip_address,
                risk_score,
                reasons: &reasons,
                ended: over,
            };
            self.sessions.report(scored).await;
        }
        let mut session_terminated = false;
        if over {
            // The same end as ValidateSession's: a `hijack` revocation event, and the hijack counter.
            let outcome = self.sessions.end_as(&session, RevocationKind::Hijack, HIJACK_REASON, None).await?;
            session_terminated = matches!(outcome, EndOutcome::Ended(_));
        }
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
