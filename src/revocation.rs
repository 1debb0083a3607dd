//! Revocation: ending sessions everywhere at once, the revocation list, and the feed watchers
//! subscribe to.
//!
//! Every end of a session except plain time expiry is recorded as one [`RevocationEvent`] in
//! the store's revocation log, in the same atomic step as the state change (see `store.rs`).
//! The log is the list: an event is a live list entry until its `expires_at` (the configured
//! `revocation.list_ttl` after the end), and [`Revocations::cleanup`] purges what expired,
//! walking an expiry index.
//!
//! A [`Cursor`] names a position in one log: `<log id>.<sequence number>`. Sequence numbers are
//! assigned in commit order without gaps, so "every event after cursor c" is exact, and the log
//! id makes a cursor from another log (an earlier memory store, another database) out of range
//! rather than silently misread.
//!
//! Cascade (`revocation.cascade`): revoking a session also asks its provider to revoke the
//! upstream tokens through [`UpstreamRevoker`], from the durable [`UpstreamQueue`] (see
//! `upstream.rs`): `App` installs it over the token work's RFC 7009 client
//! (`token::ProviderRevoker`); a bare [`Revocations`] has none and makes no call. RevokeSession
//! also tries inline; logout-all only ends the sessions and leaves the calls to the queue.
//! Revoking a user always ends each of their active
//! sessions with its own event, whatever the cascade setting: a user-wide marker would make
//! every watcher and `IsRevoked` do a second lookup, and one event per ended session keeps one
//! meaning for the feed.
//!
//! # Revocation: the log, the list and the feed
//!
//! **One log, also the list.** Every end of a session except plain time expiry appends exactly one
//! `RevocationEvent` {seq, session id, user id, kind, reason, revoked by, revoked at, expires at}
//! in the same atomic step as the state change: `end` for TerminateSession (`TERMINATED`),
//! RevokeSession and RevokeUserSessions (`REVOKED`), hijack detection (`HIJACK`) and a refused
//! refresh (`REFRESH_FAILED`, through `SessionManager::end_as`), and `create` for cap evictions
//! (`EVICTED`). A session therefore never ends without its event, and no event exists for a session
//! that did not end. On Redis, where a script's writes before a runtime error stay, `end` and
//! `create` first check (`unwritable` in the sink) every key the append writes (its type, a numeric
//! `head`, a stream last id below the next seq) and write nothing, answering `FAILED_PRECONDITION`
//! naming the key, when the append could fail. An event is a live revocation-list entry until `expires_at` = max(end +
//! `revocation.list_ttl` (24 h), the session's absolute expiry), computed by the backend in the end
//! step (`EndSession::retain_until_for`; the same instant as the tombstone's `retain_until`), so a
//! revoked session stays listed for as long as its token could otherwise be live; reads hide
//! expired entries at once, and the cleanup task (`revocation.cleanup_interval`, 1 h) deletes them
//! from the log through an expiry index, so its cost grows with what expired. The log is trimmed by
//! age only, never by count, so a live entry is never dropped.
//!
//! **Cursors.** A cursor is `<log id>.<seq>`, opaque to clients. `seq` is assigned in the write step
//! (memory: under the lock; redb: in the single-writer transaction), so sequence numbers are
//! gap-free and in commit order. The log id is random per log (per process for memory, created with
//! the database for embedded): a cursor from another log is `OUT_OF_RANGE` instead of being misread
//! as a position in this one. `OUT_OF_RANGE` also answers a cursor ahead of the head and one below
//! the highest purged sequence number; the client re-snapshots with ListRevocations, whose cursor
//! is the head read in the same step as the entries (every page of one listing carries the first
//! page's cursor, and later pages hide entries newer than it).
//!
//! **Fan-out.** Each replica runs one tailer (`RevocationFeed::run`) that reads the log after its
//! last sequence number (when it fell behind retention, from the highest purged one, so retained
//! events are still published) and publishes each event once into a bounded tokio broadcast
//! (`revocation.watch_buffer`, 4096). `SessionManager` wakes it after every end, and it also polls
//! every second (which is how another replica's writes on shared storage will arrive). A watch
//! stream subscribes to the broadcast first, then reads its history from the log in batches of 512,
//! then goes live, dropping live events it already delivered; a live event that does not follow the
//! last delivered one sends it back to the log. The first message of every stream is a heartbeat
//! carrying the starting cursor, so a "from now" watcher has a resume point before any event;
//! heartbeats (default 15 s, 1 s to 5 min) carry the stream's resume point (everything up to it was
//! delivered or filtered out by `user_id`). A replica serves at most `revocation.max_watchers`
//! streams (20 000) at once: each holds a slot for its whole life, and one more is refused with
//! `RESOURCE_EXHAUSTED` (reason `OVERLOADED`, naming the setting) before it subscribes or reads
//! anything. An open stream costs the server about 7 KB (10 000 streams over 20 connections: 30 MiB
//! idle, 95 MiB open, measured by `tests/it/overload.rs` on a debug build), so the default ceiling
//! is about 140 MB.
//!
//! **Guarantees.** Events arrive in cursor order. A client that resumes from the last cursor it
//! received (event or heartbeat) gets no gap and no duplicate. A client that reads too slowly falls
//! behind the broadcast and is ended with `ABORTED` whose message names the `after_cursor` to resume
//! with; it never stalls the other watchers (the broadcast never waits) and its memory is bounded by
//! the broadcast's capacity plus HTTP/2 flow control. Lag while a stream is still catching up from
//! the log is absorbed (re-subscribe, keep reading the log). Shutdown ends streams with
//! `UNAVAILABLE` ("reconnect and resume").
//!
//! **Cascade.** Revoking a user ends each of their active sessions with its own event (whatever
//! `revocation.cascade` says: one event per ended session is what watchers rely on). Revoking a
//! session with `revocation.cascade` on calls the `UpstreamRevoker` hook after the local revocation
//! committed; `App` installs `ProviderRevoker` (RFC 7009 at the session's provider, see
//! [Tokens](#tokens)); with no provider configured it makes no call and reports `NotConfigured`
//! (best effort: a failure is logged and recorded as one `token_revoked` security event with
//! `success=false` per revocation, at its first failure however many retries follow; the session
//! stays revoked).
//! RevokeUserSessions first ends every session in storage (one step each, no upstream call in
//! between) and answers; the upstream calls come from the **upstream revocation queue**
//! (`src/revocation/upstream.rs`), so a slow or unreachable provider cannot cut logout-all off and a
//! restart does not lose them. The queue is the revocation log itself: the `revoked` event is
//! written in the same atomic step as the end, so the work is stored with it. One worker per store
//! (elected by a lease under the reserved id `upstream_revocations` on shared storage; the process
//! that owns a local store runs it) walks the log from a checkpoint (`TokenStore::checkpoint`,
//! `<log id>.<seq>`), calls the provider for each `revoked` event, four at a time, and moves the
//! checkpoint to just below the oldest event not yet done. A failed call (`UpstreamOutcome::Failed`:
//! network, timeout, 5xx) is retried with backoff (1 s doubling to 60 s), also by the next process
//! after a restart; a refusal (`Rejected`: a 4xx, tokens that cannot be opened) is not; an event is
//! given up 24 h after its revocation. At least once: a crash between a call and the checkpoint
//! write repeats the call (harmless under RFC 7009). RevokeSession still calls inline so its caller
//! sees the provider's answer, and claims the event meanwhile so the worker of the same replica does
//! not call again. A reset log (new id) starts the queue over on the new log; events purged before
//! the worker read them (past the list TTL) are skipped with a warning. Counted in
//! `upstream_revocations_total{outcome}` and `upstream_revocations_pending`.
//!
//! **Who may revoke.** RevokeSession and RevokeUserSessions need `service` or `admin`; a `service`
//! caller may revoke by `session_id` as well as by token, unlike the SessionService rule, because
//! revocation only removes access and the same caller can already revoke every session of the user.
//! `watcher` and `proxy` may call IsRevoked, ListRevocations and WatchRevocations.
//!
//! **How Redis maps it** (`src/store/keyspace/`, scripts in `keyspace/lua/`; the same scripts for `redis`, Redis Cluster
//! and `kv-rest`). The log's keys share the hash tag `{log}`, so they are one slot:
//!
//! | key | type | contents |
//! |---|---|---|
//! | `P{log}:meta` | hash | `id` (the log id), `head` (last sequence number), `trimmed` (highest purged) |
//! | `P{log}:stream` | stream | one entry per event, id `<seq>-0`, fields `sid uid kind reason by at exp` (`by` is `-` or `+<name>`) |
//! | `P{log}:sess` | hash | session id → seq (IsRevoked) |
//! | `P{log}:u:<user id>` | sorted set | the user's seqs (ListRevocations by user) |
//! | `P{log}:exp` | sorted set | seqs scored by `expires_at` (the purge walks it) |
//! | `P{T}:outbox` | stream | Redis Cluster only: events of tag `T` not yet in the log |
//! | `P{log}:dirty` | sorted set | Redis Cluster only: tags whose outbox may hold entries, scored by the wall-clock time of the last mark |
//!
//! | operation | script |
//! |---|---|
//! | `end`, `create` | the session script itself appends: `HSETNX meta id`, `HINCRBY meta head 1`, `XADD stream <seq>-0 ...`, `HSET sess`, `ZADD u:<user>`, `ZADD exp`. One Redis, kv-rest: one script, so the state change and its event are one atomic step and seqs are gap-free in commit order. The script shares its "sink" prelude (`lua_sink!`) with the cluster outbox and the drain, so the event's shape is written once |
//! | `read_revocations` | `read_log`: `HMGET meta`, `XRANGE stream <after+1>-0 + COUNT n` |
//! | `revocation_entry` | `log_entry`: `HGET sess`, `XRANGE` of that one id; expiry checked against `now` in Rust |
//! | `list_revocations` | `list_log`: `XRANGE` between the bounds (or `ZRANGEBYSCORE u:<user>`, then `XRANGE` per seq), skipping entries whose `exp` ≤ now, 128 at a time, up to the limit |
//! | `purge_revocations` | `purge_log`: `ZRANGEBYSCORE exp -inf now LIMIT 0 n`, `XDEL`, `HDEL sess` (if it still names that seq), `ZREM` the user and expiry entries, `trimmed = max(trimmed, seq)` |
//!
//! *The log id lives in Redis* (`meta.id`), set by `HSETNX` from a fresh random candidate passed to
//! every log script, so every replica on one database reports the same id, and a flushed database
//! gets a new one (its seqs restart, and old cursors become `OUT_OF_RANGE` instead of being misread).
//! The tailer compares each read with its position: a new id, or a head below the tailer's position
//! under the same id (a failover that lost the tail), ends every open stream of the replica with
//! `OUT_OF_RANGE` reason `REVOCATION_LOG_RESET` (a cursor of another id gets the same at once); a
//! rewound log is first given a new id (`renew_log_id`, compare-and-set on `meta.id`), so cursors
//! of the old numbering never name other events. The tailer then starts over at the new head.
//! Each read returns the id; `log_id()` returns the last one read (`unknownlog`, which never matches
//! a real id, before the first read; cursors are only minted after a read).
//!
//! *The feed.* Each replica runs the one tailer of `revocation/feed.rs`: it reads the shared log with
//! `read_log` after local writes and every second, and publishes into the replica's broadcast; all
//! of the replica's watchers read the broadcast (one Redis reader per replica, however many
//! watchers). Events another replica appended arrive within the one-second poll; `XREAD BLOCK` would
//! cut that latency but needs a dedicated connection per replica and a trait method for the wait,
//! and is not done. kv-rest polls the same way (REST has no blocking read).
//!
//! *Redis Cluster: the outbox.* The session keys (slot of `{T}`) and the log (slot of `{log}`) are
//! on different slots, so "end + event" cannot be one script there. Instead:
//!
//! 1. Before the session script, `ZADD P{log}:dirty <wall-clock ms> T` marks the tag.
//! 2. The session script (one slot) ends the session and `XADD`s the event to `P{T}:outbox` in the
//!    same atomic step: a session never ends without its event being durable somewhere.
//! 3. Right after, the writer drains its own outbox: `XRANGE` it, run `drain` in the `{log}` slot,
//!    which appends each entry *unless `sess` already has that session* (a session ends at most
//!    once, so the session id is the idempotency key: draining an entry twice, by two replicas or
//!    after a retry, appends it once), then `XDEL` the drained ids. The caller's event is therefore
//!    in the log, with its seq, when `end` returns.
//! 4. If the writer stops between 2 and 3, the entry waits in the outbox. Every replica, at most
//!    once a second on its log reads, drains the outboxes of tags whose mark is older than 10 s
//!    (`OUTBOX_GRACE`, longer than any write in flight), then forgets the tag with `forget_dirty`
//!    only if its mark is unchanged (a newer mark means a newer write; it stays).
//!
//! Seqs are assigned in the `{log}` slot, one script at a time, so they stay gap-free and the log
//! is append-only; on the cluster their order is drain order rather than end order, which no
//! guarantee depends on. What the design gives up: between steps 2 and 3 (or until a stale drain,
//! if the writer died) the session is ended but IsRevoked does not list it yet, and watchers see it
//! late; ValidateSession already refuses it, since it reads the record. Assumption: a write reaches
//! Redis within 10 s of its mark (a write held longer could land after a stale drain forgot the tag;
//! its entry would then wait for the tag's next mark). The conformance suite runs on the 3-master
//! cluster through this path.

