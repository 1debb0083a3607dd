//! Faults through the real binary (issue 11): SIGKILL in the middle of a write burst on the
//! embedded store. (A Redis outage under load is `shared_storage::a_redis_outage_under_load_...`;
//! a kill after the writes completed is `sessions::acknowledged_sessions_survive_sigkill`;
//! provider faults are in `tokens`.)

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use session_authority::grpc::pb;

use crate::support::{ADMIN_KEY, Process, SERVICE_KEY, Spawn, WATCHER_KEY};

const IP: &str = "198.51.100.7";

fn create(user: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        user_id: user.into(),
        access_token: "upstream-access".into(),
        expires_in: Some(prost_types::Duration { seconds: 3600, nanos: 0 }),
        ip_address: IP.into(),
        ..Default::default()
    }
}

fn validate(token: &str) -> pb::ValidateSessionRequest {
    pb::ValidateSessionRequest { session_token: token.into(), ip_address: IP.into(), ..Default::default() }
}

fn seq(cursor: &str) -> u64 {
    cursor.rsplit_once('.').and_then(|(_, n)| n.parse().ok()).unwrap_or_else(|| panic!("not a cursor: {cursor}"))
}

// ---------------------------------------------------------------------------------------------
// SIGKILL during a write burst (embedded store)
// ---------------------------------------------------------------------------------------------

/// How a session ended, as far as the test knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Active,
    Terminated,
    Revoked,
}

impl Fate {
    fn state(self) -> pb::SessionState {
        match self {
            Fate::Active => pb::SessionState::Active,
            Fate::Terminated => pb::SessionState::Terminated,
            Fate::Revoked => pb::SessionState::Revoked,
        }
    }
}

/// One session whose create was acknowledged, and what happened to it since.
#[derive(Debug, Clone)]
struct Tracked {
    token: String,
    id: String,
    user: String,
    /// The last acknowledged state.
    fate: Fate,
    /// An end sent but not answered when the server died: it may or may not have committed.
    ending: Option<Fate>,
    /// The last acknowledged value of the metadata counter `n` (0: never updated).
    updates: u32,
    /// An update to `updates + 1` sent but not answered when the server died.
    updating: bool,
}

/// What one writer saw in one round.
#[derive(Debug, Default)]
struct Writer {
    sessions: Vec<Tracked>,
    /// The user of a create sent but not answered when the server died.
    creating: Option<String>,
    acks: BTreeMap<&'static str, usize>,
}

