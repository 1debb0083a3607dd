//! The backend-conformance suite: the same session tests, through `SessionManager` with a
//! manual clock, against every storage backend. A backend is added with one `conformance!` line.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use session_authority::clock::{Clock, ManualClock};
use session_authority::crypto::KeyRing;
use session_authority::security::events::{EventType, SecurityEvent, Severity};
use session_authority::security::limiter::Rule;
use session_authority::session::{
    Fingerprint, InvalidReason, NewSession, RequestContext, SessionManager, SessionRef, SessionSettings, SessionState,
    Validation,
};
use session_authority::store::{DynRateLimitStore, DynSecurityEventStore, DynSessionStore, EventQuery, Stores};

pub const START: i64 = 1_800_000_000_000;
const MINUTE: Duration = Duration::from_secs(60);

pub fn settings(cap: u32) -> SessionSettings {
    SessionSettings {
        idle_timeout: 30 * MINUTE,
        absolute_timeout: 480 * MINUTE,
        max_sessions_per_user: cap,
        device_validation: true,
        device_match_threshold: 0.8,
        idle_slide_step: MINUTE,
        tombstone_ttl: 24 * 60 * MINUTE,
        proactive_refresh: 5 * MINUTE,
    }
}

/// A backend under test: fresh stores, and whatever must live as long as them (temp dirs, servers).
pub struct Backend {
    pub store: DynSessionStore,
    pub limits: DynRateLimitStore,
    pub events: DynSecurityEventStore,
    pub _keep: Box<dyn std::any::Any + Send + Sync>,
}

impl Backend {
    pub fn new(stores: Stores, keep: impl std::any::Any + Send + Sync) -> Backend {
        Backend { store: stores.sessions, limits: stores.limits, events: stores.events, _keep: Box::new(keep) }
    }
}

pub fn manager(backend: &Backend, cap: u32, clock: &ManualClock) -> SessionManager {
    SessionManager::new(
        backend.store.clone(),
        Arc::new(KeyRing::new(&[42u8; 32], &[])),
        Arc::new(clock.clone()) as Arc<dyn Clock>,
        settings(cap),
    )
}

pub fn new_session(user: &str) -> NewSession {
    NewSession {
        user_id: user.into(),
        access_token: SecretString::from("upstream-access-token".to_string()),
        refresh_token: Some(SecretString::from("upstream-refresh-token".to_string())),
        expires_in: Some(Duration::from_secs(3600)),
        fingerprint: Some(laptop()),
        ip_address: Some("192.0.2.10".parse().unwrap()),
        user_agent: Some("UA/1".into()),
        provider: "local".into(),
        ..Default::default()
    }
}

