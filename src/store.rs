//! The storage layer: traits shaped by what the domain needs atomically, and their backends.
//!
//! A bare get/set store would push read-then-write races into the domain, which break the moment
//! two replicas share a database. Instead every operation that must be atomic is one call here
//! and one atomic step in the backend: a lock in `memory`, a write transaction in `embedded`,
//! a Lua script in `redis` and over the KV REST API in `kv_rest` (both in `keyspace`).
//!
//! Conventions: absence is `Ok(None)`; times are passed in (`now`) so backends hold no clock and
//! tests control time; every failure to reach storage is `Error::Unavailable`, so callers fail
//! closed. One conformance suite (`tests/it/conformance.rs`) runs against every backend.
//!
//! The revocation log lives beside the sessions in the same backend: every end of a session
//! except plain time expiry appends exactly one [`RevocationEvent`] in the same atomic step as
//! the state change (`end`, and the evictions inside `create`), so a session never ends without
//! its event and no event exists for a session that did not end. Sequence numbers are assigned
//! in that step, so they are gap-free and in commit order. The log doubles as the revocation
//! list: an event is a list entry until its `expires_at`, and purging expired entries trims the
//! log by age (never by count, which could drop live entries).
//!
//! # Storage
//!
//! `SessionStore` (`src/store.rs`) is shaped by what the domain needs atomically; every method is one
//! atomic step in the backend (a lock in memory, one write transaction in redb, one Lua script
//! in Redis and over the KV REST API):
//!
//! | operation | guarantee |
//! |---|---|
//! | `create(record, cap, eviction)` | counts the user's sessions active at `now`, ends the oldest until fewer than `cap` remain, inserts the new one; concurrent creates never exceed the cap |
//! | `get_by_token(hash)` | the hot-path read; absence is `Ok(None)` |
//! | `get_by_id`, `list_user` | by public id; one user's sessions (cost grows with that user only) |
//! | `get_by_upstream(hash)` | the session indexed under an upstream-token hash (written with the record at create and at every compare-and-swap, from its `upstream_hashes`: current tokens and those of the last rotations, six at most); a hint the caller checks against the record's list |
//! | `touch(hash, slide)` | idle expiry only moves forward; ended sessions are not touched; the version is not changed |
//! | `compare_and_swap(record, version)` | writes only if the stored version matches and the session is active; identity, state and retention cannot be changed through it |
//! | `end(hash, end)` | active → terminal; a terminal state is never rewritten (`AlreadyEnded`) |
//! | `take_timed_out(now, limit)` | active sessions past their deadline (the earlier of idle and absolute expiry), for the sweep to end as `EXPIRED`; walks a deadline index entered at creation and not touched by slides (an entry whose session slid is moved to the new deadline when reached), so cost grows with what is due |
//! | `purge_expired(now, limit)` | deletes records whose `retain_until` passed, with their index entries; walks an expiry index, so cost grows with what expired |
//! | *[`RevocationLog`], a supertrait of `SessionStore`: the log that `end` and `create` append to* | |
//! | `log_id()` | the identity of this revocation log (changes whenever sequence numbers restart) |
//! | `read_revocations(after, limit)` | events with a sequence number above `after`, in order, with the log position (head, highest purged) read in the same step |
//! | `revocation_entry(session_id, now)` | the session's event while its list entry is live |
//! | `list_revocations(user?, after, through?, limit, now)` | live entries in sequence order, one user's through a per-user index, with the position read in the same step |
//! | `purge_revocations(now, limit)` | deletes events whose `expires_at` passed and raises the highest purged sequence number; walks an expiry index |
//!
//! `end` and `create` append the revocation event of every end they make (`EndSession.kind`; `None`
//! only for a plain time expiry) in the same atomic step.
//!
//! Every record carries `retain_until`: for an active session its absolute expiry plus the
//! revocation-list TTL, for an ended one its end plus that TTL but never before its absolute expiry
//! (the tombstone that lets validation say why a session ended).
//!
//! **The sweep** (every `session.cleanup_interval`) first ends the sessions that timed out unused
//! (`SessionManager::expire_timed_out` over `take_timed_out`): each end goes through
//! `end_session`, so it is recorded once with its reason (`idle_timeout`, `absolute_timeout`), emits
//! the `session_expired` security event and counts `session_expired_total`, as a validation that
//! finds a session past its deadline does. Then it purges what is past its retention. The embedded
//! store fills its deadline index once from the stored sessions when a database written before the
//! index is opened; on Redis, sessions created before it are not in the index and keep the old
//! behaviour (refused as expired on every read, purged with their retention).
//!
//! **Rate limits and security events**: two more traits, each operation one atomic step:
//!
//! | operation | guarantee | memory | embedded (redb) | Redis (one Lua script each) |
//! |---|---|---|---|---|
//! | `RateLimitStore::check(rule, key, cost, now)` | load, `limiter::apply`, store: concurrent checks of one key are serialised | one mutex | one write transaction (`Durability::None`: a crash may forget the last counts) on `rate_limits`, `rate_limit_forget` and `rate_limit_counts` | compare-and-set around the Rust `limiter::apply` (below): the state this replica last saw for the key (else `HGET P{limits}:states <field>`), apply, script `limit_cas` writes the new state and its `forget_at` in `P{limits}:forget` only if the state is still that one, else returns the current one and the check runs again on it; a refusal that writes nothing is only decided on a state just read. A key the replica has seen costs one round trip |
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
//! *No Redis TTLs for these either*: rate-limit states and events are deleted by the purges, which
//! take `now` / `cutoff` from the service's clock (tests move it), with their own indexes.
//!
//! **Why redb for the embedded default.** Pure Rust (no C library to build), ACID with
//! copy-on-write B-trees and a single writer, so each trait method runs inside one write
//! transaction and is therefore atomic. Writes go through a group commit
//! (`store/embedded/commit.rs`): one committer thread runs every write waiting for the writer's
//! turn in one transaction and commits it once, answering each caller after that commit, durable
//! if any write in it needed it; a write that fails aborts the attempt, gets its error, and the
//! others run again without it. Commits with `Durability::Immediate` are on disk when they return (nothing
//! acknowledged is lost to SIGKILL; a test kills the process after 1,000 creates and validates them
//! all after restart, and `tests/it/faults.rs` kills it three times in the middle of a burst of
//! creates, ends and updates and finds every acknowledged write, each in-flight one whole or absent,
//! and one revocation event per end); readers never block the writer. Idle slides wait in memory
//! (`store/embedded/slides.rs`; reads merge them) and the next write transaction of any kind writes
//! them first, many at once, at most 20 ms later, with `Durability::None` unless that transaction is
//! durable anyway: losing the last slides in a crash only makes a session expire a little earlier,
//! and a validation costs no write transaction of its own. Tables: `sessions` (token hash → record JSON), `session_ids`, `user_sessions`
//! ((user, session id) → hash), `session_expiry` ((retain-until, hash) → ()).
//!
//! **Shared storage: Redis, Redis Cluster, Vercel KV / Upstash** (`src/store/keyspace.rs` and `keyspace/`). Both
//! shared backends are one `KeyspaceStore` over a transport (a Redis connection, or HTTPS to the
//! Upstash REST API), so they send the same commands and the same Lua scripts and give the same
//! guarantees. Key layout, with `P` the `redis.key_prefix` and `T` the user's shard tag:
//!
//! | key | type | contents |
//! |---|---|---|
//! | `P{T}:s:<token hash hex>` | hash | the record: `doc` (the record's JSON) plus the fields scripts change (`state`, `version`, `retain_until`, `idle_expires_at`, `last_accessed_at`, `ip_address`, `end_reason`, `ended_at`, and `session_id`, `user_id`, `created_at`, `absolute_expires_at`), which override `doc` when read |
//! | `P{T}:id:<session id>` | string | the token hash hex |
//! | `P{T}:u:<user id>` | sorted set | the user's token hashes, scored by creation time |
//! | `P{expiry}:due` | sorted set | `T:<hash hex>` scored by a time at or before the record's `retain_until` |
//! | `P{S}:lease:<session id>` | hash | the session's refresh lease: `holder`, `version`, `expires_at` (no TTL; expired means `expires_at` ≤ the app's `now`) |
//! | `P{S}:rr:<session id>` | hash | the session's refresh records: record id → `<expires_at>\n<record JSON>`, the JSON as written |
//! | `P{S}:rri:<session id>` | sorted set | the session's record ids, all scored 0, so they sort by id (`rr_<13-digit millis>_…`, that is by time) |
//! | `P{tokens}:due` | sorted set | `<session id>\|<record id>` scored by the record's `expires_at` |
//! | `P{tokens}:leases` | sorted set | session ids scored by a time at or before their lease's `expires_at` |
//! | `P{tokens}:cp:<name>` | string | a checkpoint: the upstream revocation queue's position `<log id>.<seq>` |
//!
//! `S` is the session's shard tag: the `T` its `ses_<T>_…` id carries (so a session's lease and
//! records share the slot of its record and of its user), or `shard_tag(session id)` for an id of
//! another shape.
//!
//! | operation | commands |
//! |---|---|
//! | `get_by_token` | `HGETALL P{T}:s:<hash>`: one command, one round trip (a test counts it in `INFO commandstats`) |
//! | `create` | `ZADD` due entry, then script `create`: reads the user's records, ends the oldest active ones, writes the record, id and user entry |
//! | `get_by_id`, `list_user` | one read-only script each (`GET` + `HGETALL`; `ZRANGE` + `HGETALL` each) |
//! | `get_by_upstream` | `GET P:ut:<hash>` then `get_by_token`; the entries are `SET ... PX` before the create or compare-and-swap script, with a TTL a day past the record's retention, never deleted (a stale entry fails the caller's check against the record) |
//! | `touch`, `compare_and_swap`, `end` | one script each, on the record key only |
//! | `take_timed_out` | `ZRANGEBYSCORE` `P{expiry}:deadlines` ≤ now, then `HGETALL` per record (16 at a time), then `ZREM` (ended, gone or timed out) or `ZADD` (slid) of the entry; idempotent, so replicas sweeping at once at worst both try an end, and the second finds `AlreadyEnded` |
//! | `purge_expired` | `ZRANGEBYSCORE` due ≤ now, then script `purge` per record (16 at a time), then `ZREM` / `ZADD` of the entry |
//! | `count`, `ping` | `ZCARD` due; `PING` |
//! | `acquire_lease` | `ZADD LT` of `{tokens}:leases`, then script `acquire_lease`: store the lease if there is none or its `expires_at` ≤ now, else return the held one |
//! | `renew_lease`, `release_lease` | one script each on the lease key: only the holder; a renewal needs an unexpired lease and never shortens it |
//! | `append_refresh_record` | `ZADD` `{tokens}:due`, then script `append_record`: `HSET` + `ZADD`, and the oldest beyond `keep` removed in the same step; then `ZREM` of the trimmed ids' due entries (tidiness only) |
//! | `refresh_history` | one read-only script: `ZREVRANGE` of the ids, `HGET` each |
//! | `purge_refresh_records` | `ZRANGEBYSCORE` `{tokens}:due` ≤ now, script `purge_record` per entry (re-checks `expires_at`; a trimmed record's entry is dropped without counting, and the walk goes on until `limit` records are deleted or nothing is due, so the count is exact), then the same for `{tokens}:leases` with script `purge_lease` (an entry is forgotten only if no acquisition re-marked it) |
//!
//! Why this shape:
//! - *One slot per user.* Every key of a user carries the hash tag `{T}`, so each script touches one
//!   Redis Cluster slot. The stores are only given the token's hash, so the hash carries the tag:
//!   `crypto::token_hash` replaces the first two bytes of SHA-256(token) with the token's tag (240
//!   bits of digest remain). Session ids carry it as `ses_<T>_...`, and users map to it by
//!   `shard_tag`.
//! - *Atomic steps are scripts.* Each is EVALSHA, with EVAL (or SCRIPT LOAD) only after NOSCRIPT,
//!   which means it did not run; nothing reads in Rust and writes back. Scripts read and write hash
//!   fields, never re-encode JSON (Redis' cjson writes `[]` as `{}` and rounds numbers to 14 digits).
//!   Scripts reach the id and user keys of a record they read (same slot, not declared in KEYS).
//! - *No Redis TTLs.* The service's clock decides expiry (tests move it), a TTL on an index can drop
//!   live entries (the seed library's flaw: each save reset the user index's TTL to the saved
//!   session's), and a TTL on a record would make it vanish without its index entries. Records are
//!   removed only by the purge, which every replica runs; the purge script is idempotent.
//! - *The due index is a hint.* It lives in its own slot and cannot change atomically with a record,
//!   so it never decides a deletion: the entry is written before the record (a record always has
//!   one), lowered with `ZADD LT` after an end, and the purge script re-checks the record's own
//!   `retain_until`, deleting only when it passed and otherwise moving the entry to the real time.
//!   A crash between steps leaves an entry without a record (dropped by the next purge) or an entry
//!   later than needed (the purge runs late), never a deleted live session. The purge's cost grows
//!   with what is due. `count` is the index's size: exact at rest, briefly ahead during creates.
//!   One index key is one hot key on one cluster node; splitting it by tag range is a later change.
//! - *Outages fail closed.* Every operation is bounded by `storage_timeout`; connection failures,
//!   timeouts and not-ready replies (LOADING, CLUSTERDOWN, ...) are `Unavailable`, other error
//!   replies `Internal`. A timed-out write may have applied (as with any remote store); it is never
//!   re-sent. The Redis connection is made lazily and re-made by the next call after a failure (one
//!   attempt each, so calls fail at once while Redis is down and succeed with the first call after
//!   it returns). `app.rs` pings storage every second and sets health (overall and per service)
//!   NOT_SERVING while it fails. kv-rest maps 401/403 to "check KV_REST_API_TOKEN", 429 to a retry
//!   hint, 5xx and network errors to `Unavailable`, and retries reads only.
//! - *A silent partition is an outage too.* A path that drops traffic without an error or a reset
//!   is caught by the same bound: the health ping times out, so health turns NOT_SERVING within
//!   `storage_timeout` plus one probe interval. The silent connection is kept (a timeout is not a
//!   dropped connection) and serves again when the path heals, without a restart; a reconnect into
//!   a silent path is bounded by the connection timeout (the smaller of `storage_timeout` and 1 s).
//!   `tests/it/faults.rs` cuts one replica off this way (and by resets) while another serves.
//!
//! **Identifiers.** A session token is `sat_<tag>_<43 chars>`: 256 bits from the OS CSPRNG in
//! URL-safe base64; a session id is `ses_<tag>_<uuid>`. `<tag>` is 4 hex digits of SHA-256 of the user
//! id: it routes every key of one user to one Redis Cluster slot, found from the token, the id or the
//! user alike. It reveals 16 bits of a hash of the user id to the holder of the token, who is that
//! user.
//!
//! **Device rule** (`src/model/fingerprint.rs`). Critical fields (`user_agent`, `platform`, `timezone`)
//! must be equal wherever either side has a value; scored fields (language, screen, colour depth,
//! pixel ratio, touch, memory, cores, canvas/WebGL/audio hashes, font and plugin sets by Jaccard
//! ≥ 0.8) count only when both sides have them, and the agreeing share must reach
//! `session.device_match_threshold` (0.8). A field absent on both sides is no evidence; if nothing
//! at all can be compared, the device is not recognised.

