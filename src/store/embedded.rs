//! The embedded backend, the default: a redb database in the data directory.
//!
//! Why redb: it is pure Rust (no C toolchain, no system library), ACID with copy-on-write
//! B-trees and a single writer, so each trait operation is one write transaction and therefore
//! atomic; a commit with `Durability::Immediate` is on disk when it returns, so an acknowledged
//! write survives SIGKILL; and reads run concurrently with the writer without blocking. SQLite
//! would give the same guarantees through a C library and SQL we do not need.
//!
//! Tables: `sessions` (token hash → record JSON), `session_ids` (session id → token hash),
//! `user_sessions` ((user id, session id) → token hash) and `session_expiry`
//! ((retain-until millis, token hash) → ()). Idle slides are committed with
//! `Durability::None`: losing the last slides in a crash only makes a session expire a little
//! earlier, and they cost no fsync on the hot path. Everything else is `Immediate`.
//!
//! The revocation log is four more tables in the same file, written in the same write
//! transaction as the end of the session that produced the event: `revocation_log` (sequence
//! number → event JSON), `revocation_sessions` (session id → sequence number),
//! `revocation_users` ((user id, sequence number) → ()) and `revocation_expiry`
//! ((expires-at millis, sequence number) → ()); `revocation_meta` holds the log id, the head and
//! the highest purged sequence number. redb's single writer serialises the transactions, so
//! sequence numbers are assigned in commit order with no gap.
//!
//! The security tables live in the same file: `rate_limits` ((rule, key) → limiter state and the
//! time it can be forgotten), `rate_limit_forget` ((forget-at, rule, key) → ()),
//! `security_events` ((occurred-at, event id) → event JSON) and `user_security_events`
//! ((user id, occurred-at, event id) → ()), the per-user time index that keeps a user's queries
//! proportional to that user's events. A rate-limit check is one write transaction committed with
//! `Durability::None` (a crash may forget the last few counts; no fsync per check); events are
//! `Immediate`. `rate_limit_counts` (rule → keys held) bounds the keys per rule
//! (`security.max_limiter_keys`, see [`crate::security::limiter`]); it is filled from
//! `rate_limits` when a database from before it is opened.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadableDatabase as _, ReadableTable as _, ReadableTableMetadata as _, TableDefinition,
    WriteTransaction,
};

use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::revocation::RevocationEvent;
use crate::security::events::SecurityEvent;
use crate::security::limiter::{self, Decision, LimiterState, Rule};
use crate::session::SessionRecord;
use crate::store::{
    CasOutcome, EndOutcome, EndSession, EventQuery, LeaseOutcome, LogPosition, LogRead, RateLimitStore, RevocationPage,
    SecurityEventStore, SessionStore, TimedOut, TokenHash, TokenStore, Touch, type_matches,
};
use crate::token::{RefreshLease, RefreshRecord};

const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");
const SESSION_IDS: TableDefinition<&str, &[u8]> = TableDefinition::new("session_ids");
const USER_SESSIONS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("user_sessions");
const SESSION_EXPIRY: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("session_expiry");
/// The deadline index of [`SessionStore::take_timed_out`]: (first deadline, token hash).
const SESSION_DEADLINES: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("session_deadlines");
/// Upstream-token hash → session token hash ([`SessionStore::get_by_upstream`]).
const UPSTREAM_TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("upstream_tokens");
const REVOCATION_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("revocation_log");
const REVOCATION_SESSIONS: TableDefinition<&str, u64> = TableDefinition::new("revocation_sessions");
const REVOCATION_USERS: TableDefinition<(&str, u64), ()> = TableDefinition::new("revocation_users");
const REVOCATION_EXPIRY: TableDefinition<(u64, u64), ()> = TableDefinition::new("revocation_expiry");
const REVOCATION_META: TableDefinition<&str, &[u8]> = TableDefinition::new("revocation_meta");

const META_LOG_ID: &str = "log_id";
const META_DEADLINES_INDEXED: &str = "deadlines_indexed";
const META_HEAD: &str = "head";
const META_TRIMMED: &str = "trimmed_through";

const RATE_LIMITS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("rate_limits");
const RATE_LIMIT_FORGET: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("rate_limit_forget");
const RATE_LIMIT_COUNTS: TableDefinition<&str, u64> = TableDefinition::new("rate_limit_counts");
const SECURITY_EVENTS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("security_events");
const USER_SECURITY_EVENTS: TableDefinition<(&str, u64, &str), ()> = TableDefinition::new("user_security_events");
const REFRESH_LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("refresh_leases");
const REFRESH_RECORDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("refresh_records");
const REFRESH_EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("refresh_expiry");
const CHECKPOINTS: TableDefinition<&str, &str> = TableDefinition::new("checkpoints");

/// Sessions in a redb file.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    log_id: Arc<str>,
    max_limiter_keys: usize,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::unavailable(format!("embedded store: {e}"))
}

fn at(millis: Millis) -> u64 {
    u64::try_from(millis).unwrap_or(0)
}

fn to_hash(bytes: &[u8]) -> Result<TokenHash> {
    bytes.try_into().map_err(|_| Error::internal("embedded store: malformed token hash"))
}

/// Fills the deadline index from the stored sessions the first time a database is opened by a
/// version that has it (databases written before it have active sessions the index does not
/// know); a marker in the meta table makes it once.
fn index_deadlines_once(tx: &WriteTransaction) -> Result<()> {
    let mut meta = tx.open_table(REVOCATION_META).map_err(unavailable)?;
    if meta.get(META_DEADLINES_INDEXED).map_err(unavailable)?.is_some() {
        return Ok(());
    }
    let sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
    let mut deadlines = tx.open_table(SESSION_DEADLINES).map_err(unavailable)?;
    for entry in sessions.iter().map_err(unavailable)? {
        let (hash, bytes) = entry.map_err(unavailable)?;
        let record = SessionRecord::from_bytes(bytes.value())?;
        if !record.state.is_terminal() {
            deadlines.insert((at(record.deadline()), hash.value()), ()).map_err(unavailable)?;
        }
    }
    meta.insert(META_DEADLINES_INDEXED, b"1".as_slice()).map_err(unavailable)?;
    Ok(())
}

