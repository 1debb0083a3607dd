//! The backend-conformance suite: the same session tests, through `SessionManager` with a
//! manual clock, against every storage backend. A backend is added with one `conformance!` line.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use session_authority::clock::{Clock, ManualClock};
use session_authority::crypto::KeyRing;
use session_authority::revocation::{
    Cursor, RevocationEvent, RevocationKind, RevocationSettings, Revocations, UpstreamOutcome, WatchItem, WatchRequest,
};
use session_authority::security::events::{EventType, SecurityEvent, Severity};
use session_authority::security::limiter::Rule;
use session_authority::session::{
    Fingerprint, InvalidReason, NewSession, RequestContext, SessionManager, SessionRef, SessionSettings, SessionState,
    Validation,
};
use session_authority::store::{
    DynRateLimitStore, DynSecurityEventStore, DynSessionStore, DynTokenStore, EventQuery, LeaseOutcome, Stores,
};
use session_authority::token::{RefreshLease, RefreshRecord};

pub const START: i64 = 1_800_000_000_000;
const MINUTE: Duration = Duration::from_secs(60);

pub fn settings(cap: u32) -> SessionSettings {
    SessionSettings {
        idle_timeout: 30 * MINUTE,
        absolute_timeout: 480 * MINUTE,
        max_sessions_per_user: cap,
        device_validation: true,
        device_match_threshold: 0.8,
        device_fingerprint_required: true,
        idle_slide_step: MINUTE,
        tombstone_ttl: 24 * 60 * MINUTE,
        proactive_refresh: 5 * MINUTE,
        cleanup_interval: 15 * MINUTE,
    }
}

/// A backend under test: fresh stores, and whatever must live as long as them (temp dirs, servers).
pub struct Backend {
    pub store: DynSessionStore,
    pub limits: DynRateLimitStore,
    pub events: DynSecurityEventStore,
    pub tokens: DynTokenStore,
    pub _keep: Box<dyn std::any::Any + Send + Sync>,
}