pub fn laptop() -> Fingerprint {
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

fn ctx() -> RequestContext {
    RequestContext { fingerprint: Some(laptop()), ip_address: Some("192.0.2.10".parse().unwrap()), user_agent: None }
}

fn reason(v: &Validation) -> Option<InvalidReason> {
    match v {
        Validation::Valid { .. } => None,
        Validation::Invalid { reason, .. } => Some(*reason),
    }
}

fn token(created: &session_authority::session::Created) -> String {
    secrecy::ExposeSecret::expose_secret(&created.token).to_owned()
}

async fn active(m: &SessionManager, user: &str) -> usize {
    m.list_user(user, &[], 500, None).await.unwrap().sessions.len()
}

pub async fn create_and_validate(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let created = m.create(new_session("alice")).await.unwrap();
    assert!(created.evicted.is_empty());
    let s = &created.session;
    assert_eq!(s.state, SessionState::Active);
    assert_eq!(s.idle_expires_at, START + 30 * 60_000);
    assert_eq!(s.absolute_expires_at, START + 480 * 60_000);
    assert!(s.session_id.starts_with("ses_"));

    match m.validate(&token(&created), &ctx()).await.unwrap() {
        Validation::Valid { session, needs_refresh, .. } => {
            assert_eq!(session.session_id, s.session_id);
            assert!(!needs_refresh);
        }
        other => panic!("expected valid, got {other:?}"),
    }
    // An unknown token is not found, and a found session answers by id too.
    let unknown = m.validate("sat_0000_unknown", &ctx()).await.unwrap();
    assert_eq!(reason(&unknown), Some(InvalidReason::NotFound));
    assert_eq!(m.find(&SessionRef::Id(s.session_id.clone())).await.unwrap().user_id, "alice");
    // The upstream token is sealed, and opens to what was given.
    let stored = m.find(&SessionRef::Id(s.session_id.clone())).await.unwrap();
    assert!(!stored.tokens.access.contains("upstream-access-token"));
    let opened = m.open(&stored.tokens.access, &stored).unwrap();
    assert_eq!(secrecy::ExposeSecret::expose_secret(&opened), "upstream-access-token");

    // needs_refresh when the access token expires within the proactive window (5 minutes).
    let mut short = new_session("alice");
    short.expires_in = Some(6 * MINUTE);
    let short = m.create(short).await.unwrap();
    let needs = |v: Validation| match v {
        Validation::Valid { needs_refresh, .. } => needs_refresh,
        other => panic!("expected valid, got {other:?}"),
    };
    assert!(!needs(m.validate(&token(&short), &ctx()).await.unwrap()));
    clock.advance(MINUTE + Duration::from_secs(1));
    assert!(needs(m.validate(&token(&short), &ctx()).await.unwrap()));
}

pub async fn idle_expiry_slides_then_expires(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let created = m.create(new_session("bob")).await.unwrap();
    let t = token(&created);
    // Activity every 29 minutes keeps it alive well past the first idle deadline.
    for _ in 0..3 {
        clock.advance(29 * MINUTE);
        assert_eq!(reason(&m.validate(&t, &ctx()).await.unwrap()), None);
    }
    let slid = m.find(&SessionRef::Token(t.clone())).await.unwrap();
    assert_eq!(slid.idle_expires_at, START + (87 + 30) * 60_000);
    // A validation within the slide step writes nothing.
    clock.advance(Duration::from_secs(30));
    m.validate(&t, &ctx()).await.unwrap();
    assert_eq!(m.find(&SessionRef::Token(t.clone())).await.unwrap().idle_expires_at, slid.idle_expires_at);
    // 30 idle minutes after the last slide: expired, recorded, and final.
    clock.set(slid.idle_expires_at);
    match m.validate(&t, &ctx()).await.unwrap() {
        Validation::Invalid { reason, end_reason, .. } => {
            assert_eq!(reason, InvalidReason::Expired);
            assert_eq!(end_reason.as_deref(), Some("idle_timeout"));
        }
        other => panic!("expected expired, got {other:?}"),
    }
    let stored = m.find(&SessionRef::Token(t.clone())).await.unwrap();
    assert_eq!(stored.state, SessionState::Expired);
    let (after, already) = m.terminate(&SessionRef::Token(t), "user_logout").await.unwrap();
    assert!(already);
    assert_eq!(after.state, SessionState::Expired);
}

pub async fn absolute_expiry(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let mut new = new_session("carol");
    new.absolute_timeout = Some(60 * MINUTE);
    let t = token(&m.create(new).await.unwrap());
    for _ in 0..2 {
        clock.advance(25 * MINUTE);
        assert_eq!(reason(&m.validate(&t, &ctx()).await.unwrap()), None);
    }
    let s = m.find(&SessionRef::Token(t.clone())).await.unwrap();
    assert!(s.idle_expires_at <= s.absolute_expires_at, "the idle expiry never passes the absolute one");
    clock.set(START + 60 * 60_000);
    match m.validate(&t, &ctx()).await.unwrap() {
        Validation::Invalid { reason, end_reason, .. } => {
            assert_eq!(reason, InvalidReason::Expired);
            assert_eq!(end_reason.as_deref(), Some("absolute_timeout"));
        }
        other => panic!("expected expired, got {other:?}"),
    }
}

pub async fn cap_evicts_the_oldest(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let mut created = Vec::new();
    for _ in 0..7 {
        created.push(m.create(new_session("dave")).await.unwrap());
        clock.advance(Duration::from_secs(1));
    }
    assert!(created[..5].iter().all(|c| c.evicted.is_empty()));
    assert_eq!(created[5].evicted.len(), 1);
    assert_eq!(created[5].evicted[0].session_id, created[0].session.session_id);
    assert_eq!(created[6].evicted[0].session_id, created[1].session.session_id);
    assert_eq!(active(&m, "dave").await, 5);
    match m.validate(&token(&created[0]), &ctx()).await.unwrap() {
        Validation::Invalid { reason, end_reason, .. } => {
            assert_eq!(reason, InvalidReason::Terminated);
            assert_eq!(end_reason.as_deref(), Some("session_limit"));
        }
        other => panic!("expected terminated, got {other:?}"),
    }
    // Lowering the cap to 2 evicts as many as needed at once, oldest first.
    let strict = manager(&backend, 2, &clock);
    let newest = strict.create(new_session("dave")).await.unwrap();
    let evicted: Vec<&str> = newest.evicted.iter().map(|s| s.session_id.as_str()).collect();
    let expected: Vec<&str> = created[2..6].iter().map(|c| c.session.session_id.as_str()).collect();
    assert_eq!(evicted, expected);
    assert_eq!(active(&m, "dave").await, 2);
    // Other users are untouched.
    m.create(new_session("erin")).await.unwrap();
    assert_eq!(active(&m, "erin").await, 1);
    assert_eq!(active(&m, "dave").await, 2);
}

pub async fn concurrent_creates_respect_the_cap(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let m = m.clone();
            tokio::spawn(async move { m.create(new_session("frank")).await.unwrap() })
        })
        .collect();
    let mut evicted = 0;
    for task in tasks {
        evicted += task.await.unwrap().evicted.len();
    }
    assert_eq!(active(&m, "frank").await, 5);
    assert_eq!(evicted, 45);
    let all = m.list_user("frank", &[SessionState::Active, SessionState::Terminated], 500, None).await.unwrap();
    assert_eq!(all.sessions.len(), 50);
}