#![warn(missing_docs)]

use std::sync::Arc;

use async_trait::async_trait;

use crate::clock::Millis;
use crate::error::Result;
use crate::model::limiter::{Decision, Rule};
use crate::model::{EventType, RefreshLease, RefreshRecord, RevocationEvent, RevocationKind, SecurityEvent};
use crate::model::{SessionRecord, SessionState};

pub mod embedded;
pub mod instrumented;
pub mod keyspace;
pub mod kv_rest;
pub mod memory;
pub mod redis;

pub use crate::model::TokenHash;

/// How a session ends, as applied atomically by [`SessionStore::end`].
#[derive(Debug, Clone)]
pub struct EndSession {
    /// The terminal state: `Expired`, `Revoked` or `Terminated`.
    pub state: SessionState,
    /// Why, for example "user_logout".
    pub reason: String,
    /// When.
    pub at: Millis,
    /// When the tombstone may be purged; also when the revocation-list entry expires. A backend
    /// keeps both until [`EndSession::retain_until_for`] the ended record.
    pub retain_until: Millis,
    /// The revocation event to append in the same step, or `None` for a plain time expiry
    /// (the only end that is not on the revocation list).
    pub kind: Option<RevocationKind>,
    /// Who asked (a user id or an operator name), when known; recorded in the event.
    pub revoked_by: Option<String>,
}