impl Backend {
    pub fn new(stores: Stores, keep: impl std::any::Any + Send + Sync) -> Backend {
        Backend {
            store: stores.sessions,
            limits: stores.limits,
            events: stores.events,
            tokens: stores.tokens,
            _keep: Box::new(keep),
        }
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

pub fn ctx() -> RequestContext {
    RequestContext { fingerprint: Some(laptop()), ip_address: Some("192.0.2.10".parse().unwrap()), user_agent: None }
}

fn reason(v: &Validation) -> Option<InvalidReason> {
    match v {
        Validation::Valid { .. } => None,
        Validation::Invalid { reason, .. } => Some(*reason),
    }
}

pub fn token(created: &session_authority::session::Created) -> String {
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
    let opened = m.open(&stored.tokens.access, &stored, session_authority::crypto::TokenField::Access).unwrap();
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

/// Issue 17 point 5: a session nobody validates again is ended by the sweep when it times out
/// (recorded as expired, with the reason, once), not left active until it is purged; one that
/// was used in the meantime is looked at again at its new deadline.
pub async fn sweep_ends_sessions_that_timed_out_unused(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let idle = token(&m.create(new_session("iris")).await.unwrap());
    let busy = token(&m.create(new_session("iris")).await.unwrap());
    async fn stored(m: &SessionManager, t: &str) -> session_authority::session::SessionRecord {
        m.find(&SessionRef::Token(t.to_owned())).await.unwrap()
    }
    let mut short = new_session("iris");
    short.absolute_timeout = Some(60 * MINUTE);
    let capped = token(&m.create(short).await.unwrap());

    clock.advance(20 * MINUTE);
    assert_eq!(reason(&m.validate(&busy, &ctx()).await.unwrap()), None);
    assert_eq!(reason(&m.validate(&capped, &ctx()).await.unwrap()), None);
    clock.advance(9 * MINUTE);
    assert_eq!(m.expire_timed_out().await.unwrap(), 0, "nothing has timed out at 29 minutes");

    // 31 minutes: the unused session idled out; the two used at 20 minutes live on.
    clock.advance(2 * MINUTE);
    assert_eq!(m.expire_timed_out().await.unwrap(), 1);
    let ended = stored(&m, &idle).await;
    assert_eq!(ended.state, SessionState::Expired);
    assert_eq!(ended.end_reason.as_deref(), Some("idle_timeout"));
    assert_eq!(ended.ended_at, Some(clock.now()));
    assert_eq!(stored(&m, &busy).await.state, SessionState::Active);
    assert_eq!(m.expire_timed_out().await.unwrap(), 0, "an end is recorded once");

    // The used ones are found at their slid deadline (50 minutes) without another validation.
    clock.advance(15 * MINUTE);
    assert_eq!(reason(&m.validate(&capped, &ctx()).await.unwrap()), None, "slid to min(76, 60)");
    clock.set(START + 50 * 60_000);
    assert_eq!(m.expire_timed_out().await.unwrap(), 1);
    assert_eq!(stored(&m, &busy).await.state, SessionState::Expired);
    clock.set(START + 60 * 60_000);
    assert_eq!(m.expire_timed_out().await.unwrap(), 1);
    let capped = stored(&m, &capped).await;
    assert_eq!(capped.state, SessionState::Expired);
    assert_eq!(capped.end_reason.as_deref(), Some("absolute_timeout"));
    assert_eq!(m.expire_timed_out().await.unwrap(), 0);
    assert!(m.list_user("iris", &[], 50, None).await.unwrap().sessions.is_empty());

    // Time expiry appends no revocation event (watchers already know the deadlines), and the
    // tombstones are purged a TTL after the recorded end.
    assert!(log(&backend).await.is_empty());
    clock.set(ended.ended_at.unwrap() + 24 * 60 * 60_000);
    assert_eq!(m.cleanup().await.unwrap(), 1);
}

/// Issue 17 point 6: a session is found by the upstream tokens it holds and by those its last
/// two rotations replaced (six hashes at most), while it is stored; not by others.
pub async fn sessions_are_found_by_their_upstream_tokens(backend: Backend) {
    use session_authority::store::CasOutcome;

    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let created = m.create(new_session("uma")).await.unwrap().session;
    m.create(new_session("una")).await.unwrap();
    let by = |t: &str| SessionRef::Upstream(t.to_owned());
    let not_found = |r: session_authority::Result<session_authority::session::SessionRecord>| match r {
        Err(session_authority::Error::NotFound(message)) => message.contains("upstream token"),
        _ => false,
    };
    // Both sessions hold the same fixture tokens: the newest holder wins the index entry.
    assert_eq!(m.find(&by("upstream-refresh-token")).await.unwrap().user_id, "una");
    assert!(not_found(m.find(&by("not-a-token-anyone-holds")).await));

    let mut session = m.find(&SessionRef::Id(created.session_id.clone())).await.unwrap();
    for generation in 1..=3 {
        let (access, refresh) = (format!("access-{generation}"), format!("refresh-{generation}"));
        let mut next = session.clone();
        next.upstream_hashes =
            session_authority::session::upstream_hashes([access.as_str(), refresh.as_str()], &session.upstream_hashes);
        next.version = session.version + 1;
        assert!(matches!(backend.store.compare_and_swap(&next, session.version).await.unwrap(), CasOutcome::Swapped));
        session = m.find(&by(&access)).await.unwrap();
        assert_eq!(session.session_id, created.session_id);
    }
    assert_eq!(session.upstream_hashes.len(), 6);
    for t in ["access-1", "refresh-1", "access-2", "refresh-3"] {
        assert_eq!(m.find(&by(t)).await.unwrap().session_id, created.session_id, "{t}");
    }

    // An ended session is still found (IsRevoked answers by it); a purged one is not.
    m.terminate(&SessionRef::Id(created.session_id.clone()), "user_logout").await.unwrap();
    assert_eq!(m.find(&by("access-3")).await.unwrap().state, SessionState::Terminated);
    clock.advance(25 * 60 * MINUTE);
    assert!(m.cleanup().await.unwrap() >= 1);
    assert!(not_found(m.find(&by("access-3")).await));
}

// ---- Revocation: the log, the list and the feed, over every backend ----

pub fn revocations(m: &SessionManager) -> Revocations {
    Revocations::new(m.clone(), RevocationSettings::default())
}

async fn log(backend: &Backend) -> Vec<RevocationEvent> {
    backend.store.read_revocations(0, 100_000).await.unwrap().events
}

fn id(created: &session_authority::session::Created) -> String {
    created.session.session_id.clone()
}

pub async fn revoke_by_token_and_by_id(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let r = revocations(&m);
    let first = m.create(new_session("rita")).await.unwrap();
    let second = m.create(new_session("rita")).await.unwrap();

    let revoked = r.revoke_session(&SessionRef::Token(token(&first)), "user_logout", Some("rita")).await.unwrap();
    assert!(!revoked.already_ended);
    assert_eq!(revoked.session.state, SessionState::Revoked);
    assert_eq!(revoked.upstream, UpstreamOutcome::NotConfigured, "no provider client yet: said, not faked");
    let event = revoked.event.expect("a revocation event");
    assert_eq!((event.seq, event.kind), (1, RevocationKind::Revoked));
    assert_eq!((event.session_id.as_str(), event.user_id.as_str()), (id(&first).as_str(), "rita"));
    assert_eq!(event.revoked_by.as_deref(), Some("rita"));
    assert_eq!((event.revoked_at, event.expires_at), (START, START + 24 * 3600 * 1000));
    match m.validate(&token(&first), &ctx()).await.unwrap() {
        Validation::Invalid { reason, end_reason, .. } => {
            assert_eq!(reason, InvalidReason::Revoked);
            assert_eq!(end_reason.as_deref(), Some("user_logout"));
        }
        other => panic!("expected revoked, got {other:?}"),
    }
    assert_eq!(r.is_revoked(&id(&first)).await.unwrap(), Some(event.clone()));
    assert_eq!(r.is_revoked(&id(&second)).await.unwrap(), None);
    assert_eq!(r.is_revoked("ses_0000_unknown").await.unwrap(), None);

    // Again, by id: nothing changes and the earlier event is reported.
    clock.advance(MINUTE);
    let again = r.revoke_session(&SessionRef::Id(id(&first)), "admin", None).await.unwrap();
    assert!(again.already_ended);
    assert_eq!(again.event, Some(event));
    assert_eq!(log(&backend).await.len(), 1);

    let by_id = r.revoke_session(&SessionRef::Id(id(&second)), "admin_revocation", Some("ops")).await.unwrap();
    assert_eq!(by_id.event.unwrap().seq, 2);
    let missing = r.revoke_session(&SessionRef::Id("ses_0000_missing".into()), "x", None).await.unwrap_err();
    assert!(matches!(missing, session_authority::Error::NotFound(_)), "{missing:?}");
}

pub async fn revoke_all_but_the_current_session(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let r = revocations(&m);
    let mut sam = Vec::new();
    for _ in 0..3 {
        sam.push(m.create(new_session("sam")).await.unwrap());
        clock.advance(Duration::from_secs(1));
    }
    let tom = m.create(new_session("tom")).await.unwrap();
    let current = id(&sam[1]);

    let ids = r.revoke_user("sam", Some(&current), "user_logout_all", Some("sam")).await.unwrap();
    assert_eq!(ids, vec![id(&sam[0]), id(&sam[2])], "oldest first, the current one kept");
    assert_eq!(reason(&m.validate(&token(&sam[1]), &ctx()).await.unwrap()), None);
    for ended in [&sam[0], &sam[2]] {
        assert_eq!(reason(&m.validate(&token(ended), &ctx()).await.unwrap()), Some(InvalidReason::Revoked));
        assert!(r.is_revoked(&id(ended)).await.unwrap().is_some());
    }
    assert_eq!(reason(&m.validate(&token(&tom), &ctx()).await.unwrap()), None, "other users are untouched");
    // Nothing left to revoke but the kept one: a second call revokes nothing.
    assert!(r.revoke_user("sam", Some(&current), "user_logout_all", None).await.unwrap().is_empty());
    assert_eq!(log(&backend).await.len(), 2);
}

pub async fn revoking_a_user_revokes_each_active_session_once(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 10, &clock);
    let r = revocations(&m);
    let mut short = new_session("uma");
    short.absolute_timeout = Some(MINUTE);
    let timed_out = m.create(short).await.unwrap();
    let sessions: Vec<_> = futures_join(&m, "uma", 4).await;
    m.terminate(&SessionRef::Token(token(&sessions[0])), "user_logout").await.unwrap();
    clock.advance(2 * MINUTE);

    let ids = r.revoke_user("uma", None, "user_logout_all", Some("admin")).await.unwrap();
    let mut expected: Vec<String> = sessions[1..].iter().map(id).collect();
    let mut got = ids.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "active sessions only: not the terminated one, not the timed-out one");

    let events = log(&backend).await;
    assert_eq!(events.len(), 4, "one terminate event and one revocation per active session: {events:?}");
    assert_eq!(events[0].kind, RevocationKind::Terminated);
    let revoked: Vec<&RevocationEvent> = events[1..].iter().collect();
    assert!(revoked.iter().all(|e| e.kind == RevocationKind::Revoked && e.revoked_by.as_deref() == Some("admin")));
    let mut event_ids: Vec<String> = revoked.iter().map(|e| e.session_id.clone()).collect();
    event_ids.sort();
    assert_eq!(event_ids, expected);
    assert!(events.iter().all(|e| e.session_id != id(&timed_out)));
    // Sequence numbers are gap-free and in order.
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
}

async fn futures_join(m: &SessionManager, user: &str, n: usize) -> Vec<session_authority::session::Created> {
    let mut created = Vec::new();
    for _ in 0..n {
        created.push(m.create(new_session(user)).await.unwrap());
    }
    created
}

pub async fn every_end_but_time_expiry_appends_exactly_one_event(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 1, &clock);
    let r = revocations(&m);
    let terminated = m.create(new_session("vic")).await.unwrap();
    m.terminate(&SessionRef::Token(token(&terminated)), "user_logout").await.unwrap();
    let evicted = m.create(new_session("vic")).await.unwrap();
    let evictor = m.create(new_session("vic")).await.unwrap();
    assert_eq!(evictor.evicted.len(), 1);
    let hijacked = m.create(new_session("wes")).await.unwrap();
    m.end_as(&hijacked.session, RevocationKind::Hijack, "suspected_hijacking", None).await.unwrap();
    let refused = m.create(new_session("xia")).await.unwrap();
    m.end_as(&refused.session, RevocationKind::RefreshFailed, "invalid_grant", None).await.unwrap();
    let expiring = m.create(new_session("yan")).await.unwrap();
    // Ending an ended session appends nothing.
    m.end_as(&refused.session, RevocationKind::Revoked, "again", None).await.unwrap();
    m.terminate(&SessionRef::Token(token(&terminated)), "again").await.unwrap();
    // A plain time expiry, once recorded, is not on the list.
    clock.advance(31 * MINUTE);
    assert_eq!(reason(&m.validate(&token(&expiring), &ctx()).await.unwrap()), Some(InvalidReason::Expired));
    assert_eq!(m.find(&SessionRef::Token(token(&expiring))).await.unwrap().state, SessionState::Expired);