impl EmbeddedStore {
    /// Opens (or creates) `sessions.redb` in `dir`.
    pub fn open(dir: &Path) -> Result<EmbeddedStore> {
        let path = dir.join("sessions.redb");
        let db = Database::builder()
            .set_cache_size(256 * 1024 * 1024)
            .create(&path)
            .map_err(|e| Error::unavailable(format!("cannot open {}: {e}", path.display())))?;
        let mut store =
            EmbeddedStore { db: Arc::new(db), log_id: Arc::from(""), max_limiter_keys: limiter::DEFAULT_MAX_KEYS };
        let log_id = store.write_now(Durability::Immediate, |tx| {
            tx.open_table(SESSIONS).map_err(unavailable)?;
            tx.open_table(SESSION_IDS).map_err(unavailable)?;
            tx.open_table(USER_SESSIONS).map_err(unavailable)?;
            tx.open_table(SESSION_EXPIRY).map_err(unavailable)?;
            index_deadlines_once(tx)?;
            tx.open_table(UPSTREAM_TOKENS).map_err(unavailable)?;
            tx.open_table(RATE_LIMITS).map_err(unavailable)?;
            tx.open_table(RATE_LIMIT_FORGET).map_err(unavailable)?;
            tx.open_table(SECURITY_EVENTS).map_err(unavailable)?;
            tx.open_table(USER_SECURITY_EVENTS).map_err(unavailable)?;
            tx.open_table(REVOCATION_LOG).map_err(unavailable)?;
            tx.open_table(REVOCATION_SESSIONS).map_err(unavailable)?;
            tx.open_table(REVOCATION_USERS).map_err(unavailable)?;
            tx.open_table(REVOCATION_EXPIRY).map_err(unavailable)?;
            tx.open_table(REFRESH_LEASES).map_err(unavailable)?;
            tx.open_table(REFRESH_RECORDS).map_err(unavailable)?;
            tx.open_table(REFRESH_EXPIRY).map_err(unavailable)?;
            tx.open_table(CHECKPOINTS).map_err(unavailable)?;
            // The log id is made once with the database and kept: cursors stay valid across
            // restarts, and a cursor from another database is recognised as foreign.
            let mut meta = tx.open_table(REVOCATION_META).map_err(unavailable)?;
            let existing = meta.get(META_LOG_ID).map_err(unavailable)?.map(|v| v.value().to_vec());
            match existing {
                Some(bytes) => {
                    String::from_utf8(bytes).map_err(|_| Error::internal("embedded store: malformed log id"))
                }
                None => {
                    let id = crate::revocation::new_log_id();
                    meta.insert(META_LOG_ID, id.as_bytes()).map_err(unavailable)?;
                    Ok(id)
                }
            }
        })?;
        store.log_id = Arc::from(log_id);
        store.write_now(Durability::Immediate, count_limit_keys)?;
        Ok(store)
    }

    /// Holds at most `max` limiter keys per rule (`security.max_limiter_keys`; at least 1).
    pub fn with_max_limiter_keys(mut self, max: usize) -> EmbeddedStore {
        self.max_limiter_keys = max.max(1);
        self
    }

    fn position(&self) -> Result<(redb::ReadTransaction, LogPosition)> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let position = {
            let meta = tx.open_table(REVOCATION_META).map_err(unavailable)?;
            LogPosition { head: meta_u64(&meta, META_HEAD)?, trimmed_through: meta_u64(&meta, META_TRIMMED)? }
        };
        Ok((tx, position))
    }

    /// Runs `f` in one write transaction and commits it.
    fn write_now<T>(&self, durability: Durability, f: impl FnOnce(&WriteTransaction) -> Result<T>) -> Result<T> {
        let mut tx = self.db.begin_write().map_err(unavailable)?;
        tx.set_durability(durability).map_err(unavailable)?;
        if matches!(durability, Durability::Immediate) {
            // Keeps recovery after a crash quick instead of a full repair scan.
            tx.set_quick_repair(true);
        }
        let value = f(&tx)?;
        tx.commit().map_err(unavailable)?;
        Ok(value)
    }

    /// [`EmbeddedStore::write_now`] off the async runtime (commits wait for fsync).
    async fn write<T: Send + 'static>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.write_now(durability, f))
            .await
            .map_err(|e| Error::internal_from("embedded store task failed", e))?
    }

    /// Inserts new sessions in one transaction, without the per-user cap: for the offline
    /// seeding tool (`session-authority seed`), never for serving.
    pub fn insert_batch(&self, records: &[SessionRecord]) -> Result<()> {
        self.write_now(Durability::Immediate, |tx| {
            let mut sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
            let mut ids = tx.open_table(SESSION_IDS).map_err(unavailable)?;
            let mut users = tx.open_table(USER_SESSIONS).map_err(unavailable)?;
            let mut expiry = tx.open_table(SESSION_EXPIRY).map_err(unavailable)?;
            for record in records {
                let hash = record.token_hash.as_slice();
                sessions.insert(hash, record.to_bytes()?.as_slice()).map_err(unavailable)?;
                ids.insert(record.session_id.as_str(), hash).map_err(unavailable)?;
                users.insert((record.user_id.as_str(), record.session_id.as_str()), hash).map_err(unavailable)?;
                expiry.insert((at(record.retain_until), hash), ()).map_err(unavailable)?;
            }
            Ok(())
        })
    }

    fn read_session(&self, hash: &TokenHash) -> Result<Option<SessionRecord>> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let table = tx.open_table(SESSIONS).map_err(unavailable)?;
        match table.get(hash.as_slice()).map_err(unavailable)? {
            Some(bytes) => SessionRecord::from_bytes(bytes.value()).map(Some),
            None => Ok(None),
        }
    }
}