impl EndSession {
    /// When the tombstone of `record` ended by this may be purged, which is also when its
    /// revocation-list entry expires: `retain_until`, but never before the session's absolute
    /// expiry, so a revoked session whose token a consumer could still hold stays on the list.
    pub fn retain_until_for(&self, record: &SessionRecord) -> Millis {
        self.retain_until.max(record.absolute_expires_at)
    }

    /// The event this end appends for `record`, with sequence number `seq`, if it appends one.
    pub fn event_for(&self, record: &SessionRecord, seq: u64) -> Option<RevocationEvent> {
        self.kind.map(|kind| RevocationEvent {
            seq,
            session_id: record.session_id.clone(),
            user_id: record.user_id.clone(),
            kind,
            reason: self.reason.clone(),
            revoked_by: self.revoked_by.clone(),
            revoked_at: self.at,
            expires_at: self.retain_until_for(record),
        })
    }
}

/// Where the revocation log stands, read atomically with whatever accompanies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogPosition {
    /// Sequence number of the newest event (0 when the log is empty).
    pub head: u64,
    /// Highest sequence number ever purged (0 when nothing was). Reading after a cursor below
    /// it would skip purged events, so such a cursor is out of range.
    pub trimmed_through: u64,
}

/// What [`RevocationLog::read_revocations`] read.
#[derive(Debug, Clone, Default)]
pub struct LogRead {
    /// Events after the requested sequence number, in order, without gaps.
    pub events: Vec<RevocationEvent>,
    /// The log's position in the same read.
    pub position: LogPosition,
}

