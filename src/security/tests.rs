//! Tests of the security work in process: the hijack table, the validation path with hijack
//! detection and events, DetectHijacking, the limiter as the creation guard, suspicious activity,
//! and the summary's cost. A manual clock; memory stores.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::SecretString;

use super::limits::key_address;
use super::*;
use crate::clock::ManualClock;
use crate::crypto::KeyRing;
use crate::security::events::SecurityEvent;
use crate::session::{
    Fingerprint, HijackScorer as _, InvalidReason, NewSession, SessionRecord, SessionSettings, Validation,
};
use crate::store::memory::MemoryStore;
use crate::store::{DynSecurityEventStore, SecurityEventStore};

const START: Millis = 1_800_000_000_000;

fn laptop() -> Fingerprint {
    Fingerprint {
        user_agent: Some("UA/1".into()),
        platform: Some("Linux x86_64".into()),
        timezone: Some("Europe/Paris".into()),
        accept_language: Some("fr-FR".into()),
        screen_resolution: Some("1920x1080".into()),
        color_depth: Some(24),
        ..Default::default()
    }
}

fn other_device(user_agent: &str) -> Fingerprint {
    Fingerprint {
        user_agent: Some(user_agent.into()),
        platform: Some("Linux x86_64".into()),
        timezone: Some("Europe/Paris".into()),
        accept_language: Some("en-US".into()),
        screen_resolution: Some("800x600".into()),
        color_depth: Some(16),
        ..Default::default()
    }
}

fn settings() -> SecuritySettings {
    crate::Config::from_flags(&BTreeMap::new()).unwrap().security
}

struct World {
    clock: ManualClock,
    sessions: SessionManager,
    security: Security,
    events: DynSecurityEventStore,
}

fn world_with(settings: SecuritySettings, events: Option<DynSecurityEventStore>) -> World {
    let clock = ManualClock::new(START);
    let memory = Arc::new(MemoryStore::new());
    let stores = Stores {
        sessions: memory.clone(),
        limits: memory.clone(),
        events_with_sessions: events.is_none(),
        events: events.unwrap_or_else(|| memory.clone()),
        tokens: memory.clone(),
    };
    let session_settings = SessionSettings { ..SessionSettings::default() };
    let clock_arc: Arc<dyn Clock> = Arc::new(clock.clone());
    let sessions = SessionManager::new(
        stores.sessions.clone(),
        Arc::new(KeyRing::new(&[7; 32], &[])),
        clock_arc.clone(),
        session_settings,
    );
    let (sessions, security) = Security::install(settings, &stores, clock_arc, sessions);
    World { clock, sessions, security, events: stores.events }
}

fn world() -> World {
    world_with(settings(), None)
}

fn new_session(user: &str) -> NewSession {
    NewSession {
        user_id: user.into(),
        access_token: SecretString::from("upstream".to_string()),
        fingerprint: Some(laptop()),
        ip_address: Some("192.0.2.10".parse().unwrap()),
        user_agent: Some("UA/1".into()),
        ..Default::default()
    }
}

async fn events_of(w: &World, user: &str) -> Vec<SecurityEvent> {
    let query = EventQuery { user_id: user.into(), from: 0, until: Millis::MAX, limit: 1000, ..Default::default() };
    w.events.user_events(&query).await.unwrap()
}

fn types(events: &[SecurityEvent]) -> Vec<EventType> {
    events.iter().map(|e| e.event_type).collect()
}

fn request(ip: &str, user_agent: Option<&str>, fingerprint: Option<Fingerprint>) -> RequestContext {
    RequestContext { ip_address: Some(ip.parse().unwrap()), user_agent: user_agent.map(str::to_owned), fingerprint }
}