pub async fn device_mismatch(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let t = token(&m.create(new_session("gina")).await.unwrap());
    let mut phone = laptop();
    phone.platform = Some("iPhone".into());
    let request = RequestContext { fingerprint: Some(phone.clone()), ..ctx() };
    assert_eq!(reason(&m.validate(&t, &request).await.unwrap()), Some(InvalidReason::DeviceMismatch));
    // A mismatch refuses the request without ending the session.
    assert_eq!(reason(&m.validate(&t, &ctx()).await.unwrap()), None);
    let e = m.get(&SessionRef::Token(t.clone()), Some(&phone)).await.unwrap_err();
    assert!(matches!(e, session_authority::Error::FailedPrecondition(_)), "{e:?}");
    // Without a presented fingerprint there is nothing to compare.
    let bare = RequestContext { fingerprint: None, ..ctx() };
    assert_eq!(reason(&m.validate(&t, &bare).await.unwrap()), None);
}

pub async fn terminate_keeps_terminal_states(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let t = token(&m.create(new_session("hank")).await.unwrap());
    let (ended, already) = m.terminate(&SessionRef::Token(t.clone()), "user_logout").await.unwrap();
    assert!(!already);
    assert_eq!(ended.state, SessionState::Terminated);
    assert_eq!(ended.end_reason.as_deref(), Some("user_logout"));
    clock.advance(MINUTE);
    let (again, already) = m.terminate(&SessionRef::Token(t.clone()), "admin_termination").await.unwrap();
    assert!(already);
    assert_eq!(again.end_reason.as_deref(), Some("user_logout"));
    assert_eq!(again.ended_at, ended.ended_at);

    // A revoked session stays revoked: never rewritten to terminated or expired.
    let t2 = token(&m.create(new_session("hank")).await.unwrap());
    let s2 = m.find(&SessionRef::Token(t2.clone())).await.unwrap();
    m.end_session(&s2, SessionState::Revoked, "user_logout_all").await.unwrap();
    let (kept, already) = m.terminate(&SessionRef::Token(t2.clone()), "user_logout").await.unwrap();
    assert!(already);
    assert_eq!(kept.state, SessionState::Revoked);
    clock.advance(600 * MINUTE);
    match m.validate(&t2, &ctx()).await.unwrap() {
        Validation::Invalid { reason, end_reason, .. } => {
            assert_eq!(reason, InvalidReason::Revoked);
            assert_eq!(end_reason.as_deref(), Some("user_logout_all"));
        }
        other => panic!("expected revoked, got {other:?}"),
    }
    assert_eq!(m.find(&SessionRef::Token(t2)).await.unwrap().state, SessionState::Revoked);
}

