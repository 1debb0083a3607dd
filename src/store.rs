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

/// What [`SessionStore::read_revocations`] read.
#[derive(Debug, Clone, Default)]
pub struct LogRead {
    /// Events after the requested sequence number, in order, without gaps.
    pub events: Vec<RevocationEvent>,
    /// The log's position in the same read.
    pub position: LogPosition,
}

/// What [`SessionStore::list_revocations`] read.
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

/// Sessions, their per-user index and their expiry index.
#[async_trait]
pub trait SessionStore: Send + Sync + std::fmt::Debug + 'static {
    /// Atomically: counts the user's sessions that are active at `now`, ends the oldest of them
    /// (by creation time) as `Terminated` with `eviction.reason` until fewer than `cap` remain,
    /// appending one revocation event per evicted session when `eviction.kind` is set (it is
    /// `Evicted`), then inserts `record`. Returns the evicted sessions, oldest first, in their ended form.
    /// Concurrent creates for one user never leave more than `cap` active sessions.
    async fn create(&self, record: SessionRecord, cap: u32, eviction: EndSession) -> Result<Vec<SessionRecord>>;

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
    /// The user.
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
    /// Sessions.
    pub sessions: DynSessionStore,
    /// Rate-limit state.
    pub limits: DynRateLimitStore,
    /// Security events.
    pub events: DynSecurityEventStore,
    /// Refresh leases and refresh records.
    pub tokens: DynTokenStore,
}

impl Stores {
    /// One backend object serving all four traits.
    pub fn of<S: SessionStore + RateLimitStore + SecurityEventStore + TokenStore>(store: S) -> Stores {
        Stores::shared(Arc::new(store))
    }

    /// Handles onto one backend object that is already shared (two replicas over one store).
    pub fn shared<S: SessionStore + RateLimitStore + SecurityEventStore + TokenStore>(store: Arc<S>) -> Stores {
        Stores { sessions: store.clone(), limits: store.clone(), events: store.clone(), tokens: store }
    }

    /// The same stores, each call timed, counted on failure and run inside a `storage` span,
    /// labelled with `backend` (see [`instrumented`]).
    pub fn instrumented(self, backend: &'static str) -> Stores {
        instrumented::wrap(self, backend)
    }
}

/// Whether `event` matches the type filter of `query` (shared by the backends).
pub fn type_matches(query: &EventQuery, event_type: EventType) -> bool {
    query.types.is_empty() || query.types.contains(&event_type)
}