/// A case of the hijack table: name, request, score band, reasons.
type Case = (&'static str, RequestContext, (f64, f64), &'static [&'static str]);

/// The acceptance table: each case, its score band and its reasons.
#[tokio::test]
async fn the_hijack_table() {
    let w = world();
    let created = w.sessions.create(new_session("alice")).await.unwrap();
    let stored: SessionRecord = created.session;
    let cases: [Case; 6] = [
        ("same device", request("192.0.2.10", Some("UA/1"), Some(laptop())), (0.0, 0.0), &[]),
        (
            "new IP in the same /24",
            request("192.0.2.77", Some("UA/1"), Some(laptop())),
            (0.05, 0.15),
            &["IP address changed from 192.0.2.10 to 192.0.2.77 (same network)"],
        ),
        (
            "new network",
            request("203.0.113.5", Some("UA/1"), Some(laptop())),
            (0.25, 0.35),
            &["IP address changed from 192.0.2.10 to 203.0.113.5"],
        ),
        ("new user agent", request("192.0.2.10", Some("UA/2"), None), (0.15, 0.25), &["User agent changed"]),
        (
            "new fingerprint",
            request("192.0.2.10", Some("UA/1"), Some(other_device("UA/1"))),
            (0.45, 0.55),
            &["Device fingerprint mismatch"],
        ),
        (
            "all at once",
            request("203.0.113.5", Some("Evil/9"), Some(other_device("Evil/9"))),
            (1.0, 1.0),
            &["IP address changed from 192.0.2.10 to 203.0.113.5", "User agent changed", "Device fingerprint mismatch"],
        ),
    ];
    for (name, context, (low, high), expected) in cases {
        // A fresh detector per case, so that the velocity memory of one case does not leak.
        let detector = hijack::HijackDetector::new(settings().hijack, Arc::new(w.clock.clone()));
        let (score, reasons) = detector.score(&stored, &context);
        assert!((low..=high).contains(&score), "{name}: {score} not in [{low}, {high}] ({reasons:?})");
        assert_eq!(reasons, expected, "{name}");
        let ended = score > detector.threshold();
        assert_eq!(ended, name == "all at once", "{name}: {score}");
    }

    // Velocity: a fourth distinct IP within five minutes adds the velocity signal.
    let detector = hijack::HijackDetector::new(settings().hijack, Arc::new(w.clock.clone()));
    for ip in ["192.0.2.10", "192.0.2.11", "192.0.2.12"] {
        detector.score(&stored, &request(ip, None, None));
    }
    let (score, reasons) = detector.score(&stored, &request("192.0.2.13", None, None));
    assert!(reasons.iter().any(|r| r.starts_with("Requests from 4 IP addresses")), "{reasons:?}");
    assert!((0.35..=0.45).contains(&score), "{score}");
    // Once the window has passed, the old addresses no longer count.
    w.clock.advance(Duration::from_secs(301));
    let (_, reasons) = detector.score(&stored, &request("192.0.2.14", None, None));
    assert!(!reasons.iter().any(|r| r.starts_with("Requests from")), "{reasons:?}");
}

#[tokio::test]
async fn validation_ends_a_hijacked_session_and_records_why() {
    let w = world();
    let created = w.sessions.create(new_session("alice")).await.unwrap();
    let token = secrecy::ExposeSecret::expose_secret(&created.token).to_owned();

    // The same device: valid, nothing recorded beyond the creation.
    let v = w.sessions.validate(&token, &request("192.0.2.10", Some("UA/1"), Some(laptop()))).await.unwrap();
    assert!(matches!(v, Validation::Valid { risk_score, .. } if risk_score == 0.0));
    assert_eq!(types(&events_of(&w, "alice").await), [EventType::SessionCreated]);

    // Everything changes at once: not valid, the session ended, and both facts recorded.
    let context = request("203.0.113.5", Some("Evil/9"), Some(other_device("Evil/9")));
    let v = w.sessions.validate(&token, &context).await.unwrap();
    let Validation::Invalid { reason, end_reason, risk_score, reasons } = v else { panic!("{v:?}") };
    assert_eq!(reason, InvalidReason::HijackSuspected);
    assert_eq!(end_reason.as_deref(), Some(HIJACK_REASON));
    assert_eq!(risk_score, 1.0);
    assert_eq!(reasons.len(), 3);
    let stored = w.sessions.store().get_by_id(&created.session.session_id).await.unwrap().unwrap();
    assert_eq!(stored.state, SessionState::Terminated);
    assert_eq!(stored.end_reason.as_deref(), Some(HIJACK_REASON));
    let events = events_of(&w, "alice").await;
    assert_eq!(
        types(&events),
        [EventType::SessionTerminated, EventType::SessionHijackAttempt, EventType::SessionCreated]
    );
    let attempt = &events[1];
    assert_eq!(attempt.severity, Severity::Critical);
    assert_eq!(attempt.ip_address.as_deref(), Some("203.0.113.5"));
    assert_eq!(attempt.session_id.as_deref(), Some(created.session.session_id.as_str()));
    assert_eq!(attempt.metadata["previous_ip"], "192.0.2.10");
    assert_eq!(attempt.risk_score, 1.0);
}

#[tokio::test]
async fn weak_signals_are_answered_and_only_ip_changes_and_device_mismatches_recorded() {
    let w = world();
    let created = w.sessions.create(new_session("bob")).await.unwrap();
    let token = secrecy::ExposeSecret::expose_secret(&created.token).to_owned();
    // A new user agent alone: valid, scored, not recorded (it would repeat on every request).
    let v = w.sessions.validate(&token, &request("192.0.2.10", Some("UA/2"), None)).await.unwrap();
    assert!(matches!(&v, Validation::Valid { risk_score, reasons, .. } if *risk_score > 0.0 && reasons.len() == 1));
    assert_eq!(events_of(&w, "bob").await.len(), 1);
    // A new network: valid, recorded as an IP change.
    let v = w.sessions.validate(&token, &request("198.51.100.3", Some("UA/1"), None)).await.unwrap();
    assert!(matches!(v, Validation::Valid { .. }));
    // Another device: DEVICE_MISMATCH, recorded, the session stays active.
    let v = w.sessions.validate(&token, &request("198.51.100.3", Some("UA/1"), Some(other_device("UA/1")))).await;
    assert!(matches!(v.unwrap(), Validation::Invalid { reason: InvalidReason::DeviceMismatch, .. }));
    let events = events_of(&w, "bob").await;
    assert_eq!(types(&events), [EventType::InvalidDevice, EventType::IpChangeDetected, EventType::SessionCreated]);
    assert!(w.sessions.store().get_by_id(&created.session.session_id).await.unwrap().unwrap().is_active_at(START));
}

#[tokio::test]
async fn detect_hijacking_scores_against_the_stored_session_and_ends_it_above_the_threshold() {
    let w = world();
    let created = w.sessions.create(new_session("carol")).await.unwrap();
    let by = SessionRef::Id(created.session.session_id.clone());
    let mild = w.security.detect_hijacking(&by, &request("192.0.2.99", Some("UA/1"), None)).await.unwrap();
    assert!(mild.is_suspicious && !mild.session_terminated);
    assert!((mild.risk_score - 0.1).abs() < 1e-9);
    // A changed digest on the same device (an unscored extra): 0.1.
    let mut drifted = laptop();
    drifted.extras.insert("gpu".into(), "new driver".into());
    let drift_request = request("192.0.2.10", Some("UA/1"), Some(drifted));
    let drift = w.security.detect_hijacking(&by, &drift_request).await.unwrap();
    assert_eq!(drift.reasons, ["Device fingerprint changed"]);
    assert!((drift.risk_score - 0.1).abs() < 1e-9, "{drift:?}");
    // Fingerprint + user agent is exactly 0.7: suspicious, not above the threshold.
    let edge_request = request("192.0.2.10", Some("UA/2"), Some(other_device("UA/2")));
    let edge = w.security.detect_hijacking(&by, &edge_request).await.unwrap();
    assert!(!edge.session_terminated, "{edge:?}");
    assert!((edge.risk_score - 0.7).abs() < 1e-9, "{edge:?}");
    let severe = request("203.0.113.5", Some("UA/2"), Some(other_device("UA/2")));
    let answer = w.security.detect_hijacking(&by, &severe).await.unwrap();
    assert!(answer.session_terminated && answer.risk_score > 0.7, "{answer:?}");
    let stored = w.sessions.store().get_by_id(&created.session.session_id).await.unwrap().unwrap();
    assert_eq!((stored.state, stored.end_reason.as_deref()), (SessionState::Terminated, Some(HIJACK_REASON)));
    let e = w.security.detect_hijacking(&by, &severe).await.unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
    let e = w.security.detect_hijacking(&SessionRef::Id("ses_x".into()), &severe).await.unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
}

#[tokio::test]
async fn session_create_is_limited_per_user_with_retry_information_and_recorded() {
    let w = world();
    for _ in 0..5 {
        w.sessions.create(new_session("dave")).await.unwrap();
    }
    let e = w.sessions.create(new_session("dave")).await.unwrap_err();
    let Error::RateLimited { rule, retry_after } = e else { panic!("{e:?}") };
    assert_eq!(rule, "session_create");
    assert_eq!(retry_after, Duration::from_secs(60));
    // Another user is not affected.
    w.sessions.create(new_session("erin")).await.unwrap();
    let events = events_of(&w, "dave").await;
    assert_eq!(events[0].event_type, EventType::RateLimitExceeded);
    assert_eq!(events[0].metadata["rule"], "session_create");
    assert_eq!(events.iter().filter(|e| e.event_type == EventType::SessionCreated).count(), 5);
    // One interval later one creation is allowed again.
    w.clock.advance(Duration::from_secs(60));
    w.sessions.create(new_session("dave")).await.unwrap();
}

#[tokio::test]
async fn check_rate_limit_names_unknown_rules_and_impossible_costs() {
    let w = world();
    let e = w.security.check_rate_limit("no_such_rule", "k", 1, None).await.unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument { field, .. } if field == "rule_name"), "{e:?}");
    let e = w.security.check_rate_limit("login_attempt", "k", 6, None).await.unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument { field, .. } if field == "cost"), "{e:?}");
    let d = w.security.check_rate_limit("login_attempt", "k", 0, None).await.unwrap();
    assert!(d.allowed);
    assert_eq!((d.limit, d.remaining), (5, 4));
    // A denial keyed by an IP is recorded with the IP, not as a user.
    for _ in 0..30 {
        w.security.check_rate_limit(VALIDATE_FAILURE_RULE, "203.0.113.7", 1, Some(true)).await.unwrap();
    }
    let d = w.security.check_rate_limit(VALIDATE_FAILURE_RULE, "203.0.113.7", 1, Some(true)).await.unwrap();
    assert!(!d.allowed && d.retry_after > Duration::ZERO);
    assert!(events_of(&w, "203.0.113.7").await.is_empty());

    // With rate limiting off, everything is allowed and nothing is counted.
    let off = world_with(SecuritySettings { rate_limiting: false, ..settings() }, None);
    for _ in 0..20 {
        off.sessions.create(new_session("frank")).await.unwrap();
    }
}

