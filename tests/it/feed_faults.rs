//! The revocation feed and log under storage faults: the log reset (FLUSHALL) or rewound (a
//! failover that lost the tail) under a live watcher on a real redis-server; an event that cannot
//! be appended (a foreign key) on Redis, kv-rest and the cluster; the startup warning about Redis
//! settings; a tailer behind retention (memory store, manual clock).

use std::time::Duration;

use session_authority::grpc::pb;
use session_authority::grpc::pb::watch_revocations_response::Message;
use tonic::Code;
use tonic_types::StatusExt;

use crate::servers::{RedisServer, unique_prefix};
use crate::shared_storage::on_redis;
use crate::support::{Process, SERVICE_KEY, WATCHER_KEY};

/// The ErrorInfo reason of a stream ended because its log was reset or rewound.
const RESET: &str = "REVOCATION_LOG_RESET";

async fn revoke_new_session(server: &Process, user: &str) -> String {
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let created = sessions
        .create_session(pb::CreateSessionRequest {
            user_id: user.into(),
            access_token: "access".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
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

/// The next event of `stream` and its cursor.
async fn next_event(stream: &mut tonic::Streaming<pb::WatchRevocationsResponse>) -> (String, pb::RevocationEvent) {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the stream is open");
        if let Some(Message::Event(event)) = message.message {
            return (event.cursor.clone(), event);
        }
    }
}

/// Reads `stream` until it ends (up to 10 s); returns the events seen and the ending status.
async fn until_end(
    stream: &mut tonic::Streaming<pb::WatchRevocationsResponse>,
) -> (Vec<pb::RevocationEvent>, Option<tonic::Status>) {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => return (events, None),
            Ok(Ok(Some(message))) => {
                if let Some(Message::Event(event)) = message.message {
                    events.push(event);
                }
            }
            Ok(Ok(None)) => return (events, None),
            Ok(Err(status)) => return (events, Some(status)),
        }
    }
}

fn assert_reset(status: &tonic::Status) {
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let reason = status.get_error_details().error_info().map(|i| i.reason.clone());
    assert_eq!(reason.as_deref(), Some(RESET), "{status:?}");
    assert!(status.message().contains("ListRevocations"), "{}", status.message());
}

fn watch(after: &str) -> pb::WatchRevocationsRequest {
    pb::WatchRevocationsRequest { after_cursor: after.into(), ..Default::default() }
}

#[tokio::test]
async fn feed_survives_log_reset() {
    let redis = RedisServer::start();
    let server = on_redis(&redis.url(), &unique_prefix("reset")).start();
    let mut watcher = server.revocations(Some(WATCHER_KEY)).await;
    let mut stream = watcher.watch_revocations(watch("")).await.unwrap().into_inner();
    let first = revoke_new_session(&server, "ana").await;
    let (old_cursor, event) = next_event(&mut stream).await;
    assert_eq!(event.session_id, first);

    assert_eq!(redis.cli(&["FLUSHALL"]).trim(), "OK");
    // The next log read (a poll within a second) sees the new log: the open stream ends.
    let (events, ended) = until_end(&mut stream).await;
    assert!(events.is_empty(), "no event of the old log after the reset: {events:?}");
    assert_reset(&ended.expect("the open stream ends after the log was reset"));
    // Resuming with a cursor of the old log is refused at once, with the same reason.
    let e = watcher.watch_revocations(watch(&old_cursor)).await.unwrap_err();
    assert_reset(&e);

    // A re-snapshot gives a cursor of the new log, and events appended after the reset arrive.
    let snapshot = watcher.list_revocations(pb::ListRevocationsRequest::default()).await.unwrap().into_inner();
    assert!(snapshot.entries.is_empty(), "FLUSHALL emptied the list: {:?}", snapshot.entries);
    let old_log = old_cursor.rsplit_once('.').unwrap().0;
    assert_ne!(snapshot.cursor.rsplit_once('.').unwrap().0, old_log, "a new log id after the reset");
    let mut fresh = watcher.watch_revocations(watch(&snapshot.cursor)).await.unwrap().into_inner();
    let second = revoke_new_session(&server, "ben").await;
    let (cursor, event) = next_event(&mut fresh).await;
    assert_eq!(event.session_id, second);
    assert_eq!(cursor.rsplit_once('.').unwrap().0, snapshot.cursor.rsplit_once('.').unwrap().0);
    let listed = watcher.list_revocations(pb::ListRevocationsRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.entries.iter().map(|e| e.session_id.clone()).collect::<Vec<_>>(), vec![second]);
}