fn meta_u64(meta: &impl redb::ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<u64> {
    match meta.get(key).map_err(unavailable)? {
        Some(bytes) => {
            let raw: [u8; 8] =
                bytes.value().try_into().map_err(|_| Error::internal("embedded store: malformed log metadata"))?;
            Ok(u64::from_be_bytes(raw))
        }
        None => Ok(0),
    }
}

fn set_meta_u64(tx: &WriteTransaction, key: &str, value: u64) -> Result<()> {
    let mut meta = tx.open_table(REVOCATION_META).map_err(unavailable)?;
    meta.insert(key, value.to_be_bytes().as_slice()).map_err(unavailable)?;
    Ok(())
}

/// Appends the event of `end` (if it has one) for the just-ended `record`, in the caller's
/// transaction, so the end and its event commit together or not at all.
fn append_in(tx: &WriteTransaction, end: &EndSession, record: &SessionRecord) -> Result<()> {
    let head = meta_u64(&tx.open_table(REVOCATION_META).map_err(unavailable)?, META_HEAD)?;
    let seq = head + 1;
    let Some(event) = end.event_for(record, seq) else { return Ok(()) };
    let bytes = serde_json::to_vec(&event).map_err(Error::internal)?;
    tx.open_table(REVOCATION_LOG).map_err(unavailable)?.insert(seq, bytes.as_slice()).map_err(unavailable)?;
    tx.open_table(REVOCATION_SESSIONS)
        .map_err(unavailable)?
        .insert(event.session_id.as_str(), seq)
        .map_err(unavailable)?;
    tx.open_table(REVOCATION_USERS)
        .map_err(unavailable)?
        .insert((event.user_id.as_str(), seq), ())
        .map_err(unavailable)?;
    tx.open_table(REVOCATION_EXPIRY)
        .map_err(unavailable)?
        .insert((at(event.expires_at), seq), ())
        .map_err(unavailable)?;
    set_meta_u64(tx, META_HEAD, seq)
}

fn parse_event(bytes: &[u8]) -> Result<RevocationEvent> {
    serde_json::from_slice(bytes).map_err(|e| Error::internal_from("stored revocation event is unreadable", e))
}

fn load(tx: &WriteTransaction, hash: &TokenHash) -> Result<Option<SessionRecord>> {
    let table = tx.open_table(SESSIONS).map_err(unavailable)?;
    let found = table.get(hash.as_slice()).map_err(unavailable)?;
    match found {
        Some(bytes) => SessionRecord::from_bytes(bytes.value()).map(Some),
        None => Ok(None),
    }
}

/// Writes a record that already exists, moving its expiry entry if retention changed.
fn save(tx: &WriteTransaction, record: &SessionRecord, old_retain_until: Millis) -> Result<()> {
    let mut sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
    sessions.insert(record.token_hash.as_slice(), record.to_bytes()?.as_slice()).map_err(unavailable)?;
    if old_retain_until != record.retain_until {
        let mut expiry = tx.open_table(SESSION_EXPIRY).map_err(unavailable)?;
        expiry.remove((at(old_retain_until), record.token_hash.as_slice())).map_err(unavailable)?;
        expiry.insert((at(record.retain_until), record.token_hash.as_slice()), ()).map_err(unavailable)?;
    }
    Ok(())
}

/// Indexes `add` under `session` and drops the entries of `drop` that point at it.
fn reindex_upstream(tx: &WriteTransaction, session: &TokenHash, drop: &[String], add: &[String]) -> Result<()> {
    let mut upstream = tx.open_table(UPSTREAM_TOKENS).map_err(unavailable)?;
    for hex_hash in drop.iter().filter(|h| !add.contains(h)) {
        let Ok(key) = hex::decode(hex_hash) else { continue };
        let points_here = upstream.get(key.as_slice()).map_err(unavailable)?.is_some_and(|v| v.value() == session);
        if points_here {
            upstream.remove(key.as_slice()).map_err(unavailable)?;
        }
    }
    for hex_hash in add {
        let Ok(key) = hex::decode(hex_hash) else { continue };
        upstream.insert(key.as_slice(), session.as_slice()).map_err(unavailable)?;
    }
    Ok(())
}

fn end_in(tx: &WriteTransaction, hash: &TokenHash, end: &EndSession) -> Result<EndOutcome> {
    let Some(mut record) = load(tx, hash)? else { return Ok(EndOutcome::NotFound) };
    if record.state.is_terminal() {
        return Ok(EndOutcome::AlreadyEnded(record));
    }
    let old_retain = record.retain_until;
    record.state = end.state;
    record.end_reason = Some(end.reason.clone());
    record.ended_at = Some(end.at);
    record.retain_until = end.retain_until_for(&record);
    record.version += 1;
    save(tx, &record, old_retain)?;
    append_in(tx, end, &record)?;
    Ok(EndOutcome::Ended(record))
}

fn user_records(tx: &WriteTransaction, user_id: &str) -> Result<Vec<SessionRecord>> {
    let users = tx.open_table(USER_SESSIONS).map_err(unavailable)?;
    let mut records = Vec::new();
    for entry in users.range((user_id, "")..).map_err(unavailable)? {
        let (key, hash) = entry.map_err(unavailable)?;
        if key.value().0 != user_id {
            break;
        }
        if let Some(record) = load(tx, &to_hash(hash.value())?)? {
            records.push(record);
        }
    }
    Ok(records)
}

#[async_trait]
impl SessionStore for EmbeddedStore {
    async fn create(&self, record: SessionRecord, cap: u32, eviction: EndSession) -> Result<Vec<SessionRecord>> {
        self.write(Durability::Immediate, move |tx| {
            let mut active: Vec<SessionRecord> =
                user_records(tx, &record.user_id)?.into_iter().filter(|s| s.is_active_at(eviction.at)).collect();
            active.sort_by(|a, b| (a.created_at, &a.session_id).cmp(&(b.created_at, &b.session_id)));
            let excess = (active.len() + 1).saturating_sub(cap as usize);
            let mut evicted = Vec::with_capacity(excess);
            for old in active.iter().take(excess) {
                if let EndOutcome::Ended(ended) = end_in(tx, &old.token_hash, &eviction)? {
                    evicted.push(ended);
                }
            }
            let hash = record.token_hash.as_slice();
            tx.open_table(SESSIONS)
                .map_err(unavailable)?
                .insert(hash, record.to_bytes()?.as_slice())
                .map_err(unavailable)?;
            tx.open_table(SESSION_IDS)
                .map_err(unavailable)?
                .insert(record.session_id.as_str(), hash)
                .map_err(unavailable)?;
            tx.open_table(USER_SESSIONS)
                .map_err(unavailable)?
                .insert((record.user_id.as_str(), record.session_id.as_str()), hash)
                .map_err(unavailable)?;
            tx.open_table(SESSION_EXPIRY)
                .map_err(unavailable)?
                .insert((at(record.retain_until), hash), ())
                .map_err(unavailable)?;
            tx.open_table(SESSION_DEADLINES)
                .map_err(unavailable)?
                .insert((at(record.deadline()), hash), ())
                .map_err(unavailable)?;
            reindex_upstream(tx, &record.token_hash, &[], &record.upstream_hashes)?;
            Ok(evicted)
        })
        .await
    }

    async fn get_by_token(&self, token_hash: &TokenHash) -> Result<Option<SessionRecord>> {
        // A read is a few microseconds from redb's cache: not worth a thread hop.
        self.read_session(token_hash)
    }

    async fn get_by_upstream(&self, upstream_hash: &TokenHash) -> Result<Option<SessionRecord>> {
        let hash = {
            let tx = self.db.begin_read().map_err(unavailable)?;
            let upstream = tx.open_table(UPSTREAM_TOKENS).map_err(unavailable)?;
            match upstream.get(upstream_hash.as_slice()).map_err(unavailable)? {
                Some(hash) => to_hash(hash.value())?,
                None => return Ok(None),
            }
        };
        self.read_session(&hash)
    }

    async fn get_by_id(&self, session_id: &str) -> Result<Option<SessionRecord>> {
        let hash = {
            let tx = self.db.begin_read().map_err(unavailable)?;
            let ids = tx.open_table(SESSION_IDS).map_err(unavailable)?;
            match ids.get(session_id).map_err(unavailable)? {
                Some(hash) => to_hash(hash.value())?,
                None => return Ok(None),
            }
        };
        self.read_session(&hash)
    }

    async fn list_user(&self, user_id: &str) -> Result<Vec<SessionRecord>> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let users = tx.open_table(USER_SESSIONS).map_err(unavailable)?;
        let sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
        let mut records = Vec::new();
        for entry in users.range((user_id, "")..).map_err(unavailable)? {
            let (key, hash) = entry.map_err(unavailable)?;
            if key.value().0 != user_id {
                break;
            }
            if let Some(bytes) = sessions.get(hash.value()).map_err(unavailable)? {
                records.push(SessionRecord::from_bytes(bytes.value())?);
            }
        }
        Ok(records)
    }

    async fn touch(&self, token_hash: &TokenHash, touch: Touch) -> Result<()> {
        let hash = *token_hash;
        self.write(Durability::None, move |tx| {
            let Some(mut record) = load(tx, &hash)? else { return Ok(()) };
            if record.state.is_terminal() {
                return Ok(());
            }
            record.idle_expires_at = record.idle_expires_at.max(touch.idle_expires_at);
            record.last_accessed_at = record.last_accessed_at.max(touch.last_accessed_at);
            if let Some(ip) = touch.ip_address {
                record.ip_address = Some(ip);
            }
            let retain = record.retain_until;
            save(tx, &record, retain)
        })
        .await
    }

    async fn compare_and_swap(&self, record: &SessionRecord, expected_version: u64) -> Result<CasOutcome> {
        let next = record.clone();
        self.write(Durability::Immediate, move |tx| {
            let Some(current) = load(tx, &next.token_hash)? else { return Ok(CasOutcome::NotFound) };
            if current.version != expected_version || current.state.is_terminal() {
                return Ok(CasOutcome::Conflict(Box::new(current)));
            }
            let mut next = next;
            next.version = expected_version + 1;
            // Identity, state and retention are not the caller's to change through a swap.
            next.session_id = current.session_id.clone();
            next.user_id = current.user_id.clone();
            next.state = current.state;
            next.retain_until = current.retain_until;
            save(tx, &next, current.retain_until)?;
            reindex_upstream(tx, &next.token_hash, &current.upstream_hashes, &next.upstream_hashes)?;
            Ok(CasOutcome::Swapped)
        })
        .await
    }

    async fn end(&self, token_hash: &TokenHash, end: EndSession) -> Result<EndOutcome> {
        let hash = *token_hash;
        self.write(Durability::Immediate, move |tx| end_in(tx, &hash, &end)).await
    }

    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<usize> {
        self.write(Durability::Immediate, move |tx| {
            let due: Vec<(u64, TokenHash)> = {
                let expiry = tx.open_table(SESSION_EXPIRY).map_err(unavailable)?;
                let mut due = Vec::new();
                for entry in expiry.range(..=(at(now), [0xffu8; 32].as_slice())).map_err(unavailable)?.take(limit) {
                    let (key, _) = entry.map_err(unavailable)?;
                    let (until, hash) = key.value();
                    due.push((until, to_hash(hash)?));
                }
                due
            };
            let mut expiry = tx.open_table(SESSION_EXPIRY).map_err(unavailable)?;
            let mut sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
            let mut ids = tx.open_table(SESSION_IDS).map_err(unavailable)?;
            let mut users = tx.open_table(USER_SESSIONS).map_err(unavailable)?;
            let mut purged = Vec::new();
            for (until, hash) in &due {
                expiry.remove((*until, hash.as_slice())).map_err(unavailable)?;
                let removed = sessions.remove(hash.as_slice()).map_err(unavailable)?;
                if let Some(bytes) = removed {
                    let record = SessionRecord::from_bytes(bytes.value())?;
                    ids.remove(record.session_id.as_str()).map_err(unavailable)?;
                    users.remove((record.user_id.as_str(), record.session_id.as_str())).map_err(unavailable)?;
                    purged.push(record);
                }
            }
            for record in &purged {
                reindex_upstream(tx, &record.token_hash, &record.upstream_hashes, &[])?;
            }
            Ok(due.len())
        })
        .await
    }

    async fn take_timed_out(&self, now: Millis, limit: usize) -> Result<TimedOut> {
        self.write(Durability::Immediate, move |tx| {
            let due: Vec<(u64, TokenHash)> = {
                let deadlines = tx.open_table(SESSION_DEADLINES).map_err(unavailable)?;
                let mut due = Vec::new();
                for entry in deadlines.range(..=(at(now), [0xffu8; 32].as_slice())).map_err(unavailable)?.take(limit) {
                    let (key, _) = entry.map_err(unavailable)?;
                    let (deadline, hash) = key.value();
                    due.push((deadline, to_hash(hash)?));
                }
                due
            };
            let mut deadlines = tx.open_table(SESSION_DEADLINES).map_err(unavailable)?;
            let sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
            let mut found = TimedOut { sessions: Vec::new(), walked: due.len() };
            for (deadline, hash) in &due {
                deadlines.remove((*deadline, hash.as_slice())).map_err(unavailable)?;
                let Some(bytes) = sessions.get(hash.as_slice()).map_err(unavailable)? else { continue };
                let record = SessionRecord::from_bytes(bytes.value())?;
                if record.state.is_terminal() {
                    continue;
                }
                if record.deadline() > now {
                    deadlines.insert((at(record.deadline()), hash.as_slice()), ()).map_err(unavailable)?;
                } else {
                    found.sessions.push(record);
                }
            }
            Ok(found)
        })
        .await
    }

    fn log_id(&self) -> String {
        self.log_id.to_string()
    }

    async fn read_revocations(&self, after: u64, limit: usize) -> Result<LogRead> {
        let (tx, position) = self.position()?;
        let log = tx.open_table(REVOCATION_LOG).map_err(unavailable)?;
        let mut events = Vec::new();
        if limit > 0 {
            for entry in log.range(after.saturating_add(1)..).map_err(unavailable)?.take(limit) {
                let (_, bytes) = entry.map_err(unavailable)?;
                events.push(parse_event(bytes.value())?);
            }
        }
        Ok(LogRead { events, position })
    }

    async fn revocation_entry(&self, session_id: &str, now: Millis) -> Result<Option<RevocationEvent>> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let by_session = tx.open_table(REVOCATION_SESSIONS).map_err(unavailable)?;
        let Some(seq) = by_session.get(session_id).map_err(unavailable)?.map(|v| v.value()) else { return Ok(None) };
        let log = tx.open_table(REVOCATION_LOG).map_err(unavailable)?;
        let event = match log.get(seq).map_err(unavailable)? {
            Some(bytes) => parse_event(bytes.value())?,
            None => return Ok(None),
        };
        Ok(Some(event).filter(|e| e.expires_at > now))
    }

    async fn list_revocations(
        &self,
        user_id: Option<&str>,
        after: u64,
        through: Option<u64>,
        limit: usize,
        now: Millis,
    ) -> Result<RevocationPage> {
        let (tx, position) = self.position()?;
        let through = through.unwrap_or(position.head);
        let log = tx.open_table(REVOCATION_LOG).map_err(unavailable)?;
        let mut entries = Vec::new();
        if after >= through {
            return Ok(RevocationPage { entries, position });
        }
        let mut keep = |bytes: &[u8]| -> Result<bool> {
            let event = parse_event(bytes)?;
            if event.expires_at > now {
                entries.push(event);
            }
            Ok(entries.len() < limit)
        };
        match user_id {
            Some(user) => {
                let users = tx.open_table(REVOCATION_USERS).map_err(unavailable)?;
                for entry in users.range((user, after + 1)..=(user, through)).map_err(unavailable)? {
                    let (key, _) = entry.map_err(unavailable)?;
                    let Some(bytes) = log.get(key.value().1).map_err(unavailable)? else { continue };
                    if !keep(bytes.value())? {
                        break;
                    }
                }
            }
            None => {
                for entry in log.range(after + 1..=through).map_err(unavailable)? {
                    let (_, bytes) = entry.map_err(unavailable)?;
                    if !keep(bytes.value())? {
                        break;
                    }
                }
            }
        }
        Ok(RevocationPage { entries, position })
    }

    async fn purge_revocations(&self, now: Millis, limit: usize) -> Result<usize> {
        self.write(Durability::Immediate, move |tx| {
            let due: Vec<(u64, u64)> = {
                let expiry = tx.open_table(REVOCATION_EXPIRY).map_err(unavailable)?;
                let mut due = Vec::new();
                for entry in expiry.range(..=(at(now), u64::MAX)).map_err(unavailable)?.take(limit) {
                    let (key, _) = entry.map_err(unavailable)?;
                    due.push(key.value());
                }
                due
            };
            if due.is_empty() {
                return Ok(0);
            }
            let mut trimmed = meta_u64(&tx.open_table(REVOCATION_META).map_err(unavailable)?, META_TRIMMED)?;
            let mut expiry = tx.open_table(REVOCATION_EXPIRY).map_err(unavailable)?;
            let mut log = tx.open_table(REVOCATION_LOG).map_err(unavailable)?;
            let mut by_session = tx.open_table(REVOCATION_SESSIONS).map_err(unavailable)?;
            let mut by_user = tx.open_table(REVOCATION_USERS).map_err(unavailable)?;
            for (until, seq) in &due {
                expiry.remove((*until, *seq)).map_err(unavailable)?;
                let removed = log.remove(*seq).map_err(unavailable)?;
                if let Some(bytes) = removed {
                    let event = parse_event(bytes.value())?;
                    by_session.remove(event.session_id.as_str()).map_err(unavailable)?;
                    by_user.remove((event.user_id.as_str(), *seq)).map_err(unavailable)?;
                }
                trimmed = trimmed.max(*seq);
            }
            drop((expiry, log, by_session, by_user));
            set_meta_u64(tx, META_TRIMMED, trimmed)?;
            Ok(due.len())
        })
        .await
    }

    async fn count(&self) -> Result<u64> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
        sessions.len().map_err(unavailable)
    }

    /// Reads every record in one read transaction on a blocking thread: the cost grows with
    /// all stored sessions, which is why only the periodic gauge sampler calls it. Readers
    /// never block the writer in redb.
    async fn count_active(&self, now: Millis) -> Result<Option<u64>> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_read().map_err(unavailable)?;
            let sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
            let mut active = 0;
            for entry in sessions.iter().map_err(unavailable)? {
                let (_, bytes) = entry.map_err(unavailable)?;
                if SessionRecord::from_bytes(bytes.value())?.is_active_at(now) {
                    active += 1;
                }
            }
            Ok(Some(active))
        })
        .await
        .map_err(|e| Error::internal_from("embedded store task failed", e))?
    }

    async fn ping(&self) -> Result<()> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        tx.open_table(SESSIONS).map_err(unavailable)?;
        Ok(())
    }
}

