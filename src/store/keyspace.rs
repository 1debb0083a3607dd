//! The Redis key space shared by the `redis` and `kv-rest` backends: the key layout, the Lua
//! scripts, and [`KeyspaceStore`], which implements the storage traits once over a [`Transport`]
//! (a Redis connection or the Upstash REST protocol). Both backends therefore run the same
//! commands and the same scripts, and give the same guarantees.
//!
//! Key layout (`P` is `redis.key_prefix`, `T` the 4-hex-digit shard tag of the user, which is
//! also in the session token, its hash and the session id):
//!
//! | key | type | contents |
//! |---|---|---|
//! | `P{T}:s:<token hash hex>` | hash | the record: `doc` (its JSON) and the fields scripts change |
//! | `P{T}:id:<session id>` | string | the token hash hex |
//! | `P{T}:u:<user id>` | sorted set | the user's token hashes, scored by creation time |
//! | `P{expiry}:due` | sorted set | `T:<token hash hex>` scored by a time at or before `retain_until` |
//! | `P:ut:<upstream-token hash hex>` | string, with a Redis TTL | `T:<token hash hex>` of the session that holds (or held) that upstream token |
//! | `P{expiry}:deadlines` | sorted set | `T:<token hash hex>` scored by a time at or before the session's deadline (idle or absolute expiry) |
//! | `P{log}:meta`, `:stream`, `:sess`, `:exp`, `:u:<user>` | hash, stream, hash, sorted sets | the revocation log: id and counters, events (`<seq>-0`), session → seq, expiry and per-user indexes |
//! | `P{T}:outbox`, `P{log}:dirty` | stream, sorted set | Redis Cluster: events waiting for the log, and the tags that may have some |
//! | `P{limits}:states`, `:forget` | hash, sorted set | rate-limit states and the time each can be forgotten |
//! | `P{T}:ev:<user>`, `P{T}:evi:<user>`, `P{events}:time`, `:nouser` | hash, sorted sets, hash | security events, per-user and global time indexes |
//! | `P{S}:lease:<session id>` | hash | the session's refresh lease: `holder`, `version`, `expires_at` |
//! | `P{S}:rr:<session id>`, `P{S}:rri:<session id>` | hash, sorted set | refresh records (id → `<expires_at>\n<json>`) and their ids (score 0: by id, so by time) |
//! | `P{tokens}:due`, `:leases` | sorted sets | refresh records by `expires_at`, leases by a time at or before theirs |
//! | `P{tokens}:cp:<name>` | string | a background worker's checkpoint (the upstream revocation queue's position) |
//!
//! `S` is a session's tag: the `T` its `ses_<T>_...` id carries (`shard_tag` of the id for any
//! other shape), so its lease and records share the slot of its record.
//!
//! The revocation log, the limiter, the security events and the token work implement
//! [`RateLimitStore`], [`SecurityEventStore`] and [`TokenStore`] here too; ARCHITECTURE.md ("How
//! Redis maps it", "Redis Cluster: the outbox", the Security storage table and the Tokens
//! storage table) explains each script and why.
//!
//! Every key of one user shares the hash tag `{T}`, so each per-user script touches one Redis
//! Cluster slot. No key has a Redis TTL: the service's clock decides what is expired (and tests
//! move that clock), and an index TTL could drop live entries (the seed library's flaw). Records
//! are deleted only by [`SessionStore::purge_expired`], which walks `P{expiry}:due`; refresh
//! records and expired leases only by [`TokenStore::purge_refresh_records`], which walks
//! `P{tokens}:due` and `P{tokens}:leases` the same way.
//!
//! The record is a hash rather than a JSON string so that scripts change fields without
//! re-encoding JSON in Lua (cjson turns `[]` into `{}` and rounds numbers to 14 digits): `doc`
//! holds the JSON written at creation or by a compare-and-swap, and the fields beside it
//! (`state`, `version`, `retain_until`, `idle_expires_at`, ...) override it when read.
//!
//! The due index lives in its own slot, so it cannot change atomically with a record. It is a
//! hint that never causes a deletion by itself: it is written before the record (so a record
//! always has an entry), lowered (`ZADD LT`) after a write that shortens retention, and the
//! purge script re-checks the record's own `retain_until` before deleting, putting the entry
//! back at the real time when the record is retained longer. A lost update only delays a purge.

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt as _;
use serde_json::{Map, Value};

use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::revocation::{RevocationEvent, RevocationKind, new_log_id};
use crate::security::events::SecurityEvent;
use crate::security::limiter::{self, Decision, LimiterState, Rule};
use crate::session::{SessionRecord, SessionState, shard_tag};
use crate::store::{
    CasOutcome, EndOutcome, EndSession, EventQuery, LeaseOutcome, LogPosition, LogRead, RateLimitStore, RevocationPage,
    SecurityEventStore, SessionStore, TimedOut, TokenHash, TokenStore, Touch,
};
use crate::token::{RefreshLease, RefreshRecord};

/// A reply, as both transports decode it (RESP2 shapes; status replies become `Data`).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Nil.
    Nil,
    /// An integer.
    Int(i64),
    /// A bulk or status string.
    Data(Vec<u8>),
    /// An array.
    Array(Vec<Reply>),
}

/// A Lua script with its SHA-1, for EVALSHA.
#[derive(Debug)]
pub struct Lua {
    /// A name for logs.
    pub name: &'static str,
    /// The source, for EVAL and SCRIPT LOAD.
    pub source: &'static str,
    /// The redis crate's handle (EVALSHA with fallback).
    pub script: ::redis::Script,
}

impl Lua {
    fn new(name: &'static str, source: &'static str) -> Lua {
        Lua { name, source, script: ::redis::Script::new(source) }
    }

    /// The lower-case hex SHA-1 of the source.
    pub fn sha1(&self) -> &str {
        self.script.get_hash()
    }
}

/// How a backend sends commands. Implementations map every failure to reach storage to
/// [`Error::Unavailable`] and a Redis error reply to [`Error::Internal`] (a bug in a script or
/// a foreign value under our prefix) unless the reply says the server is not ready.
#[async_trait]
pub trait Transport: Send + Sync + std::fmt::Debug + 'static {
    /// The backend's name in messages: "redis" or "kv-rest".
    fn name(&self) -> &'static str;

    /// Sends one command. `read_only` commands may be retried after a transient failure.
    async fn command(&self, args: Vec<String>, read_only: bool) -> Result<Reply>;

    /// Runs a script: EVALSHA, and EVAL (or SCRIPT LOAD) only when the server answers NOSCRIPT,
    /// which guarantees it did not run. A script that may have run is never sent again.
    async fn eval(&self, lua: &Lua, keys: Vec<String>, args: Vec<String>, read_only: bool) -> Result<Reply>;

    /// Whether keys of different hash slots may live on different servers (Redis Cluster), so
    /// that no script may touch two slots.
    fn clustered(&self) -> bool {
        false
    }
}

/// The revocation sink, shared by every script that may end a session or move events: it
/// appends one event to the log (`log`), to the user slot's outbox (`outbox`, Redis Cluster),
/// or to the log unless the session already has an event there (`drain`, outbox → log).
/// KEYS[1..4]: log meta, log stream, session → seq hash, expiry index (`outbox`: the outbox
/// four times). ARGV[1..3]: mode, a fresh log id (kept only if the log has none), the prefix of
/// the per-user seq indexes. The script's own keys and arguments follow, as `K` and `V`.
macro_rules! lua_sink {
    () => {
        include_str!("keyspace/lua/sink.lua")
    };
}

/// Creates a session under the cap, ending the oldest active sessions of the user, each with
/// its event when V[18] (the eviction's kind) is set.
/// K: record, id, user index. V: record-key prefix, now, cap, eviction state, reason,
/// retain-until, then the new record: hash hex, doc, session id, user id, created, absolute,
/// idle, last access, retain-until, version, state; then kind, revoked-by. Returns the evicted
/// records (HGETALL each), or {'!log', key} with nothing written when an eviction's event could
/// not be appended to `key`.
const CREATE: &str = concat!(lua_sink!(), include_str!("keyspace/lua/create.lua"));

/// The record a session id names. KEYS: id. ARGV: record-key prefix. Returns HGETALL or `{}`.
const GET_BY_ID: &str = include_str!("keyspace/lua/get_by_id.lua");

/// Every record of a user. KEYS: user index. ARGV: record-key prefix. Returns HGETALL each.
const LIST_USER: &str = include_str!("keyspace/lua/list_user.lua");

/// The idle slide: only forward, only while active, version untouched. KEYS: record.
/// ARGV: last access, idle expiry, '1' and the IP when it changed (else '0', '').
const TOUCH: &str = include_str!("keyspace/lua/touch.lua");

/// Compare-and-swap. KEYS: record. ARGV: expected version, doc, absolute expiry, idle expiry,
/// last access. Identity, creation time, state and retention stay as stored (their fields
/// override the doc). Returns {0} missing, {1} swapped, {2, HGETALL} conflict.
const COMPARE_AND_SWAP: &str = include_str!("keyspace/lua/compare_and_swap.lua");

/// Active → terminal, with the revocation event when V[5] (the kind) is set; a terminal state is
/// never rewritten. K: record. V: state, reason, at, retain-until, kind, revoked-by. Returns {0}
/// missing, {1, HGETALL} ended, {2, HGETALL} already ended, {3, key} nothing written because
/// the event could not be appended to `key`.
const END: &str = concat!(lua_sink!(), include_str!("keyspace/lua/end.lua"));