    let kinds: Vec<(String, RevocationKind, String)> =
        log(&backend).await.into_iter().map(|e| (e.session_id, e.kind, e.reason)).collect();
    assert_eq!(
        kinds,
        vec![
            (id(&terminated), RevocationKind::Terminated, "user_logout".into()),
            (id(&evicted), RevocationKind::Evicted, "session_limit".into()),
            (id(&hijacked), RevocationKind::Hijack, "suspected_hijacking".into()),
            (id(&refused), RevocationKind::RefreshFailed, "invalid_grant".into()),
        ]
    );
    assert_eq!(m.find(&SessionRef::Token(token(&refused))).await.unwrap().state, SessionState::Terminated);
    assert!(r.is_revoked(&id(&expiring)).await.unwrap().is_none());
    assert!(r.is_revoked(&id(&evicted)).await.unwrap().is_some());
}

pub async fn list_entries_expire_after_the_ttl(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let r = revocations(&m);
    let old = m.create(new_session("zoe")).await.unwrap();
    r.revoke_session(&SessionRef::Token(token(&old)), "user_logout", None).await.unwrap();
    let first_cursor = r.list(None, 10, None).await.unwrap().cursor;
    clock.advance(23 * 60 * MINUTE);
    let newer = m.create(new_session("zoe")).await.unwrap();
    r.revoke_session(&SessionRef::Token(token(&newer)), "user_logout", None).await.unwrap();
    assert_eq!(r.list(None, 10, None).await.unwrap().entries.len(), 2);
    assert_eq!(r.cleanup().await.unwrap(), 0, "nothing expired yet");

    // 24 h after the first revocation its entry leaves the list, even before cleanup runs.
    clock.set(START + 24 * 60 * 60_000 - 1);
    assert!(r.is_revoked(&id(&old)).await.unwrap().is_some());
    clock.advance(Duration::from_millis(1));
    assert!(r.is_revoked(&id(&old)).await.unwrap().is_none());
    let live = r.list(None, 10, None).await.unwrap();
    assert_eq!(live.entries.iter().map(|e| e.session_id.clone()).collect::<Vec<_>>(), vec![id(&newer)]);

    // Cleanup deletes it from the log; a cursor from before it is then out of range.
    assert_eq!(r.cleanup().await.unwrap(), 1);
    assert_eq!(log(&backend).await.len(), 1);
    let stale = Cursor { seq: 0, ..first_cursor.clone() };
    let e = r.feed().watch(WatchRequest { after: Some(stale), ..Default::default() }).await.err().unwrap();
    assert!(matches!(e, session_authority::Error::OutOfRange(_)), "{e:?}");
    // The first cursor itself (after the purged event) is still a valid resume point.
    assert!(r.feed().watch(WatchRequest { after: Some(first_cursor), ..Default::default() }).await.is_ok());
    clock.advance(24 * 60 * MINUTE);
    assert_eq!(r.cleanup().await.unwrap(), 1);
    assert!(r.list(None, 10, None).await.unwrap().entries.is_empty());
    assert!(r.is_revoked(&id(&newer)).await.unwrap().is_none());
}

/// An entry lives until max(end + list TTL, the session's absolute expiry): a denylist consumer
/// would otherwise treat the revoked session as live again while its token is still unexpired.
pub async fn list_entries_outlive_the_ttl_until_the_absolute_expiry(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 1, &clock);
    let r = revocations(&m);
    let long = |user: &str| NewSession { absolute_timeout: Some(72 * 60 * MINUTE), ..new_session(user) };
    let revoked = m.create(long("ivy")).await.unwrap();
    r.revoke_session(&SessionRef::Token(token(&revoked)), "user_logout", None).await.unwrap();
    let evicted = m.create(long("jon")).await.unwrap();
    assert_eq!(m.create(long("jon")).await.unwrap().evicted.len(), 1, "the cap of 1 evicts the first");
    let both = vec![id(&revoked), id(&evicted)];

    // Past end + TTL (24 h) the entries are still listed, and cleanup keeps them.
    clock.set(START + 24 * 60 * 60_000 + 60_000);
    for session in &both {
        let entry = r.is_revoked(session).await.unwrap();
        assert_eq!(entry.map(|e| e.expires_at), Some(START + 72 * 60 * 60_000), "{session}");
    }
    assert_eq!(r.cleanup().await.unwrap(), 0, "nothing expired before the absolute expiry");
    let listed: Vec<String> = r.list(None, 10, None).await.unwrap().entries.into_iter().map(|e| e.session_id).collect();
    assert_eq!(listed, both);
    // The tombstone is kept as long as its entry.
    assert_eq!(m.find(&SessionRef::Token(token(&revoked))).await.unwrap().state, SessionState::Revoked);

    // At the absolute expiry they leave the list; cleanup then purges them.
    clock.set(START + 72 * 60 * 60_000);
    for session in &both {
        assert!(r.is_revoked(session).await.unwrap().is_none(), "{session}");
    }
    assert!(r.list(None, 10, None).await.unwrap().entries.is_empty());
    assert_eq!(r.cleanup().await.unwrap(), 2);
}