fn parse_lease(bytes: &[u8]) -> Result<RefreshLease> {
    serde_json::from_slice(bytes).map_err(|e| Error::internal_from("stored refresh lease is unreadable", e))
}

fn parse_record(bytes: &[u8]) -> Result<RefreshRecord> {
    serde_json::from_slice(bytes).map_err(|e| Error::internal_from("stored refresh record is unreadable", e))
}

// Leases are committed with `Durability::None`: a crash loses them, and a lease whose holder
// crashed means nothing. Records are `Immediate`, like every other record of what happened.
#[async_trait]
impl TokenStore for EmbeddedStore {
    async fn acquire_lease(&self, lease: &RefreshLease, now: Millis) -> Result<LeaseOutcome> {
        let lease = lease.clone();
        self.write(Durability::None, move |tx| {
            let mut leases = tx.open_table(REFRESH_LEASES).map_err(unavailable)?;
            let current = match leases.get(lease.session_id.as_str()).map_err(unavailable)? {
                Some(bytes) => Some(parse_lease(bytes.value())?),
                None => None,
            };
            if let Some(current) = current.filter(|c| c.expires_at > now) {
                return Ok(LeaseOutcome::Held(current));
            }
            let bytes = serde_json::to_vec(&lease).map_err(Error::internal)?;
            leases.insert(lease.session_id.as_str(), bytes.as_slice()).map_err(unavailable)?;
            Ok(LeaseOutcome::Acquired)
        })
        .await
    }