#[tokio::test]
async fn feed_survives_log_rewind() {
    let redis = RedisServer::start();
    let prefix = unique_prefix("rewind");
    let server = on_redis(&redis.url(), &prefix).start();
    let mut watcher = server.revocations(Some(WATCHER_KEY)).await;
    let mut stream = watcher.watch_revocations(watch("")).await.unwrap().into_inner();
    let mut cursors = Vec::new();
    for user in ["cai", "dan", "eve"] {
        revoke_new_session(&server, user).await;
        cursors.push(next_event(&mut stream).await.0);
    }
    let seqs: Vec<u64> = cursors.iter().map(|c| c.rsplit_once('.').unwrap().1.parse().unwrap()).collect();
    let head = seqs[2];
    // A failover that lost the last two events: the head goes back, the entries are gone.
    let meta = format!("{prefix}{{log}}:meta");
    let log = format!("{prefix}{{log}}:stream");
    redis.cli(&["HSET", &meta, "head", &(head - 2).to_string()]);
    redis.cli(&["XDEL", &log, &format!("{}-0", head - 1), &format!("{head}-0")]);
    // The promoted replica never saw them: its stream's last id is the older head too.
    assert_eq!(redis.cli(&["XSETID", &log, &format!("{}-0", head - 2)]).trim(), "OK");
    // A new event now takes a sequence number the watcher has already passed.
    let lost = revoke_new_session(&server, "fay").await;
    let (events, ended) = until_end(&mut stream).await;
    assert!(events.is_empty(), "no event delivered under a sequence number already passed: {events:?}");
    assert_reset(&ended.expect("the watcher is ended when the log went backwards, not fed nothing"));
    // The cursor it held is void at once.
    let e = watcher.watch_revocations(watch(&cursors[2])).await.unwrap_err();
    assert_reset(&e);
    // A re-snapshot lists the new event and a watch from it gets the next.
    let snapshot = watcher.list_revocations(pb::ListRevocationsRequest::default()).await.unwrap().into_inner();
    assert!(snapshot.entries.iter().any(|e| e.session_id == lost), "{:?}", snapshot.entries);
    let mut fresh = watcher.watch_revocations(watch(&snapshot.cursor)).await.unwrap().into_inner();
    let next = revoke_new_session(&server, "gus").await;
    assert_eq!(next_event(&mut fresh).await.1.session_id, next);
}