/// Deletes a record whose retention passed, with its id key and user-index entry. KEYS: record.
/// ARGV: tag prefix (`P{T}:`), now, hash hex. Returns {0} missing, {1} deleted,
/// {2, retain_until} still retained.
const PURGE: &str = include_str!("keyspace/lua/purge.lua");

/// Moves outbox entries into the log (Redis Cluster), skipping sessions that already have an
/// event there, so that draining one entry twice (two replicas, a retry) appends it once.
/// KEYS/ARGV[1..3]: the sink in `drain` mode. V: groups of sid, uid, kind, reason, by, at, exp.
/// Returns how many were appended.
const DRAIN: &str = concat!(lua_sink!(), include_str!("keyspace/lua/drain.lua"));

/// Log events after a position. KEYS: meta, stream. ARGV: a fresh log id, first stream id to
/// read (`<after + 1>-0`), limit. Returns {log id, head, trimmed, XRANGE entries}.
const READ_LOG: &str = include_str!("keyspace/lua/read_log.lua");

/// A new log id if the id is still the one seen (see [`SessionStore::renew_log_id`]).
/// KEYS: meta. ARGV: the id seen, a fresh log id. Returns the id now.
const RENEW_LOG_ID: &str = include_str!("keyspace/lua/renew_log_id.lua");

/// Live list entries (`exp` after now) with after < seq <= through, of one user when a user
/// index is given. KEYS: meta, stream, user index (or the stream again). ARGV: a fresh log id,
/// after, through ('' for the head), limit, now, '1' with a user, first stream id
/// (`<after + 1>-0`). Returns {log id, head, trimmed, XRANGE-shaped entries}.
const LIST_LOG: &str = include_str!("keyspace/lua/list_log.lua");

/// The log event of a session. KEYS: meta, session → seq hash, stream. ARGV: a fresh log id,
/// session id. Returns {log id, XRANGE entries (zero or one)}.
const LOG_ENTRY: &str = include_str!("keyspace/lua/log_entry.lua");

/// Deletes events whose `exp` is at or before now, with their index entries, and raises
/// `trimmed`. KEYS: meta, stream, session → seq hash, expiry index. ARGV: now, limit, prefix of
/// the per-user indexes. Returns how many were deleted.
const PURGE_LOG: &str = include_str!("keyspace/lua/purge_log.lua");

/// Forgets a dirty outbox tag if its mark is unchanged since it was read. KEYS: dirty set.
/// ARGV: tag, score as read.
const FORGET_DIRTY: &str = include_str!("keyspace/lua/forget_dirty.lua");

/// Compare-and-set of one rate-limit state. KEYS: states hash, forget index. ARGV: field,
/// expected value ('' when absent), new value, forget-at. Returns {1} written or {0, current}.
const LIMIT_CAS: &str = include_str!("keyspace/lua/limit_cas.lua");

/// Deletes rate-limit states forgettable at now. KEYS: states hash, forget index. ARGV: now,
/// limit. Returns how many were deleted.
const PURGE_LIMITS: &str = include_str!("keyspace/lua/purge_limits.lua");

/// Stores one security event. KEYS: events hash, time index. ARGV: event id, value
/// (`<type>\n<json>`), occurred-at, index member.
const EVENT_APPEND: &str = include_str!("keyspace/lua/event_append.lua");

/// Deletes one security event and its index entry. KEYS: events hash, index. ARGV: event id,
/// index member. Returns 1 if the event existed.
const EVENT_DELETE: &str = include_str!("keyspace/lua/event_delete.lua");

/// One user's events, newest first by (occurred_at, id). KEYS: the user's events hash and time
/// index. ARGV: from (inclusive), upper score, upper id ('' : the upper score is exclusive;
/// else entries at the upper score are kept only below that id), limit, then the wanted types
/// (none: all). Returns the stored values.
const USER_EVENTS: &str = include_str!("keyspace/lua/user_events.lua");

/// Takes a session's refresh lease if it has none or it expired at now. KEYS: lease. ARGV:
/// holder, version, expires-at, now. Returns {1} acquired or {0, holder, version, expires-at}.
const ACQUIRE_LEASE: &str = include_str!("keyspace/lua/acquire_lease.lua");

/// Moves a lease's expiry forward (never back) if the holder holds it unexpired at now. KEYS:
/// lease. ARGV: holder, expires-at, now. Returns 1 if renewed.
const RENEW_LEASE: &str = include_str!("keyspace/lua/renew_lease.lua");

/// Deletes a lease if the holder holds it (expired or not). KEYS: lease. ARGV: holder.
const RELEASE_LEASE: &str = include_str!("keyspace/lua/release_lease.lua");

/// Deletes a lease that expired at now. KEYS: lease. ARGV: now. Returns {0} missing, {1}
/// deleted, {2, expires-at} still live.
const PURGE_LEASE: &str = include_str!("keyspace/lua/purge_lease.lua");

/// Appends a refresh record and trims the session's records to the newest `keep` (record ids
/// sort by time; all scores are 0, so the set orders by id). KEYS: records hash, id index.
/// ARGV: record id, value (`<expires-at>\n<json>`), keep. Returns the trimmed ids.
const APPEND_RECORD: &str = include_str!("keyspace/lua/append_record.lua");

/// A session's newest records. KEYS: records hash, id index. ARGV: limit (at least 1). Returns
/// the stored values, newest first.
const RECORD_HISTORY: &str = include_str!("keyspace/lua/record_history.lua");

/// Deletes one refresh record whose expiry passed. KEYS: records hash, id index. ARGV: record
/// id, now. Returns {0} missing, {1} deleted, {2, expires-at} still retained.
const PURGE_RECORD: &str = include_str!("keyspace/lua/purge_record.lua");

/// The scripts, each with its SHA-1.
#[derive(Debug)]
pub struct Scripts {
    /// [`SessionStore::create`].
    pub create: Lua,
    /// [`SessionStore::get_by_id`].
    pub get_by_id: Lua,
    /// [`SessionStore::list_user`].
    pub list_user: Lua,
    /// [`SessionStore::touch`].
    pub touch: Lua,
    /// [`SessionStore::compare_and_swap`].
    pub compare_and_swap: Lua,
    /// [`SessionStore::end`].
    pub end: Lua,
    /// [`SessionStore::purge_expired`], one record per call.
    pub purge: Lua,
    /// Outbox entries into the log (Redis Cluster).
    pub drain: Lua,
    /// [`SessionStore::read_revocations`].
    pub read_log: Lua,
    /// [`SessionStore::list_revocations`].
    pub list_log: Lua,
    /// [`SessionStore::revocation_entry`].
    pub log_entry: Lua,
    /// [`SessionStore::purge_revocations`].
    pub purge_log: Lua,
    /// [`SessionStore::renew_log_id`].
    pub renew_log_id: Lua,
    /// Forgets a drained outbox tag.
    pub forget_dirty: Lua,
    /// [`RateLimitStore::check`]'s compare-and-set.
    pub limit_cas: Lua,
    /// [`RateLimitStore::purge_limits`].
    pub purge_limits: Lua,
    /// [`SecurityEventStore::append`].
    pub event_append: Lua,
    /// [`SecurityEventStore::purge_events`], one event per call.
    pub event_delete: Lua,
    /// [`SecurityEventStore::user_events`].
    pub user_events: Lua,
    /// [`TokenStore::acquire_lease`].
    pub acquire_lease: Lua,
    /// [`TokenStore::renew_lease`].
    pub renew_lease: Lua,
    /// [`TokenStore::release_lease`].
    pub release_lease: Lua,
    /// Expired leases, in [`TokenStore::purge_refresh_records`], one per call.
    pub purge_lease: Lua,
    /// [`TokenStore::append_refresh_record`].
    pub append_record: Lua,
    /// [`TokenStore::refresh_history`].
    pub record_history: Lua,
    /// [`TokenStore::purge_refresh_records`], one record per call.
    pub purge_record: Lua,
}

/// The scripts every keyspace backend runs.
pub static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    create: Lua::new("create", CREATE),
    get_by_id: Lua::new("get_by_id", GET_BY_ID),
    list_user: Lua::new("list_user", LIST_USER),
    touch: Lua::new("touch", TOUCH),
    compare_and_swap: Lua::new("compare_and_swap", COMPARE_AND_SWAP),
    end: Lua::new("end", END),
    purge: Lua::new("purge", PURGE),
    drain: Lua::new("drain", DRAIN),
    read_log: Lua::new("read_log", READ_LOG),
    list_log: Lua::new("list_log", LIST_LOG),
    log_entry: Lua::new("log_entry", LOG_ENTRY),
    purge_log: Lua::new("purge_log", PURGE_LOG),
    renew_log_id: Lua::new("renew_log_id", RENEW_LOG_ID),
    forget_dirty: Lua::new("forget_dirty", FORGET_DIRTY),
    limit_cas: Lua::new("limit_cas", LIMIT_CAS),
    purge_limits: Lua::new("purge_limits", PURGE_LIMITS),
    event_append: Lua::new("event_append", EVENT_APPEND),
    event_delete: Lua::new("event_delete", EVENT_DELETE),
    user_events: Lua::new("user_events", USER_EVENTS),
    acquire_lease: Lua::new("acquire_lease", ACQUIRE_LEASE),
    renew_lease: Lua::new("renew_lease", RENEW_LEASE),
    release_lease: Lua::new("release_lease", RELEASE_LEASE),
    purge_lease: Lua::new("purge_lease", PURGE_LEASE),
    append_record: Lua::new("append_record", APPEND_RECORD),
    record_history: Lua::new("record_history", RECORD_HISTORY),
    purge_record: Lua::new("purge_record", PURGE_RECORD),
});