    async fn renew_lease(&self, session_id: &str, holder: &str, expires_at: Millis, now: Millis) -> Result<bool> {
        let (session_id, holder) = (session_id.to_owned(), holder.to_owned());
        self.write(Durability::None, move |tx| {
            let mut leases = tx.open_table(REFRESH_LEASES).map_err(unavailable)?;
            let current = match leases.get(session_id.as_str()).map_err(unavailable)? {
                Some(bytes) => parse_lease(bytes.value())?,
                None => return Ok(false),
            };
            if current.holder != holder || current.expires_at <= now {
                return Ok(false);
            }
            let renewed = RefreshLease { expires_at: current.expires_at.max(expires_at), ..current };
            let bytes = serde_json::to_vec(&renewed).map_err(Error::internal)?;
            leases.insert(session_id.as_str(), bytes.as_slice()).map_err(unavailable)?;
            Ok(true)
        })
        .await
    }

    async fn release_lease(&self, session_id: &str, holder: &str) -> Result<()> {
        let (session_id, holder) = (session_id.to_owned(), holder.to_owned());
        self.write(Durability::None, move |tx| {
            let mut leases = tx.open_table(REFRESH_LEASES).map_err(unavailable)?;
            let held = match leases.get(session_id.as_str()).map_err(unavailable)? {
                Some(bytes) => parse_lease(bytes.value())?.holder == holder,
                None => false,
            };
            if held {
                leases.remove(session_id.as_str()).map_err(unavailable)?;
            }
            Ok(())
        })
        .await
    }