/// What [`RevocationLog::list_revocations`] read.
#[derive(Debug, Clone, Default)]
pub struct RevocationPage {
    /// Live entries, in sequence order.
    pub entries: Vec<RevocationEvent>,
    /// The log's position in the same read (the snapshot's cursor is its head).
    pub position: LogPosition,
}

/// What [`SessionStore::take_timed_out`] found.
#[derive(Debug, Default)]
pub struct TimedOut {
    /// Active sessions past their idle or absolute expiry.
    pub sessions: Vec<SessionRecord>,
    /// Deadline entries walked; fewer than the limit means nothing more is due.
    pub walked: usize,
}

/// What [`SessionStore::end`] did.
#[derive(Debug, Clone)]
pub enum EndOutcome {
    /// The session was active and is now ended; the record after the change.
    Ended(SessionRecord),
    /// The session had already ended; its record, unchanged.
    AlreadyEnded(SessionRecord),
    /// No such session.
    NotFound,
}

/// What [`SessionStore::create_recorded`] writes with a new session.
#[derive(Debug, Clone, Default)]
pub struct CreateWith {
    /// The creation's security event, appended to this backend's log.
    pub event: Option<SecurityEvent>,
    /// A rate-limit check that must allow before the session is stored.
    pub limit: Option<LimitCheck>,
}