pub async fn list_pages_share_the_snapshot_cursor(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 10, &clock);
    let r = revocations(&m);
    for user in ["ann", "ben", "ann", "ben", "ann"] {
        let created = m.create(new_session(user)).await.unwrap();
        r.revoke_session(&SessionRef::Token(token(&created)), "user_logout", None).await.unwrap();
    }
    let first = r.list(None, 2, None).await.unwrap();
    assert_eq!(first.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(first.cursor.seq, 5);
    // A revocation after the snapshot is not in its later pages: it comes through the watch.
    let late = m.create(new_session("ann")).await.unwrap();
    r.revoke_session(&SessionRef::Token(token(&late)), "user_logout", None).await.unwrap();
    let second = r.list(None, 2, first.next_page_token.as_deref()).await.unwrap();
    assert_eq!(second.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4]);
    let third = r.list(None, 2, second.next_page_token.as_deref()).await.unwrap();
    assert_eq!(third.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5]);
    assert!(third.next_page_token.is_none());
    assert!([&second.cursor, &third.cursor].iter().all(|c| **c == first.cursor));

    let ann = r.list(Some("ann"), 10, None).await.unwrap();
    assert_eq!(ann.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 3, 5, 6]);
    assert!(r.list(Some("nobody"), 10, None).await.unwrap().entries.is_empty());
    let bad = r.list(None, 2, Some("garbage")).await.unwrap_err();
    assert!(matches!(bad, session_authority::Error::InvalidArgument { .. }), "{bad:?}");
}

async fn next_event<S>(stream: &mut S) -> RevocationEvent
where
    S: futures_util::Stream<Item = session_authority::Result<WatchItem>> + Unpin,
{
    loop {
        let item = tokio::time::timeout(Duration::from_secs(10), futures_util::StreamExt::next(stream))
            .await
            .expect("an event within 10 s")
            .expect("the stream is open")
            .expect("no error");
        if let WatchItem::Event(cursor, event) = item {
            assert_eq!(cursor.seq, event.seq);
            return (*event).clone();
        }
    }
}

pub async fn watch_resumes_without_gap_or_duplicate(backend: Backend) {
    let clock = ManualClock::new(START);
    let m = manager(&backend, 10, &clock);
    let r = revocations(&m);
    let stop = tokio_util::sync::CancellationToken::new();
    let tailer = tokio::spawn(r.feed().clone().run(stop.clone()));
    let before = m.create(new_session("cid")).await.unwrap();
    r.revoke_session(&SessionRef::Token(token(&before)), "before", None).await.unwrap();

    // From now: the first message is a heartbeat at the head, and the earlier event is not sent.
    let mut watch = Box::pin(r.feed().watch(WatchRequest::default()).await.unwrap());
    match futures_util::StreamExt::next(&mut watch).await.unwrap().unwrap() {
        WatchItem::Heartbeat(cursor, _) => assert_eq!(cursor.seq, 1),
        other => panic!("expected the opening heartbeat, got {other:?}"),
    }
    let mut filtered =
        Box::pin(r.feed().watch(WatchRequest { user_id: Some("dan".into()), ..Default::default() }).await.unwrap());
    let mut ids = Vec::new();
    for user in ["cid", "dan", "cid"] {
        let created = m.create(new_session(user)).await.unwrap();
        ids.push(id(&created));
        r.revoke_session(&SessionRef::Token(token(&created)), "live", None).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_event(&mut watch).await);
    }
    assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3, 4]);
    assert_eq!(got.iter().map(|e| e.session_id.clone()).collect::<Vec<_>>(), ids);
    let dan = next_event(&mut filtered).await;
    assert_eq!((dan.seq, dan.user_id.as_str()), (3, "dan"));
    let last = r.cursor(got[1].seq);
    drop(watch);

    // Resume after event 3 while more happen: exactly 4, 5, 6, then live 7.
    for user in ["cid", "cid"] {
        let created = m.create(new_session(user)).await.unwrap();
        r.revoke_session(&SessionRef::Token(token(&created)), "while away", None).await.unwrap();
    }
    let mut resumed = Box::pin(r.feed().watch(WatchRequest { after: Some(last), ..Default::default() }).await.unwrap());
    let mut seqs = Vec::new();
    for _ in 0..3 {
        seqs.push(next_event(&mut resumed).await.seq);
    }
    let created = m.create(new_session("dan")).await.unwrap();
    r.revoke_session(&SessionRef::Token(token(&created)), "live again", None).await.unwrap();
    seqs.push(next_event(&mut resumed).await.seq);
    assert_eq!(seqs, vec![4, 5, 6, 7]);
    assert_eq!(next_event(&mut filtered).await.seq, 7, "the filtered stream skips other users' events");

    // Cursors of another log, or ahead of this one, are out of range.
    let foreign = Cursor { log_id: "0000000000000000".into(), seq: 1 };
    let e = r.feed().watch(WatchRequest { after: Some(foreign), ..Default::default() }).await.err().unwrap();
    assert!(matches!(e, session_authority::Error::LogReset(_)), "{e:?}");
    let e = r.feed().watch(WatchRequest { after: Some(r.cursor(99)), ..Default::default() }).await.err().unwrap();
    assert!(matches!(e, session_authority::Error::OutOfRange(_)), "{e:?}");
    stop.cancel();
    tailer.await.unwrap();
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