    async fn append_refresh_record(&self, record: &RefreshRecord, keep: usize) -> Result<()> {
        let record = record.clone();
        self.write(Durability::Immediate, move |tx| {
            let mut records = tx.open_table(REFRESH_RECORDS).map_err(unavailable)?;
            let mut expiry = tx.open_table(REFRESH_EXPIRY).map_err(unavailable)?;
            let bytes = serde_json::to_vec(&record).map_err(Error::internal)?;
            let session = record.session_id.as_str();
            records.insert((session, record.record_id.as_str()), bytes.as_slice()).map_err(unavailable)?;
            expiry.insert((at(record.expires_at), session, record.record_id.as_str()), ()).map_err(unavailable)?;
            let excess: Vec<RefreshRecord> = {
                let mut all = Vec::new();
                for entry in records.range((session, "")..=(session, "\u{10ffff}")).map_err(unavailable)? {
                    let (_, value) = entry.map_err(unavailable)?;
                    all.push(parse_record(value.value())?);
                }
                let excess = all.len().saturating_sub(keep.max(1));
                all.into_iter().take(excess).collect()
            };
            for old in &excess {
                records.remove((session, old.record_id.as_str())).map_err(unavailable)?;
                expiry.remove((at(old.expires_at), session, old.record_id.as_str())).map_err(unavailable)?;
            }
            Ok(())
        })
        .await
    }

    async fn refresh_history(&self, session_id: &str, limit: usize) -> Result<Vec<RefreshRecord>> {
        let store = self.clone();
        let session_id = session_id.to_owned();
        tokio::task::spawn_blocking(move || {
            let tx = store.db.begin_read().map_err(unavailable)?;
            let records = tx.open_table(REFRESH_RECORDS).map_err(unavailable)?;
            let mut out = Vec::new();
            let session = session_id.as_str();
            for entry in records.range((session, "")..=(session, "\u{10ffff}")).map_err(unavailable)?.rev().take(limit)
            {
                let (_, value) = entry.map_err(unavailable)?;
                out.push(parse_record(value.value())?);
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::internal_from("embedded store task failed", e))?
    }

    async fn purge_refresh_records(&self, now: Millis, limit: usize) -> Result<usize> {
        self.write(Durability::Immediate, move |tx| {
            let due: Vec<(u64, String, String)> = {
                let expiry = tx.open_table(REFRESH_EXPIRY).map_err(unavailable)?;
                let mut due = Vec::new();
                for entry in expiry.range(..(at(now).saturating_add(1), "", "")).map_err(unavailable)?.take(limit) {
                    let (k, _) = entry.map_err(unavailable)?;
                    let (when, session, record) = k.value();
                    due.push((when, session.to_owned(), record.to_owned()));
                }
                due
            };
            let mut expiry = tx.open_table(REFRESH_EXPIRY).map_err(unavailable)?;
            let mut records = tx.open_table(REFRESH_RECORDS).map_err(unavailable)?;
            for (when, session, record) in &due {
                expiry.remove((*when, session.as_str(), record.as_str())).map_err(unavailable)?;
                records.remove((session.as_str(), record.as_str())).map_err(unavailable)?;
            }
            // Leases of crashed holders: drop the expired ones.
            let mut leases = tx.open_table(REFRESH_LEASES).map_err(unavailable)?;
            let mut stale = Vec::new();
            for entry in leases.iter().map_err(unavailable)? {
                let (k, v) = entry.map_err(unavailable)?;
                if parse_lease(v.value())?.expires_at <= now {
                    stale.push(k.value().to_owned());
                }
            }
            for key in stale {
                leases.remove(key.as_str()).map_err(unavailable)?;
            }
            Ok(due.len())
        })
        .await
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>> {
        let store = self.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let tx = store.db.begin_read().map_err(unavailable)?;
            let table = tx.open_table(CHECKPOINTS).map_err(unavailable)?;
            Ok(table.get(name.as_str()).map_err(unavailable)?.map(|v| v.value().to_owned()))
        })
        .await
        .map_err(|e| Error::internal_from("embedded store task failed", e))?
    }

    async fn save_checkpoint(&self, name: &str, value: &str) -> Result<()> {
        let (name, value) = (name.to_owned(), value.to_owned());
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(CHECKPOINTS).map_err(unavailable)?;
            table.insert(name.as_str(), value.as_str()).map_err(unavailable)?;
            Ok(())
        })
        .await
    }
}