pub async fn list_by_user_with_history_and_pages(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 10, &clock);
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(m.create(new_session("ivan")).await.unwrap());
        clock.advance(Duration::from_secs(1));
    }
    m.create(new_session("judy")).await.unwrap();
    m.terminate(&SessionRef::Token(token(&ids[0])), "user_logout").await.unwrap();

    let active_page = m.list_user("ivan", &[], 50, None).await.unwrap();
    assert_eq!(active_page.sessions.len(), 3);
    assert!(active_page.sessions.iter().all(|s| s.user_id == "ivan"));
    // Newest first.
    assert_eq!(active_page.sessions[0].session_id, ids[3].session.session_id);

    let history = m.list_user("ivan", &[SessionState::Terminated], 50, None).await.unwrap();
    assert_eq!(history.sessions.len(), 1);
    assert_eq!(history.sessions[0].session_id, ids[0].session.session_id);

    let first = m.list_user("ivan", &[], 2, None).await.unwrap();
    assert_eq!(first.sessions.len(), 2);
    let next = first.next_page_token.expect("a second page");
    let second = m.list_user("ivan", &[], 2, Some(&next)).await.unwrap();
    assert_eq!(second.sessions.len(), 1);
    assert!(second.next_page_token.is_none());
    assert_eq!(second.sessions[0].session_id, ids[1].session.session_id);
    assert!(m.list_user("nobody", &[], 50, None).await.unwrap().sessions.is_empty());
}