/// Redis at `port` (a cluster node with `cluster`): runs one command through redis-cli.
fn cli(port: u16, cluster: bool, args: &[&str]) -> String {
    let mut command = std::process::Command::new("redis-cli");
    command.arg("-p").arg(port.to_string());
    if cluster {
        command.arg("-c");
    }
    let out = command.args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// With the key the end's event goes to holding a foreign value, neither END nor CREATE's
/// eviction ends a session: the event could not be appended, so nothing is written, and the
/// error says what to fix. Once the key is gone, both work and append their events.
async fn an_unappendable_event_ends_nothing(
    backend: crate::conformance::Backend,
    prefix: &str,
    port: u16,
    cluster: bool,
) {
    use session_authority::clock::ManualClock;
    use session_authority::session::{SessionRef, SessionState};

    let clock = ManualClock::new(crate::conformance::START);
    let m = crate::conformance::manager(&backend, 1, &clock);
    let r = crate::conformance::revocations(&m);
    let user = "lea";
    let first = m.create(crate::conformance::new_session(user)).await.unwrap();
    let by_id = SessionRef::Id(first.session.session_id.clone());
    // Where the event of an end goes: the log's stream (one Redis, kv-rest) or the user's
    // outbox (cluster).
    let target = if cluster {
        format!("{prefix}{{{}}}:outbox", session_authority::session::shard_tag(user))
    } else {
        format!("{prefix}{{log}}:stream")
    };
    assert_eq!(cli(port, cluster, &["SET", &target, "not a stream"]).trim(), "OK");

    let e = r.revoke_session(&by_id, "user_logout", None).await.unwrap_err();
    assert_eq!(m.find(&by_id).await.unwrap().state, SessionState::Active, "not ended without its event ({e:?})");
    assert!(matches!(e, session_authority::Error::FailedPrecondition(_)), "{e:?}");
    assert!(e.to_string().contains(&target), "the message names the key: {e}");
    let Err(e) = m.create(crate::conformance::new_session(user)).await else { panic!("the eviction cannot append") };
    assert!(matches!(e, session_authority::Error::FailedPrecondition(_)), "{e:?}");
    assert_eq!(m.find(&by_id).await.unwrap().state, SessionState::Active, "not evicted without its event");

    cli(port, cluster, &["DEL", &target]);
    r.revoke_session(&by_id, "user_logout", None).await.unwrap();
    assert_eq!(m.find(&by_id).await.unwrap().state, SessionState::Revoked);
    assert!(r.is_revoked(&first.session.session_id).await.unwrap().is_some(), "the event is on the list");
}

#[tokio::test]
async fn an_unappendable_event_ends_nothing_on_redis() {
    let server = crate::servers::shared_redis();
    let prefix = unique_prefix("unappendable");
    let store = session_authority::store::redis::open(&server.url(), &prefix, Duration::from_secs(5)).unwrap();
    let backend = crate::conformance::Backend::new(session_authority::store::Stores::of(store), ());
    an_unappendable_event_ends_nothing(backend, &prefix, server.port, false).await;
}

#[tokio::test]
async fn an_unappendable_event_ends_nothing_on_kv_rest() {
    let shim = crate::servers::shared_kv_rest();
    let prefix = unique_prefix("unappendable-kv");
    let token = secrecy::SecretString::from(shim.token.clone());
    let store = session_authority::store::kv_rest::open(&shim.url, &token, &prefix, Duration::from_secs(5)).unwrap();
    let backend = crate::conformance::Backend::new(session_authority::store::Stores::of(store), ());
    an_unappendable_event_ends_nothing(backend, &prefix, crate::servers::shared_redis().port, false).await;
}

#[tokio::test]
async fn an_unappendable_event_ends_nothing_on_the_cluster() {
    let cluster = crate::servers::shared_cluster();
    let prefix = unique_prefix("unappendable-cluster");
    let store = session_authority::store::redis::open(&cluster.url(), &prefix, Duration::from_secs(5)).unwrap();
    let backend = crate::conformance::Backend::new(session_authority::store::Stores::of(store), ());
    an_unappendable_event_ends_nothing(backend, &prefix, cluster.ports[0], true).await;
}

#[tokio::test]
async fn a_redis_without_persistence_is_warned_about_at_start() {
    let redis = RedisServer::start();
    assert!(redis.cli(&["CONFIG", "GET", "appendonly"]).contains("no"), "the test server runs without AOF");
    let server = on_redis(&redis.url(), &unique_prefix("settings")).start();
    let logs = server.logs();
    let warnings: Vec<&str> = logs.lines().filter(|l| l.contains("CONFIG SET")).collect();
    assert_eq!(warnings.len(), 1, "one line, for appendonly only (maxmemory-policy is noeviction):\n{logs}");
    assert!(warnings[0].contains("appendonly yes") && warnings[0].contains("WARN"), "{}", warnings[0]);
}

/// A tailer that fell behind retention (here: it did not run while an event was appended and
/// purged, and a watcher went live after the purge) resumes after the highest purged event, so
/// an event retained after it still reaches live watchers. The memory store on a
/// current-thread runtime, with a manual clock: the tailer runs only when this test waits.
#[tokio::test(flavor = "current_thread")]
async fn a_tailer_behind_retention_still_publishes_the_retained_events() {
    use futures_util::{FutureExt as _, StreamExt as _};
    use session_authority::clock::ManualClock;
    use session_authority::revocation::{Cursor, WatchItem, WatchRequest};
    use session_authority::session::SessionRef;

    let clock = ManualClock::new(crate::conformance::START);
    let m = crate::conformance::manager(&crate::conformance::memory(), 10, &clock);
    let r = crate::conformance::revocations(&m);
    let stop = tokio_util::sync::CancellationToken::new();
    let tailer = tokio::spawn(r.feed().clone().run(stop.clone()));
    // Let the tailer take its place at the head (0) and wait for work.
    tokio::time::sleep(Duration::from_millis(50)).await;

    // None of this waits, so the tailer does not run: event 1 is appended and purged.
    let purged = m.create(crate::conformance::new_session("max")).await.unwrap();
    r.revoke_session(&SessionRef::Id(purged.session.session_id.clone()), "user_logout", None).await.unwrap();
    clock.advance(Duration::from_secs(30 * 24 * 3600));
    assert_eq!(r.cleanup().await.unwrap(), 1);
    // A watcher from just after the purged event reads the (empty) rest of the log and goes live.
    let after = Cursor { log_id: r.cursor(0).log_id, seq: 1 };
    let mut watch = Box::pin(r.feed().watch(WatchRequest { after: Some(after), ..Default::default() }).await.unwrap());
    assert!(matches!(watch.next().await, Some(Ok(WatchItem::Heartbeat(..)))));
    assert!(watch.next().now_or_never().is_none(), "live, nothing to deliver yet");
    // Event 2 is retained; the tailer, still at 0, now sees the log trimmed through 1.
    let retained = m.create(crate::conformance::new_session("max")).await.unwrap();
    r.revoke_session(&SessionRef::Id(retained.session.session_id.clone()), "user_logout", None).await.unwrap();
    let item = tokio::time::timeout(Duration::from_secs(5), watch.next()).await;
    match item {
        Ok(Some(Ok(WatchItem::Event(cursor, event)))) => {
            assert_eq!((cursor.seq, event.session_id.as_str()), (2, retained.session.session_id.as_str()));
        }
        other => panic!("the retained event 2 reaches the live watcher within 5 s, got {other:?}"),
    }
    stop.cancel();
    tailer.await.unwrap();
}