/// A create through the security log's observer stores the session and its `session_created`
/// event together (`SessionStore::create_recorded`), and an eviction still records its end.
pub async fn a_create_records_its_event_with_the_session(backend: Backend) {
    use session_authority::security::EventObserver;
    use session_authority::security::events::Recorder;
    let clock = ManualClock::new(START);
    let recorder = Recorder::new(backend.events.clone(), Arc::new(clock.clone()) as Arc<dyn Clock>);
    let m = manager(&backend, 1, &clock)
        .with_observer(Arc::new(EventObserver::new(recorder).recording_with_sessions(true)));
    let first = m.create(new_session("frank")).await.unwrap();
    clock.advance(Duration::from_secs(1));
    let second = m.create(new_session("frank")).await.unwrap();
    assert_eq!(second.evicted.len(), 1, "the cap of one evicts the first session");
    let stored = backend.store.get_by_id(&id(&second)).await.unwrap().expect("the second session is stored");
    assert_eq!(stored.user_id, "frank");
    let query = EventQuery { user_id: "frank".into(), from: 0, until: i64::MAX, limit: 100, ..EventQuery::default() };
    let events = backend.events.user_events(&query).await.unwrap();
    let of = |kind: EventType, session: &str| {
        events.iter().filter(|e| e.event_type == kind && e.session_id.as_deref() == Some(session)).count()
    };
    assert_eq!(of(EventType::SessionCreated, &id(&first)), 1, "{events:?}");
    assert_eq!(of(EventType::SessionCreated, &id(&second)), 1, "{events:?}");
    assert_eq!(of(EventType::SessionTerminated, &id(&first)), 1, "the eviction is recorded: {events:?}");
    let created = events.iter().find(|e| e.session_id.as_deref() == Some(id(&second).as_str())).unwrap();
    assert_eq!(created.occurred_at, START + 1000);
    assert_eq!(created.metadata.get("provider"), Some(&stored.provider));
    assert_eq!(events.len(), 3, "{events:?}");
}

/// The `session_create` limit decided with the create (in its transaction on the embedded
/// store): a refusal stores no session and records one `rate_limit_exceeded` event; other users
/// keep their own allowance.
pub async fn a_create_over_its_limit_stores_nothing(backend: Backend) {
    use session_authority::error::Error;
    use session_authority::security::events::Recorder;
    use session_authority::security::{EventObserver, Limiter};
    let clock = ManualClock::new(START);
    let clock_dyn = Arc::new(clock.clone()) as Arc<dyn Clock>;
    let recorder = Recorder::new(backend.events.clone(), clock_dyn.clone());
    let rule = Rule { name: "session_create".into(), ..per_minute(2) };
    let rules = BTreeMap::from([(rule.name.clone(), rule)]);
    let limiter = Limiter::new(true, rules, backend.limits.clone(), recorder.clone(), clock_dyn);
    let m = manager(&backend, 5, &clock)
        .with_limit_guard(Arc::new(limiter))
        .with_observer(Arc::new(EventObserver::new(recorder).recording_with_sessions(true)));
    m.create(new_session("gina")).await.unwrap();
    m.create(new_session("gina")).await.unwrap();
    let third = m.create(new_session("gina")).await;
    assert!(matches!(&third, Err(Error::RateLimited { rule, .. }) if rule == "session_create"), "{third:?}");
    assert_eq!(backend.store.list_user("gina").await.unwrap().len(), 2, "the refused create stored nothing");
    let query = EventQuery { user_id: "gina".into(), from: 0, until: i64::MAX, limit: 100, ..EventQuery::default() };
    let events = backend.events.user_events(&query).await.unwrap();
    let count = |kind: EventType| events.iter().filter(|e| e.event_type == kind).count();
    assert_eq!((count(EventType::SessionCreated), count(EventType::RateLimitExceeded)), (2, 1), "{events:?}");
    m.create(new_session("hal")).await.unwrap();
    // The allowance returns with time: one unit per 30 s.
    clock.advance(Duration::from_secs(30));
    m.create(new_session("gina")).await.unwrap();
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

fn lease(session: &str, holder: &str, expires_at: i64) -> RefreshLease {
    RefreshLease { session_id: session.into(), holder: holder.into(), version: 1, expires_at }
}

/// The upstream revocation queue's checkpoint (issue 16 point 5): absent until saved, then the
/// last value saved under its name, names kept apart.
pub async fn checkpoints_keep_the_last_value_per_name(backend: Backend) {
    let tokens = &backend.tokens;
    assert_eq!(tokens.checkpoint("upstream_revocations").await.unwrap(), None);
    tokens.save_checkpoint("upstream_revocations", "0123abcd0123abcd.7").await.unwrap();
    tokens.save_checkpoint("upstream_revocations", "0123abcd0123abcd.9").await.unwrap();
    tokens.save_checkpoint("other", "x.1").await.unwrap();
    assert_eq!(tokens.checkpoint("upstream_revocations").await.unwrap().as_deref(), Some("0123abcd0123abcd.9"));
    assert_eq!(tokens.checkpoint("other").await.unwrap().as_deref(), Some("x.1"));
}

pub async fn refresh_leases_are_exclusive_and_expire(backend: Backend) {
    let tokens = &backend.tokens;
    let now = START;
    assert_eq!(tokens.acquire_lease(&lease("s1", "a", now + 1000), now).await.unwrap(), LeaseOutcome::Acquired);
    match tokens.acquire_lease(&lease("s1", "b", now + 1000), now).await.unwrap() {
        LeaseOutcome::Held(held) => assert_eq!(held.holder, "a"),
        other => panic!("{other:?}"),
    }
    // Another session is independent.
    assert_eq!(tokens.acquire_lease(&lease("s2", "b", now + 1000), now).await.unwrap(), LeaseOutcome::Acquired);
    // Only the holder renews; a renewal never shortens.
    assert!(!tokens.renew_lease("s1", "b", now + 5000, now + 10).await.unwrap());
    assert!(tokens.renew_lease("s1", "a", now + 2000, now + 10).await.unwrap());
    assert!(matches!(
        tokens.acquire_lease(&lease("s1", "b", now + 3000), now + 1500).await.unwrap(),
        LeaseOutcome::Held(_)
    ));
    // Releasing someone else's lease does nothing.
    tokens.release_lease("s1", "b").await.unwrap();
    assert!(matches!(
        tokens.acquire_lease(&lease("s1", "b", now + 3000), now + 1500).await.unwrap(),
        LeaseOutcome::Held(_)
    ));
    // Expired: another holder takes it, and the old holder can neither renew nor release it.
    assert_eq!(tokens.acquire_lease(&lease("s1", "b", now + 5000), now + 2000).await.unwrap(), LeaseOutcome::Acquired);
    assert!(!tokens.renew_lease("s1", "a", now + 9000, now + 2001).await.unwrap());
    tokens.release_lease("s1", "a").await.unwrap();
    assert!(matches!(
        tokens.acquire_lease(&lease("s1", "c", now + 6000), now + 2002).await.unwrap(),
        LeaseOutcome::Held(_)
    ));
    tokens.release_lease("s1", "b").await.unwrap();
    assert_eq!(tokens.acquire_lease(&lease("s1", "c", now + 6000), now + 2003).await.unwrap(), LeaseOutcome::Acquired);

    // Concurrent acquisitions of a free lease: exactly one wins.
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let tokens = tokens.clone();
            tokio::spawn(
                async move { tokens.acquire_lease(&lease("s3", &format!("h{i}"), now + 1000), now).await.unwrap() },
            )
        })
        .collect();
    let mut acquired = 0;
    for task in tasks {
        acquired += usize::from(task.await.unwrap() == LeaseOutcome::Acquired);
    }
    assert_eq!(acquired, 1);
}

