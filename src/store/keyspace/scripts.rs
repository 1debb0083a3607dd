//! The Lua scripts of the key space (one `.lua` file each under `lua/`) and what each takes
//! and returns.

use super::*;

/// The revocation sink, shared by every script that may end a session or move events: it
/// appends one event to the log (`log`), to the user slot's outbox (`outbox`, Redis Cluster),
/// or to the log unless the session already has an event there (`drain`, outbox → log).
/// KEYS[1..4]: log meta, log stream, session → seq hash, expiry index (`outbox`: the outbox
/// four times). ARGV[1..3]: mode, a fresh log id (kept only if the log has none), the prefix of
/// the per-user seq indexes. The script's own keys and arguments follow, as `K` and `V`.
macro_rules! lua_sink {
    () => {
        include_str!("lua/sink.lua")
    };
}

/// Creates a session under the cap, ending the oldest active sessions of the user, each with
/// its event when V[18] (the eviction's kind) is set.
/// K: record, id, user index. V: record-key prefix, now, cap, eviction state, reason,
/// retain-until, then the new record: hash hex, doc, session id, user id, created, absolute,
/// idle, last access, retain-until, version, state; then kind, revoked-by. Returns the evicted
/// records (HGETALL each), or {'!log', key} with nothing written when an eviction's event could
/// not be appended to `key`.
pub(super) const CREATE: &str = concat!(lua_sink!(), include_str!("lua/create.lua"));

/// The record a session id names. KEYS: id. ARGV: record-key prefix. Returns HGETALL or `{}`.
pub(super) const GET_BY_ID: &str = include_str!("lua/get_by_id.lua");

/// Every record of a user. KEYS: user index. ARGV: record-key prefix. Returns HGETALL each.
pub(super) const LIST_USER: &str = include_str!("lua/list_user.lua");

/// The idle slide: only forward, only while active, version untouched. KEYS: record.
/// ARGV: last access, idle expiry, '1' and the IP when it changed (else '0', '').
pub(super) const TOUCH: &str = include_str!("lua/touch.lua");

/// Compare-and-swap. KEYS: record. ARGV: expected version, doc, absolute expiry, idle expiry,
/// last access. Identity, creation time, state and retention stay as stored (their fields
/// override the doc). Returns {0} missing, {1} swapped, {2, HGETALL} conflict.
pub(super) const COMPARE_AND_SWAP: &str = include_str!("lua/compare_and_swap.lua");

/// Active → terminal, with the revocation event when V[5] (the kind) is set; a terminal state is
/// never rewritten. K: record. V: state, reason, at, retain-until, kind, revoked-by. Returns {0}
/// missing, {1, HGETALL} ended, {2, HGETALL} already ended, {3, key} nothing written because
/// the event could not be appended to `key`.
pub(super) const END: &str = concat!(lua_sink!(), include_str!("lua/end.lua"));

/// Deletes a record whose retention passed, with its id key and user-index entry. KEYS: record.
/// ARGV: tag prefix (`P{T}:`), now, hash hex. Returns {0} missing, {1} deleted,
/// {2, retain_until} still retained.
pub(super) const PURGE: &str = include_str!("lua/purge.lua");

/// Moves outbox entries into the log (Redis Cluster), skipping sessions that already have an
/// event there, so that draining one entry twice (two replicas, a retry) appends it once.
/// KEYS/ARGV[1..3]: the sink in `drain` mode. V: groups of sid, uid, kind, reason, by, at, exp.
/// Returns how many were appended.
pub(super) const DRAIN: &str = concat!(lua_sink!(), include_str!("lua/drain.lua"));

/// Log events after a position. KEYS: meta, stream. ARGV: a fresh log id, first stream id to
/// read (`<after + 1>-0`), limit. Returns {log id, head, trimmed, XRANGE entries}.
pub(super) const READ_LOG: &str = include_str!("lua/read_log.lua");

/// A new log id if the id is still the one seen (see [`RevocationLog::renew_log_id`]).
/// KEYS: meta. ARGV: the id seen, a fresh log id. Returns the id now.
pub(super) const RENEW_LOG_ID: &str = include_str!("lua/renew_log_id.lua");

/// Live list entries (`exp` after now) with after < seq <= through, of one user when a user
/// index is given. KEYS: meta, stream, user index (or the stream again). ARGV: a fresh log id,
/// after, through ('' for the head), limit, now, '1' with a user, first stream id
/// (`<after + 1>-0`). Returns {log id, head, trimmed, XRANGE-shaped entries}.
pub(super) const LIST_LOG: &str = include_str!("lua/list_log.lua");

