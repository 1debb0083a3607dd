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

use std::sync::Arc;

use async_trait::async_trait;

use crate::clock::Millis;
use crate::error::Result;
use crate::session::{SessionRecord, SessionState};

pub mod embedded;
pub mod keyspace;
pub mod kv_rest;
pub mod memory;
pub mod redis;

/// SHA-256 of a session token: the key sessions are stored under.
pub type TokenHash = [u8; 32];

/// How a session ends, as applied atomically by [`SessionStore::end`].
#[derive(Debug, Clone)]
pub struct EndSession {
    /// The terminal state: `Expired`, `Revoked` or `Terminated`.
    pub state: SessionState,
    /// Why, for example "user_logout".
    pub reason: String,
    /// When.
    pub at: Millis,
    /// When the tombstone may be purged.
    pub retain_until: Millis,
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
    /// then inserts `record`. Returns the evicted sessions, oldest first, in their ended form.
    /// Concurrent creates for one user never leave more than `cap` active sessions.
    async fn create(&self, record: SessionRecord, cap: u32, eviction: EndSession) -> Result<Vec<SessionRecord>>;

    /// The session stored under a token hash: the hot path, one read.
    async fn get_by_token(&self, token_hash: &TokenHash) -> Result<Option<SessionRecord>>;

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

    /// Moves an active session to a terminal state. A session already in a terminal state is
    /// left exactly as it is: terminal states are never rewritten.
    async fn end(&self, token_hash: &TokenHash, end: EndSession) -> Result<EndOutcome>;

    /// Deletes up to `limit` sessions whose `retain_until` is at or before `now`, with their
    /// index entries. Returns how many were deleted. Cost grows with what expired, not with all
    /// sessions.
    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<usize>;

    /// Number of stored sessions (all states), for metrics and benchmarks.
    async fn count(&self) -> Result<u64>;

    /// Whether the backend is reachable (health).
    async fn ping(&self) -> Result<()>;
}

/// A shared handle to a session store.
pub type DynSessionStore = Arc<dyn SessionStore>;