/// Key names under a prefix.
#[derive(Debug, Clone)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    /// A layout under `prefix`. Braces are refused: Redis Cluster hashes the first `{...}` of a
    /// key, so a brace in the prefix would move every key to one slot.
    pub fn new(prefix: &str) -> std::result::Result<Layout, String> {
        if prefix.contains(['{', '}']) {
            return Err("must not contain `{` or `}` (Redis Cluster hash tags)".into());
        }
        Ok(Layout { prefix: prefix.to_owned() })
    }

    /// `P{T}:`: the start of every key of the users with tag `tag`.
    fn tagged(&self, tag: &str) -> String {
        format!("{}{{{tag}}}:", self.prefix)
    }

    /// `P{T}:s:`: record keys start with this; scripts append the hash hex.
    fn records(&self, tag: &str) -> String {
        format!("{}s:", self.tagged(tag))
    }

    fn record(&self, hash: &TokenHash) -> String {
        format!("{}{}", self.records(&hash_tag(hash)), hex::encode(hash))
    }

    fn id(&self, tag: &str, session_id: &str) -> String {
        format!("{}id:{session_id}", self.tagged(tag))
    }

    fn user(&self, tag: &str, user_id: &str) -> String {
        format!("{}u:{user_id}", self.tagged(tag))
    }

    /// The purge index (one key, its own slot).
    fn due(&self) -> String {
        format!("{}{{expiry}}:due", self.prefix)
    }

    /// The upstream-token index entry of one hash (its own key, so in any slot).
    fn upstream(&self, upstream_hash_hex: &str) -> String {
        format!("{}ut:{upstream_hash_hex}", self.prefix)
    }

    /// The deadline index of [`SessionStore::take_timed_out`] (beside the purge index).
    fn deadlines(&self) -> String {
        format!("{}{{expiry}}:deadlines", self.prefix)
    }

    /// A key of the revocation log (all in the `{log}` slot): `meta`, `stream`, `sess`, `exp`,
    /// `dirty`, and `u:` (the prefix of the per-user indexes).
    fn log(&self, what: &str) -> String {
        format!("{}{{log}}:{what}", self.prefix)
    }

    /// The revocation outbox of the users with tag `tag` (Redis Cluster).
    fn outbox(&self, tag: &str) -> String {
        format!("{}outbox", self.tagged(tag))
    }

    /// Rate-limit states (`states`) and their forget index (`forget`), in the `{limits}` slot.
    fn limits(&self, what: &str) -> String {
        format!("{}{{limits}}:{what}", self.prefix)
    }

    /// A user's security events (`ev`) or their time index (`evi`).
    fn user_events(&self, what: &str, user_id: &str) -> String {
        format!("{}{what}:{user_id}", self.tagged(&shard_tag(user_id)))
    }

    /// Security events without a user (`nouser`) and the global time index (`time`), in the
    /// `{events}` slot.
    fn events(&self, what: &str) -> String {
        format!("{}{{events}}:{what}", self.prefix)
    }

    /// A session's refresh lease, in its slot.
    fn lease(&self, session_id: &str) -> String {
        format!("{}lease:{session_id}", self.tagged(&session_tag(session_id)))
    }

    /// A session's refresh records (`rr`: record id → value) or their id index (`rri`), in its
    /// slot.
    fn refresh(&self, what: &str, session_id: &str) -> String {
        format!("{}{what}:{session_id}", self.tagged(&session_tag(session_id)))
    }

    /// The purge indexes of the token work, in the `{tokens}` slot: `due` (refresh records by
    /// `expires_at`) and `leases` (leases by a time at or before their expiry).
    fn tokens(&self, what: &str) -> String {
        format!("{}{{tokens}}:{what}", self.prefix)
    }
}

/// The shard tag of a session's token-work keys: the tag its `ses_<tag>_...` id carries, or, for
/// an id of another shape, the tag of the id itself (still one slot per session).
fn session_tag(session_id: &str) -> String {
    id_tag(session_id).map_or_else(|| shard_tag(session_id), str::to_owned)
}

/// The `{tokens}:due` member of a refresh record: `<session id>|<record id>` (record ids have
/// no `|`; the session id is split off at the last one).
fn record_member(session_id: &str, record_id: &str) -> String {
    format!("{session_id}|{record_id}")
}

/// The shard tag a token hash carries (see [`crate::crypto::token_hash`]).
fn hash_tag(hash: &TokenHash) -> String {
    hex::encode(&hash[..2])
}

fn due_member(hash: &TokenHash) -> String {
    format!("{}:{}", hash_tag(hash), hex::encode(hash))
}

/// The shard tag of a `ses_<tag>_...` id.
fn id_tag(session_id: &str) -> Option<&str> {
    let rest = session_id.strip_prefix("ses_")?;
    let tag = rest.get(..4)?;
    (rest.as_bytes().get(4) == Some(&b'_') && tag.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then_some(tag)
}

fn state_name(state: SessionState) -> &'static str {
    match state {
        SessionState::Active => "active",
        SessionState::Expired => "expired",
        SessionState::Revoked => "revoked",
        SessionState::Terminated => "terminated",
    }
}

/// Hash fields that override the same-named member of `doc`, and whether they are numbers.
const FIELDS: [(&str, bool); 12] = [
    ("session_id", false),
    ("user_id", false),
    ("state", false),
    ("version", true),
    ("created_at", true),
    ("absolute_expires_at", true),
    ("idle_expires_at", true),
    ("last_accessed_at", true),
    ("retain_until", true),
    ("ip_address", false),
    ("end_reason", false),
    ("ended_at", true),
];

fn malformed(what: &str) -> Error {
    Error::internal(format!("stored session is unreadable: {what}"))
}

fn text(reply: &Reply) -> Result<&str> {
    match reply {
        Reply::Data(bytes) => std::str::from_utf8(bytes).map_err(|_| malformed("a field is not UTF-8")),
        other => Err(malformed(&format!("expected a string, got {other:?}"))),
    }
}

fn integer(reply: &Reply) -> Result<i64> {
    match reply {
        Reply::Int(n) => Ok(*n),
        Reply::Data(_) => text(reply)?.parse().map_err(|_| malformed("expected an integer")),
        other => Err(malformed(&format!("expected an integer, got {other:?}"))),
    }
}

fn items(reply: Reply) -> Result<Vec<Reply>> {
    match reply {
        Reply::Array(items) => Ok(items),
        Reply::Nil => Ok(Vec::new()),
        other => Err(malformed(&format!("expected an array, got {other:?}"))),
    }
}

/// A record from an HGETALL reply; an empty reply is `None`.
fn record(reply: Reply) -> Result<Option<SessionRecord>> {
    let items = items(reply)?;
    if items.is_empty() {
        return Ok(None);
    }
    let mut doc: Option<Map<String, Value>> = None;
    let mut fields = Vec::with_capacity(items.len() / 2);
    for pair in items.chunks(2) {
        let [name, value] = pair else { return Err(malformed("odd number of hash items")) };
        let name = text(name)?;
        if name == "doc" {
            match serde_json::from_str(text(value)?) {
                Ok(Value::Object(map)) => doc = Some(map),
                _ => return Err(malformed("`doc` is not a JSON object")),
            }
        } else if let Some((field, numeric)) = FIELDS.iter().find(|(f, _)| *f == name) {
            let value = if *numeric { Value::from(integer(value)?) } else { Value::from(text(value)?) };
            fields.push((*field, value));
        }
    }
    let mut doc = doc.ok_or_else(|| malformed("no `doc` field"))?;
    for (field, value) in fields {
        doc.insert(field.to_owned(), value);
    }
    serde_json::from_value(Value::Object(doc)).map(Some).map_err(|e| malformed(&e.to_string()))
}

fn required(reply: Reply) -> Result<SessionRecord> {
    record(reply)?.ok_or_else(|| malformed("empty record"))
}

/// A script's `{code, ...}` reply.
/// The end (or eviction) was refused, with nothing written, because its revocation event could
/// not be appended to `key`: a session never ends without its event.
fn log_unwritable(key: &str) -> Error {
    Error::FailedPrecondition(format!(
        "the session was not ended: its revocation event cannot be appended, because the Redis key \
         {key} holds a value of another type (or a sequence number the log has passed); an operator \
         must delete or repair that key (nothing else may write under the key prefix), then retry"
    ))
}

fn coded(reply: Reply) -> Result<(i64, Vec<Reply>)> {
    let mut items = items(reply)?.into_iter();
    let code = integer(&items.next().ok_or_else(|| malformed("empty script reply"))?)?;
    Ok((code, items.collect()))
}

/// How many purge scripts run at once.
const PURGE_CONCURRENCY: usize = 16;

fn unsigned(reply: &Reply) -> Result<u64> {
    u64::try_from(integer(reply)?).map_err(|_| malformed("negative number"))
}

fn wall_clock_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A stream entry `[id, [field, value, ...]]`.
fn stream_entry(reply: Reply) -> Result<(String, std::collections::HashMap<String, String>)> {
    let mut parts = items(reply)?.into_iter();
    let (Some(id), Some(fields)) = (parts.next(), parts.next()) else { return Err(malformed("stream entry")) };
    let id = text(&id)?.to_owned();
    let mut map = std::collections::HashMap::new();
    for pair in items(fields)?.chunks(2) {
        let [name, value] = pair else { return Err(malformed("odd stream entry fields")) };
        map.insert(text(name)?.to_owned(), text(value)?.to_owned());
    }
    Ok((id, map))
}