/// One unit of `rule` for `key` at `now`, as [`RateLimitStore::check`] takes it.
#[derive(Debug, Clone)]
pub struct LimitCheck {
    /// The rule.
    pub rule: Rule,
    /// The key it limits (a user id, an address).
    pub key: String,
    /// When the check is made.
    pub now: Millis,
}

/// What [`SessionStore::create_recorded`] did.
#[derive(Debug, Clone)]
pub enum CreateOutcome {
    /// Stored, evicting these sessions (oldest first, in their ended form).
    Created(Vec<SessionRecord>),
    /// The limit check refused: nothing was stored but the limiter's state.
    Refused(Decision),
}

/// [`SessionStore::create_recorded`] for a backend without one atomic write for all of it:
/// the limit check, then the create, then the event's append, one after the other. The session
/// exists once the create returns, so a failed append is logged, not returned: a lost event must
/// not report the creation as failed.
pub(crate) async fn create_in_steps<S>(
    store: &S,
    record: SessionRecord,
    cap: u32,
    eviction: EndSession,
    with: CreateWith,
) -> Result<CreateOutcome>
where
    S: SessionStore + RateLimitStore + SecurityEventStore + ?Sized,
{
    if let Some(limit) = &with.limit {
        let decision = store.check(&limit.rule, &limit.key, 1, limit.now).await?;
        if !decision.allowed {
            return Ok(CreateOutcome::Refused(decision));
        }
    }
    let evicted = store.create(record, cap, eviction).await?;
    if let Some(event) = &with.event
        && let Err(error) = store.append(event).await
    {
        tracing::warn!(event_type = event.event_type.as_str(), %error, "security event could not be recorded");
    }
    Ok(CreateOutcome::Created(evicted))
}

/// What [`SessionStore::compare_and_swap`] did.
#[derive(Debug, Clone)]
pub enum CasOutcome {
    /// The record was written (its version is now `expected + 1`).
    Swapped,
    /// Another writer changed the session first; the current record.
    Conflict(Box<SessionRecord>),
    /// No such session.
    NotFound,
}

/// The slide written by [`SessionStore::touch`].
#[derive(Debug, Clone)]
pub struct Touch {
    /// New last-access time.
    pub last_accessed_at: Millis,
    /// New idle expiry; the store never moves it backwards.
    pub idle_expires_at: Millis,
    /// The client's current IP address, when it changed.
    pub ip_address: Option<String>,
}

/// The revocation log and list that [`SessionStore::end`] and [`SessionStore::create`] append to,
/// read on its own: the feed, the list and the purge need only this.
#[async_trait]
pub trait RevocationLog: Send + Sync + std::fmt::Debug + 'static {
    /// Identity of this revocation log. Cursors carry it, so a cursor from another log (a
    /// memory store of an earlier process, another database) is recognised instead of being
    /// misread as a position in this one. It must change whenever sequence numbers restart.
    /// Owned, because a shared backend learns it from the database (every replica of one
    /// database must report the same id) and may see it change when the database is reset.
    fn log_id(&self) -> String;

    /// Up to `limit` log events with a sequence number above `after`, in order, and the log's
    /// position read atomically with them (`limit` 0 reads only the position). Events whose
    /// list entry expired but that are not purged yet are still returned: the log has no gaps.
    async fn read_revocations(&self, after: u64, limit: usize) -> Result<LogRead>;

    /// Gives the log a new id if its id is still `seen`. The feed calls it when it saw the log
    /// go backwards under the same id (a failover that lost the tail), so that every cursor of
    /// the old numbering is void instead of naming other events. A backend whose log cannot go
    /// backwards keeps this default, which does nothing.
    async fn renew_log_id(&self, seen: &str) -> Result<()> {
        let _ = seen;
        Ok(())
    }

    /// The live revocation-list entry of a session: its event, if it has one whose
    /// `expires_at` is after `now`.
    async fn revocation_entry(&self, session_id: &str, now: Millis) -> Result<Option<RevocationEvent>>;

    /// The live entries `query` asks for, in sequence order, with the position read atomically
    /// with them. Cost grows with the page (and, with a user, with that user's entries), not
    /// with the whole list.
    async fn list_revocations(&self, query: RevocationQuery<'_>) -> Result<RevocationPage>;

    /// Deletes up to `limit` events whose `expires_at` is at or before `now`, with their index
    /// entries, and raises `trimmed_through` accordingly. Returns how many were deleted. Walks an
    /// expiry index, so cost grows with what expired.
    async fn purge_revocations(&self, now: Millis, limit: usize) -> Result<usize>;
}