#[tokio::test]
async fn suspicious_activity_is_scored_from_the_users_events_and_recorded() {
    let w = world();
    let quiet = w.security.detect_suspicious_activity("gina", "login", BTreeMap::new()).await.unwrap();
    assert!(!quiet.is_suspicious && quiet.risk_score == 0.0);
    for i in 0..4 {
        let draft = EventDraft::new(EventType::LoginFailure).user("gina").ip(Some(format!("198.51.100.{i}")));
        w.security.log_event(draft).await.unwrap();
    }
    let metadata = BTreeMap::from([("activity_type".to_string(), "spoofed".to_string()), ("x".into(), "1".into())]);
    let answer = w.security.detect_suspicious_activity("gina", "login", metadata).await.unwrap();
    assert!(answer.is_suspicious);
    assert!((answer.risk_score - 0.8).abs() < 1e-9, "{answer:?}");
    let events = events_of(&w, "gina").await;
    assert_eq!(events[0].event_type, EventType::SuspiciousActivity);
    assert_eq!(events[0].metadata["activity_type"], "login", "the service's keys win");
    assert_eq!(events[0].metadata["x"], "1");
    assert_eq!(events[0].severity, Severity::Critical);
}

/// Wraps a store and counts what the summary reads: it must only ever ask for one user's events
/// and receive only those.
#[derive(Debug)]
struct Counting {
    inner: MemoryStore,
    returned: AtomicUsize,
    users: Mutex<BTreeSet<String>>,
}