/// Writes as fast as one client can until the server dies: creates (5 of 8 operations),
/// terminates, revokes and metadata updates of its own sessions, each sequential, so at most one
/// operation of this writer is in flight when the kill lands. An error before `killed` is set is
/// a real failure.
async fn writer(
    server: &Process,
    round: usize,
    lane: usize,
    acks: Arc<AtomicUsize>,
    killed: Arc<AtomicBool>,
) -> Writer {
    let mut sessions_client = server.sessions(Some(SERVICE_KEY)).await;
    let mut revocations_client = server.revocations(Some(SERVICE_KEY)).await;
    let mut out = Writer::default();
    let mut live: Vec<usize> = Vec::new();
    let fail = |op: &str, e: tonic::Status| {
        assert!(killed.load(Ordering::SeqCst), "round {round} lane {lane}: {op} failed before the kill: {e:?}");
    };
    let mut step = 0usize;
    loop {
        step += 1;
        let op = match step % 8 {
            3 if !live.is_empty() => "terminate",
            5 if !live.is_empty() => "revoke",
            7 if !live.is_empty() => "update",
            _ => "create",
        };
        match op {
            "create" => {
                let user = format!("burst-r{round}-l{lane}-u{}", step % 3);
                out.creating = Some(user.clone());
                match sessions_client.create_session(create(&user)).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        out.creating = None;
                        live.push(out.sessions.len());
                        out.sessions.push(Tracked {
                            token: r.session_token,
                            id: r.session.expect("a session").session_id,
                            user,
                            fate: Fate::Active,
                            ending: None,
                            updates: 0,
                            updating: false,
                        });
                    }
                    Err(e) => {
                        fail(op, e);
                        return out;
                    }
                }
            }
            "terminate" | "revoke" => {
                // The oldest live session of this writer: ends spread over the round.
                let index = live.remove(0);
                let session = &mut out.sessions[index];
                let fate = if op == "terminate" { Fate::Terminated } else { Fate::Revoked };
                session.ending = Some(fate);
                let result = if fate == Fate::Terminated {
                    let request = pb::TerminateSessionRequest {
                        selector: Some(pb::terminate_session_request::Selector::SessionToken(session.token.clone())),
                        reason: String::new(),
                    };
                    sessions_client.terminate_session(request).await.map(|r| r.into_inner().already_ended)
                } else {
                    let request = pb::RevokeSessionRequest {
                        selector: Some(pb::revoke_session_request::Selector::SessionToken(session.token.clone())),
                        reason: "burst".into(),
                        revoked_by: format!("lane-{lane}"),
                    };
                    revocations_client.revoke_session(request).await.map(|r| r.into_inner().already_ended)
                };
                match result {
                    Ok(already_ended) => {
                        assert!(!already_ended, "{op} of a live session said it had already ended");
                        session.fate = fate;
                        session.ending = None;
                    }
                    Err(e) => {
                        fail(op, e);
                        return out;
                    }
                }
            }
            _ => {
                let index = live[step % live.len()];
                let session = &mut out.sessions[index];
                session.updating = true;
                let request = pb::UpdateSessionRequest {
                    selector: Some(pb::update_session_request::Selector::SessionToken(session.token.clone())),
                    metadata: HashMap::from([("n".to_owned(), (session.updates + 1).to_string())]),
                    ..Default::default()
                };
                match sessions_client.update_session(request).await {
                    Ok(r) => {
                        let stored = r.into_inner().session.expect("a session").metadata;
                        assert_eq!(stored.get("n"), Some(&(session.updates + 1).to_string()));
                        session.updates += 1;
                        session.updating = false;
                    }
                    Err(e) => {
                        fail(op, e);
                        return out;
                    }
                }
            }
        }
        *out.acks.entry(op).or_default() += 1;
        acks.fetch_add(1, Ordering::SeqCst);
    }
}