pub async fn update_merges_metadata(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let mut new = new_session("kate");
    new.metadata = BTreeMap::from([("a".to_string(), "1".to_string()), ("b".to_string(), "2".to_string())]);
    let t = token(&m.create(new).await.unwrap());
    let by = SessionRef::Token(t.clone());
    let merge = BTreeMap::from([("b".to_string(), "20".to_string()), ("c".to_string(), "3".to_string())]);
    let updated = m.update(&by, merge, &["a".to_string()], None).await.unwrap();
    assert_eq!(
        updated.metadata,
        BTreeMap::from([("b".to_string(), "20".to_string()), ("c".to_string(), "3".to_string())])
    );
    let stored = m.find(&by).await.unwrap();
    assert_eq!(stored.metadata, updated.metadata);
    assert_eq!(stored.version, 2);
    // Concurrent updates all land (compare-and-swap retries), none is lost.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let m = m.clone();
            let by = by.clone();
            tokio::spawn(async move {
                m.update(&by, BTreeMap::from([(format!("k{i}"), i.to_string())]), &[], None).await.unwrap()
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let stored = m.find(&by).await.unwrap();
    assert!((0..8).all(|i| stored.metadata.contains_key(&format!("k{i}"))), "{:?}", stored.metadata);
    m.terminate(&by, "user_logout").await.unwrap();
    assert!(m.update(&by, BTreeMap::new(), &[], None).await.is_err());
}

pub async fn cleanup_purges_only_what_expired(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let ended = token(&m.create(new_session("leo")).await.unwrap());
    let live = token(&m.create(new_session("leo")).await.unwrap());
    let forgotten = token(&m.create(new_session("leo")).await.unwrap());
    m.terminate(&SessionRef::Token(ended.clone()), "user_logout").await.unwrap();
    let before = backend.store.count().await.unwrap();
    assert_eq!(m.cleanup().await.unwrap(), 0, "nothing is due yet");

    // The tombstone outlives the session by the revocation TTL, then goes.
    clock.advance(23 * 60 * MINUTE);
    assert_eq!(m.cleanup().await.unwrap(), 0);
    assert_eq!(reason(&m.validate(&ended, &ctx()).await.unwrap()), Some(InvalidReason::Terminated));
    clock.advance(2 * 60 * MINUTE);
    assert_eq!(m.cleanup().await.unwrap(), 1);
    assert_eq!(backend.store.count().await.unwrap(), before - 1);
    assert_eq!(reason(&m.validate(&ended, &ctx()).await.unwrap()), Some(InvalidReason::NotFound));
    assert_eq!(m.list_user("leo", &[SessionState::Terminated], 50, None).await.unwrap().sessions.len(), 0);

    // The live session expired (idle) meanwhile; once recorded, its tombstone lasts the TTL.
    assert_eq!(reason(&m.validate(&live, &ctx()).await.unwrap()), Some(InvalidReason::Expired));
    let recorded = m.find(&SessionRef::Token(live.clone())).await.unwrap();
    assert_eq!(recorded.state, SessionState::Expired);

    // A session nobody looked at again is purged at its absolute expiry plus the TTL (32 h),
    // before the recorded expiry's tombstone (25 h + 24 h).
    clock.set(START + (480 + 24 * 60) * 60_000 - 1);
    assert_eq!(m.cleanup().await.unwrap(), 0);
    clock.advance(Duration::from_millis(1));
    assert_eq!(m.cleanup().await.unwrap(), 1);
    assert_eq!(reason(&m.validate(&forgotten, &ctx()).await.unwrap()), Some(InvalidReason::NotFound));
    assert_eq!(backend.store.count().await.unwrap(), before - 2);

    clock.set(recorded.ended_at.unwrap() + 24 * 60 * 60_000 - 1);
    assert_eq!(m.cleanup().await.unwrap(), 0);
    clock.advance(Duration::from_millis(1));
    assert_eq!(m.cleanup().await.unwrap(), 1);
    assert_eq!(backend.store.count().await.unwrap(), before - 3);
    let states = [SessionState::Expired, SessionState::Active, SessionState::Terminated];
    assert!(m.list_user("leo", &states, 50, None).await.unwrap().sessions.is_empty());
}

fn per_minute(limit: u32) -> Rule {
    Rule { name: "per_minute".into(), limit, period: MINUTE, burst: limit, backoff: None }
}

/// `n` concurrent checks of one key at `now`; returns how many were allowed.
async fn concurrent_checks(limits: &DynRateLimitStore, rule: &Rule, key: &str, n: usize, now: i64) -> usize {
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let (limits, rule, key) = (limits.clone(), rule.clone(), key.to_owned());
            tokio::spawn(async move { limits.check(&rule, &key, 1, now).await.unwrap().allowed })
        })
        .collect();
    let mut allowed = 0;
    for call in calls {
        allowed += usize::from(call.await.unwrap());
    }
    allowed
}