/// A rate-limit entry as stored: the state and the time it was filed under in the forget index.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredLimit {
    state: LimiterState,
    forget_at: Millis,
}

/// States a check at the bound drops, at most, before it decides whether a new key fits.
const PURGE_AT_BOUND: usize = 1000;

/// The stored state of (`rule`, `key`).
fn read_limit(tx: &WriteTransaction, rule: &str, key: &str) -> Result<Option<StoredLimit>> {
    let limits = tx.open_table(RATE_LIMITS).map_err(unavailable)?;
    let stored = match limits.get((rule, key)).map_err(unavailable)? {
        Some(bytes) => Some(
            serde_json::from_slice(bytes.value())
                .map_err(|e| Error::internal_from("stored rate-limit state is unreadable", e))?,
        ),
        None => None,
    };
    Ok(stored)
}

/// Fills `rate_limit_counts` from `rate_limits` when it is empty and they are not (a database
/// from before the counts); otherwise the counts are kept with every insert and purge.
fn count_limit_keys(tx: &WriteTransaction) -> Result<()> {
    let mut counts = tx.open_table(RATE_LIMIT_COUNTS).map_err(unavailable)?;
    if !counts.is_empty().map_err(unavailable)? {
        return Ok(());
    }
    let limits = tx.open_table(RATE_LIMITS).map_err(unavailable)?;
    let mut per_rule: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for entry in limits.iter().map_err(unavailable)? {
        let (k, _) = entry.map_err(unavailable)?;
        *per_rule.entry(k.value().0.to_owned()).or_default() += 1;
    }
    for (rule, held) in &per_rule {
        counts.insert(rule.as_str(), *held).map_err(unavailable)?;
    }
    Ok(())
}

/// Keys of `rule` held now.
fn held_keys(tx: &WriteTransaction, rule: &str) -> Result<u64> {
    let counts = tx.open_table(RATE_LIMIT_COUNTS).map_err(unavailable)?;
    Ok(counts.get(rule).map_err(unavailable)?.map_or(0, |held| held.value()))
}

/// Adds `delta` (one, or minus the keys purged) to the keys `rule` holds.
fn add_held_keys(tx: &WriteTransaction, rule: &str, delta: i64) -> Result<()> {
    let mut counts = tx.open_table(RATE_LIMIT_COUNTS).map_err(unavailable)?;
    let held = counts.get(rule).map_err(unavailable)?.map_or(0, |held| held.value());
    let next = held.saturating_add_signed(delta);
    if next == 0 {
        counts.remove(rule).map_err(unavailable)?;
    } else {
        counts.insert(rule, next).map_err(unavailable)?;
    }
    Ok(())
}

/// Whether a new key of `rule` may be stored at `now`: below `max`, after dropping state that
/// decides nothing any more.
fn has_room(tx: &WriteTransaction, rule: &str, max: usize, now: Millis) -> Result<bool> {
    let max = u64::try_from(max).unwrap_or(u64::MAX);
    if held_keys(tx, rule)? < max {
        return Ok(true);
    }
    purge_limit_states(tx, now, PURGE_AT_BOUND)?;
    Ok(held_keys(tx, rule)? < max)
}

/// Deletes up to `limit` states forgettable at `now`, with their index entries and counts.
fn purge_limit_states(tx: &WriteTransaction, now: Millis, limit: usize) -> Result<usize> {
    let due: Vec<(u64, String, String)> = {
        let forget = tx.open_table(RATE_LIMIT_FORGET).map_err(unavailable)?;
        let mut due = Vec::new();
        for entry in forget.range(..(at(now).saturating_add(1), "", "")).map_err(unavailable)?.take(limit) {
            let (k, _) = entry.map_err(unavailable)?;
            let (when, rule, key) = k.value();
            due.push((when, rule.to_owned(), key.to_owned()));
        }
        due
    };
    let mut removed: std::collections::BTreeMap<String, i64> = std::collections::BTreeMap::new();
    {
        let mut forget = tx.open_table(RATE_LIMIT_FORGET).map_err(unavailable)?;
        let mut limits = tx.open_table(RATE_LIMITS).map_err(unavailable)?;
        for (when, rule, key) in &due {
            forget.remove((*when, rule.as_str(), key.as_str())).map_err(unavailable)?;
            if limits.remove((rule.as_str(), key.as_str())).map_err(unavailable)?.is_some() {
                *removed.entry(rule.clone()).or_default() += 1;
            }
        }
    }
    for (rule, n) in &removed {
        add_held_keys(tx, rule, -n)?;
    }
    Ok(due.len())
}

#[async_trait]
impl RateLimitStore for EmbeddedStore {
    async fn check(&self, rule: &Rule, key: &str, cost: u32, now: Millis) -> Result<Decision> {
        let rule = rule.clone();
        let key = key.to_owned();
        let max_keys = self.max_limiter_keys;
        self.write(Durability::None, move |tx| {
            let stored = read_limit(tx, &rule.name, &key)?;
            if stored.is_none() && !has_room(tx, &rule.name, max_keys, now)? {
                return Ok(limiter::refused(&rule));
            }
            let (decision, next) = limiter::apply(stored.as_ref().map(|s| s.state), &rule, cost, now);
            if let Some(state) = next {
                if stored.is_none() {
                    add_held_keys(tx, &rule.name, 1)?;
                }
                let mut limits = tx.open_table(RATE_LIMITS).map_err(unavailable)?;
                let mut forget = tx.open_table(RATE_LIMIT_FORGET).map_err(unavailable)?;
                if let Some(old) = &stored {
                    forget.remove((at(old.forget_at), rule.name.as_str(), key.as_str())).map_err(unavailable)?;
                }
                let forget_at = state.forget_at(&rule);
                forget.insert((at(forget_at), rule.name.as_str(), key.as_str()), ()).map_err(unavailable)?;
                let bytes = serde_json::to_vec(&StoredLimit { state, forget_at }).map_err(Error::internal)?;
                limits.insert((rule.name.as_str(), key.as_str()), bytes.as_slice()).map_err(unavailable)?;
            }
            Ok(decision)
        })
        .await
    }