use std::fmt;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::session::{SessionEvent, SessionManager, SessionRecord, SessionRef, SessionState};
use crate::store::{DynRevocationLog, EndOutcome, RevocationQuery};

pub mod feed;
pub mod upstream;

pub use feed::{RevocationFeed, SharedEvent, WatchItem, WatchRequest};
pub use upstream::UpstreamQueue;

pub use crate::model::revocation::{RevocationEvent, RevocationKind, new_log_id};

/// A position in a revocation log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub log_id: String,
    /// The last sequence number seen (0: before the first event).
    pub seq: u64,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.log_id, self.seq)
    }
}

impl Cursor {
    /// Parses what [`Cursor`]'s `Display` wrote; `field` names the request field on error.
    pub fn parse(field: &str, text: &str) -> Result<Cursor> {
        let bad = || Error::invalid(field, "not a cursor returned by this service");
        let (log_id, seq) = text.rsplit_once('.').ok_or_else(bad)?;
        if log_id.is_empty() || !log_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(bad());
        }
        let seq = seq.parse::<u64>().map_err(|_| bad())?;
        Ok(Cursor { log_id: log_id.to_owned(), seq })
    }
}

/// What asking the provider to revoke a session's upstream tokens did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// Cascade is off: no call was made.
    Skipped,
    /// No provider (or no revocation endpoint) is configured for the session: no call was made.
    NotConfigured,
    /// The provider revoked the tokens.
    Revoked,
    /// The call failed in a way worth retrying (the provider unreachable, slow or answering
    /// 5xx); the session is revoked locally all the same, and the queue tries again.
    Failed(String),
    /// The provider (or the stored tokens) made the revocation impossible, for good: a 4xx
    /// other than 429, a malformed answer, tokens that cannot be opened. Not retried.
    Rejected(String),
}