/// A shared handle to a revocation log.
pub type DynRevocationLog = Arc<dyn RevocationLog>;

/// Sessions, their per-user index and their expiry index. Every session store is also the
/// [`RevocationLog`] of the ends it makes: `create` and `end` append to it in their atomic step.
#[async_trait]
pub trait SessionStore: RevocationLog + Send + Sync + std::fmt::Debug + 'static {
    /// Atomically: counts the user's sessions that are active at `now`, ends the oldest of them
    /// (by creation time) as `Terminated` with `eviction.reason` until fewer than `cap` remain,
    /// appending one revocation event per evicted session when `eviction.kind` is set (it is
    /// `Evicted`), then inserts `record`. Returns the evicted sessions, oldest first, in their ended form.
    /// Concurrent creates for one user never leave more than `cap` active sessions.
    async fn create(&self, record: SessionRecord, cap: u32, eviction: EndSession) -> Result<Vec<SessionRecord>>;

    /// [`SessionStore::create`] after `with.limit` allowed (a refusal stores nothing but the
    /// limiter's state), with `with.event` (the creation's security event) appended to this
    /// backend's security log. Where the backend has one atomic write for all of it (the
    /// embedded store: one transaction and one fsync) a create costs one commit and the event
    /// exists exactly when the session does. The memory store, Redis and kv-rest check, create
    /// and append one after the other ([`create_in_steps`]); a failed append there is logged, not
    /// returned, as the session exists.
    async fn create_recorded(
        &self,
        record: SessionRecord,
        cap: u32,
        eviction: EndSession,
        with: CreateWith,
    ) -> Result<CreateOutcome>;

    /// The session stored under a token hash: the hot path, one read.
    async fn get_by_token(&self, token_hash: &TokenHash) -> Result<Option<SessionRecord>>;

    /// The session indexed under an upstream-token hash ([`crate::crypto::upstream_token_hash`]),
    /// from the record's `upstream_hashes` at its creation and at each compare-and-swap. The index
    /// may lag or hold a hash the record no longer lists: the caller checks the record's list.
    async fn get_by_upstream(&self, upstream_hash: &TokenHash) -> Result<Option<SessionRecord>>;

    /// The session with a public id.
    async fn get_by_id(&self, session_id: &str) -> Result<Option<SessionRecord>>;

    /// All stored sessions of one user (active and tombstones), in no particular order. Cost
    /// grows with that user's sessions only.
    async fn list_user(&self, user_id: &str) -> Result<Vec<SessionRecord>>;

    /// Slides the idle timeout of an active session. Never moves `idle_expires_at` backwards,
    /// never touches an ended session, never changes the version (so a concurrent refresh's
    /// compare-and-swap is not disturbed). A missing session is not an error.
    async fn touch(&self, token_hash: &TokenHash, touch: Touch) -> Result<()>;

    /// Writes `record` (found by its token hash) only if the stored version is
    /// `expected_version` and the stored session is still active; the written version is
    /// `expected_version + 1`.
    async fn compare_and_swap(&self, record: &SessionRecord, expected_version: u64) -> Result<CasOutcome>;

    /// Moves an active session to a terminal state and, when `end.kind` is set, appends its
    /// revocation event in the same atomic step. A session already in a terminal state is left
    /// exactly as it is (terminal states are never rewritten) and nothing is appended.
    async fn end(&self, token_hash: &TokenHash, end: EndSession) -> Result<EndOutcome>;

    /// Active sessions that have timed out by `now`, for the sweep to end them. The store keeps a
    /// deadline index: every session enters it at creation under its first deadline (the earlier
    /// of the idle and absolute expiry); slides do not touch it. This walks up to `limit` entries
    /// due at or before `now`: an entry whose session is gone or ended is dropped, one whose
    /// session slid meanwhile is moved to the new deadline, and the sessions past a timeout at
    /// `now` are returned with their entries dropped (the caller ends them; if that fails, the
    /// session is still refused as expired by every read and purged with its retention).
    async fn take_timed_out(&self, now: Millis, limit: usize) -> Result<TimedOut>;

    /// Deletes up to `limit` sessions whose `retain_until` is at or before `now`, with their
    /// index entries. Returns how many were deleted. Cost grows with what expired, not with all
    /// sessions.
    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<usize>;

    /// Number of stored sessions (all states), for metrics and benchmarks.
    async fn count(&self) -> Result<u64>;

    /// Number of sessions active at `now`, for the `sessions_active` gauge, which samples it
    /// periodically off the request path. `None` means the backend cannot count without a cost
    /// it is not willing to pay, and the gauge is then not exported.
    async fn count_active(&self, now: Millis) -> Result<Option<u64>> {
        let _ = now;
        Ok(None)
    }

    /// Whether the backend is reachable (health).
    async fn ping(&self) -> Result<()>;

    /// The shared store's clock, for replicas to agree on time ([`crate::clock::AlignedClock`]);
    /// `None` for a store only this process uses (its clock is the only one).
    async fn server_time(&self) -> Result<Option<Millis>> {
        Ok(None)
    }

    /// Logs a warning for each server setting the revocation log's guarantees rely on that the
    /// backend reports otherwise (Redis: `appendonly yes`, `maxmemory-policy noeviction`), at
    /// start. The default, for backends without such settings, logs nothing.
    async fn warn_about_settings(&self) {}
}

