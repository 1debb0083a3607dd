//! The embedded backend, the default: a redb database in the data directory.
//!
//! Why redb: it is pure Rust (no C toolchain, no system library), ACID with copy-on-write
//! B-trees and a single writer, so each trait operation runs inside one write transaction and is
//! therefore atomic; a commit with `Durability::Immediate` is on disk when it returns, so an
//! acknowledged write survives SIGKILL; and reads run concurrently with the writer without
//! blocking. SQLite would give the same guarantees through a C library and SQL we do not need.
//! Operations waiting together share one transaction and one fsync (`embedded/commit.rs`).
//!
//! Tables: `sessions` (token hash → record JSON), `session_ids` (session id → token hash),
//! `user_sessions` ((user id, session id) → token hash) and `session_expiry`
//! ((retain-until millis, token hash) → ()). Idle slides wait in memory (reads see them) and
//! are written by the next write transaction, at most `slides::FLUSH_AFTER` (20 ms) later, many at once
//! and with `Durability::None` unless that transaction is durable anyway: losing the last slides
//! in a crash only makes a session expire a little earlier, and a validation costs no write
//! transaction of its own. Everything else is `Immediate`.
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
//! (`security.max_limiter_keys`, see [`crate::model::limiter`]); it is filled from
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
use crate::model::limiter::{self, Decision, LimiterState, Rule};
use crate::model::{RecordFormat, RevocationEvent, SecurityEvent, SessionRecord};
use crate::model::{RefreshLease, RefreshRecord};
use crate::store::{
    CasOutcome, CreateOutcome, CreateWith, EndOutcome, EndSession, EventQuery, LeaseOutcome, LogPosition, LogRead,
    RateLimitStore, RevocationLog, RevocationPage, RevocationQuery, SecurityEventStore, SessionStore, TimedOut,
    TokenHash, TokenStore, Touch, type_matches,
};

mod commit;
mod events;
mod limits;
mod sessions;
mod slides;
mod tokens;

use limits::count_limit_keys;
use sessions::*;

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
    slides: Arc<slides::PendingSlides>,
    committer: Arc<commit::Committer>,
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

/// How this store writes records. It reads JSON records too (every database written before the
/// binary form existed), and rewrites each in binary the next time it changes.
const RECORD_FORMAT: RecordFormat = RecordFormat::Binary;

/// Megabytes of database pages kept in memory when `embedded.cache_mb` is unset. The cache
/// fills only as pages are read, so a small store never holds this much.
pub const DEFAULT_CACHE_MB: usize = 1024;

impl EmbeddedStore {
    /// Opens (or creates) `sessions.redb` in `dir`, with the default page cache.
    pub fn open(dir: &Path) -> Result<EmbeddedStore> {
        Self::open_with_cache(dir, DEFAULT_CACHE_MB * 1024 * 1024)
    }

    /// Opens (or creates) `sessions.redb` in `dir`, keeping up to `cache_bytes` of its pages in
    /// memory.
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<EmbeddedStore> {
        let path = dir.join("sessions.redb");
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| Error::unavailable(format!("cannot open {}: {e}", path.display())))?;
        let db = Arc::new(db);
        let slides = Arc::<slides::PendingSlides>::default();
        let committer = Arc::new(commit::Committer::start(db.clone(), slides.clone())?);
        let mut store =
            EmbeddedStore { db, log_id: Arc::from(""), max_limiter_keys: limiter::DEFAULT_MAX_KEYS, slides, committer };
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
                    let id = crate::model::new_log_id();
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

    /// Runs `f` in one write transaction and commits it, after the pending idle slides (see
    /// [`slides`]): every write sees them, and they are kept for the next one if this one fails.
    fn write_now<T>(&self, durability: Durability, f: impl FnOnce(&WriteTransaction) -> Result<T>) -> Result<T> {
        let mut tx = self.db.begin_write().map_err(unavailable)?;
        tx.set_durability(durability).map_err(unavailable)?;
        if matches!(durability, Durability::Immediate) {
            // Keeps recovery after a crash quick instead of a full repair scan.
            tx.set_quick_repair(true);
        }
        let pending = self.slides.take();
        slides::write_slides(&tx, &pending);
        let outcome = f(&tx).and_then(|value| {
            tx.commit().map_err(unavailable)?;
            Ok(value)
        });
        if outcome.is_err() && !pending.is_empty() {
            self.slides.restore(pending);
        }
        outcome
    }