/// Revokes a session's upstream tokens at its provider (RFC 7009), best effort: the session is
/// already ended locally when this is called. `token::ProviderRevoker` implements it.
#[async_trait::async_trait]
pub trait UpstreamRevoker: Send + Sync + fmt::Debug + 'static {
    /// Revokes the upstream tokens of the (already ended) `session`.
    async fn revoke(&self, session: &SessionRecord) -> UpstreamOutcome;
}

/// Settings of revocation (the configuration builds them from `revocation.*`; [`Default`] is its
/// defaults).
#[derive(Debug, Clone)]
pub struct RevocationSettings {
    /// Revoke upstream tokens when a session is revoked.
    pub cascade: bool,
    /// Capacity of the per-replica live broadcast; a watcher further behind is ended.
    pub watch_buffer: usize,
    /// Watch streams served at once; one more is refused with `ResourceExhausted`.
    pub max_watchers: usize,
    /// Heartbeat interval when the watcher asks for none.
    pub default_heartbeat: Duration,
    /// How long an entry stays on the revocation list.
    pub list_ttl: Duration,
    /// How often expired list entries are swept.
    pub cleanup_interval: Duration,
}

impl Default for RevocationSettings {
    fn default() -> Self {
        RevocationSettings {
            cascade: true,
            watch_buffer: 4096,
            max_watchers: DEFAULT_MAX_WATCHERS,
            default_heartbeat: DEFAULT_HEARTBEAT,
            list_ttl: Duration::from_secs(24 * 3600),
            cleanup_interval: Duration::from_secs(3600),
        }
    }
}