fn kind_from(name: &str) -> Result<RevocationKind> {
    [
        RevocationKind::Revoked,
        RevocationKind::Terminated,
        RevocationKind::Evicted,
        RevocationKind::Hijack,
        RevocationKind::RefreshFailed,
    ]
    .into_iter()
    .find(|kind| kind.as_str() == name)
    .ok_or_else(|| malformed("unknown revocation kind"))
}

/// `revoked_by` as a stream field: `-` for none, `+<name>` for a name.
fn encode_by(by: Option<&str>) -> String {
    by.map_or_else(|| "-".to_owned(), |by| format!("+{by}"))
}

/// A log event from a stream entry whose id is `<seq>-0`.
fn log_event(reply: Reply) -> Result<RevocationEvent> {
    let (id, mut fields) = stream_entry(reply)?;
    let seq = id.strip_suffix("-0").and_then(|n| n.parse().ok()).ok_or_else(|| malformed("log entry id"))?;
    let mut take = |name: &str| fields.remove(name).ok_or_else(|| malformed("log entry field"));
    let number = |value: String| value.parse::<Millis>().map_err(|_| malformed("log entry number"));
    Ok(RevocationEvent {
        seq,
        session_id: take("sid")?,
        user_id: take("uid")?,
        kind: kind_from(&take("kind")?)?,
        reason: take("reason")?,
        revoked_by: take("by")?.strip_prefix('+').map(str::to_owned),
        revoked_at: number(take("at")?)?,
        expires_at: number(take("exp")?)?,
    })
}

/// The hash field of a rate-limit state: the rule's name, length-prefixed, then the key.
fn limit_field(rule: &str, key: &str) -> String {
    format!("{}:{rule}{key}", rule.len())
}

fn encode_limit(state: &LimiterState) -> String {
    format!("{}:{}:{}:{}", state.tat_us, state.violations, state.last_violation_ms, state.blocked_until_ms)
}

fn decode_limit(value: &str) -> Result<LimiterState> {
    let bad = || Error::internal("stored rate-limit state is unreadable");
    let mut parts = value.split(':');
    let mut next = || parts.next().ok_or_else(bad);
    let state = LimiterState {
        tat_us: next()?.parse().map_err(|_| bad())?,
        violations: next()?.parse().map_err(|_| bad())?,
        last_violation_ms: next()?.parse().map_err(|_| bad())?,
        blocked_until_ms: next()?.parse().map_err(|_| bad())?,
    };
    Ok(state)
}

/// The time-index member of a security event: `u|<tag>|<user hex>|<id>` or `n|<id>`.
fn event_member(event: &SecurityEvent) -> String {
    match &event.user_id {
        Some(user) => format!("u|{}|{}|{}", shard_tag(user), hex::encode(user), event.event_id),
        None => format!("n|{}", event.event_id),
    }
}

/// A [`SessionStore`] over any [`Transport`]; every operation is bounded by the storage timeout.
#[derive(Debug)]
pub struct KeyspaceStore<T: Transport> {
    transport: T,
    layout: Layout,
    timeout: Duration,
    /// The log id last read from Redis (see [`SessionStore::log_id`]).
    log_id: std::sync::RwLock<String>,
    /// When this replica last drained stale outboxes (Redis Cluster).
    last_drain: std::sync::Mutex<Option<std::time::Instant>>,
    /// Rate-limit checks of one key take turns within this replica (striped by key), so the
    /// compare-and-set only ever races the other replicas' checks, not this one's.
    limit_turns: Vec<tokio::sync::Mutex<()>>,
}

/// Stripes of [`KeyspaceStore::limit_turns`].
const LIMIT_STRIPES: usize = 64;

/// Placeholder log id until the first log read: alphanumeric (so a cursor made with it parses),
/// never equal to a real id (16 hex digits), so such a cursor is out of range, never misread.
const UNKNOWN_LOG_ID: &str = "unknownlog";

/// How long an outbox tag's mark protects it from other replicas' drains: the writer that
/// marked it drains its own entry right after its script, so others only step in (and may then
/// forget the tag) once the mark is older than any write in flight could be.
const OUTBOX_GRACE: Duration = Duration::from_secs(10);

/// How often a replica looks for outboxes that their writers did not drain (Redis Cluster).
const STALE_DRAIN_INTERVAL: Duration = Duration::from_secs(1);

/// Outbox entries moved per drain script.
const DRAIN_BATCH: usize = 256;

impl<T: Transport> KeyspaceStore<T> {
    /// A store over `transport` under `layout`; each operation fails `Unavailable` after `timeout`.
    pub fn new(transport: T, layout: Layout, timeout: Duration) -> KeyspaceStore<T> {
        KeyspaceStore {
            transport,
            layout,
            timeout,
            log_id: std::sync::RwLock::new(UNKNOWN_LOG_ID.to_owned()),
            last_drain: std::sync::Mutex::new(None),
            limit_turns: (0..LIMIT_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    /// The sink keys and arguments of a script that may end sessions of tag `tag` (see
    /// `lua_sink!`): the log itself on one Redis, the tag's outbox on a cluster.
    fn sink(&self, tag: &str) -> (Vec<String>, Vec<String>) {
        if self.transport.clustered() {
            let outbox = self.layout.outbox(tag);
            (
                vec![outbox.clone(), outbox.clone(), outbox.clone(), outbox],
                vec!["outbox".into(), String::new(), String::new()],
            )
        } else {
            (self.log_keys(), vec!["log".into(), new_log_id(), self.layout.log("u:")])
        }
    }

    fn log_keys(&self) -> Vec<String> {
        vec![self.layout.log("meta"), self.layout.log("stream"), self.layout.log("sess"), self.layout.log("exp")]
    }

    fn remember_log_id(&self, reply: &Reply) -> Result<()> {
        let id = text(reply)?;
        let mut current = self.log_id.write().unwrap_or_else(|p| p.into_inner());
        if *current != id {
            if *current != UNKNOWN_LOG_ID {
                tracing::warn!(old = %current, new = %id, "the revocation log in Redis has a new id (was it reset?); older cursors are now out of range");
            }
            id.clone_into(&mut current);
        }
        Ok(())
    }

    /// Cluster: marks `tag` as having outbox entries, before the script that writes them.
    async fn mark_outbox(&self, tag: &str) -> Result<()> {
        if !self.transport.clustered() {
            return Ok(());
        }
        let args = vec!["ZADD".into(), self.layout.log("dirty"), wall_clock_ms().to_string(), tag.to_owned()];
        self.transport.command(args, false).await.map(drop)
    }

    /// Cluster: after a script that may have written the outbox of `tag`, moves its entries into
    /// the log at once, so the caller's event is in the log when the call returns. A failure is
    /// logged, not returned: the end itself has happened, and the entry stays in the outbox
    /// until a later drain (this writer's next one, or any replica's stale drain) moves it.
    async fn drain_after_write(&self, tag: &str) {
        if self.transport.clustered()
            && let Err(e) = self.drain_outbox(tag).await
        {
            tracing::warn!(error = %e, tag, "revocation outbox not drained yet; a later drain will move it");
        }
    }

    /// Moves every entry of one outbox into the log (idempotent: a session's event is appended
    /// once however often its entry is drained), then deletes them from the outbox.
    async fn drain_outbox(&self, tag: &str) -> Result<()> {
        let outbox = self.layout.outbox(tag);
        loop {
            let args =
                vec!["XRANGE".into(), outbox.clone(), "-".into(), "+".into(), "COUNT".into(), DRAIN_BATCH.to_string()];
            let entries = items(self.transport.command(args, true).await?)?;
            if entries.is_empty() {
                return Ok(());
            }
            let full = entries.len() == DRAIN_BATCH;
            let mut ids = Vec::with_capacity(entries.len());
            let mut args = vec!["drain".to_owned(), new_log_id(), self.layout.log("u:")];
            for entry in entries {
                let (id, fields) = stream_entry(entry)?;
                ids.push(id);
                for name in ["sid", "uid", "kind", "reason", "by", "at", "exp"] {
                    args.push(fields.get(name).cloned().ok_or_else(|| malformed("outbox entry field"))?);
                }
            }
            self.transport.eval(&SCRIPTS.drain, self.log_keys(), args, false).await?;
            let mut xdel = vec!["XDEL".to_owned(), outbox.clone()];
            xdel.extend(ids);
            self.transport.command(xdel, false).await?;
            if !full {
                return Ok(());
            }
        }
    }

    /// Cluster: drains the outboxes whose mark is older than [`OUTBOX_GRACE`] (their writer
    /// stopped before draining), then forgets each tag unless it was marked again meanwhile.
    /// Runs at most once per [`STALE_DRAIN_INTERVAL`] per replica.
    async fn drain_stale(&self) -> Result<()> {
        if !self.transport.clustered() {
            return Ok(());
        }
        {
            let mut last = self.last_drain.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < STALE_DRAIN_INTERVAL) {
                return Ok(());
            }
            *last = Some(std::time::Instant::now());
        }
        let before = wall_clock_ms() - crate::clock::millis(OUTBOX_GRACE);
        let dirty = self.layout.log("dirty");
        let args = vec![
            "ZRANGEBYSCORE".into(),
            dirty.clone(),
            "-inf".into(),
            format!("({before}"),
            "WITHSCORES".into(),
            "LIMIT".into(),
            "0".into(),
            "64".into(),
        ];
        let marks = items(self.transport.command(args, true).await?)?;
        for pair in marks.chunks(2) {
            let [tag, score] = pair else { return Err(malformed("odd ZRANGEBYSCORE reply")) };
            let tag = text(tag)?.to_owned();
            self.drain_outbox(&tag).await?;
            let args = vec![tag, text(score)?.to_owned()];
            self.transport.eval(&SCRIPTS.forget_dirty, vec![dirty.clone()], args, false).await?;
        }
        Ok(())
    }

    /// The log's id and position from a `{id, head, trimmed, ...}` reply.
    fn position(&self, reply: &[Reply]) -> Result<LogPosition> {
        let [id, head, trimmed, ..] = reply else { return Err(malformed("log reply")) };
        self.remember_log_id(id)?;
        Ok(LogPosition { head: unsigned(head)?, trimmed_through: unsigned(trimmed)? })
    }

    /// The transport (tests inspect it).
    pub fn transport(&self) -> &T {
        &self.transport
    }

    async fn bounded<R>(&self, operation: &str, work: impl Future<Output = Result<R>>) -> Result<R> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(Error::unavailable(format!(
                "session storage ({}) did not answer within {} ms ({operation})",
                self.transport.name(),
                self.timeout.as_millis()
            ))),
        }
    }