fn refresh_record(session: &str, at: i64, expires_at: i64) -> RefreshRecord {
    RefreshRecord {
        record_id: format!("rr_{at:013}_{session}"),
        session_id: session.into(),
        user_id: "u".into(),
        refreshed_at: at,
        reason: "proactive".into(),
        success: true,
        error: None,
        cause: None,
        rotated: true,
        old_access_token_hash: "a".repeat(64),
        new_access_token_hash: Some("b".repeat(64)),
        old_refresh_token_hash: Some("c".repeat(64)),
        new_refresh_token_hash: Some("d".repeat(64)),
        old_expires_at: Some(at),
        new_expires_at: Some(at + 60_000),
        attempts: 1,
        grace_period_ends_at: Some(at + 300_000),
        expires_at,
    }
}

pub async fn refresh_records_are_newest_first_trimmed_and_purged(backend: Backend) {
    let tokens = &backend.tokens;
    for i in 0..5 {
        tokens.append_refresh_record(&refresh_record("s1", START + i, START + 10_000), 3).await.unwrap();
    }
    tokens.append_refresh_record(&refresh_record("s2", START, START + 20_000), 3).await.unwrap();
    let history = tokens.refresh_history("s1", 10).await.unwrap();
    let times: Vec<i64> = history.iter().map(|r| r.refreshed_at - START).collect();
    assert_eq!(times, vec![4, 3, 2], "newest first, trimmed to the newest 3");
    assert_eq!(history[0], refresh_record("s1", START + 4, START + 10_000), "stored as written");
    assert_eq!(tokens.refresh_history("s1", 1).await.unwrap().len(), 1);
    assert!(tokens.refresh_history("nobody", 10).await.unwrap().is_empty());
    // Purging walks the expiry index: s1's records go at their expiry, s2's later.
    assert_eq!(tokens.purge_refresh_records(START + 9_999, 100).await.unwrap(), 0);
    assert_eq!(tokens.purge_refresh_records(START + 10_000, 100).await.unwrap(), 3);
    assert!(tokens.refresh_history("s1", 10).await.unwrap().is_empty());
    assert_eq!(tokens.refresh_history("s2", 10).await.unwrap().len(), 1);
    assert_eq!(tokens.purge_refresh_records(START + 20_000, 100).await.unwrap(), 1);
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
            #[tokio::test]
            async fn sweep_ends_sessions_that_timed_out_unused() {
                suite::sweep_ends_sessions_that_timed_out_unused($make).await
            }
            #[tokio::test]
            async fn sessions_are_found_by_their_upstream_tokens() {
                suite::sessions_are_found_by_their_upstream_tokens($make).await
            }
            #[tokio::test]
            async fn revoke_by_token_and_by_id() {
                suite::revoke_by_token_and_by_id($make).await
            }
            #[tokio::test]
            async fn revoke_all_but_the_current_session() {
                suite::revoke_all_but_the_current_session($make).await
            }
            #[tokio::test]
            async fn revoking_a_user_revokes_each_active_session_once() {
                suite::revoking_a_user_revokes_each_active_session_once($make).await
            }
            #[tokio::test]
            async fn every_end_but_time_expiry_appends_exactly_one_event() {
                suite::every_end_but_time_expiry_appends_exactly_one_event($make).await
            }
            #[tokio::test]
            async fn list_entries_expire_after_the_ttl() {
                suite::list_entries_expire_after_the_ttl($make).await
            }
            #[tokio::test]
            async fn list_entries_outlive_the_ttl_until_the_absolute_expiry() {
                suite::list_entries_outlive_the_ttl_until_the_absolute_expiry($make).await
            }
            #[tokio::test]
            async fn list_pages_share_the_snapshot_cursor() {
                suite::list_pages_share_the_snapshot_cursor($make).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn watch_resumes_without_gap_or_duplicate() {
                suite::watch_resumes_without_gap_or_duplicate($make).await
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
            async fn a_create_over_its_limit_stores_nothing() {
                suite::a_create_over_its_limit_stores_nothing($make).await
            }
            #[tokio::test]
            async fn a_create_records_its_event_with_the_session() {
                suite::a_create_records_its_event_with_the_session($make).await
            }
            #[tokio::test]
            async fn events_are_listed_per_user_by_time_and_purged() {
                suite::events_are_listed_per_user_by_time_and_purged($make).await
            }
            #[tokio::test]
            async fn checkpoints_keep_the_last_value_per_name() {
                suite::checkpoints_keep_the_last_value_per_name($make).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn refresh_leases_are_exclusive_and_expire() {
                suite::refresh_leases_are_exclusive_and_expire($make).await
            }
            #[tokio::test]
            async fn refresh_records_are_newest_first_trimmed_and_purged() {
                suite::refresh_records_are_newest_first_trimmed_and_purged($make).await
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

#[tokio::test]
async fn the_embedded_log_survives_a_reopen_with_its_cursors() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let (log_id, ids) = {
        let store = session_authority::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let backend = Backend::new(Stores::of(store), ());
        let m = manager(&backend, 5, &clock);
        let r = revocations(&m);
        let mut ids = Vec::new();
        for _ in 0..3 {
            let created = m.create(new_session("eve")).await.unwrap();
            r.revoke_session(&SessionRef::Token(token(&created)), "user_logout", None).await.unwrap();
            ids.push(id(&created));
        }
        (backend.store.log_id().to_owned(), ids)
    };
    let store = session_authority::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
    let backend = Backend::new(Stores::of(store), ());
    assert_eq!(backend.store.log_id(), log_id, "cursors stay valid across restarts");
    let events = log(&backend).await;
    assert_eq!(events.iter().map(|e| e.session_id.clone()).collect::<Vec<_>>(), ids);
    // Sequence numbers continue after the restart.
    let m = manager(&backend, 5, &clock);
    let created = m.create(new_session("eve")).await.unwrap();
    let event = revocations(&m).revoke_session(&SessionRef::Token(token(&created)), "x", None).await.unwrap();
    assert_eq!(event.event.unwrap().seq, 4);
    // A fresh database is another log: the old cursors are foreign to it.
    let other = tempfile::tempdir().unwrap();
    let fresh = session_authority::store::embedded::EmbeddedStore::open(other.path()).unwrap();
    assert_ne!(session_authority::store::RevocationLog::log_id(&fresh), log_id);
}

/// The per-rule key bound of the backends that hold limiter state themselves (memory,
/// embedded; issue 16 point 11), with a manual clock: a new key past the bound is refused by
/// check and peek alike, held keys keep their exact state, another rule is not affected, and
/// state that decides nothing any more makes room.
async fn the_limiter_key_bound_refuses_new_keys_and_keeps_held_ones(limits: DynRateLimitStore) {
    let rule = per_minute(2);
    let other = Rule { name: "other".into(), ..per_minute(2) };
    for key in ["a", "b", "c"] {
        assert!(limits.check(&rule, key, 1, START).await.unwrap().allowed);
    }
    assert!(limits.check(&rule, "c", 1, START).await.unwrap().allowed);
    let refused = limits.check(&rule, "d", 1, START).await.unwrap();
    assert!(!refused.allowed && refused.key_refused && refused.retry_after == MINUTE, "{refused:?}");
    assert!(limits.peek(&rule, "d", 1, START).await.unwrap().key_refused);
    assert!(limits.check(&other, "d", 1, START).await.unwrap().allowed);
    // Held keys: "a" has one unit left, "c" none; no flood changes that.
    for i in 0..50 {
        assert!(limits.check(&rule, &format!("flood-{i}"), 1, START + 1).await.unwrap().key_refused);
    }
    assert!(limits.check(&rule, "a", 1, START + 1).await.unwrap().allowed);
    let c = limits.check(&rule, "c", 1, START + 1).await.unwrap();
    assert!(!c.allowed && !c.key_refused, "{c:?}");
    // "b" spent one unit at START: its state decides nothing after 30 s; then "d" gets its slot.
    assert!(limits.check(&rule, "d", 1, START + 29_000).await.unwrap().key_refused);
    let d = limits.check(&rule, "d", 1, START + 30_001).await.unwrap();
    assert!(d.allowed && d.remaining == 1, "{d:?}");
    assert!(limits.check(&rule, "e", 1, START + 30_001).await.unwrap().key_refused);
}

#[tokio::test]
async fn the_memory_limiter_key_bound_refuses_new_keys_and_keeps_held_ones() {
    let store = session_authority::store::memory::MemoryStore::new().with_max_limiter_keys(3);
    the_limiter_key_bound_refuses_new_keys_and_keeps_held_ones(Arc::new(store)).await;
}

#[tokio::test]
async fn the_embedded_limiter_key_bound_refuses_new_keys_and_holds_across_a_reopen() {
    use session_authority::store::RateLimitStore as _;
    use session_authority::store::embedded::EmbeddedStore;
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap().with_max_limiter_keys(3);
    the_limiter_key_bound_refuses_new_keys_and_keeps_held_ones(Arc::new(store)).await;
    let rule = per_minute(2);
    let later = START + 30_001;
    // The counts are stored: after a reopen the rule is still full ("a", "c", "d").
    let store = EmbeddedStore::open(dir.path()).unwrap().with_max_limiter_keys(3);
    assert!(store.check(&rule, "f", 1, later).await.unwrap().key_refused);
    drop(store);
    // A database from before the counts (the table absent) has them rebuilt on open.
    {
        let db = redb::Database::open(dir.path().join("sessions.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        let counts: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("rate_limit_counts");
        assert!(tx.delete_table(counts).unwrap());
        tx.commit().unwrap();
    }
    let store = EmbeddedStore::open(dir.path()).unwrap().with_max_limiter_keys(3);
    assert!(store.check(&rule, "f", 1, later).await.unwrap().key_refused);
    drop(store);
    let store = EmbeddedStore::open(dir.path()).unwrap().with_max_limiter_keys(4);
    assert!(store.check(&rule, "f", 1, later).await.unwrap().allowed);
}

/// How long a shared-storage operation may take in the suite: generous, since the tests of
/// one binary share two cores and these servers.
const SHARED_TIMEOUT: Duration = Duration::from_secs(5);

pub fn redis() -> Backend {
    let server = crate::servers::shared_redis();
    let prefix = crate::servers::unique_prefix("redis");
    let store = session_authority::store::redis::open(&server.url(), &prefix, SHARED_TIMEOUT).unwrap();
    Backend::new(Stores::of(store), ())
}

pub fn redis_cluster() -> Backend {
    let cluster = crate::servers::shared_cluster();
    let prefix = crate::servers::unique_prefix("cluster");
    let store = session_authority::store::redis::open(&cluster.url(), &prefix, SHARED_TIMEOUT).unwrap();
    Backend::new(Stores::of(store), ())
}

pub fn kv_rest() -> Backend {
    let shim = crate::servers::shared_kv_rest();
    let prefix = crate::servers::unique_prefix("kv");
    let token = SecretString::from(shim.token.clone());
    let store = session_authority::store::kv_rest::open(&shim.url, &token, &prefix, SHARED_TIMEOUT).unwrap();
    Backend::new(Stores::of(store), ())
}

/// Redis writing binary records (`redis.record_format = "binary"`): the `~`-prefixed base64
/// form through the scripts, which override fields beside it without reading it.
pub fn redis_binary() -> Backend {
    let server = crate::servers::shared_redis();
    let prefix = crate::servers::unique_prefix("redis-bin");
    let store = session_authority::store::redis::open(&server.url(), &prefix, SHARED_TIMEOUT)
        .unwrap()
        .with_record_format(session_authority::model::RecordFormat::Binary);
    Backend::new(Stores::of(store), ())
}

conformance!(redis_backend, crate::conformance::redis());
conformance!(redis_binary_backend, crate::conformance::redis_binary());
conformance!(redis_cluster_backend, crate::conformance::redis_cluster());
conformance!(kv_rest_backend, crate::conformance::kv_rest());

/// The Redis key of the session record under `prefix` whose token hash is `hash_hex` (`*`: the
/// first record found).
fn record_key(server: &crate::servers::SharedRedis, prefix: &str, hash_hex: &str) -> String {
    let keys = server.cli(&["--scan", "--pattern", &format!("{prefix}*:s:{hash_hex}")]);
    keys.lines().next().unwrap_or_else(|| panic!("no record key under {prefix}")).to_owned()
}

/// Issue 16 point 15a on Redis: a field a newer replica wrote into the record's `doc` survives
/// this build's compare-and-swap (UpdateSession) and end (terminate).
#[tokio::test]
async fn redis_records_keep_fields_a_newer_replica_wrote() {
    let server = crate::servers::shared_redis();
    let prefix = crate::servers::unique_prefix("redis-newer");
    let store = session_authority::store::redis::open(&server.url(), &prefix, SHARED_TIMEOUT).unwrap();
    let backend = Backend::new(Stores::of(store), ());
    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let t = token(&m.create(new_session("nora")).await.unwrap());
    let by = SessionRef::Token(t);
    let cli = |args: &[&str]| server.cli(args);
    let key = record_key(server, &prefix, "*");
    let doc_of = |key: &str| -> serde_json::Value { serde_json::from_str(cli(&["hget", key, "doc"]).trim()).unwrap() };
    let mut doc = doc_of(&key);
    doc["future_field"] = serde_json::json!({"kept": true});
    cli(&["hset", &key, "doc", &doc.to_string()]);

    m.update(&by, BTreeMap::from([("a".to_string(), "1".to_string())]), &[], None).await.unwrap();
    let doc = doc_of(&key);
    assert_eq!(doc["future_field"], serde_json::json!({"kept": true}), "after compare-and-swap: {doc}");
    assert_eq!(m.find(&by).await.unwrap().metadata.get("a").map(String::as_str), Some("1"));
    m.terminate(&by, "user_logout").await.unwrap();
    let doc = doc_of(&key);
    assert_eq!(doc["future_field"], serde_json::json!({"kept": true}), "after end: {doc}");
}

/// Records of both formats coexist on one Redis: a replica writing binary stores `~` and base64
/// in `doc`, and a replica still writing JSON reads, updates and ends that session (and the
/// binary one reads the JSON rewrite).
#[tokio::test]
async fn redis_binary_and_json_replicas_read_each_others_records() {
    let server = crate::servers::shared_redis();
    let prefix = crate::servers::unique_prefix("redis-mixed");
    let open = |format| {
        let store = session_authority::store::redis::open(&server.url(), &prefix, SHARED_TIMEOUT).unwrap();
        Backend::new(Stores::of(store.with_record_format(format)), ())
    };
    let (binary, json) =
        (open(session_authority::model::RecordFormat::Binary), open(session_authority::model::RecordFormat::Json));
    let clock = ManualClock::new(START);
    let (writer, reader) = (manager(&binary, 5, &clock), manager(&json, 5, &clock));
    let by = SessionRef::Token(token(&writer.create(new_session("mia")).await.unwrap()));
    let cli = |args: &[&str]| server.cli(args);
    let key = record_key(server, &prefix, "*");
    assert!(cli(&["hget", &key, "doc"]).starts_with('~'), "a binary writer stores `~` and base64");

    reader.update(&by, BTreeMap::from([("a".to_string(), "1".to_string())]), &[], None).await.unwrap();
    assert!(cli(&["hget", &key, "doc"]).starts_with('{'), "the JSON writer's swap rewrote it as JSON");
    assert_eq!(writer.find(&by).await.unwrap().metadata.get("a").map(String::as_str), Some("1"));
    reader.terminate(&by, "user_logout").await.unwrap();
    assert!(!writer.find(&by).await.unwrap().is_active_at(START));
}

/// Issue 16 point 15b on Redis: a sealed upstream token is bound to its session and its field.
/// Someone who can write the store (a Redis user, a backup restored by hand) and copies one
/// session's ciphertext into another session's record, or a refresh token's into the access
/// field, gets a token that does not open: never another session's or another field's secret.
#[tokio::test]
async fn redis_ciphertexts_moved_between_sessions_or_fields_do_not_open() {
    use session_authority::crypto::TokenField;

    let server = crate::servers::shared_redis();
    let prefix = crate::servers::unique_prefix("redis-aad");
    let store = session_authority::store::redis::open(&server.url(), &prefix, SHARED_TIMEOUT).unwrap();
    let backend = Backend::new(Stores::of(store), ());
    let clock = ManualClock::new(START);
    let m = manager(&backend, 5, &clock);
    let with_access = |user: &str, access: &str| NewSession {
        access_token: SecretString::from(access.to_string()),
        ..new_session(user)
    };
    let a = m.create(with_access("ada", "access-of-ada")).await.unwrap();
    let b = m.create(with_access("bob", "access-of-bob")).await.unwrap();
    let cli = |args: &[&str]| server.cli(args);
    let key_of = |created: &session_authority::session::Created| {
        record_key(server, &prefix, &hex::encode(created.session.token_hash))
    };
    let (key_a, key_b) = (key_of(&a), key_of(&b));
    let doc_of = |key: &str| -> serde_json::Value { serde_json::from_str(cli(&["hget", key, "doc"]).trim()).unwrap() };
    let by_b = SessionRef::Token(token(&b));
    let open = |record: &session_authority::session::SessionRecord, sealed: &str, field| {
        m.open(sealed, record, field).map(|s| secrecy::ExposeSecret::expose_secret(&s).to_owned())
    };

    // Untouched, bob's record opens to bob's token.
    let stored = m.find(&by_b).await.unwrap();
    assert_eq!(open(&stored, &stored.tokens.access, TokenField::Access).unwrap(), "access-of-bob");

    // Ada's access ciphertext in bob's record: it does not open there.
    let mut doc = doc_of(&key_b);
    let ada_access = doc_of(&key_a)["tokens"]["access"].clone();
    doc["tokens"]["access"] = ada_access;
    cli(&["hset", &key_b, "doc", &doc.to_string()]);
    let stored = m.find(&by_b).await.unwrap();
    let e = open(&stored, &stored.tokens.access, TokenField::Access).unwrap_err();
    assert!(e.to_string().contains("failed authentication"), "{e}");

    // Bob's own refresh ciphertext in his access field: it does not open as an access token.
    let mut doc = doc_of(&key_b);
    doc["tokens"]["access"] = doc["tokens"]["refresh"].clone();
    cli(&["hset", &key_b, "doc", &doc.to_string()]);
    let stored = m.find(&by_b).await.unwrap();
    let e = open(&stored, &stored.tokens.access, TokenField::Access).unwrap_err();
    assert!(e.to_string().contains("failed authentication"), "{e}");
    let refresh = stored.tokens.refresh.as_deref().expect("bob has a refresh token");
    assert_eq!(open(&stored, refresh, TokenField::Refresh).unwrap(), "upstream-refresh-token");
}