/// Watch streams one replica serves at once unless configured (`revocation.max_watchers`).
pub const DEFAULT_MAX_WATCHERS: usize = 20_000;
/// Heartbeat interval of a watch stream that asks for none.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
/// Shortest heartbeat interval a watcher may ask for.
pub const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
/// Longest heartbeat interval a watcher may ask for.
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(300);

/// The default reason of RevokeSession.
pub const DEFAULT_REVOKE_REASON: &str = "user_logout";
/// The default reason of RevokeUserSessions.
pub const DEFAULT_REVOKE_ALL_REASON: &str = "user_logout_all";

/// What revoking one session did.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// The session as it is now.
    pub session: SessionRecord,
    /// Its event: the new one, or the earlier end's when it had already ended (none when it
    /// ended by time expiry, which is not on the list).
    pub event: Option<RevocationEvent>,
    /// Whether the session had already ended.
    pub already_ended: bool,
    /// What the upstream cascade did.
    pub upstream: UpstreamOutcome,
}

/// A page of the revocation list.
#[derive(Debug, Clone)]
pub struct RevocationList {
    /// Live entries, in cursor order.
    pub entries: Vec<RevocationEvent>,
    /// Watch from here to see every revocation after this snapshot (the same on every page).
    pub cursor: Cursor,
    /// Token of the next page.
    pub next_page_token: Option<String>,
}