    async fn peek(&self, rule: &Rule, key: &str, cost: u32, now: Millis) -> Result<Decision> {
        let rule = rule.clone();
        let key = key.to_owned();
        let max_keys = self.max_limiter_keys;
        // The same path as `check`, storing nothing; at the bound it may drop state that decides
        // nothing any more, which changes no decision.
        self.write(Durability::None, move |tx| {
            let stored = read_limit(tx, &rule.name, &key)?;
            if stored.is_none() && !has_room(tx, &rule.name, max_keys, now)? {
                return Ok(limiter::refused(&rule));
            }
            Ok(limiter::apply(stored.as_ref().map(|s| s.state), &rule, cost, now).0)
        })
        .await
    }

    async fn purge_limits(&self, now: Millis, limit: usize) -> Result<usize> {
        self.write(Durability::None, move |tx| purge_limit_states(tx, now, limit)).await
    }
}

#[async_trait]
impl SecurityEventStore for EmbeddedStore {
    async fn append(&self, event: &SecurityEvent) -> Result<()> {
        let event = event.clone();
        self.write(Durability::Immediate, move |tx| {
            let when = at(event.occurred_at);
            tx.open_table(SECURITY_EVENTS)
                .map_err(unavailable)?
                .insert((when, event.event_id.as_str()), event.to_bytes().as_slice())
                .map_err(unavailable)?;
            if let Some(user) = &event.user_id {
                tx.open_table(USER_SECURITY_EVENTS)
                    .map_err(unavailable)?
                    .insert((user.as_str(), when, event.event_id.as_str()), ())
                    .map_err(unavailable)?;
            }
            Ok(())
        })
        .await
    }

    async fn user_events(&self, query: &EventQuery) -> Result<Vec<SecurityEvent>> {
        if query.from >= query.until || query.limit == 0 {
            return Ok(Vec::new());
        }
        let tx = self.db.begin_read().map_err(unavailable)?;
        let index = tx.open_table(USER_SECURITY_EVENTS).map_err(unavailable)?;
        let events = tx.open_table(SECURITY_EVENTS).map_err(unavailable)?;
        let user = query.user_id.as_str();
        let lower = (user, at(query.from), "");
        let mut found = Vec::new();
        let mut scan = |range: redb::Range<'_, (&str, u64, &str), ()>| -> Result<()> {
            for entry in range.rev() {
                let (k, _) = entry.map_err(unavailable)?;
                let (_, when, id) = k.value();
                if let Some(bytes) = events.get((when, id)).map_err(unavailable)? {
                    let event = SecurityEvent::from_bytes(bytes.value())?;
                    if type_matches(query, event.event_type) {
                        found.push(event);
                        if found.len() >= query.limit {
                            break;
                        }
                    }
                }
            }
            Ok(())
        };
        let upper = match &query.after {
            Some((after_at, after_id)) if *after_at < query.until => (user, at(*after_at), after_id.as_str()),
            _ => (user, at(query.until), ""),
        };
        // A resume position before the range (a crafted page token) selects nothing.
        if upper <= lower {
            return Ok(Vec::new());
        }
        scan(index.range(lower..upper).map_err(unavailable)?)?;
        Ok(found)
    }

    async fn purge_events(&self, cutoff: Millis, limit: usize) -> Result<usize> {
        self.write(Durability::Immediate, move |tx| {
            let due: Vec<(u64, String, Option<String>)> = {
                let events = tx.open_table(SECURITY_EVENTS).map_err(unavailable)?;
                let mut due = Vec::new();
                for entry in events.range(..(at(cutoff), "")).map_err(unavailable)?.take(limit) {
                    let (k, v) = entry.map_err(unavailable)?;
                    let (when, id) = k.value();
                    let user = SecurityEvent::from_bytes(v.value()).ok().and_then(|e| e.user_id);
                    due.push((when, id.to_owned(), user));
                }
                due
            };
            let mut events = tx.open_table(SECURITY_EVENTS).map_err(unavailable)?;
            let mut index = tx.open_table(USER_SECURITY_EVENTS).map_err(unavailable)?;
            for (when, id, user) in &due {
                events.remove((*when, id.as_str())).map_err(unavailable)?;
                if let Some(user) = user {
                    index.remove((user.as_str(), *when, id.as_str())).map_err(unavailable)?;
                }
            }
            Ok(due.len())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use secrecy::SecretString;

    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::crypto::KeyRing;
    use crate::session::{NewSession, SessionManager, SessionSettings};

    #[tokio::test]
    async fn a_database_written_before_the_deadline_index_gets_one_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_800_000_000_000);
        let settings = SessionSettings {
            idle_timeout: Duration::from_secs(1800),
            absolute_timeout: Duration::from_secs(8 * 3600),
            max_sessions_per_user: 5,
            device_validation: true,
            device_fingerprint_required: true,
            device_match_threshold: 0.8,
            idle_slide_step: Duration::from_secs(60),
            tombstone_ttl: Duration::from_secs(3600),
            proactive_refresh: Duration::from_secs(300),
        };
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let manager = SessionManager::new(
            Arc::new(store.clone()),
            Arc::new(KeyRing::new(&[7u8; 32], &[])),
            Arc::new(clock.clone()) as Arc<dyn Clock>,
            settings,
        );
        let new = NewSession {
            user_id: "ada".into(),
            access_token: SecretString::from("upstream".to_string()),
            ..Default::default()
        };
        let created = manager.create(new).await.unwrap().session;
        // What an older version left: the session, but no deadline index and no marker.
        store
            .write_now(Durability::Immediate, |tx| {
                tx.delete_table(SESSION_DEADLINES).map_err(unavailable)?;
                tx.open_table(REVOCATION_META)
                    .map_err(unavailable)?
                    .remove(META_DEADLINES_INDEXED)
                    .map_err(unavailable)?;
                Ok(())
            })
            .unwrap();
        assert!(store.take_timed_out(created.deadline(), 10).await.unwrap().sessions.is_empty());
        drop((manager, store));

        let reopened = EmbeddedStore::open(dir.path()).unwrap();
        let found = reopened.take_timed_out(created.deadline(), 10).await.unwrap();
        assert_eq!(
            found.sessions.iter().map(|s| s.session_id.as_str()).collect::<Vec<_>>(),
            [created.session_id.as_str()]
        );
    }
}