#[async_trait::async_trait]
impl SecurityEventStore for Counting {
    async fn append(&self, event: &SecurityEvent) -> crate::Result<()> {
        self.inner.append(event).await
    }
    async fn user_events(&self, query: &EventQuery) -> crate::Result<Vec<SecurityEvent>> {
        self.users.lock().unwrap().insert(query.user_id.clone());
        let events = self.inner.user_events(query).await?;
        self.returned.fetch_add(events.len(), Ordering::SeqCst);
        Ok(events)
    }
    async fn purge_events(&self, cutoff: Millis, limit: usize) -> crate::Result<usize> {
        self.inner.purge_events(cutoff, limit).await
    }
}

#[tokio::test]
async fn the_summary_reads_only_that_users_events_in_the_window() {
    let counting =
        Arc::new(Counting { inner: MemoryStore::new(), returned: AtomicUsize::new(0), users: Mutex::default() });
    let w = world_with(settings(), Some(counting.clone()));
    for i in 0..2000 {
        let draft = EventDraft::new(EventType::LoginSuccess).user(format!("crowd-{}", i % 50));
        w.security.log_event(draft).await.unwrap();
    }
    // An old event, outside a one-hour window.
    w.security
        .log_event(EventDraft::new(EventType::LoginSuccess).user("hana").ip(Some("192.0.2.1".into())))
        .await
        .unwrap();
    w.clock.advance(Duration::from_secs(2 * 3600));
    w.sessions.create(new_session("hana")).await.unwrap();
    let failure = EventDraft::new(EventType::LoginFailure).user("hana").ip(Some("198.51.100.9".into())).risk(0.6);
    w.security.log_event(failure).await.unwrap();
    counting.returned.store(0, Ordering::SeqCst);
    counting.users.lock().unwrap().clear();

    let summary = w.security.summary("hana", 1).await.unwrap();
    assert_eq!(summary.period_hours, 1);
    assert_eq!(summary.total_events, 2);
    assert_eq!(summary.failed_logins, 1);
    assert_eq!(summary.successful_logins, 0);
    assert_eq!(summary.suspicious_events, 1);
    assert_eq!(summary.active_sessions, 1);
    assert_eq!(summary.distinct_ips, 2);
    assert_eq!(summary.last_login_at, Some(START + 2 * 3600 * 1000));
    // The window's two events, plus the one newest login: nothing of the 2000 others.
    assert_eq!(counting.returned.load(Ordering::SeqCst), 3);
    assert_eq!(*counting.users.lock().unwrap(), BTreeSet::from(["hana".to_string()]));
    // 0 hours means 24: the old event is in.
    assert_eq!(w.security.summary("hana", 0).await.unwrap().total_events, 3);
}