    /// Lowers the purge-index entry of `hash` to `retain_until` (never raises it).
    async fn lower_due(&self, hash: &TokenHash, retain_until: Millis) -> Result<()> {
        let args = vec!["ZADD".into(), self.layout.due(), "LT".into(), retain_until.to_string(), due_member(hash)];
        self.transport.command(args, false).await.map(drop)
    }

    /// After a write that shortened retention: the purge only runs late if this fails, so a
    /// failure is logged, not returned (the write itself has happened).
    async fn lower_due_after_write(&self, hash: &TokenHash, retain_until: Millis) {
        if let Err(e) = self.lower_due(hash, retain_until).await {
            tracing::warn!(error = %e, "could not update the purge index; the tombstone will be purged late");
        }
    }

    /// Purges one indexed record; `true` if this call deleted it. A record retained longer than
    /// its index entry said gets its entry moved to the real retention time; an entry whose
    /// record is gone is dropped.
    async fn purge_one(&self, member: String, now: Millis) -> Result<bool> {
        let Some((tag, hash_hex)) = member.split_once(':') else {
            return self.forget_due(member).await.map(|()| false);
        };
        let keys = vec![format!("{}{hash_hex}", self.layout.records(tag))];
        let args = vec![self.layout.tagged(tag), now.to_string(), hash_hex.to_owned()];
        let (code, rest) = coded(self.transport.eval(&SCRIPTS.purge, keys, args, false).await?)?;
        match code {
            2 => {
                let retain_until = integer(rest.first().ok_or_else(|| malformed("purge reply"))?)?;
                let args = vec!["ZADD".into(), self.layout.due(), retain_until.to_string(), member];
                self.transport.command(args, false).await?;
                Ok(false)
            }
            deleted => {
                self.forget_due(member).await?;
                Ok(deleted == 1)
            }
        }
    }

    /// One entry of the deadline index: the session if it timed out (its entry dropped), else
    /// `None` with the entry dropped (session gone or ended) or moved to its new deadline. Every
    /// step is idempotent, so two replicas sweeping at once at worst both return a session, and
    /// the second end of it finds it already ended.
    async fn look_at_deadline(&self, member: String, now: Millis) -> Result<Option<SessionRecord>> {
        let hash: Option<TokenHash> = member
            .split_once(':')
            .and_then(|(_, hex_hash)| hex::decode(hex_hash).ok())
            .and_then(|bytes| bytes.try_into().ok());
        let record = match hash {
            Some(hash) => self.get_by_token(&hash).await?,
            None => None,
        };
        let forget = vec!["ZREM".into(), self.layout.deadlines(), member.clone()];
        match record {
            Some(record) if !record.state.is_terminal() && record.deadline() > now => {
                let args = vec!["ZADD".into(), self.layout.deadlines(), record.deadline().to_string(), member];
                self.transport.command(args, false).await?;
                Ok(None)
            }
            Some(record) if !record.state.is_terminal() => {
                self.transport.command(forget, false).await?;
                Ok(Some(record))
            }
            _ => {
                self.transport.command(forget, false).await?;
                Ok(None)
            }
        }
    }

    /// Writes the upstream-token index entries of `record` (before the record itself, so a
    /// record never lists a hash the index lacks). The index is a hint checked against the
    /// record, so it needs no deletion: each entry carries a Redis TTL a day past the record's
    /// retention by the wall clock (the one exception to "no Redis TTL": an entry that outlives
    /// its record is harmless, one that vanished early only makes an old token unknown).
    async fn index_upstream(&self, record: &SessionRecord) -> Result<()> {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let ttl = record.retain_until.saturating_sub(wall).max(0).saturating_add(24 * 3600 * 1000);
        for hex_hash in &record.upstream_hashes {
            let args = vec![
                "SET".into(),
                self.layout.upstream(hex_hash),
                due_member(&record.token_hash),
                "PX".into(),
                ttl.to_string(),
            ];
            self.transport.command(args, false).await?;
        }
        Ok(())
    }

    async fn forget_due(&self, member: String) -> Result<()> {
        self.transport.command(vec!["ZREM".into(), self.layout.due(), member], false).await.map(drop)
    }
}

#[async_trait]
impl<T: Transport> SessionStore for KeyspaceStore<T> {
    async fn create(&self, record: SessionRecord, cap: u32, eviction: EndSession) -> Result<Vec<SessionRecord>> {
        let tag = hash_tag(&record.token_hash);
        if tag != shard_tag(&record.user_id) || id_tag(&record.session_id) != Some(tag.as_str()) {
            return Err(Error::internal("session token, id and user route to different shards"));
        }
        self.bounded("create", async {
            // The index entries first: a record never exists without them.
            let due =
                vec!["ZADD".into(), self.layout.due(), record.retain_until.to_string(), due_member(&record.token_hash)];
            self.transport.command(due, false).await?;
            let deadline = vec![
                "ZADD".into(),
                self.layout.deadlines(),
                record.deadline().to_string(),
                due_member(&record.token_hash),
            ];
            self.transport.command(deadline, false).await?;
            self.index_upstream(&record).await?;
            if eviction.kind.is_some() {
                self.mark_outbox(&tag).await?;
            }
            let hash_hex = hex::encode(record.token_hash);
            let (mut keys, mut args) = self.sink(&tag);
            keys.extend([
                self.layout.record(&record.token_hash),
                self.layout.id(&tag, &record.session_id),
                self.layout.user(&tag, &record.user_id),
            ]);
            let doc = String::from_utf8(record.to_bytes()?).map_err(Error::internal)?;
            args.extend([
                self.layout.records(&tag),
                eviction.at.to_string(),
                cap.to_string(),
                state_name(eviction.state).into(),
                eviction.reason.clone(),
                eviction.retain_until.to_string(),
                hash_hex,
                doc,
                record.session_id.clone(),
                record.user_id.clone(),
                record.created_at.to_string(),
                record.absolute_expires_at.to_string(),
                record.idle_expires_at.to_string(),
                record.last_accessed_at.to_string(),
                record.retain_until.to_string(),
                record.version.to_string(),
                state_name(record.state).into(),
                eviction.kind.map_or("", RevocationKind::as_str).to_owned(),
                encode_by(eviction.revoked_by.as_deref()),
            ]);
            let reply = items(self.transport.eval(&SCRIPTS.create, keys, args, false).await?)?;
            if let [Reply::Data(marker), key] = reply.as_slice()
                && marker.as_slice() == b"!log"
            {
                return Err(log_unwritable(text(key)?));
            }
            let evicted = reply.into_iter().map(required).collect::<Result<Vec<_>>>()?;
            for ended in &evicted {
                self.lower_due_after_write(&ended.token_hash, ended.retain_until).await;
            }
            if !evicted.is_empty() {
                self.drain_after_write(&tag).await;
            }
            Ok(evicted)
        })
        .await
    }

    async fn get_by_token(&self, token_hash: &TokenHash) -> Result<Option<SessionRecord>> {
        self.bounded("get_by_token", async {
            record(self.transport.command(vec!["HGETALL".into(), self.layout.record(token_hash)], true).await?)
        })
        .await
    }

    async fn get_by_upstream(&self, upstream_hash: &TokenHash) -> Result<Option<SessionRecord>> {
        let member = self
            .bounded("get_by_upstream", async {
                let args = vec!["GET".into(), self.layout.upstream(&hex::encode(upstream_hash))];
                match self.transport.command(args, true).await? {
                    Reply::Nil => Ok(None),
                    reply => text(&reply).map(|m| Some(m.to_owned())),
                }
            })
            .await?;
        let hash: Option<TokenHash> = member
            .as_deref()
            .and_then(|m| m.split_once(':'))
            .and_then(|(_, hex_hash)| hex::decode(hex_hash).ok())
            .and_then(|bytes| bytes.try_into().ok());
        match hash {
            Some(hash) => self.get_by_token(&hash).await,
            None => Ok(None),
        }
    }

    async fn get_by_id(&self, session_id: &str) -> Result<Option<SessionRecord>> {
        let Some(tag) = id_tag(session_id) else { return Ok(None) };
        self.bounded("get_by_id", async {
            let keys = vec![self.layout.id(tag, session_id)];
            record(self.transport.eval(&SCRIPTS.get_by_id, keys, vec![self.layout.records(tag)], true).await?)
        })
        .await
    }

    async fn list_user(&self, user_id: &str) -> Result<Vec<SessionRecord>> {
        let tag = shard_tag(user_id);
        self.bounded("list_user", async {
            let keys = vec![self.layout.user(&tag, user_id)];
            let reply = self.transport.eval(&SCRIPTS.list_user, keys, vec![self.layout.records(&tag)], true).await?;
            items(reply)?.into_iter().map(required).collect()
        })
        .await
    }

