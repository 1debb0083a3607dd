//! RevocationService through the real binary (and, where time must move, the real App in
//! process with a manual clock): many watchers over thousands of revocations, resume after a
//! kill, a stalled watcher, the kinds of events, OUT_OF_RANGE, shutdown, and the `watch` CLI.

use std::collections::HashSet;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use session_authority::grpc::pb;
use session_authority::grpc::pb::revocation_service_client::RevocationServiceClient;
use session_authority::grpc::pb::watch_revocations_response::Message;
use tokio::sync::mpsc;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::support::{Auth, Process, SERVICE_KEY, Spawn, WATCHER_KEY, binary, run_to_exit};

fn seq(cursor: &str) -> u64 {
    cursor.rsplit_once('.').and_then(|(_, n)| n.parse().ok()).unwrap_or_else(|| panic!("not a cursor: {cursor}"))
}

fn create(user: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest { user_id: user.into(), access_token: "access".into(), ..Default::default() }
}

/// Creates `per_user` sessions for each of `users` users named `<prefix>-<n>`, 16 at a time.
pub(crate) async fn create_sessions(
    server: &Process,
    prefix: &str,
    users: usize,
    per_user: usize,
) -> Vec<pb::CreateSessionResponse> {
    let client = server.sessions(Some(SERVICE_KEY)).await;
    let tasks: Vec<_> = (0..16)
        .map(|lane| {
            let mut client = client.clone();
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                let mut created = Vec::new();
                for user in (lane..users).step_by(16) {
                    for _ in 0..per_user {
                        let response = client.create_session(create(&format!("{prefix}-{user}"))).await.unwrap();
                        created.push(response.into_inner());
                    }
                }
                created
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

/// Revokes every session of each user with RevokeUserSessions, 4 users at a time; returns the
/// revoked ids.
pub(crate) async fn revoke_users(server: &Process, prefix: &str, users: usize) -> Vec<String> {
    let client = server.revocations(Some(SERVICE_KEY)).await;
    let tasks: Vec<_> = (0..4)
        .map(|lane| {
            let mut client = client.clone();
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for user in (lane..users).step_by(4) {
                    let request = pb::RevokeUserSessionsRequest {
                        user_id: format!("{prefix}-{user}"),
                        reason: "load_test".into(),
                        ..Default::default()
                    };
                    let response = client.revoke_user_sessions(request).await.unwrap().into_inner();
                    assert_eq!(response.revoked_count as usize, response.session_ids.len());
                    ids.extend(response.session_ids);
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await.unwrap());
    }
    ids
}

/// What one watcher saw.
#[derive(Debug, Default)]
pub(crate) struct Watched {
    pub(crate) events: Vec<(u64, String)>,
    /// Times the stream was ended with ABORTED (fell behind) and resumed.
    pub(crate) aborted: usize,
    /// The cursor the first heartbeat gave (where a "from now" watch starts).
    pub(crate) start: Option<String>,
}

/// Watches until `want` events arrived, reconnecting after each end with the last cursor seen
/// (events and heartbeats), like a sidecar would. `kill_after`: drop the stream and its
/// connection once after that many events. `ready` is told when the first heartbeat arrived.
async fn watch_until(
    url: String,
    after: Option<String>,
    want: usize,
    kill_after: Option<usize>,
    ready: Option<mpsc::Sender<()>>,
) -> Watched {
    watch_until_on(vec![url], after, want, kill_after, ready).await
}

/// [`watch_until`] over several replicas: each reconnection goes to the next of `urls`, so a
/// resumed stream continues on another replica from the cursor the first one gave.
pub(crate) async fn watch_until_on(
    urls: Vec<String>,
    after: Option<String>,
    want: usize,
    kill_after: Option<usize>,
    ready: Option<mpsc::Sender<()>>,
) -> Watched {
    let mut watched = Watched::default();
    let mut cursor = after;
    let mut ready = ready;
    let mut killed = false;
    for url in urls.iter().cycle() {
        let channel = Channel::from_shared(url.clone()).unwrap().connect().await.unwrap();
        let mut client = RevocationServiceClient::with_interceptor(channel, Auth::new(Some(WATCHER_KEY)));
        let request =
            pb::WatchRevocationsRequest { after_cursor: cursor.clone().unwrap_or_default(), ..Default::default() };
        let mut stream = client.watch_revocations(request).await.unwrap().into_inner();
        loop {
            match stream.message().await {
                Ok(Some(pb::WatchRevocationsResponse { message: Some(Message::Event(event)) })) => {
                    watched.events.push((seq(&event.cursor), event.session_id));
                    cursor = Some(event.cursor);
                    if watched.events.len() == want {
                        return watched;
                    }
                    if !killed && kill_after == Some(watched.events.len()) {
                        killed = true;
                        break;
                    }
                }
                Ok(Some(pb::WatchRevocationsResponse { message: Some(Message::Heartbeat(heartbeat)) })) => {
                    watched.start.get_or_insert(heartbeat.cursor.clone());
                    cursor = Some(heartbeat.cursor);
                    if let Some(ready) = ready.take() {
                        ready.send(()).await.unwrap();
                    }
                }
                Ok(Some(_)) => panic!("a message with neither event nor heartbeat"),
                Ok(None) => break,
                Err(status) if status.code() == Code::Aborted => {
                    watched.aborted += 1;
                    break;
                }
                Err(status) => panic!("watch failed: {status:?}"),
            }
        }
    }
    panic!("watch_until_on needs at least one url")
}

/// Every event exactly once, in cursor order, without a gap after the start.
pub(crate) fn assert_complete(watched: &Watched, expected: &HashSet<String>) {
    let start = seq(watched.start.as_deref().expect("an opening heartbeat"));
    let seqs: Vec<u64> = watched.events.iter().map(|(s, _)| *s).collect();
    let wanted: Vec<u64> = (start + 1..=start + expected.len() as u64).collect();
    assert!(seqs == wanted, "cursors not in order or with gaps/duplicates (first {:?})", &seqs[..seqs.len().min(5)]);
    let ids: HashSet<String> = watched.events.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ids.len(), watched.events.len(), "duplicate sessions");
    assert!(ids == *expected, "the watcher's sessions are not the revoked ones");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_watchers_receive_ten_thousand_revocations_in_order_and_a_killed_one_resumes() {
    const USERS: usize = 100;
    const PER_USER: usize = 100;
    let total = USERS * PER_USER;
    let server = Spawn::default()
        .arg("--storage")
        .arg("memory")
        .env("SESSION_AUTHORITY_SESSION_MAX_SESSIONS_PER_USER", PER_USER.to_string())
        .without_create_limit()
        .start();

    let (ready_tx, mut ready_rx) = mpsc::channel(20);
    let watchers: Vec<_> = (0..20)
        .map(|i| {
            let kill_after = (i == 0).then_some(total * 3 / 10);
            tokio::spawn(watch_until(server.url(), None, total, kill_after, Some(ready_tx.clone())))
        })
        .collect();
    for _ in 0..20 {
        tokio::time::timeout(Duration::from_secs(30), ready_rx.recv()).await.expect("watchers subscribed");
    }

    let created = create_sessions(&server, "load", USERS, PER_USER).await;
    assert_eq!(created.len(), total);
    assert!(created.iter().all(|c| c.evicted_session_ids.is_empty()));
    let revoked = revoke_users(&server, "load", USERS).await;
    assert_eq!(revoked.len(), total);
    let expected: HashSet<String> = revoked.into_iter().collect();

    for (i, watcher) in watchers.into_iter().enumerate() {
        let watched = tokio::time::timeout(Duration::from_secs(60), watcher).await.expect("watcher done").unwrap();
        assert_complete(&watched, &expected);
        if watched.aborted > 0 {
            eprintln!("watcher {i} fell behind {} times and resumed", watched.aborted);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_watcher_does_not_delay_others_and_is_ended_with_its_resume_cursor() {
    const USERS: usize = 80;
    const PER_USER: usize = 100;
    let total = USERS * PER_USER;
    let server = Spawn::default()
        .arg("--storage")
        .arg("memory")
        .env("SESSION_AUTHORITY_SESSION_MAX_SESSIONS_PER_USER", PER_USER.to_string())
        .without_create_limit()
        .env("SESSION_AUTHORITY_REVOCATION_WATCH_BUFFER", "1024")
        .start();

    // The stalled client: small HTTP/2 windows, reads the opening heartbeat, then nothing.
    let channel = Endpoint::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut stalled_client = RevocationServiceClient::with_interceptor(channel, Auth::new(Some(WATCHER_KEY)));
    let mut stalled =
        stalled_client.watch_revocations(pb::WatchRevocationsRequest::default()).await.unwrap().into_inner();
    let Some(Message::Heartbeat(opening)) = stalled.message().await.unwrap().unwrap().message else {
        panic!("expected the opening heartbeat");
    };

    let (ready_tx, mut ready_rx) = mpsc::channel(3);
    let others: Vec<_> =
        (0..3).map(|_| tokio::spawn(watch_until(server.url(), None, total, None, Some(ready_tx.clone())))).collect();
    for _ in 0..3 {
        ready_rx.recv().await.unwrap();
    }
    create_sessions(&server, "slow", USERS, PER_USER).await;
    let expected: HashSet<String> = revoke_users(&server, "slow", USERS).await.into_iter().collect();
    assert_eq!(expected.len(), total);

    // The others finish while the stalled one has still not read anything.
    for other in others {
        let watched = tokio::time::timeout(Duration::from_secs(60), other).await.expect("not delayed").unwrap();
        assert_complete(&watched, &expected);
    }

    // Now it reads: what was buffered for it, then ABORTED naming the cursor to resume from.
    let mut received = Vec::new();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(30), stalled.message()).await.expect("the stream ends") {
            Ok(Some(pb::WatchRevocationsResponse { message: Some(Message::Event(event)) })) => {
                received.push((seq(&event.cursor), event.session_id))
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stalled stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(received.len() < total, "it must have fallen behind, got all {}", received.len());
    let resume = status.message().split('"').nth(1).expect("the resume cursor in the message").to_owned();
    let last = received.last().map(|(s, _)| *s).unwrap_or_else(|| seq(&opening.cursor));
    assert_eq!(seq(&resume), last, "the resume cursor is the last one delivered");

    // Resumed from that cursor, it ends with exactly the full set.
    let rest = watch_until(server.url(), Some(resume), total - received.len(), None, None).await;
    let mut all = Watched { events: received, aborted: 0, start: Some(opening.cursor) };
    all.events.extend(rest.events);
    assert_complete(&all, &expected);
}

fn kind_of(event: &pb::RevocationEvent) -> pb::RevocationKind {
    pb::RevocationKind::try_from(event.kind).unwrap()
}

async fn next_event(stream: &mut tonic::Streaming<pb::WatchRevocationsResponse>) -> pb::RevocationEvent {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the stream is open");
        if let Some(Message::Event(event)) = message.message {
            return event;
        }
    }
}

#[tokio::test]
async fn terminate_and_eviction_produce_events_and_the_user_filter_applies() {
    let server = Spawn::default()
        .arg("--storage")
        .arg("memory")
        .env("SESSION_AUTHORITY_SESSION_MAX_SESSIONS_PER_USER", "2")
        .without_create_limit()
        .start();
    let mut watcher = server.revocations(Some(WATCHER_KEY)).await;
    let one_second = Some(prost_types::Duration { seconds: 1, nanos: 0 });
    let mut everything = watcher
        .watch_revocations(pb::WatchRevocationsRequest { heartbeat_interval: one_second, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut ivy_only = watcher
        .watch_revocations(pb::WatchRevocationsRequest {
            user_id: "ivy".into(),
            heartbeat_interval: one_second,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Both are subscribed once their opening heartbeat arrived.
    for stream in [&mut everything, &mut ivy_only] {
        assert!(matches!(stream.message().await.unwrap().unwrap().message, Some(Message::Heartbeat(_))));
    }

    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut revocations = server.revocations(Some(SERVICE_KEY)).await;
    let first = sessions.create_session(create("ivy")).await.unwrap().into_inner();
    let second = sessions.create_session(create("ivy")).await.unwrap().into_inner();
    let third = sessions.create_session(create("ivy")).await.unwrap().into_inner();
    let first_id = first.session.unwrap().session_id;
    assert_eq!(third.evicted_session_ids, vec![first_id.clone()]);
    sessions
        .terminate_session(pb::TerminateSessionRequest {
            selector: Some(pb::terminate_session_request::Selector::SessionToken(second.session_token)),
            reason: String::new(),
        })
        .await
        .unwrap();
    let jon = sessions.create_session(create("jon")).await.unwrap().into_inner();
    revocations
        .revoke_session(pb::RevokeSessionRequest {
            selector: Some(pb::revoke_session_request::Selector::SessionToken(jon.session_token)),
            ..Default::default()
        })
        .await
        .unwrap();
    // A service caller may revoke by id (documented in grpc/revocation.rs).
    let third_id = third.session.unwrap().session_id;
    let revoked = revocations
        .revoke_session(pb::RevokeSessionRequest {
            selector: Some(pb::revoke_session_request::Selector::SessionId(third_id.clone())),
            reason: "admin_revocation".into(),
            revoked_by: "ops".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!revoked.already_ended);

    let all: Vec<pb::RevocationEvent> = [
        next_event(&mut everything).await,
        next_event(&mut everything).await,
        next_event(&mut everything).await,
        next_event(&mut everything).await,
    ]
    .into();
    let kinds: Vec<(pb::RevocationKind, String, String)> =
        all.iter().map(|e| (kind_of(e), e.user_id.clone(), e.reason.clone())).collect();
    assert_eq!(
        kinds,
        vec![
            (pb::RevocationKind::Evicted, "ivy".into(), "session_limit".into()),
            (pb::RevocationKind::Terminated, "ivy".into(), "user_logout".into()),
            (pb::RevocationKind::Revoked, "jon".into(), "user_logout".into()),
            (pb::RevocationKind::Revoked, "ivy".into(), "admin_revocation".into()),
        ]
    );
    assert_eq!(all[0].session_id, first_id);
    assert_eq!(all[3].revoked_by, "ops");
    assert_eq!(revoked.event.unwrap(), all[3]);

    let ivy: Vec<pb::RevocationEvent> =
        [next_event(&mut ivy_only).await, next_event(&mut ivy_only).await, next_event(&mut ivy_only).await].into();
    assert_eq!(ivy, vec![all[0].clone(), all[1].clone(), all[3].clone()]);
    // Idle now: a heartbeat arrives, at the head of the log.
    let heartbeat = loop {
        let message = tokio::time::timeout(Duration::from_secs(5), ivy_only.message()).await.unwrap().unwrap().unwrap();
        if let Some(Message::Heartbeat(h)) = message.message {
            break h;
        }
    };
    assert_eq!(heartbeat.cursor, all[3].cursor);

    // IsRevoked and ListRevocations see the same entries.
    let answer = watcher
        .is_revoked(pb::IsRevokedRequest { session_id: first_id, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.revoked);
    assert_eq!(answer.event.unwrap(), all[0]);
    let list = watcher
        .list_revocations(pb::ListRevocationsRequest { user_id: "ivy".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.entries, ivy);
    assert_eq!(list.cursor, all[3].cursor);

    // Out-of-bounds heartbeats and malformed cursors are refused up front.
    let e = watcher
        .watch_revocations(pb::WatchRevocationsRequest {
            heartbeat_interval: Some(prost_types::Duration { seconds: 0, nanos: 500_000_000 }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = watcher
        .watch_revocations(pb::WatchRevocationsRequest { after_cursor: "nonsense".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Watchers read; they do not revoke.
    let e =
        watcher.revoke_session(pb::RevokeSessionRequest { selector: None, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_cursor_older_than_retention_is_out_of_range() {
    use session_authority::clock::ManualClock;
    use session_authority::config::Flags;

    let flags: Flags = [("storage", "memory"), ("listen", "127.0.0.1:0")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let keys = crate::support::api_keys_env();
    let config =
        session_authority::Config::load(&flags, &|name| (name == "SESSION_AUTHORITY_API_KEYS").then(|| keys.clone()))
            .unwrap();
    let clock = ManualClock::new(crate::conformance::START);
    let stores = session_authority::store::Stores::of(session_authority::store::memory::MemoryStore::new());
    let app = session_authority::App::build_with(config, stores, Arc::new(clock.clone())).await.unwrap();
    let url = format!("http://{}", app.local_addr());
    let revocations = app.revocations().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));

    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let mut sessions = session_authority::grpc::pb::session_service_client::SessionServiceClient::with_interceptor(
        channel.clone(),
        Auth::new(Some(SERVICE_KEY)),
    );
    let mut client = RevocationServiceClient::with_interceptor(channel, Auth::new(Some(SERVICE_KEY)));
    let before = client.list_revocations(pb::ListRevocationsRequest::default()).await.unwrap().into_inner().cursor;
    let token = sessions.create_session(create("kim")).await.unwrap().into_inner().session_token;
    client
        .revoke_session(pb::RevokeSessionRequest {
            selector: Some(pb::revoke_session_request::Selector::SessionToken(token)),
            ..Default::default()
        })
        .await
        .unwrap();
    let watch = |after: String| pb::WatchRevocationsRequest { after_cursor: after, ..Default::default() };
    // While retained, the old cursor replays the event.
    let mut replay = client.watch_revocations(watch(before.clone())).await.unwrap().into_inner();
    assert_eq!(next_event(&mut replay).await.user_id, "kim");
    drop(replay);

    clock.advance(Duration::from_secs(25 * 3600));
    assert_eq!(revocations.cleanup().await.unwrap(), 1);
    let e = client.watch_revocations(watch(before.clone())).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("ListRevocations"), "{}", e.message());
    // A cursor of another log (another process's memory store) is out of range too.
    let foreign = format!("0123456789abcdef.{}", seq(&before));
    assert_eq!(client.watch_revocations(watch(foreign)).await.unwrap_err().code(), Code::OutOfRange);
    // A fresh snapshot gives a cursor that works.
    let fresh = client.list_revocations(pb::ListRevocationsRequest::default()).await.unwrap().into_inner();
    assert!(fresh.entries.is_empty());
    assert!(client.watch_revocations(watch(fresh.cursor)).await.is_ok());

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn sigterm_with_an_open_watch_exits_zero_and_ends_the_stream() {
    let mut server = Process::start();
    let mut watcher = server.revocations(Some(WATCHER_KEY)).await;
    let mut stream = watcher.watch_revocations(pb::WatchRevocationsRequest::default()).await.unwrap().into_inner();
    assert!(matches!(stream.message().await.unwrap().unwrap().message, Some(Message::Heartbeat(_))));

    server.signal("TERM");
    let exited = tokio::task::spawn_blocking(move || {
        let code = server.wait_exit(Duration::from_secs(15));
        (code, server)
    });
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(15), stream.message()).await.expect("the stream ends") {
            Ok(Some(_)) => {}
            Ok(None) => break Code::Ok,
            Err(status) => break status.code(),
        }
    };
    assert_eq!(ended, Code::Unavailable, "ended with a reconnect status");
    let (code, server) = exited.await.unwrap();
    assert_eq!(code, Some(0), "log:\n{}", server.logs());
}

/// Reads a child's stdout lines on a thread.
fn lines_of(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

async fn revoke_new_session(server: &Process, user: &str) -> String {
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let created = sessions.create_session(create(user)).await.unwrap().into_inner();
    let mut revocations = server.revocations(Some(SERVICE_KEY)).await;
    revocations
        .revoke_session(pb::RevokeSessionRequest {
            selector: Some(pb::revoke_session_request::Selector::SessionToken(created.session_token)),
            reason: "user_logout".into(),
            revoked_by: user.into(),
        })
        .await
        .unwrap();
    created.session.unwrap().session_id
}

#[tokio::test]
async fn the_watch_command_prints_json_lines_and_resumes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let server = Spawn::default().data_dir(&data).listen(&listen).start();
    let start = server
        .revocations(Some(WATCHER_KEY))
        .await
        .list_revocations(pb::ListRevocationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cursor;

    let mut cli = Command::new(binary())
        .args(["watch", "--target", &server.url(), "--after", &start])
        .env("SESSION_AUTHORITY_KEY", WATCHER_KEY)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(cli.stdout.take().unwrap());
    let stderr = cli.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let read_line = |lines: &std::sync::mpsc::Receiver<String>| -> serde_json::Value {
        let line = lines.recv_timeout(Duration::from_secs(30)).expect("a JSON line from the watch command");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };

    let mut ids = Vec::new();
    for user in ["lea", "max", "lea"] {
        ids.push(revoke_new_session(&server, user).await);
    }
    let mut printed = Vec::new();
    for _ in 0..3 {
        printed.push(read_line(&lines));
    }
    let first = &printed[0];
    assert_eq!(first["kind"], "revoked");
    assert_eq!(first["user_id"], "lea");
    assert_eq!(first["revoked_by"], "lea");
    assert_eq!(first["reason"], "user_logout");
    assert!(first["revoked_at"].as_str().unwrap().ends_with('Z'), "{first}");

    // Restart on the same address and data: the command reconnects and resumes after its last
    // cursor, so the events after the restart arrive once, and none is repeated.
    let (code, _stopped) = server.terminate().await;
    assert_eq!(code, Some(0));
    let server = Spawn::default().data_dir(&data).listen(&listen).start();
    for user in ["max", "lea"] {
        ids.push(revoke_new_session(&server, user).await);
    }
    for _ in 0..2 {
        printed.push(read_line(&lines));
    }
    let seqs: Vec<u64> = printed.iter().map(|e| seq(e["cursor"].as_str().unwrap())).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    let printed_ids: Vec<String> = printed.iter().map(|e| e["session_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(printed_ids, ids);
    assert!(lines.recv_timeout(Duration::from_millis(500)).is_err(), "nothing more, in particular no duplicate");

    cli.kill().unwrap();
    cli.wait().unwrap();
    let stderr = stderr.join().unwrap();
    assert!(stderr.contains("reconnecting"), "{stderr}");
}

#[tokio::test]
async fn the_watch_command_stops_with_one_clear_line_on_a_bad_key() {
    let server = Spawn::default().arg("--storage").arg("memory").start();
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = run_to_exit(
        &["watch", "--target", &server.url()],
        &[("SESSION_AUTHORITY_KEY", "not-a-configured-key-at-all")],
        dir.path(),
    );
    assert_ne!(code, Some(0));
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    let (code, stderr) = run_to_exit(&["watch", "--target", &server.url()], &[], dir.path());
    assert_ne!(code, Some(0));
    assert!(stderr.contains("SESSION_AUTHORITY_KEY"), "{stderr}");
}