/// A shared handle to a session store.
pub type DynSessionStore = Arc<dyn SessionStore>;

/// Rate-limit state, one entry per (rule, key). The limiter itself is the pure function
/// [`crate::model::limiter::apply`]; a backend only makes load–apply–store one atomic step,
/// so that replicas sharing the store count every request exactly once.
#[async_trait]
pub trait RateLimitStore: Send + Sync + std::fmt::Debug + 'static {
    /// Atomically: loads the state of (`rule.name`, `key`), applies
    /// [`crate::model::limiter::apply`] with `cost` at `now`, stores the new state (or deletes
    /// it when it no longer matters) and returns the decision. Concurrent checks of one key are
    /// serialised: N checks against a fresh rule of limit L allow exactly min(N, L). A backend
    /// that bounds the keys it holds per rule answers a new key past the bound with
    /// [`crate::model::limiter::refused`] and never evicts a held key to make room.
    async fn check(&self, rule: &Rule, key: &str, cost: u32, now: Millis) -> Result<Decision>;

    /// The decision [`RateLimitStore::check`] would give now, without storing anything (a peek:
    /// no units consumed, no violation counted).
    async fn peek(&self, rule: &Rule, key: &str, cost: u32, now: Millis) -> Result<Decision>;

    /// Deletes up to `limit` states that no longer affect any decision at `now` (see
    /// [`crate::model::limiter::LimiterState::forget_at`]). Cost grows with what is deleted.
    async fn purge_limits(&self, now: Millis, limit: usize) -> Result<usize>;
}

/// A shared handle to a rate-limit store.
pub type DynRateLimitStore = Arc<dyn RateLimitStore>;

/// A page of the revocation list: up to `limit` live entries (`expires_at` after `now`) with
/// `after < seq <= through` (`through` `None`: up to the head), of one user when `user_id` is set.
#[derive(Debug, Clone, Copy)]
pub struct RevocationQuery<'a> {
    /// Only this user's entries, when set.
    pub user_id: Option<&'a str>,
    /// Entries strictly after this sequence number.
    pub after: u64,
    /// Entries at or below this sequence number; `None`: up to the head.
    pub through: Option<u64>,
    /// At most this many entries.
    pub limit: usize,
    /// Entries whose `expires_at` is after this time.
    pub now: Millis,
}

/// A query of one user's security events.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// Whose events (the per-user index is the only way in: cost grows with this user's events).
    pub user_id: String,
    /// Events at or after this time.
    pub from: Millis,
    /// Events strictly before this time.
    pub until: Millis,
    /// Only these types; every type when empty.
    pub types: Vec<EventType>,
    /// Resume strictly after (older than) this `(occurred_at, event_id)` position.
    pub after: Option<(Millis, String)>,
    /// At most this many events.
    pub limit: usize,
}

/// The security event log: append-only, indexed by time and by (user, time).
#[async_trait]
pub trait SecurityEventStore: Send + Sync + std::fmt::Debug + 'static {
    /// Appends an event (durably, before returning). Events without a user are kept in the time
    /// index only (they are purged with the rest but not listed per user).
    async fn append(&self, event: &SecurityEvent) -> Result<()>;

    /// One user's events matching `query`, newest first, ordered by `(occurred_at, event_id)`
    /// descending. Cost grows with that user's events in the range, never with all events.
    async fn user_events(&self, query: &EventQuery) -> Result<Vec<SecurityEvent>>;

    /// Deletes up to `limit` events that occurred before `cutoff`, with their index entries.
    /// Returns how many were deleted; cost grows with what is deleted. A backend that expires
    /// events itself (Redis: the append script trims the user's log and sets key TTLs) may do
    /// nothing here and return 0.
    async fn purge_events(&self, cutoff: Millis, limit: usize) -> Result<usize>;
}