    async fn touch(&self, token_hash: &TokenHash, touch: Touch) -> Result<()> {
        self.bounded("touch", async {
            let (changed, ip) = match touch.ip_address {
                Some(ip) => ("1".to_owned(), ip),
                None => ("0".to_owned(), String::new()),
            };
            let args = vec![touch.last_accessed_at.to_string(), touch.idle_expires_at.to_string(), changed, ip];
            self.transport.eval(&SCRIPTS.touch, vec![self.layout.record(token_hash)], args, false).await.map(drop)
        })
        .await
    }

    async fn compare_and_swap(&self, record: &SessionRecord, expected_version: u64) -> Result<CasOutcome> {
        self.bounded("compare_and_swap", async {
            self.index_upstream(record).await?;
            let doc = String::from_utf8(record.to_bytes()?).map_err(Error::internal)?;
            let args = vec![
                expected_version.to_string(),
                doc,
                record.absolute_expires_at.to_string(),
                record.idle_expires_at.to_string(),
                record.last_accessed_at.to_string(),
            ];
            let keys = vec![self.layout.record(&record.token_hash)];
            let (code, mut rest) = coded(self.transport.eval(&SCRIPTS.compare_and_swap, keys, args, false).await?)?;
            Ok(match code {
                0 => CasOutcome::NotFound,
                1 => CasOutcome::Swapped,
                _ => CasOutcome::Conflict(Box::new(required(rest.pop().unwrap_or(Reply::Nil))?)),
            })
        })
        .await
    }

    async fn end(&self, token_hash: &TokenHash, end: EndSession) -> Result<EndOutcome> {
        self.bounded("end", async {
            let tag = hash_tag(token_hash);
            if end.kind.is_some() {
                self.mark_outbox(&tag).await?;
            }
            let (mut keys, mut args) = self.sink(&tag);
            keys.push(self.layout.record(token_hash));
            args.extend([
                state_name(end.state).into(),
                end.reason.clone(),
                end.at.to_string(),
                end.retain_until.to_string(),
                end.kind.map_or("", RevocationKind::as_str).to_owned(),
                encode_by(end.revoked_by.as_deref()),
            ]);
            let (code, mut rest) = coded(self.transport.eval(&SCRIPTS.end, keys, args, false).await?)?;
            Ok(match code {
                0 => EndOutcome::NotFound,
                1 => {
                    let ended = required(rest.pop().unwrap_or(Reply::Nil))?;
                    self.lower_due_after_write(token_hash, ended.retain_until).await;
                    if end.kind.is_some() {
                        self.drain_after_write(&tag).await;
                    }
                    EndOutcome::Ended(ended)
                }
                3 => return Err(log_unwritable(text(rest.first().unwrap_or(&Reply::Nil))?)),
                _ => EndOutcome::AlreadyEnded(required(rest.pop().unwrap_or(Reply::Nil))?),
            })
        })
        .await
    }

    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<usize> {
        self.bounded("purge_expired", async {
            let args = vec![
                "ZRANGEBYSCORE".into(),
                self.layout.due(),
                "-inf".into(),
                now.to_string(),
                "LIMIT".into(),
                "0".into(),
                limit.to_string(),
            ];
            let due = items(self.transport.command(args, true).await?)?
                .iter()
                .map(|m| text(m).map(str::to_owned))
                .collect::<Result<Vec<_>>>()?;
            let results: Vec<Result<bool>> = futures_util::stream::iter(due)
                .map(|member| self.purge_one(member, now))
                .buffer_unordered(PURGE_CONCURRENCY)
                .collect()
                .await;
            let mut deleted = 0;
            for result in results {
                if result? {
                    deleted += 1;
                }
            }
            Ok(deleted)
        })
        .await
    }

    async fn take_timed_out(&self, now: Millis, limit: usize) -> Result<TimedOut> {
        self.bounded("take_timed_out", async {
            let args = vec![
                "ZRANGEBYSCORE".into(),
                self.layout.deadlines(),
                "-inf".into(),
                now.to_string(),
                "LIMIT".into(),
                "0".into(),
                limit.to_string(),
            ];
            let due = items(self.transport.command(args, true).await?)?
                .iter()
                .map(|m| text(m).map(str::to_owned))
                .collect::<Result<Vec<_>>>()?;
            let mut found = TimedOut { sessions: Vec::new(), walked: due.len() };
            let looked: Vec<Result<Option<SessionRecord>>> = futures_util::stream::iter(due)
                .map(|member| self.look_at_deadline(member, now))
                .buffer_unordered(PURGE_CONCURRENCY)
                .collect()
                .await;
            for record in looked {
                found.sessions.extend(record?);
            }
            Ok(found)
        })
        .await
    }