    /// A write off the async runtime, in the next group commit (see [`commit`]; `f` may run
    /// more than once there), answered once committed: on disk if `durability` is `Immediate`.
    async fn write<T: Send + 'static>(
        &self,
        durability: Durability,
        f: impl FnMut(&WriteTransaction) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.committer.submit(matches!(durability, Durability::Immediate), f).await
    }

    /// A `Durability::None` write answered once its transaction has run, before the commit
    /// (rate-limit decisions; see `commit`).
    async fn write_early<T: Send + 'static>(
        &self,
        f: impl FnMut(&WriteTransaction) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.committer.submit_early(f).await
    }

    /// Inserts new sessions in one transaction, without the per-user cap: for the offline
    /// seeding tool (`session-authority seed`), never for serving.
    #[cfg(feature = "bench-seed")]
    pub fn insert_batch(&self, records: &[SessionRecord]) -> Result<()> {
        self.write_now(Durability::Immediate, |tx| {
            let mut sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
            let mut ids = tx.open_table(SESSION_IDS).map_err(unavailable)?;
            let mut users = tx.open_table(USER_SESSIONS).map_err(unavailable)?;
            let mut expiry = tx.open_table(SESSION_EXPIRY).map_err(unavailable)?;
            for record in records {
                let hash = record.token_hash.as_slice();
                sessions.insert(hash, record.to_bytes(RECORD_FORMAT)?.as_slice()).map_err(unavailable)?;
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
            Some(bytes) => {
                SessionRecord::from_bytes(bytes.value()).map(|record| Some(self.slides.read_through(record)))
            }
            None => Ok(None),
        }
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

    fn settings() -> SessionSettings {
        SessionSettings { tombstone_ttl: Duration::from_secs(3600), ..SessionSettings::default() }
    }

    /// A session of `user` created through the manager, as stored.
    async fn stored_session(store: &EmbeddedStore, clock: &ManualClock, user: &str) -> SessionRecord {
        let manager = SessionManager::new(
            Arc::new(store.clone()),
            Arc::new(KeyRing::new(&[7u8; 32], &[])),
            Arc::new(clock.clone()) as Arc<dyn Clock>,
            settings(),
        );
        let new = NewSession {
            user_id: user.into(),
            access_token: SecretString::from("upstream".to_string()),
            ..Default::default()
        };
        let id = manager.create(new).await.unwrap().session.session_id;
        store.get_by_id(&id).await.unwrap().unwrap()
    }

    fn touch(at: Millis, idle: Millis) -> Touch {
        Touch { last_accessed_at: at, idle_expires_at: idle, ip_address: None }
    }

    fn revoke(at: Millis) -> EndSession {
        EndSession {
            state: crate::session::SessionState::Revoked,
            reason: "test".into(),
            at,
            retain_until: at + 3_600_000,
            kind: None,
            revoked_by: None,
        }
    }

    #[tokio::test]
    async fn a_slide_is_read_at_once_written_with_the_next_write_and_never_revives_an_ended_session() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let clock = ManualClock::new(1_800_000_000_000);
        let (a, b) = (stored_session(&store, &clock, "ada").await, stored_session(&store, &clock, "bob").await);
        let now = a.last_accessed_at;
        let idle = a.idle_expires_at;

        store.touch(&a.token_hash, touch(now + 500, idle + 500)).await.unwrap();
        store.touch(&a.token_hash, touch(now + 400, idle + 400)).await.unwrap();
        let read = store.get_by_token(&a.token_hash).await.unwrap().unwrap();
        assert_eq!((read.last_accessed_at, read.idle_expires_at), (now + 500, idle + 500), "never backwards");
        assert_eq!(store.get_by_id(&a.session_id).await.unwrap().unwrap().idle_expires_at, idle + 500);
        assert_eq!(store.list_user("ada").await.unwrap()[0].idle_expires_at, idle + 500);
        assert_eq!(store.slides.len(), 1, "still in memory");

        // The sweep is a write: it applies the slide first and finds nothing due at the old
        // idle deadline (bob's untouched session is due, as it should be).
        let due = store.take_timed_out(idle + 200, 10).await.unwrap().sessions;
        assert_eq!(due.iter().map(|s| s.user_id.as_str()).collect::<Vec<_>>(), ["bob"]);
        assert_eq!(store.slides.len(), 0);

        // A slide pending when the session ends is applied before the end; one after it never is.
        store.touch(&b.token_hash, touch(now + 600, idle + 600)).await.unwrap();
        store.end(&b.token_hash, revoke(now + 700)).await.unwrap();
        store.touch(&b.token_hash, touch(now + 800, idle + 800)).await.unwrap();
        assert_eq!(store.get_by_token(&b.token_hash).await.unwrap().unwrap().idle_expires_at, idle + 600);
        tokio::time::sleep(slides::FLUSH_AFTER * 5).await;
        assert_eq!(store.slides.len(), 0, "the scheduled flush ran");
        let ended = store.get_by_token(&b.token_hash).await.unwrap().unwrap();
        assert!(ended.state.is_terminal());
        assert_eq!(ended.idle_expires_at, idle + 600, "applied before the end, not after");

        // Written slides survive a reopen.
        drop(store);
        let reopened = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(reopened.get_by_token(&a.token_hash).await.unwrap().unwrap().idle_expires_at, idle + 500);
    }

    fn checkpoint(store: &EmbeddedStore, name: &str) -> Option<String> {
        let tx = store.db.begin_read().unwrap();
        let table = tx.open_table(CHECKPOINTS).unwrap();
        table.get(name).unwrap().map(|v| v.value().to_owned())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durable_writes_waiting_together_share_one_commit_and_a_failing_one_takes_none_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        // Hold the writer's turn so that every write below is queued when the committer gets it.
        let held = store.db.begin_write().unwrap();
        let before = store.committer.commits();
        let mut writes = Vec::new();
        for n in 0..64 {
            let store = store.clone();
            writes.push(tokio::spawn(async move {
                store
                    .write(Durability::Immediate, move |tx| {
                        if n == 31 {
                            return Err(Error::invalid("n", "the failing write"));
                        }
                        let mut table = tx.open_table(CHECKPOINTS).map_err(unavailable)?;
                        table.insert(format!("c{n}").as_str(), "v").map_err(unavailable)?;
                        Ok(n)
                    })
                    .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(writes.iter().all(|w| !w.is_finished()), "nothing is answered before its commit");
        held.abort().unwrap();
        for (n, write) in writes.into_iter().enumerate() {
            let outcome = write.await.unwrap();
            if n == 31 {
                assert!(matches!(outcome, Err(Error::InvalidArgument { .. })), "{outcome:?}");
                assert_eq!(checkpoint(&store, "c31"), None, "the failed write left nothing");
            } else {
                assert_eq!(outcome.unwrap(), n);
                assert_eq!(checkpoint(&store, &format!("c{n}")).as_deref(), Some("v"));
            }
        }
        // One attempt aborted at the failing write, then one commit for the 63 others.
        assert_eq!(store.committer.commits() - before, 1);

        // Every acknowledged write is in the file.
        drop(store);
        let reopened = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(checkpoint(&reopened, "c0").as_deref(), Some("v"));
        assert_eq!(checkpoint(&reopened, "c63").as_deref(), Some("v"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_durable_write_is_an_internal_error_and_the_committer_keeps_going() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let panicked = store.write(Durability::Immediate, |_tx| -> Result<()> { panic!("a bug in a write") }).await;
        assert!(matches!(panicked, Err(Error::Internal { .. })), "{panicked:?}");
        store
            .write(Durability::Immediate, |tx| {
                tx.open_table(CHECKPOINTS).map_err(unavailable)?.insert("after", "v").map_err(unavailable)?;
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(checkpoint(&store, "after").as_deref(), Some("v"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn limiter_decisions_answered_before_the_commit_stay_exact_when_their_batch_reruns() {
        use crate::model::limiter::Rule;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let rule = Rule { name: "r".into(), limit: 10, period: Duration::from_secs(60), burst: 10, backoff: None };
        let now = 1_800_000_000_000;
        // Hold the writer so that every job below waits for the same transaction; a failing
        // durable write in the middle makes the committer abort it and run the others again.
        let held = store.db.begin_write().unwrap();
        let mut checks = Vec::new();
        for n in 0..40 {
            let (checker, rule) = (store.clone(), rule.clone());
            checks.push(tokio::spawn(async move { checker.check(&rule, "k", 1, now).await }));
            if n == 20 {
                let store = store.clone();
                checks.push(tokio::spawn(async move {
                    store
                        .write(Durability::Immediate, |_tx| -> Result<Decision> { Err(Error::invalid("n", "fails")) })
                        .await
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(checks.iter().all(|c| !c.is_finished()), "nothing is answered before its transaction runs");
        held.abort().unwrap();
        let mut allowed = 0;
        let mut failed = 0;
        for check in checks {
            match check.await.unwrap() {
                Ok(decision) => allowed += usize::from(decision.allowed),
                Err(Error::InvalidArgument { .. }) => failed += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!((allowed, failed), (10, 1), "ten of forty allowed, across the aborted attempt");
        // The state stands: the next check is refused.
        assert!(!store.check(&rule, "k", 1, now).await.unwrap().allowed);
    }

    #[tokio::test]
    async fn a_create_and_its_security_event_are_one_commit() {
        use crate::security::EventObserver;
        use crate::security::events::Recorder;
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_800_000_000_000);
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let clock_dyn = Arc::new(clock.clone()) as Arc<dyn Clock>;
        let recorder = Recorder::new(Arc::new(store.clone()), clock_dyn.clone());
        let manager = SessionManager::new(
            Arc::new(store.clone()),
            Arc::new(KeyRing::new(&[7u8; 32], &[])),
            clock_dyn,
            settings(),
        )
        .with_observer(Arc::new(EventObserver::new(recorder).recording_with_sessions(true)));
        let before = store.committer.commits();
        let created = manager.create(NewSession { user_id: "ada".into(), ..Default::default() }).await.unwrap();
        assert_eq!(store.committer.commits() - before, 1, "one transaction, one fsync");
        let query =
            crate::store::EventQuery { user_id: "ada".into(), until: i64::MAX, limit: 10, ..Default::default() };
        let events = store.user_events(&query).await.unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].session_id.as_deref(), Some(created.session.session_id.as_str()));
    }

    #[tokio::test]
    async fn a_database_written_before_the_deadline_index_gets_one_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_800_000_000_000);
        let settings = settings();
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

    #[tokio::test]
    async fn a_database_holding_json_records_from_an_earlier_build_reads_them_and_rewrites_each_in_binary() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let clock = ManualClock::new(1_800_000_000_000);
        let (a, b) = (stored_session(&store, &clock, "ada").await, stored_session(&store, &clock, "bob").await);
        let raw = |store: &EmbeddedStore, hash: &TokenHash| {
            let tx = store.db.begin_read().unwrap();
            let table = tx.open_table(SESSIONS).unwrap();
            table.get(hash.as_slice()).unwrap().unwrap().value().to_vec()
        };
        assert_eq!(raw(&store, &a.token_hash)[0], 0xB1, "this build writes binary");
        // What an earlier build wrote: the same records as JSON (its writer, unchanged here).
        store
            .write_now(Durability::Immediate, |tx| {
                let mut sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
                for record in [&a, &b] {
                    let json = record.to_bytes(RecordFormat::Json)?;
                    sessions.insert(record.token_hash.as_slice(), json.as_slice()).map_err(unavailable)?;
                }
                Ok(())
            })
            .unwrap();
        drop(store);

        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(raw(&store, &a.token_hash)[0], b'{');
        assert_eq!(store.get_by_token(&a.token_hash).await.unwrap().unwrap(), a);
        assert_eq!(store.get_by_id(&b.session_id).await.unwrap().unwrap(), b);
        assert_eq!(store.list_user("ada").await.unwrap(), vec![a.clone()]);

        // The next change rewrites the record in binary; an untouched one stays JSON and readable.
        store.end(&a.token_hash, revoke(a.last_accessed_at + 10)).await.unwrap();
        assert_eq!(raw(&store, &a.token_hash)[0], 0xB1);
        let ended = store.get_by_token(&a.token_hash).await.unwrap().unwrap();
        assert!(ended.state.is_terminal());
        assert_eq!((ended.user_id.as_str(), ended.session_id.as_str()), ("ada", a.session_id.as_str()));
        assert_eq!(raw(&store, &b.token_hash)[0], b'{');
        assert_eq!(store.get_by_token(&b.token_hash).await.unwrap().unwrap(), b);
    }
}