/// Revocation over a [`SessionManager`] and its store, with the replica's live feed.
#[derive(Debug, Clone)]
pub struct Revocations {
    sessions: SessionManager,
    log: DynRevocationLog,
    feed: RevocationFeed,
    settings: RevocationSettings,
    queue: Option<UpstreamQueue>,
}

impl Revocations {
    /// Revocation for `sessions`, with a feed (not yet running: see [`RevocationFeed::run`]).
    pub fn new(sessions: SessionManager, settings: RevocationSettings) -> Revocations {
        let feed = RevocationFeed::new(&sessions, &settings);
        Revocations { log: sessions.revocation_log(), sessions, feed, settings, queue: None }
    }

    /// Cascades to the provider through `queue` (and its revoker, inline for RevokeSession).
    /// Without a queue nothing is revoked upstream.
    pub fn with_upstream_queue(mut self, queue: UpstreamQueue) -> Revocations {
        self.queue = Some(queue);
        self
    }

    /// The upstream revocation queue, if there is one (its worker is started by the app).
    pub fn upstream_queue(&self) -> Option<&UpstreamQueue> {
        self.queue.as_ref()
    }

    /// The replica's live feed.
    pub fn feed(&self) -> &RevocationFeed {
        &self.feed
    }

    /// The cursor of sequence number `seq` in this store's log.
    pub fn cursor(&self, seq: u64) -> Cursor {
        Cursor { log_id: self.log.log_id(), seq }
    }