    fn log_id(&self) -> String {
        self.log_id.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn read_revocations(&self, after: u64, limit: usize) -> Result<LogRead> {
        self.bounded("read_revocations", async {
            if let Err(e) = self.drain_stale().await {
                tracing::warn!(error = %e, "stale revocation outboxes not drained; will retry");
            }
            let keys = vec![self.layout.log("meta"), self.layout.log("stream")];
            let args = vec![new_log_id(), format!("{}-0", after.saturating_add(1)), limit.to_string()];
            let mut reply = items(self.transport.eval(&SCRIPTS.read_log, keys, args, true).await?)?;
            let position = self.position(&reply)?;
            let entries = reply.pop().ok_or_else(|| malformed("log reply"))?;
            let events = items(entries)?.into_iter().map(log_event).collect::<Result<Vec<_>>>()?;
            Ok(LogRead { events, position })
        })
        .await
    }

    async fn renew_log_id(&self, seen: &str) -> Result<()> {
        self.bounded("renew_log_id", async {
            let keys = vec![self.layout.log("meta")];
            let reply =
                self.transport.eval(&SCRIPTS.renew_log_id, keys, vec![seen.to_owned(), new_log_id()], false).await?;
            self.remember_log_id(&reply)
        })
        .await
    }

    async fn revocation_entry(&self, session_id: &str, now: Millis) -> Result<Option<RevocationEvent>> {
        self.bounded("revocation_entry", async {
            let keys = vec![self.layout.log("meta"), self.layout.log("sess"), self.layout.log("stream")];
            let args = vec![new_log_id(), session_id.to_owned()];
            let mut reply = items(self.transport.eval(&SCRIPTS.log_entry, keys, args, true).await?)?.into_iter();
            let (Some(id), Some(entries)) = (reply.next(), reply.next()) else {
                return Err(malformed("log entry reply"));
            };
            self.remember_log_id(&id)?;
            match items(entries)?.into_iter().next() {
                Some(entry) => Ok(Some(log_event(entry)?).filter(|e| e.expires_at > now)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list_revocations(
        &self,
        user_id: Option<&str>,
        after: u64,
        through: Option<u64>,
        limit: usize,
        now: Millis,
    ) -> Result<RevocationPage> {
        self.bounded("list_revocations", async {
            let stream = self.layout.log("stream");
            let index = user_id.map_or_else(|| stream.clone(), |user| self.layout.log(&format!("u:{user}")));
            let keys = vec![self.layout.log("meta"), stream, index];
            let args = vec![
                new_log_id(),
                after.to_string(),
                through.map(|t| t.to_string()).unwrap_or_default(),
                limit.to_string(),
                now.to_string(),
                if user_id.is_some() { "1" } else { "0" }.into(),
                format!("{}-0", after.saturating_add(1)),
            ];
            let mut reply = items(self.transport.eval(&SCRIPTS.list_log, keys, args, true).await?)?;
            let position = self.position(&reply)?;
            let entries = reply.pop().ok_or_else(|| malformed("list reply"))?;
            let entries = items(entries)?.into_iter().map(log_event).collect::<Result<Vec<_>>>()?;
            Ok(RevocationPage { entries, position })
        })
        .await
    }

    async fn purge_revocations(&self, now: Millis, limit: usize) -> Result<usize> {
        self.bounded("purge_revocations", async {
            let args = vec![now.to_string(), limit.to_string(), self.layout.log("u:")];
            let n = integer(&self.transport.eval(&SCRIPTS.purge_log, self.log_keys(), args, false).await?)?;
            Ok(usize::try_from(n).unwrap_or(0))
        })
        .await
    }

    async fn count(&self) -> Result<u64> {
        // The purge index has one entry per record (plus, briefly, entries of creations in
        // flight or that failed after their entry was written): O(1) instead of a key scan.
        self.bounded("count", async {
            let n = integer(&self.transport.command(vec!["ZCARD".into(), self.layout.due()], true).await?)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.bounded("ping", async { self.transport.command(vec!["PING".into()], true).await.map(drop) }).await
    }

    async fn server_time(&self) -> Result<Option<Millis>> {
        self.bounded("server_time", async {
            let reply = items(self.transport.command(vec!["TIME".into()], true).await?)?;
            let [seconds, micros] = reply.as_slice() else { return Err(malformed("TIME reply")) };
            let number = |r: &Reply| -> Result<i64> {
                match r {
                    Reply::Int(n) => Ok(*n),
                    other => text(other)?.parse().map_err(|_| malformed("TIME reply")),
                }
            };
            Ok(Some(number(seconds)?.saturating_mul(1000).saturating_add(number(micros)? / 1000)))
        })
        .await
    }

    async fn warn_about_settings(&self) {
        for (setting, wanted, why) in [
            ("appendonly", "yes", "a restart would lose the revocation log's tail"),
            ("maxmemory-policy", "noeviction", "eviction may drop revocation-log keys"),
        ] {
            let args = vec!["CONFIG".into(), "GET".into(), setting.into()];
            let reply = self.bounded("config_get", self.transport.command(args, true)).await;
            let value = match reply.and_then(items) {
                Ok(reply) => match reply.as_slice() {
                    [_, value] => text(value).map(str::to_owned),
                    _ => Err(malformed("CONFIG GET reply")),
                },
                Err(e) => Err(e),
            };
            match value {
                Ok(value) if value == wanted => {}
                Ok(value) => tracing::warn!(
                    setting,
                    value = %value,
                    "Redis has `{setting} {value}`: {why}, so revocations could be lost or watchers \
                     reset; set `{setting} {wanted}` on the server (CONFIG SET {setting} {wanted}, and in redis.conf)"
                ),
                Err(e) => {
                    tracing::debug!(setting, error = %e, "could not check the Redis setting (CONFIG GET refused?)")
                }
            }
        }
    }
}

#[async_trait]
impl<T: Transport> RateLimitStore for KeyspaceStore<T> {
    /// `limiter::apply` runs here, in Rust, and the script only compare-and-sets the state it
    /// read: one function decides on every backend, with no Lua copy of its arithmetic to drift.
    /// A conflict means another check of the key committed first; the script returns the state
    /// it found and this check runs again on it, so checks of one key are serialised exactly
    /// (lock-free: every retry follows another check's success), bounded by the storage timeout.
    /// Within one replica, checks of a key take turns first, so that N concurrent checks cost
    /// about N round trips rather than N²/2 conflicts.
    async fn check(&self, rule: &Rule, key: &str, cost: u32, now: Millis) -> Result<Decision> {
        let field = limit_field(&rule.name, key);
        let stripe = crate::crypto::sha256(field.as_bytes())[0] as usize % LIMIT_STRIPES;
        self.bounded("rate_limit_check", async {
            let _turn = self.limit_turns[stripe].lock().await;
            let states = self.layout.limits("states");
            let get = vec!["HGET".into(), states.clone(), field.clone()];
            let mut current = match self.transport.command(get, true).await? {
                Reply::Nil => String::new(),
                reply => text(&reply)?.to_owned(),
            };
            loop {
                let state = if current.is_empty() { None } else { Some(decode_limit(&current)?) };
                let (decision, next) = limiter::apply(state, rule, cost, now);
                let Some(next) = next else { return Ok(decision) };
                let keys = vec![states.clone(), self.layout.limits("forget")];
                let args = vec![field.clone(), current, encode_limit(&next), next.forget_at(rule).to_string()];
                let (code, rest) = coded(self.transport.eval(&SCRIPTS.limit_cas, keys, args, false).await?)?;
                if code == 1 {
                    return Ok(decision);
                }
                current = text(rest.first().ok_or_else(|| malformed("rate-limit reply"))?)?.to_owned();
            }
        })
        .await
    }

    async fn peek(&self, rule: &Rule, key: &str, cost: u32, now: Millis) -> Result<Decision> {
        let field = limit_field(&rule.name, key);
        self.bounded("rate_limit_peek", async {
            let get = vec!["HGET".into(), self.layout.limits("states"), field];
            let state = match self.transport.command(get, true).await? {
                Reply::Nil => None,
                reply => Some(decode_limit(text(&reply)?)?),
            };
            Ok(limiter::apply(state, rule, cost, now).0)
        })
        .await
    }

    async fn purge_limits(&self, now: Millis, limit: usize) -> Result<usize> {
        self.bounded("purge_limits", async {
            let keys = vec![self.layout.limits("states"), self.layout.limits("forget")];
            let args = vec![now.to_string(), limit.to_string()];
            let n = integer(&self.transport.eval(&SCRIPTS.purge_limits, keys, args, false).await?)?;
            Ok(usize::try_from(n).unwrap_or(0))
        })
        .await
    }
}

#[async_trait]
impl<T: Transport> SecurityEventStore for KeyspaceStore<T> {
    async fn append(&self, event: &SecurityEvent) -> Result<()> {
        self.bounded("append_event", async {
            let json = serde_json::to_string(event).map_err(Error::internal)?;
            let value = format!("{}\n{json}", event.event_type.as_str());
            let member = event_member(event);
            let at = event.occurred_at.to_string();
            match &event.user_id {
                Some(user) => {
                    // The global time index first (its own slot): an event is never stored
                    // without the entry that lets the retention purge find it.
                    let index = vec!["ZADD".into(), self.layout.events("time"), at.clone(), member];
                    self.transport.command(index, false).await?;
                    let keys = vec![self.layout.user_events("ev", user), self.layout.user_events("evi", user)];
                    let args = vec![event.event_id.clone(), value, at, event.event_id.clone()];
                    self.transport.eval(&SCRIPTS.event_append, keys, args, false).await.map(drop)
                }
                None => {
                    let keys = vec![self.layout.events("nouser"), self.layout.events("time")];
                    let args = vec![event.event_id.clone(), value, at, member];
                    self.transport.eval(&SCRIPTS.event_append, keys, args, false).await.map(drop)
                }
            }
        })
        .await
    }

    async fn user_events(&self, query: &EventQuery) -> Result<Vec<SecurityEvent>> {
        if query.from >= query.until || query.limit == 0 {
            return Ok(Vec::new());
        }
        // The exclusive upper bound, as in the memory store: the resume position when it is
        // inside the range, else `until`.
        let (upper_at, upper_id) = match &query.after {
            Some((at, id)) if *at < query.until => (*at, id.clone()),
            _ => (query.until, String::new()),
        };
        if (upper_at, upper_id.as_str()) <= (query.from, "") {
            return Ok(Vec::new());
        }
        self.bounded("user_events", async {
            let user = &query.user_id;
            let keys = vec![self.layout.user_events("ev", user), self.layout.user_events("evi", user)];
            let mut args = vec![query.from.to_string(), upper_at.to_string(), upper_id, query.limit.to_string()];
            args.extend(query.types.iter().map(|t| t.as_str().to_owned()));
            let reply = self.transport.eval(&SCRIPTS.user_events, keys, args, true).await?;
            items(reply)?
                .iter()
                .map(|value| serde_json::from_str(text(value)?).map_err(|e| malformed(&format!("security event: {e}"))))
                .collect()
        })
        .await
    }

    async fn purge_events(&self, cutoff: Millis, limit: usize) -> Result<usize> {
        self.bounded("purge_events", async {
            let time = self.layout.events("time");
            let args = vec![
                "ZRANGEBYSCORE".into(),
                time.clone(),
                "-inf".into(),
                format!("({cutoff}"),
                "LIMIT".into(),
                "0".into(),
                limit.to_string(),
            ];
            let due = items(self.transport.command(args, true).await?)?;
            let mut deleted = 0;
            for member in due {
                let member = text(&member)?.to_owned();
                let parts: Vec<&str> = member.splitn(4, '|').collect();
                let n = match parts.as_slice() {
                    ["n", id] => {
                        let keys = vec![self.layout.events("nouser"), time.clone()];
                        let args = vec![(*id).to_owned(), member.clone()];
                        integer(&self.transport.eval(&SCRIPTS.event_delete, keys, args, false).await?)?
                    }
                    ["u", _, user_hex, id] => {
                        let user = hex::decode(user_hex)
                            .ok()
                            .and_then(|b| String::from_utf8(b).ok())
                            .ok_or_else(|| malformed("security event index entry"))?;
                        let keys = vec![self.layout.user_events("ev", &user), self.layout.user_events("evi", &user)];
                        let n = integer(
                            &self
                                .transport
                                .eval(&SCRIPTS.event_delete, keys, vec![(*id).to_owned(), (*id).to_owned()], false)
                                .await?,
                        )?;
                        self.transport.command(vec!["ZREM".into(), time.clone(), member.clone()], false).await?;
                        n
                    }
                    _ => {
                        self.transport.command(vec!["ZREM".into(), time.clone(), member.clone()], false).await?;
                        0
                    }
                };
                deleted += usize::try_from(n).unwrap_or(0);
            }
            Ok(deleted)
        })
        .await
    }
}

impl<T: Transport> KeyspaceStore<T> {
    /// Purges one indexed refresh record; `true` if this call deleted it.
    async fn purge_record(&self, member: String, now: Millis) -> Result<bool> {
        let due = self.layout.tokens("due");
        let Some((session_id, record_id)) = member.rsplit_once('|') else {
            self.transport.command(vec!["ZREM".into(), due, member], false).await?;
            return Ok(false);
        };
        let keys = vec![self.layout.refresh("rr", session_id), self.layout.refresh("rri", session_id)];
        let args = vec![record_id.to_owned(), now.to_string()];
        let (code, rest) = coded(self.transport.eval(&SCRIPTS.purge_record, keys, args, false).await?)?;
        if code == 2 {
            let at = integer(rest.first().ok_or_else(|| malformed("purge reply"))?)?;
            self.transport.command(vec!["ZADD".into(), due, at.to_string(), member], false).await?;
            return Ok(false);
        }
        self.transport.command(vec!["ZREM".into(), due, member], false).await?;
        Ok(code == 1)
    }

    /// Deletes up to `limit` leases that expired at `now` (left by holders that stopped before
    /// releasing them). An index entry is dropped only if no acquisition re-marked it meanwhile.
    async fn purge_leases(&self, now: Millis, limit: usize) -> Result<()> {
        let index = self.layout.tokens("leases");
        let args = vec![
            "ZRANGEBYSCORE".into(),
            index.clone(),
            "-inf".into(),
            now.to_string(),
            "WITHSCORES".into(),
            "LIMIT".into(),
            "0".into(),
            limit.to_string(),
        ];
        let entries = items(self.transport.command(args, true).await?)?;
        for pair in entries.chunks(2) {
            let [session_id, score] = pair else { return Err(malformed("odd ZRANGEBYSCORE reply")) };
            let session_id = text(session_id)?.to_owned();
            let keys = vec![self.layout.lease(&session_id)];
            let (code, rest) =
                coded(self.transport.eval(&SCRIPTS.purge_lease, keys, vec![now.to_string()], false).await?)?;
            if code == 2 {
                let at = integer(rest.first().ok_or_else(|| malformed("purge reply"))?)?;
                let args = vec!["ZADD".into(), index.clone(), at.to_string(), session_id];
                self.transport.command(args, false).await?;
            } else {
                let args = vec![session_id, text(score)?.to_owned()];
                self.transport.eval(&SCRIPTS.forget_dirty, vec![index.clone()], args, false).await?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl<T: Transport> TokenStore for KeyspaceStore<T> {
    async fn acquire_lease(&self, lease: &RefreshLease, now: Millis) -> Result<LeaseOutcome> {
        self.bounded("acquire_lease", async {
            // The purge-index entry first (a lease never exists without one); `LT` keeps it at
            // or before the expiry of a lease already held.
            let index = vec![
                "ZADD".into(),
                self.layout.tokens("leases"),
                "LT".into(),
                lease.expires_at.to_string(),
                lease.session_id.clone(),
            ];
            self.transport.command(index, false).await?;
            let keys = vec![self.layout.lease(&lease.session_id)];
            let args =
                vec![lease.holder.clone(), lease.version.to_string(), lease.expires_at.to_string(), now.to_string()];
            let (code, rest) = coded(self.transport.eval(&SCRIPTS.acquire_lease, keys, args, false).await?)?;
            if code == 1 {
                return Ok(LeaseOutcome::Acquired);
            }
            let [holder, version, expires_at] = rest.as_slice() else { return Err(malformed("lease reply")) };
            Ok(LeaseOutcome::Held(RefreshLease {
                session_id: lease.session_id.clone(),
                holder: text(holder)?.to_owned(),
                version: unsigned(version)?,
                expires_at: integer(expires_at)?,
            }))
        })
        .await
    }

    async fn renew_lease(&self, session_id: &str, holder: &str, expires_at: Millis, now: Millis) -> Result<bool> {
        self.bounded("renew_lease", async {
            // The index entry stays where it is: at or before the expiry, which is all the purge
            // needs (it re-checks the lease and moves the entry to the real time).
            let keys = vec![self.layout.lease(session_id)];
            let args = vec![holder.to_owned(), expires_at.to_string(), now.to_string()];
            Ok(integer(&self.transport.eval(&SCRIPTS.renew_lease, keys, args, false).await?)? == 1)
        })
        .await
    }

    async fn release_lease(&self, session_id: &str, holder: &str) -> Result<()> {
        self.bounded("release_lease", async {
            let keys = vec![self.layout.lease(session_id)];
            self.transport.eval(&SCRIPTS.release_lease, keys, vec![holder.to_owned()], false).await.map(drop)
        })
        .await
    }

    async fn append_refresh_record(&self, record: &RefreshRecord, keep: usize) -> Result<()> {
        self.bounded("append_refresh_record", async {
            let json = serde_json::to_string(record).map_err(Error::internal)?;
            let due = self.layout.tokens("due");
            // The purge-index entry first (its own slot): a record never exists without one.
            let member = record_member(&record.session_id, &record.record_id);
            let index = vec!["ZADD".into(), due.clone(), record.expires_at.to_string(), member];
            self.transport.command(index, false).await?;
            let keys =
                vec![self.layout.refresh("rr", &record.session_id), self.layout.refresh("rri", &record.session_id)];
            let args =
                vec![record.record_id.clone(), format!("{}\n{json}", record.expires_at), keep.max(1).to_string()];
            let trimmed = items(self.transport.eval(&SCRIPTS.append_record, keys, args, false).await?)?;
            if !trimmed.is_empty() {
                // Only tidiness: the purge drops entries whose record is gone without counting them.
                let mut zrem = vec!["ZREM".to_owned(), due];
                for id in &trimmed {
                    zrem.push(record_member(&record.session_id, text(id)?));
                }
                if let Err(e) = self.transport.command(zrem, false).await {
                    tracing::warn!(error = %e, "could not drop trimmed refresh records from the purge index");
                }
            }
            Ok(())
        })
        .await
    }

    async fn refresh_history(&self, session_id: &str, limit: usize) -> Result<Vec<RefreshRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.bounded("refresh_history", async {
            let keys = vec![self.layout.refresh("rr", session_id), self.layout.refresh("rri", session_id)];
            let reply = self.transport.eval(&SCRIPTS.record_history, keys, vec![limit.to_string()], true).await?;
            items(reply)?
                .iter()
                .map(|value| {
                    let value = text(value)?;
                    let json = value.split_once('\n').map_or(value, |(_, json)| json);
                    serde_json::from_str(json).map_err(|e| malformed(&format!("refresh record: {e}")))
                })
                .collect()
        })
        .await
    }

    /// Walks `{tokens}:due` up to `now` until `limit` records are deleted or nothing is due:
    /// entries whose record was trimmed are dropped without counting, so the count is exact.
    /// Expired leases go too (not counted).
    async fn purge_refresh_records(&self, now: Millis, limit: usize) -> Result<usize> {
        self.bounded("purge_refresh_records", async {
            let due = self.layout.tokens("due");
            let mut deleted = 0;
            while deleted < limit {
                let args = vec![
                    "ZRANGEBYSCORE".into(),
                    due.clone(),
                    "-inf".into(),
                    now.to_string(),
                    "LIMIT".into(),
                    "0".into(),
                    (limit - deleted).to_string(),
                ];
                let members = items(self.transport.command(args, true).await?)?
                    .iter()
                    .map(|m| text(m).map(str::to_owned))
                    .collect::<Result<Vec<_>>>()?;
                if members.is_empty() {
                    break;
                }
                let results: Vec<Result<bool>> = futures_util::stream::iter(members)
                    .map(|member| self.purge_record(member, now))
                    .buffer_unordered(PURGE_CONCURRENCY)
                    .collect()
                    .await;
                for result in results {
                    if result? {
                        deleted += 1;
                    }
                }
            }
            self.purge_leases(now, limit.max(1)).await?;
            Ok(deleted)
        })
        .await
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>> {
        self.bounded("checkpoint", async {
            match self.transport.command(vec!["GET".into(), self.layout.tokens(&format!("cp:{name}"))], true).await? {
                Reply::Nil => Ok(None),
                reply => text(&reply).map(|v| Some(v.to_owned())),
            }
        })
        .await
    }

    async fn save_checkpoint(&self, name: &str, value: &str) -> Result<()> {
        self.bounded("save_checkpoint", async {
            let args = vec!["SET".into(), self.layout.tokens(&format!("cp:{name}")), value.to_owned()];
            self.transport.command(args, false).await.map(drop)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_user_share_a_hash_tag() {
        let layout = Layout::new("atoms:session:").unwrap();
        let tag = shard_tag("alice");
        let token = format!("sat_{tag}_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG");
        let hash = crate::crypto::token_hash(&token);
        let record = layout.record(&hash);
        assert!(record.starts_with(&format!("atoms:session:{{{tag}}}:s:")), "{record}");
        assert!(layout.user(&tag, "alice").starts_with(&format!("atoms:session:{{{tag}}}:u:")));
        assert_eq!(id_tag(&format!("ses_{tag}_0123")), Some(tag.as_str()));
        assert_eq!(id_tag("ses_XYZW_0123"), None);
        // A session's lease and refresh records live in its user's slot.
        let session_id = format!("ses_{tag}_0123");
        assert!(layout.lease(&session_id).starts_with(&format!("atoms:session:{{{tag}}}:lease:")));
        assert!(layout.refresh("rr", &session_id).starts_with(&format!("atoms:session:{{{tag}}}:rr:")));
        assert_eq!(session_tag("s1"), shard_tag("s1"));
        assert!(Layout::new("app:{x}:").is_err());
    }

    #[test]
    fn fields_override_the_doc() {
        let doc = r#"{"session_id":"ses_0000_a","token_hash":"0000000000000000000000000000000000000000000000000000000000000000","user_id":"u","state":"active","created_at":1,"last_accessed_at":1,"idle_expires_at":10,"absolute_expires_at":20,"idle_timeout_ms":9,"absolute_timeout_ms":19,"token_expires_at":null,"scopes":[],"provider":"","ip_address":"192.0.2.1","user_agent":null,"metadata":{},"end_reason":null,"ended_at":null,"retain_until":30,"fingerprint":null,"tokens":{"token_type":"Bearer","access":"x","refresh":null,"id":null},"version":1,"refresh_count":0,"last_refreshed_at":null}"#;
        let data = |s: &str| Reply::Data(s.as_bytes().to_vec());
        let reply = Reply::Array(vec![
            data("doc"),
            data(doc),
            data("state"),
            data("terminated"),
            data("version"),
            data("2"),
            data("ended_at"),
            data("5"),
            data("end_reason"),
            data("user_logout"),
        ]);
        let r = record(reply).unwrap().unwrap();
        assert_eq!(r.state, SessionState::Terminated);
        assert_eq!(r.version, 2);
        assert_eq!(r.ended_at, Some(5));
        assert_eq!(r.end_reason.as_deref(), Some("user_logout"));
        assert_eq!(r.ip_address.as_deref(), Some("192.0.2.1"));
        assert!(record(Reply::Array(vec![])).unwrap().is_none());
    }
}