pub async fn limiter_is_exact_under_concurrency(backend: Backend) {
    let rule = per_minute(10);
    // 100 concurrent checks of one key against 10 per minute: exactly 10 pass.
    assert_eq!(concurrent_checks(&backend.limits, &rule, "alice", 100, START).await, 10);
    // Another key and another rule have their own allowance.
    assert_eq!(concurrent_checks(&backend.limits, &rule, "bob", 100, START).await, 10);
    let other = Rule { name: "other".into(), ..per_minute(3) };
    assert_eq!(concurrent_checks(&backend.limits, &other, "alice", 20, START).await, 3);
    // The allowance returns as the period passes: one unit per 6 s, all ten after a minute.
    assert_eq!(concurrent_checks(&backend.limits, &rule, "alice", 20, START + 5_999).await, 0);
    assert_eq!(concurrent_checks(&backend.limits, &rule, "alice", 20, START + 6_000).await, 1);
    assert_eq!(concurrent_checks(&backend.limits, &rule, "alice", 100, START + 6_000 + 60_000).await, 10);
    let d = backend.limits.check(&rule, "alice", 1, START + 66_000).await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.remaining, 0);
    assert_eq!(d.retry_after, Duration::from_secs(6));
}

pub async fn limiter_state_is_purged_when_it_no_longer_matters(backend: Backend) {
    let rule = per_minute(10);
    for key in ["a", "b", "c"] {
        backend.limits.check(&rule, key, 1, START).await.unwrap();
    }
    assert_eq!(concurrent_checks(&backend.limits, &rule, "d", 10, START).await, 10);
    // "a".."c" are forgettable after one interval; "d" only after the whole minute.
    assert_eq!(backend.limits.purge_limits(START, 100).await.unwrap(), 0);
    assert_eq!(backend.limits.purge_limits(START + 7_000, 100).await.unwrap(), 3);
    assert_eq!(backend.limits.purge_limits(START + 7_000, 100).await.unwrap(), 0);
    assert_eq!(backend.limits.purge_limits(START + 61_000, 100).await.unwrap(), 1);
    // A purged key starts afresh.
    assert_eq!(concurrent_checks(&backend.limits, &rule, "d", 20, START + 61_000).await, 10);
}

fn event(id: &str, event_type: EventType, user: Option<&str>, at: i64) -> SecurityEvent {
    SecurityEvent {
        event_id: id.into(),
        event_type,
        user_id: user.map(str::to_owned),
        session_id: Some(format!("ses_{id}")),
        ip_address: Some("192.0.2.1".into()),
        severity: Severity::Info,
        details: format!("event {id}"),
        risk_score: 0.25,
        metadata: BTreeMap::from([("k".to_string(), id.to_string())]),
        occurred_at: at,
    }
}

fn ids(events: &[SecurityEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event_id.as_str()).collect()
}