    async fn cascade(&self, session: &SessionRecord) -> UpstreamOutcome {
        if !self.settings.cascade {
            return UpstreamOutcome::Skipped;
        }
        let Some(queue) = &self.queue else { return UpstreamOutcome::NotConfigured };
        let outcome = queue.revoker().revoke(session).await;
        match &outcome {
            // Recorded by the queue, which tries again, once however many tries it takes.
            UpstreamOutcome::Failed(cause) => {
                tracing::warn!(session_id = %session.session_id, %cause, "upstream token revocation failed; the session is revoked locally and the queue retries");
            }
            UpstreamOutcome::Rejected(cause) => {
                tracing::warn!(session_id = %session.session_id, %cause, "the provider refused the upstream token revocation; the session is revoked locally");
                self.sessions.report(SessionEvent::UpstreamRevocationFailed { session, error: cause }).await;
            }
            _ => {}
        }
        outcome
    }

    /// Revokes one session. An active session past a timeout is recorded as expired and reported
    /// as already ended, like TerminateSession does; an ended one is reported with its end.
    pub async fn revoke_session(&self, by: &SessionRef, reason: &str, revoked_by: Option<&str>) -> Result<Revoked> {
        let session = self.sessions.find(by).await?;
        let now = self.sessions.now();
        let (state, expiry_reason) = session.effective_state(now);
        let outcome = if session.state == SessionState::Active && state == SessionState::Expired {
            let reason = expiry_reason.unwrap_or("expired").to_owned();
            self.sessions.end_session(&session, SessionState::Expired, &reason).await?
        } else {
            self.sessions.end_as(&session, RevocationKind::Revoked, reason, revoked_by).await?
        };
        match outcome {
            EndOutcome::Ended(record) if record.state == SessionState::Revoked => {
                let event = self.log.revocation_entry(&record.session_id, now).await?;
                // Inline, so the caller sees the provider's answer; the event is claimed for
                // that time so the queue does not call too, and takes over if this fails.
                let claim = match (&self.queue, &event) {
                    (Some(queue), Some(event)) => {
                        let cursor = self.cursor(event.seq);
                        queue.claim(&cursor);
                        Some((queue, cursor))
                    }
                    _ => None,
                };
                let upstream = self.cascade(&record).await;
                if let Some((queue, cursor)) = claim {
                    queue.settle(&cursor, !matches!(upstream, UpstreamOutcome::Failed(_)));
                }
                Ok(Revoked { session: record, event, already_ended: false, upstream })
            }
            EndOutcome::Ended(record) | EndOutcome::AlreadyEnded(record) => {
                let event = self.log.revocation_entry(&record.session_id, now).await?;
                Ok(Revoked { session: record, event, already_ended: true, upstream: UpstreamOutcome::Skipped })
            }
            EndOutcome::NotFound => Err(Error::NotFound("no such session".into())),
        }
    }