#[tokio::test]
async fn events_are_paged_newest_first_and_purged_after_retention() {
    let w = world_with(SecuritySettings { event_retention: Duration::from_secs(3600), ..settings() }, None);
    for i in 0..7 {
        w.security.log_event(EventDraft::new(EventType::Logout).user("ivan").details(format!("{i}"))).await.unwrap();
        w.clock.advance(Duration::from_secs(60));
    }
    let mut list = ListEvents { user_id: "ivan".into(), page_size: 3, ..Default::default() };
    let mut seen = Vec::new();
    loop {
        let page = w.security.list_events(&list).await.unwrap();
        seen.extend(page.events.iter().map(|e| e.details.clone()));
        match page.next_page_token {
            Some(token) => list.page_token = Some(token),
            None => break,
        }
    }
    assert_eq!(seen, ["6", "5", "4", "3", "2", "1", "0"]);
    let bad = ListEvents { page_token: Some("!!".into()), ..list.clone() };
    assert!(matches!(w.security.list_events(&bad).await.unwrap_err(), Error::InvalidArgument { .. }));
    // A time range: [start, end).
    let ranged = ListEvents {
        user_id: "ivan".into(),
        start: Some(START + 60_000),
        end: Some(START + 180_000),
        page_size: 50,
        ..Default::default()
    };
    let got: Vec<String> =
        w.security.list_events(&ranged).await.unwrap().events.into_iter().map(|e| e.details).collect();
    assert_eq!(got, ["2", "1"]);
    // Retention one hour: after 1 h 5 min, the first five minutes' events are gone.
    w.clock.set(START + 3_600_000 + 5 * 60_000);
    w.security.cleanup().await.unwrap();
    let all = ListEvents { user_id: "ivan".into(), page_size: 50, ..Default::default() };
    assert_eq!(w.security.list_events(&all).await.unwrap().events.len(), 2);
}

#[test]
fn client_network_keys_are_exact_for_ipv4_and_the_64_for_ipv6() {
    let key = |ip: &str| client_network_key(ip.parse().unwrap());
    assert_eq!(key("192.0.2.1"), "192.0.2.1");
    assert_eq!(key("::ffff:192.0.2.1"), "192.0.2.1");
    assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::/64");
    assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
    assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    assert_eq!(key("::1"), "::/64");
    // Denial events name the network as their address, never as a user.
    assert_eq!(key_address("2001:db8:1:2::/64").as_deref(), Some("2001:db8:1:2::/64"));
    assert_eq!(key_address("192.0.2.1").as_deref(), Some("192.0.2.1"));
    assert_eq!(key_address("alice/64"), None);
    assert_eq!(key_address("alice"), None);
}