pub async fn events_are_listed_per_user_by_time_and_purged(backend: Backend) {
    let log = &backend.events;
    let t = |s: i64| START + s * 1000;
    for (id, kind, user, at) in [
        ("e1", EventType::SessionCreated, Some("alice"), t(1)),
        ("e2", EventType::LoginSuccess, Some("alice"), t(2)),
        ("e3", EventType::SessionCreated, Some("bob"), t(3)),
        ("e4", EventType::RateLimitExceeded, None, t(4)),
        ("e5", EventType::Logout, Some("alice"), t(5)),
        ("e6a", EventType::LoginFailure, Some("alice"), t(6)),
        ("e6b", EventType::LoginFailure, Some("alice"), t(6)),
    ] {
        log.append(&event(id, kind, user, at)).await.unwrap();
    }
    let query = |from: i64, until: i64| EventQuery {
        user_id: "alice".into(),
        from,
        until,
        limit: 100,
        ..EventQuery::default()
    };
    let all = log.user_events(&query(0, t(100))).await.unwrap();
    assert_eq!(ids(&all), ["e6b", "e6a", "e5", "e2", "e1"]);
    assert_eq!(all[4], event("e1", EventType::SessionCreated, Some("alice"), t(1)), "stored whole");
    // The range is [from, until).
    assert_eq!(ids(&log.user_events(&query(t(2), t(5))).await.unwrap()), ["e2"]);
    // Types filter; limit; resuming after a position (ties at one millisecond by id).
    let mut q = query(0, t(100));
    q.types = vec![EventType::LoginFailure, EventType::SessionCreated];
    assert_eq!(ids(&log.user_events(&q).await.unwrap()), ["e6b", "e6a", "e1"]);
    q.limit = 1;
    q.after = Some((t(6), "e6b".into()));
    assert_eq!(ids(&log.user_events(&q).await.unwrap()), ["e6a"]);
    q.after = Some((t(6), "e6a".into()));
    assert_eq!(ids(&log.user_events(&q).await.unwrap()), ["e1"]);
    // A resume position before the range selects nothing (and does not panic).
    let mut q = query(t(3), t(100));
    q.after = Some((t(1), "e1".into()));
    assert!(log.user_events(&q).await.unwrap().is_empty());
    q.after = Some((-5, String::new()));
    assert!(log.user_events(&q).await.unwrap().is_empty());
    // Other users and user-less events stay apart.
    let bob = log.user_events(&EventQuery { user_id: "bob".into(), ..query(0, t(100)) }).await.unwrap();
    assert_eq!(ids(&bob), ["e3"]);
    assert!(log.user_events(&EventQuery { user_id: "carol".into(), ..query(0, t(100)) }).await.unwrap().is_empty());
    // Purging removes events strictly before the cutoff, with their index entries.
    assert_eq!(log.purge_events(t(3), 100).await.unwrap(), 2);
    assert_eq!(log.purge_events(t(3), 100).await.unwrap(), 0);
    assert_eq!(ids(&log.user_events(&query(0, t(100))).await.unwrap()), ["e6b", "e6a", "e5"]);
    assert_eq!(log.purge_events(t(100), 2).await.unwrap(), 2);
    assert_eq!(log.purge_events(t(100), 100).await.unwrap(), 3);
    assert!(log.user_events(&query(0, t(100))).await.unwrap().is_empty());
}

/// Instantiates the suite for a backend.
#[macro_export]
macro_rules! conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            use $crate::conformance as suite;

            #[tokio::test]
            async fn create_and_validate() {
                suite::create_and_validate($make).await
            }
            #[tokio::test]
            async fn idle_expiry_slides_then_expires() {
                suite::idle_expiry_slides_then_expires($make).await
            }
            #[tokio::test]
            async fn absolute_expiry() {
                suite::absolute_expiry($make).await
            }
            #[tokio::test]
            async fn cap_evicts_the_oldest() {
                suite::cap_evicts_the_oldest($make).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_creates_respect_the_cap() {
                suite::concurrent_creates_respect_the_cap($make).await
            }
            #[tokio::test]
            async fn device_mismatch() {
                suite::device_mismatch($make).await
            }
            #[tokio::test]
            async fn terminate_keeps_terminal_states() {
                suite::terminate_keeps_terminal_states($make).await
            }
            #[tokio::test]
            async fn list_by_user_with_history_and_pages() {
                suite::list_by_user_with_history_and_pages($make).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn update_merges_metadata() {
                suite::update_merges_metadata($make).await
            }
            #[tokio::test]
            async fn cleanup_purges_only_what_expired() {
                suite::cleanup_purges_only_what_expired($make).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn limiter_is_exact_under_concurrency() {
                suite::limiter_is_exact_under_concurrency($make).await
            }
            #[tokio::test]
            async fn limiter_state_is_purged_when_it_no_longer_matters() {
                suite::limiter_state_is_purged_when_it_no_longer_matters($make).await
            }
            #[tokio::test]
            async fn events_are_listed_per_user_by_time_and_purged() {
                suite::events_are_listed_per_user_by_time_and_purged($make).await
            }
        }
    };
}

pub fn memory() -> Backend {
    Backend::new(Stores::of(session_authority::store::memory::MemoryStore::new()), ())
}

pub fn embedded() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = session_authority::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
    Backend::new(Stores::of(store), dir)
}

conformance!(memory_backend, crate::conformance::memory());
conformance!(embedded_backend, crate::conformance::embedded());
