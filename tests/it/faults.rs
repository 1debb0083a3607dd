//! Faults through the real binary (issue 11): SIGKILL in the middle of a write burst on the
//! embedded store, and one replica cut off from Redis by a network partition while another
//! keeps serving. (A Redis outage under load is `shared_storage::a_redis_outage_under_load_...`;
//! a kill after the writes completed is `sessions::acknowledged_sessions_survive_sigkill`;
//! provider faults are in `tokens`.)

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use session_authority::grpc::pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::servers::{RedisServer, unique_prefix};
use crate::shared_storage::on_redis;
use crate::support::proxy::{Mode, Proxy};
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

// ---------------------------------------------------------------------------------------------
// A network partition between one replica and Redis
// ---------------------------------------------------------------------------------------------

/// The overall status and every service's.
async fn health(server: &Process) -> Vec<Option<i32>> {
    let mut client = HealthClient::new(server.channel().await);
    let mut statuses = Vec::new();
    for service in [""].into_iter().chain(session_authority::app::SERVICE_NAMES) {
        let status =
            client.check(HealthCheckRequest { service: service.into() }).await.ok().map(|r| r.into_inner().status);
        statuses.push(status);
    }
    statuses
}

/// Polls until every status is `wanted`, up to `limit`; returns how long it took.
async fn wait_health(server: &Process, wanted: ServingStatus, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let statuses = health(server).await;
        if statuses.iter().all(|s| *s == Some(wanted as i32)) {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "health did not become {wanted:?} within {limit:?}: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Valid,
    Revoked,
    Unavailable,
    Other(Code, i32),
}

#[derive(Debug)]
struct Call {
    token: usize,
    started: Instant,
    ended: Instant,
    outcome: Outcome,
}

/// Validates `tokens` round robin on `server` until `stop`, recording every call.
fn validators(
    server: &Process,
    lanes: usize,
    tokens: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Call>>> {
    let url = server.url();
    (0..lanes)
        .map(|lane| {
            let (tokens, stop, url) = (tokens.clone(), stop.clone(), url.clone());
            tokio::spawn(async move {
                let channel = tonic::transport::Channel::from_shared(url).unwrap().connect().await.unwrap();
                let mut client = pb::session_service_client::SessionServiceClient::with_interceptor(
                    channel,
                    crate::support::Auth::new(Some(SERVICE_KEY)),
                );
                let mut calls = Vec::new();
                let mut n = lane;
                while !stop.load(Ordering::SeqCst) {
                    let token = n % tokens.len();
                    n += lanes;
                    let started = Instant::now();
                    let outcome = match client.validate_session(validate(&tokens[token])).await {
                        Ok(r) if r.get_ref().valid => Outcome::Valid,
                        Ok(r) if r.get_ref().reason == pb::InvalidReason::Revoked as i32 => Outcome::Revoked,
                        Ok(r) => Outcome::Other(Code::Ok, r.get_ref().reason),
                        Err(s) if s.code() == Code::Unavailable => Outcome::Unavailable,
                        Err(s) => Outcome::Other(s.code(), 0),
                    };
                    calls.push(Call { token, started, ended: Instant::now(), outcome });
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                calls
            })
        })
        .collect()
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Vec<Call>>>) -> Vec<Call> {
    let mut calls = Vec::new();
    for task in tasks {
        calls.extend(task.await.unwrap());
    }
    calls
}

fn tally(calls: &[&Call]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for call in calls {
        *counts.entry(format!("{:?}", call.outcome)).or_default() += 1;
    }
    counts
}

/// Two replicas on one redis-server, A through `proxy`: A is cut off (the proxy goes through
/// `cut`, 300 ms per step) while B keeps serving and revokes some sessions; A must fail closed
/// and come back by itself.
async fn partition_one_replica(cut_modes: &[Mode]) {
    const SESSIONS: usize = 24;
    const REVOKED: usize = 6;
    const PARTITION_AFTER_NOT_SERVING: Duration = Duration::from_secs(4);
    let redis = RedisServer::start();
    let proxy = Proxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let prefix = unique_prefix("partition");
    // The default storage timeout (2 s): the partition is met with the shipped settings.
    let a = on_redis(&proxy.redis_url(), &prefix).start();
    let b = on_redis(&redis.url(), &prefix).start();
    let pid = a.child.id();

    let mut on_b = b.sessions(Some(SERVICE_KEY)).await;
    let mut tokens = Vec::new();
    let mut ids = Vec::new();
    for i in 0..SESSIONS {
        let created = on_b.create_session(create(&format!("part-{}", i % 6))).await.unwrap().into_inner();
        tokens.push(created.session_token);
        ids.push(created.session.unwrap().session_id);
    }
    let mut on_a = a.sessions(Some(SERVICE_KEY)).await;
    for token in &tokens {
        assert!(on_a.validate_session(validate(token)).await.unwrap().into_inner().valid);
    }
    wait_health(&a, ServingStatus::Serving, Duration::from_secs(5)).await;
    wait_health(&b, ServingStatus::Serving, Duration::from_secs(5)).await;

    // Load on both replicas over the same sessions, and a watch on B's health.
    let tokens = Arc::new(tokens);
    let stop = Arc::new(AtomicBool::new(false));
    let load_a = validators(&a, 8, tokens.clone(), stop.clone());
    let load_b = validators(&b, 2, tokens.clone(), stop.clone());
    let b_health = {
        let (stop, url) = (stop.clone(), b.url());
        tokio::spawn(async move {
            let channel = tonic::transport::Channel::from_shared(url).unwrap().connect().await.unwrap();
            let mut client = HealthClient::new(channel);
            let (mut checks, mut not_serving) = (0usize, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                for service in [""].into_iter().chain(session_authority::app::SERVICE_NAMES) {
                    let status = client.check(HealthCheckRequest { service: service.into() }).await;
                    checks += 1;
                    match status {
                        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => {}
                        other => not_serving.push(format!("{service}: {other:?}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (checks, not_serving)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Partition.
    let accepted_before = proxy.accepted();
    let cut = Instant::now();
    for (i, mode) in cut_modes.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        proxy.set(*mode);
    }
    wait_health(&a, ServingStatus::NotServing, Duration::from_secs(15)).await;
    let to_not_serving = cut.elapsed();

    // While A is cut off, B revokes some sessions: A cannot know, so it must not say valid.
    let mut revoke_on_b = b.revocations(Some(SERVICE_KEY)).await;
    for id in &ids[..REVOKED] {
        let request = pb::RevokeSessionRequest {
            selector: Some(pb::revoke_session_request::Selector::SessionId(id.clone())),
            reason: "partition".into(),
            revoked_by: "faults".into(),
        };
        revoke_on_b.revoke_session(request).await.expect("B revokes during the partition");
    }
    let revoked_at = Instant::now();
    let e = on_a.validate_session(validate(&tokens[0])).await.expect_err("A cannot check a revoked session");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    tokio::time::sleep_until((cut + to_not_serving + PARTITION_AFTER_NOT_SERVING).into()).await;
    let statuses = health(&a).await;
    assert!(
        statuses.iter().all(|s| *s == Some(ServingStatus::NotServing as i32)),
        "A's health came back while still cut off: {statuses:?}"
    );

    // Heal.
    proxy.set(Mode::Forward);
    let healed = Instant::now();
    // Both measured from the heal: the first valid answer to a probe, then health (the server
    // pings storage once a second, so health may follow up to a second later).
    let to_first_valid = loop {
        if let Ok(r) = on_a.validate_session(validate(&tokens[REVOKED])).await {
            assert!(r.get_ref().valid, "{r:?}");
            break healed.elapsed();
        }
        assert!(healed.elapsed() < Duration::from_secs(15), "A did not validate within 15 s of the heal");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    wait_health(&a, ServingStatus::Serving, Duration::from_secs(15)).await;
    let to_serving = healed.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::SeqCst);
    let (calls_a, calls_b) = (collect(load_a).await, collect(load_b).await);
    let (b_checks, b_not_serving) = b_health.await.unwrap();
    let settled = Instant::now();

    // A, during the partition: every call that started after the cut and ended before the heal
    // answered UNAVAILABLE (it could not read Redis), none valid, none "not valid".
    let during_a: Vec<&Call> = calls_a.iter().filter(|c| c.started >= cut && c.ended <= healed).collect();
    assert!(during_a.len() >= 6, "the load kept calling A during the partition ({} calls)", during_a.len());
    let wrong: Vec<&&Call> = during_a.iter().filter(|c| c.outcome != Outcome::Unavailable).collect();
    assert!(wrong.is_empty(), "A answered during the partition: {wrong:?}");
    // A revoked session never validated on A after its revocation.
    let stale: Vec<&Call> = calls_a
        .iter()
        .filter(|c| c.token < REVOKED && c.started >= revoked_at && c.outcome == Outcome::Valid)
        .collect();
    assert!(stale.is_empty(), "A said valid for a session B had revoked: {stale:?}");

    // B, during the partition: served every call and stayed SERVING.
    let during_b: Vec<&Call> = calls_b.iter().filter(|c| c.started >= cut && c.ended <= healed).collect();
    assert!(during_b.len() >= 10, "the load kept calling B ({} calls)", during_b.len());
    for call in &during_b {
        let fine = match call.outcome {
            Outcome::Valid => call.token >= REVOKED || call.started < revoked_at,
            // Revoked from the moment B's revocation committed (at the latest when it answered).
            Outcome::Revoked => call.token < REVOKED,
            _ => false,
        };
        assert!(fine, "B answered {call:?} during A's partition");
    }
    assert!(b_not_serving.is_empty(), "B's health left SERVING: {b_not_serving:?}");

    // A after the heal: same process, every session in its real state, every service SERVING.
    assert_eq!(a.child.id(), pid);
    let after_a: Vec<&Call> =
        calls_a.iter().filter(|c| c.started >= healed + to_first_valid + Duration::from_millis(100)).collect();
    assert!(!after_a.is_empty());
    for call in &after_a {
        let wanted = if call.token < REVOKED { Outcome::Revoked } else { Outcome::Valid };
        assert_eq!(call.outcome, wanted, "A after the heal: {call:?}");
    }
    for (i, token) in tokens.iter().enumerate() {
        let answer = on_a.validate_session(validate(token)).await.unwrap().into_inner();
        if i < REVOKED {
            assert_eq!((answer.valid, answer.reason), (false, pb::InvalidReason::Revoked as i32), "{answer:?}");
        } else {
            assert!(answer.valid, "{answer:?}");
        }
    }
    let created = on_a.create_session(create("after-the-heal")).await.expect("A writes after the heal").into_inner();
    assert!(on_b.validate_session(validate(&created.session_token)).await.unwrap().into_inner().valid);
    wait_health(&a, ServingStatus::Serving, Duration::from_secs(1)).await;

    let straddling = calls_a.iter().filter(|c| c.started < healed && c.ended > healed).count();
    eprintln!(
        "partition ({cut_modes:?}): A NOT_SERVING after {to_not_serving:?}; SERVING {to_serving:?} after the heal, first \
         valid answer after {to_first_valid:?}; A during the partition: {:?} ({} calls straddled the heal); B \
         during the partition: {:?}, {b_checks} health checks all SERVING; {} proxy connections accepted \
         during and after the partition; load ran {:?}",
        tally(&during_a),
        straddling,
        tally(&during_b),
        proxy.accepted() - accepted_before,
        settled - cut,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_black_holed_from_redis_fails_closed_and_heals_while_another_serves() {
    partition_one_replica(&[Mode::BlackHole]).await;
}

/// The path drops the replica's connection, then swallows everything: every reconnect is
/// accepted and then silent, so only the connection timeout ends each attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_reconnecting_into_a_black_hole_fails_closed_and_heals_while_another_serves() {
    partition_one_replica(&[Mode::Reset, Mode::BlackHole]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_whose_redis_connections_are_reset_fails_closed_and_heals_while_another_serves() {
    partition_one_replica(&[Mode::Reset]).await;
}