/// A shared handle to a security event store.
pub type DynSecurityEventStore = Arc<dyn SecurityEventStore>;

/// What [`TokenStore::acquire_lease`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// The caller holds the lease now.
    Acquired,
    /// Another holder's unexpired lease; the caller must wait for its result.
    Held(RefreshLease),
}

/// What the token work stores besides the session record: the refresh lease that makes one
/// replica the only one calling the provider for a session, and the refresh records
/// (GetRefreshHistory). Every method is one atomic step.
///
/// The lease is a mutual-exclusion hint with an expiry, not the guard of correctness: the
/// holder writes its result with [`SessionStore::compare_and_swap`] on the session version it
/// read after acquiring, so a holder whose lease expired (and who was overtaken) can never
/// overwrite a newer result. The lease only keeps the second replica from redeeming the same
/// refresh token, which with a rotating provider would revoke the whole grant.
#[async_trait]
pub trait TokenStore: Send + Sync + std::fmt::Debug + 'static {
    /// Atomically: if the session has no lease, or its lease expired at or before `now`, stores
    /// `lease` and returns `Acquired`; otherwise returns the current lease untouched.
    async fn acquire_lease(&self, lease: &RefreshLease, now: Millis) -> Result<LeaseOutcome>;

    /// Moves the expiry of the session's lease to `expires_at` if `holder` still holds it and it
    /// has not expired at `now`; returns whether it did.
    async fn renew_lease(&self, session_id: &str, holder: &str, expires_at: Millis, now: Millis) -> Result<bool>;

    /// Deletes the session's lease if `holder` holds it (expired or not); another holder's lease
    /// is left alone.
    async fn release_lease(&self, session_id: &str, holder: &str) -> Result<()>;

    /// Appends a refresh record and, in the same step, deletes the session's oldest records
    /// beyond the newest `keep`. Records hold token hashes only.
    async fn append_refresh_record(&self, record: &RefreshRecord, keep: usize) -> Result<()>;

    /// Up to `limit` records of one session, newest first (by `record_id`, which sorts by time).
    async fn refresh_history(&self, session_id: &str, limit: usize) -> Result<Vec<RefreshRecord>>;

    /// Deletes up to `limit` records whose `expires_at` is at or before `now`; returns how many.
    /// Walks an expiry index, so cost grows with what expired. Expired leases are deleted too
    /// (not counted).
    async fn purge_refresh_records(&self, now: Millis, limit: usize) -> Result<usize>;

    /// The value [`TokenStore::save_checkpoint`] last stored under `name`, if any: the position
    /// of a background worker over the revocation log (the upstream revocation queue), kept
    /// durably so a restart goes on from it.
    async fn checkpoint(&self, name: &str) -> Result<Option<String>>;

    /// Stores `value` under `name`, replacing what was there (durably, where the backend is).
    async fn save_checkpoint(&self, name: &str, value: &str) -> Result<()>;
}

/// A shared handle to a token store.
pub type DynTokenStore = Arc<dyn TokenStore>;

/// The four stores of one backend, usually one object behind four handles.
#[derive(Debug, Clone)]
pub struct Stores {
    /// Sessions and, through its supertrait, their revocation log.
    pub sessions: DynSessionStore,
    /// Rate-limit state.
    pub limits: DynRateLimitStore,
    /// Security events.
    pub events: DynSecurityEventStore,
    /// Refresh leases and refresh records.
    pub tokens: DynTokenStore,
    /// Whether `events` is the log that `sessions` writes a creation's event into
    /// ([`SessionStore::create_recorded`]): true for one backend behind every handle.
    pub events_with_sessions: bool,
}

impl Stores {
    /// One backend object serving all four traits.
    pub fn of<S: SessionStore + RateLimitStore + SecurityEventStore + TokenStore>(store: S) -> Stores {
        Stores::shared(Arc::new(store))
    }

    /// Handles onto one backend object that is already shared (two replicas over one store).
    pub fn shared<S: SessionStore + RateLimitStore + SecurityEventStore + TokenStore>(store: Arc<S>) -> Stores {
        Stores {
            sessions: store.clone(),
            limits: store.clone(),
            events: store.clone(),
            tokens: store,
            events_with_sessions: true,
        }
    }

    /// The same stores, each call timed and counted on failure, labelled with `backend`, and
    /// run inside a `storage` span when `traced` (see [`instrumented`]).
    pub fn instrumented(self, backend: &'static str, traced: bool) -> Stores {
        instrumented::wrap(self, backend, traced)
    }
}

/// Whether `event` matches the type filter of `query` (shared by the backends).
pub fn type_matches(query: &EventQuery, event_type: EventType) -> bool {
    query.types.is_empty() || query.types.contains(&event_type)
}