/// Every session of `user` in any state, by id.
async fn user_sessions(server: &Process, user: &str) -> BTreeMap<String, pb::Session> {
    let mut admin = server.sessions(Some(ADMIN_KEY)).await;
    let states =
        [pb::SessionState::Active, pb::SessionState::Expired, pb::SessionState::Revoked, pb::SessionState::Terminated];
    let mut found = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_user_sessions(pb::ListUserSessionsRequest {
                user_id: user.into(),
                states: states.iter().map(|s| *s as i32).collect(),
                page_size: 500,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        for session in page.sessions {
            assert!(found.insert(session.session_id.clone(), session).is_none(), "a session listed twice");
        }
        if page.next_page_token.is_empty() {
            return found;
        }
        page_token = page.next_page_token;
    }
}

/// The whole revocation list (session id -> kind) and its head sequence number.
async fn revocation_log(server: &Process) -> (BTreeMap<String, i32>, Vec<u64>, u64) {
    let mut client = server.revocations(Some(WATCHER_KEY)).await;
    let (mut entries, mut seqs, mut head) = (BTreeMap::new(), Vec::new(), None);
    let mut page_token = String::new();
    loop {
        let page = client
            .list_revocations(pb::ListRevocationsRequest { user_id: String::new(), page_size: 1000, page_token })
            .await
            .unwrap()
            .into_inner();
        head.get_or_insert(seq(&page.cursor));
        for entry in page.entries {
            seqs.push(seq(&entry.cursor));
            assert!(entries.insert(entry.session_id.clone(), entry.kind).is_none(), "two events for one session");
        }
        if page.next_page_token.is_empty() {
            return (entries, seqs, head.unwrap_or(0));
        }
        page_token = page.next_page_token;
    }
}

/// What one check after a restart found.
#[derive(Debug, Default)]
struct Checked {
    sessions: usize,
    ends_committed: usize,
    ends_lost: usize,
    updates_committed: usize,
    updates_lost: usize,
    unacknowledged_creates: usize,
}

/// Checks every tracked session against the restarted server, then resolves what was in flight
/// at the kill to what the server now says (so the next round's expectations are exact).
/// `creating` counts, per user, the creates that were in flight at some kill: the only sessions
/// the lists may hold that the test never heard of.
async fn check_after_restart(server: &Process, tracked: &mut [Tracked], creating: &HashMap<String, usize>) -> Checked {
    let mut checked = Checked { sessions: tracked.len(), ..Default::default() };
    let client = server.sessions(Some(SERVICE_KEY)).await;

    // 1. ValidateSession of every acknowledged session, 8 lanes at a time.
    let lanes: Vec<_> = (0..8)
        .map(|lane| {
            let mut client = client.clone();
            let tokens: Vec<(usize, String)> =
                tracked.iter().enumerate().skip(lane).step_by(8).map(|(i, t)| (i, t.token.clone())).collect();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for (i, token) in tokens {
                    answers.push((i, client.validate_session(validate(&token)).await.unwrap().into_inner()));
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for lane in lanes {
        answers.extend(lane.await.unwrap());
    }
    for (i, answer) in answers {
        let session = &mut tracked[i];
        let seen = if answer.valid {
            Fate::Active
        } else if answer.reason == pb::InvalidReason::Terminated as i32 {
            Fate::Terminated
        } else if answer.reason == pb::InvalidReason::Revoked as i32 {
            Fate::Revoked
        } else {
            panic!("acknowledged session {} answered {answer:?} after the restart ({session:?})", session.id);
        };
        match session.ending.take() {
            None => assert_eq!(seen, session.fate, "acknowledged state lost: {session:?}, answer {answer:?}"),
            Some(ending) => {
                assert!(seen == session.fate || seen == ending, "{session:?} answered {answer:?}");
                if seen == ending {
                    checked.ends_committed += 1;
                } else {
                    checked.ends_lost += 1;
                }
            }
        }
        session.fate = seen;
    }

    // 2. Each user's list holds every acknowledged session in its state, with its last
    //    acknowledged metadata, and nothing else but in-flight creates.
    let mut users: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, session) in tracked.iter().enumerate() {
        users.entry(session.user.as_str()).or_default().push(i);
    }
    let mut listed = BTreeMap::new();
    for (user, indexes) in &users {
        let mut sessions = user_sessions(server, user).await;
        for &i in indexes {
            let session = &tracked[i];
            let Some(found) = sessions.remove(&session.id) else {
                panic!("the list of {user} lacks acknowledged session {}", session.id)
            };
            assert_eq!(found.state, session.fate.state() as i32, "{session:?} listed as {found:?}");
            listed.insert(found.session_id.clone(), found);
        }
        let allowed = creating.get(*user).copied().unwrap_or(0);
        assert!(
            sessions.len() <= allowed,
            "{user} has {} unknown sessions, at most {allowed} creates were in flight: {sessions:?}",
            sessions.len()
        );
        assert!(sessions.values().all(|s| s.state == pb::SessionState::Active as i32), "{sessions:?}");
        checked.unacknowledged_creates += sessions.len();
        listed.extend(sessions);
    }
    for (user, _) in creating.iter().filter(|(u, _)| !users.contains_key(u.as_str())) {
        let sessions = user_sessions(server, user).await;
        assert!(sessions.len() <= creating[user], "{user}: {sessions:?}");
        checked.unacknowledged_creates += sessions.len();
        listed.extend(sessions);
    }
    for session in tracked.iter_mut() {
        let metadata = &listed[&session.id].metadata;
        let n: u32 = metadata.get("n").map_or(0, |n| n.parse().unwrap());
        if session.updating {
            assert!(n == session.updates || n == session.updates + 1, "{session:?} has n = {n}");
            if n > session.updates {
                checked.updates_committed += 1;
            } else {
                checked.updates_lost += 1;
            }
            session.updates = n;
            session.updating = false;
        } else {
            assert_eq!(n, session.updates, "an acknowledged update was lost: {session:?}");
        }
    }

    // 3. The revocation log has exactly one event per ended session, of the right kind, and
    //    its sequence numbers are gap-free from 1 to the head: an end and its event committed
    //    together or not at all.
    let (log, mut seqs, head) = revocation_log(server).await;
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>(), "the log has gaps or entries past its head");
    let ended: BTreeMap<&String, i32> = listed
        .values()
        .filter(|s| s.state != pb::SessionState::Active as i32)
        .map(|s| {
            let kind = if s.state == pb::SessionState::Revoked as i32 {
                pb::RevocationKind::Revoked
            } else {
                pb::RevocationKind::Terminated
            };
            (&s.session_id, kind as i32)
        })
        .collect();
    let log: BTreeMap<&String, i32> = log.iter().map(|(id, kind)| (id, *kind)).collect();
    assert_eq!(log, ended, "the revocation log does not match the ended sessions");
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_a_write_burst_loses_no_acknowledged_write_on_embedded() {
    const ROUNDS: usize = 3;
    const LANES: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let start = |data: &Path| {
        Spawn::default()
            .arg("--storage")
            .arg("embedded")
            .data_dir(data)
            .env("SESSION_AUTHORITY_SESSION_MAX_SESSIONS_PER_USER", "1000")
            .without_create_limit()
            .start()
    };
    let mut server = start(&data);
    let mut tracked: Vec<Tracked> = Vec::new();
    let mut creating: HashMap<String, usize> = HashMap::new();

    for round in 0..ROUNDS {
        // Kill after a few hundred acknowledgements, a different number each round, while every
        // lane has a call in flight.
        let kill_after = 200 + 100 * round;
        let acks = Arc::new(AtomicUsize::new(0));
        let killed = Arc::new(AtomicBool::new(false));
        let server_ref = Arc::new(server);
        let lanes: Vec<_> = (0..LANES)
            .map(|lane| {
                let (server, acks, killed) = (server_ref.clone(), acks.clone(), killed.clone());
                tokio::spawn(async move { writer(&server, round, lane, acks, killed).await })
            })
            .collect();
        let started = Instant::now();
        while acks.load(Ordering::SeqCst) < kill_after {
            assert!(started.elapsed() < Duration::from_secs(60), "the burst stalled at {acks:?} acknowledgements");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        killed.store(true, Ordering::SeqCst);
        server_ref.signal("KILL");
        let burst = started.elapsed();
        let mut acked: BTreeMap<&str, usize> = BTreeMap::new();
        let mut in_flight = 0;
        for lane in lanes {
            let out = tokio::time::timeout(Duration::from_secs(30), lane).await.expect("writers end").unwrap();
            for (op, n) in out.acks {
                *acked.entry(op).or_default() += n;
            }
            if let Some(user) = out.creating {
                *creating.entry(user).or_default() += 1;
                in_flight += 1;
            }
            in_flight += out.sessions.iter().filter(|s| s.ending.is_some() || s.updating).count();
            tracked.extend(out.sessions);
        }
        let total: usize = acked.values().sum();
        assert!(total >= kill_after, "{acked:?}");
        assert!(in_flight > 0, "no write was in flight at the kill: the kill came after the burst");
        // Drop reaps the killed process before the restart opens its files.
        drop(Arc::into_inner(server_ref).expect("the writers released the server"));

        let restarting = Instant::now();
        server = start(&data);
        let restart = restarting.elapsed();
        let checked = check_after_restart(&server, &mut tracked, &creating).await;
        eprintln!(
            "round {round}: {total} acknowledged writes in {burst:?} ({acked:?}), {in_flight} in flight at the \
             kill; restarted in {restart:?}; {} sessions checked; in-flight ends committed {} / lost {}, \
             updates committed {} / lost {}, unacknowledged creates present (all rounds) {}",
            checked.sessions,
            checked.ends_committed,
            checked.ends_lost,
            checked.updates_committed,
            checked.updates_lost,
            checked.unacknowledged_creates
        );
    }

    // New writes work on the data directory that survived three kills.
    let mut client = server.sessions(Some(SERVICE_KEY)).await;
    let fresh = client.create_session(create("after-the-kills")).await.unwrap().into_inner();
    assert!(client.validate_session(validate(&fresh.session_token)).await.unwrap().into_inner().valid);
    let terminate = pb::TerminateSessionRequest {
        selector: Some(pb::terminate_session_request::Selector::SessionToken(fresh.session_token.clone())),
        reason: String::new(),
    };
    assert!(!client.terminate_session(terminate).await.unwrap().into_inner().already_ended);
    let answer = client.validate_session(validate(&fresh.session_token)).await.unwrap().into_inner();
    assert_eq!((answer.valid, answer.reason), (false, pb::InvalidReason::Terminated as i32));
    let (code, _server) = server.terminate().await;
    assert_eq!(code, Some(0), "a clean shutdown after the kills");
}