    /// Revokes every active session of a user except `except_session_id`, one event each;
    /// returns the ids revoked. Sessions that had already ended are left as they are.
    pub async fn revoke_user(
        &self,
        user_id: &str,
        except_session_id: Option<&str>,
        reason: &str,
        revoked_by: Option<&str>,
    ) -> Result<Vec<String>> {
        let now = self.sessions.now();
        let mut targets: Vec<SessionRecord> = self
            .sessions
            .store()
            .list_user(user_id)
            .await?
            .into_iter()
            .filter(|s| s.is_active_at(now) && Some(s.session_id.as_str()) != except_session_id)
            .collect();
        targets.sort_by(|a, b| (a.created_at, &a.session_id).cmp(&(b.created_at, &b.session_id)));
        // Every session ends in storage first, one step each, with no upstream call in between:
        // a slow or unreachable provider cannot leave any of them active.
        let mut ended = Vec::with_capacity(targets.len());
        for session in targets {
            // A session that ended meanwhile (another revocation, a logout) is not counted.
            if let EndOutcome::Ended(record) =
                self.sessions.end_as(&session, RevocationKind::Revoked, reason, revoked_by).await?
            {
                ended.push(record);
            }
        }
        // The upstream revocations are in the log with the ends: the queue does them, off the
        // request path, and again after a restart until they succeed.
        if let Some(queue) = &self.queue
            && !ended.is_empty()
        {
            queue.wake();
        }
        Ok(ended.into_iter().map(|r| r.session_id).collect())
    }

    /// The live revocation-list entry of a session, if it is on the list.
    pub async fn is_revoked(&self, session_id: &str) -> Result<Option<RevocationEvent>> {
        self.log.revocation_entry(session_id, self.sessions.now()).await
    }

    /// The live revocation-list entry of the session that holds (or held before its last
    /// rotation) the upstream token; `None` for a token no stored session holds.
    pub async fn is_token_revoked(&self, upstream_token: &str) -> Result<Option<RevocationEvent>> {
        match self.sessions.find(&SessionRef::Upstream(upstream_token.to_owned())).await {
            Ok(session) => self.is_revoked(&session.session_id).await,
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A page of the live revocation list (of one user when `user_id` is set), in cursor order,
    /// with the snapshot's cursor: watching from it sees every revocation after the snapshot.
    pub async fn list(
        &self,
        user_id: Option<&str>,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<RevocationList> {
        let (after, through) = match page_token {
            Some(token) => {
                let (after, through) = crate::paging::decode_seq(token)?;
                (after, Some(through))
            }
            None => (0, None),
        };
        let page_size = page_size.max(1);
        let now = self.sessions.now();
        let page =
            self.log.list_revocations(RevocationQuery { user_id, after, through, limit: page_size + 1, now }).await?;
        let snapshot = through.unwrap_or(page.position.head);
        let mut entries = page.entries;
        let next_page_token =
            (entries.len() > page_size).then(|| crate::paging::encode_seq(entries[page_size - 1].seq, snapshot));
        entries.truncate(page_size);
        Ok(RevocationList { entries, cursor: self.cursor(snapshot), next_page_token })
    }

    /// Purges list entries (and their log events) whose TTL passed, in batches; returns how
    /// many were removed.
    pub async fn cleanup(&self) -> Result<usize> {
        let now = self.sessions.now();
        let mut total = 0;
        loop {
            let removed = self.log.purge_revocations(now, 1000).await?;
            total += removed;
            if removed < 1000 {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor { log_id: "0123abcd0123abcd".into(), seq: 42 };
        assert_eq!(Cursor::parse("after_cursor", &c.to_string()).unwrap(), c);
        for bad in ["", "42", ".42", "abc.", "abc.-1", "abc.x", "a b.1", "abc.18446744073709551616"] {
            let e = Cursor::parse("after_cursor", bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { ref field, .. } if field == "after_cursor"), "{bad}: {e:?}");
        }
    }

    #[test]
    fn only_revocations_end_in_the_revoked_state() {
        assert_eq!(RevocationKind::Revoked.state(), SessionState::Revoked);
        for kind in
            [RevocationKind::Terminated, RevocationKind::Evicted, RevocationKind::Hijack, RevocationKind::RefreshFailed]
        {
            assert_eq!(kind.state(), SessionState::Terminated);
        }
    }
}