/// The log event of a session. KEYS: meta, session → seq hash, stream. ARGV: a fresh log id,
/// session id. Returns {log id, XRANGE entries (zero or one)}.
pub(super) const LOG_ENTRY: &str = include_str!("lua/log_entry.lua");

/// Deletes events whose `exp` is at or before now, with their index entries, and raises
/// `trimmed`. KEYS: meta, stream, session → seq hash, expiry index. ARGV: now, limit, prefix of
/// the per-user indexes. Returns how many were deleted.
pub(super) const PURGE_LOG: &str = include_str!("lua/purge_log.lua");

/// Forgets a dirty outbox tag if its mark is unchanged since it was read. KEYS: dirty set.
/// ARGV: tag, score as read.
pub(super) const FORGET_DIRTY: &str = include_str!("lua/forget_dirty.lua");

/// Compare-and-set of one rate-limit state. KEYS: states hash, forget index. ARGV: field,
/// expected value ('' when absent), new value, forget-at. Returns {1} written or {0, current}.
pub(super) const LIMIT_CAS: &str = include_str!("lua/limit_cas.lua");

/// Deletes rate-limit states forgettable at now. KEYS: states hash, forget index. ARGV: now,
/// limit. Returns how many were deleted.
pub(super) const PURGE_LIMITS: &str = include_str!("lua/purge_limits.lua");

/// Stores one security event. KEYS: events hash, time index. ARGV: event id, value
/// (`<type>\n<json>`), occurred-at, index member.
pub(super) const EVENT_APPEND: &str = include_str!("lua/event_append.lua");

/// Deletes one security event and its index entry. KEYS: events hash, index. ARGV: event id,
/// index member. Returns 1 if the event existed.
pub(super) const EVENT_DELETE: &str = include_str!("lua/event_delete.lua");

/// One user's events, newest first by (occurred_at, id). KEYS: the user's events hash and time
/// index. ARGV: from (inclusive), upper score, upper id ('' : the upper score is exclusive;
/// else entries at the upper score are kept only below that id), limit, then the wanted types
/// (none: all). Returns the stored values.
pub(super) const USER_EVENTS: &str = include_str!("lua/user_events.lua");

/// Takes a session's refresh lease if it has none or it expired at now. KEYS: lease. ARGV:
/// holder, version, expires-at, now. Returns {1} acquired or {0, holder, version, expires-at}.
pub(super) const ACQUIRE_LEASE: &str = include_str!("lua/acquire_lease.lua");

/// Moves a lease's expiry forward (never back) if the holder holds it unexpired at now. KEYS:
/// lease. ARGV: holder, expires-at, now. Returns 1 if renewed.
pub(super) const RENEW_LEASE: &str = include_str!("lua/renew_lease.lua");

/// Deletes a lease if the holder holds it (expired or not). KEYS: lease. ARGV: holder.
pub(super) const RELEASE_LEASE: &str = include_str!("lua/release_lease.lua");

/// Deletes a lease that expired at now. KEYS: lease. ARGV: now. Returns {0} missing, {1}
/// deleted, {2, expires-at} still live.
pub(super) const PURGE_LEASE: &str = include_str!("lua/purge_lease.lua");

/// Appends a refresh record and trims the session's records to the newest `keep` (record ids
/// sort by time; all scores are 0, so the set orders by id). KEYS: records hash, id index.
/// ARGV: record id, value (`<expires-at>\n<json>`), keep. Returns the trimmed ids.
pub(super) const APPEND_RECORD: &str = include_str!("lua/append_record.lua");

/// A session's newest records. KEYS: records hash, id index. ARGV: limit (at least 1). Returns
/// the stored values, newest first.
pub(super) const RECORD_HISTORY: &str = include_str!("lua/record_history.lua");

/// Deletes one refresh record whose expiry passed. KEYS: records hash, id index. ARGV: record
/// id, now. Returns {0} missing, {1} deleted, {2, expires-at} still retained.
pub(super) const PURGE_RECORD: &str = include_str!("lua/purge_record.lua");

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
    /// [`RevocationLog::read_revocations`].
    pub read_log: Lua,
    /// [`RevocationLog::list_revocations`].
    pub list_log: Lua,
    /// [`RevocationLog::revocation_entry`].
    pub log_entry: Lua,
    /// [`RevocationLog::purge_revocations`].
    pub purge_log: Lua,
    /// [`RevocationLog::renew_log_id`].
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
