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

use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::model::limiter::{self, Decision, LimiterState, Rule};
use crate::model::{RecordFormat, SessionRecord, SessionState, shard_tag};
use crate::model::{RefreshLease, RefreshRecord};
use crate::model::{RevocationEvent, RevocationKind, SecurityEvent, new_log_id};
use crate::store::{
    CasOutcome, CreateOutcome, CreateWith, EndOutcome, EndSession, EventQuery, LeaseOutcome, LogPosition, LogRead,
    RateLimitStore, RevocationLog, RevocationPage, RevocationQuery, SecurityEventStore, SessionStore, TimedOut,
    TokenHash, TokenStore, Touch,
};

mod events;
mod layout;
mod limits;
mod reply;
mod scripts;
mod sessions;
mod tokens;

pub use layout::Layout;
use layout::*;
use reply::*;
pub use scripts::{SCRIPTS, Scripts};

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

/// A [`SessionStore`] over any [`Transport`]; every operation is bounded by the storage timeout.
#[derive(Debug)]
pub struct KeyspaceStore<T: Transport> {
    transport: T,
    layout: Layout,
    timeout: Duration,
    /// The log id last read from Redis (see [`RevocationLog::log_id`]).
    log_id: std::sync::RwLock<String>,
    /// When this replica last drained stale outboxes (Redis Cluster).
    last_drain: std::sync::Mutex<Option<std::time::Instant>>,
    /// Rate-limit checks of one key take turns within this replica (striped by key), so the
    /// compare-and-set only ever races the other replicas' checks, not this one's; each stripe
    /// remembers the states its checks last saw.
    limit_turns: Vec<tokio::sync::Mutex<LimitStripe>>,
    /// How records are written (`redis.record_format`); both are read.
    format: RecordFormat,
}

/// Stripes of [`KeyspaceStore::limit_turns`].
const LIMIT_STRIPES: usize = 64;

/// Keys whose state one stripe remembers, at most: 64 stripes hold 65,536 keys, about 10 MiB
/// with short keys and 25 MiB at worst (keys of the longest id, 256 bytes).
const LIMIT_STATES_PER_STRIPE: usize = 1024;

/// One stripe of rate-limit turns: the encoded state this replica last read or wrote for each
/// of its keys (by field), the guess a check's compare-and-set starts from. Only a guess: a
/// check grants only through a compare-and-set against the stored state, and refuses only on a
/// state read from Redis, so a stale entry costs a round trip, never a wrong decision.
#[derive(Default)]
pub(crate) struct LimitStripe {
    seen: std::collections::HashMap<String, String>,
}

/// Counts only: the keys are user ids and addresses.
impl std::fmt::Debug for LimitStripe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitStripe").field("remembered", &self.seen.len()).finish()
    }
}

impl LimitStripe {
    fn remember(&mut self, field: &str, state: String) {
        if let Some(slot) = self.seen.get_mut(field) {
            *slot = state;
            return;
        }
        if self.seen.len() >= LIMIT_STATES_PER_STRIPE {
            // Full: one key, whichever the table yields first, makes room (no ages are kept;
            // a forgotten key costs its next check one read), so all the others stay.
            if let Some(evicted) = self.seen.keys().next().cloned() {
                self.seen.remove(&evicted);
            }
        }
        self.seen.insert(field.to_owned(), state);
    }
}

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
            limit_turns: (0..LIMIT_STRIPES).map(|_| tokio::sync::Mutex::default()).collect(),
            format: RecordFormat::default(),
        }
    }

    /// The same store, writing records in `format` (records of either format are read).
    pub fn with_record_format(mut self, format: RecordFormat) -> KeyspaceStore<T> {
        self.format = format;
        self
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
        for (tag, score) in self.due_with_scores(dirty.clone(), format!("({before}"), 64).await? {
            self.drain_outbox(&tag).await?;
            let args = vec![tag, score];
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

    /// The first `limit` members of the sorted set `key` scored at or below `max` (a
    /// ZRANGEBYSCORE bound: `"123"` includes 123, `"(123"` does not), lowest score first.
    async fn due(&self, key: String, max: String, limit: usize) -> Result<Vec<String>> {
        let args = vec!["ZRANGEBYSCORE".into(), key, "-inf".into(), max, "LIMIT".into(), "0".into(), limit.to_string()];
        items(self.transport.command(args, true).await?)?.iter().map(|m| text(m).map(str::to_owned)).collect()
    }

    /// [`KeyspaceStore::due`] with each member's score.
    async fn due_with_scores(&self, key: String, max: String, limit: usize) -> Result<Vec<(String, String)>> {
        let args = vec![
            "ZRANGEBYSCORE".into(),
            key,
            "-inf".into(),
            max,
            "WITHSCORES".into(),
            "LIMIT".into(),
            "0".into(),
            limit.to_string(),
        ];
        let replies = items(self.transport.command(args, true).await?)?;
        replies
            .chunks(2)
            .map(|pair| match pair {
                [member, score] => Ok((text(member)?.to_owned(), text(score)?.to_owned())),
                _ => Err(malformed("odd ZRANGEBYSCORE reply")),
            })
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A stripe's memory of states is bounded whatever the number of keys, and a key it holds
    /// is updated in place.
    #[test]
    fn a_limit_stripe_remembers_a_bounded_number_of_keys() {
        let mut stripe = LimitStripe::default();
        for i in 0..LIMIT_STATES_PER_STRIPE * 3 + 7 {
            stripe.remember(&format!("rule\0key-{i}"), format!("state-{i}"));
            assert!(stripe.seen.len() <= LIMIT_STATES_PER_STRIPE);
        }
        assert_eq!(stripe.seen.len(), LIMIT_STATES_PER_STRIPE, "full, one key made room for each new one");
        stripe.remember("rule\0kept", "one".into());
        stripe.remember("rule\0kept", "two".into());
        assert_eq!(stripe.seen.get("rule\0kept").map(String::as_str), Some("two"));
        assert!(!format!("{stripe:?}").contains("key-"), "Debug shows no key: {stripe:?}");
    }

    #[test]
    fn keys_of_one_user_share_a_hash_tag() {
        let layout = Layout::new("atoms:session:").unwrap();
        let tag = shard_tag("alice");
        let token = format!("sat_{tag}_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG");
        let hash = crate::crypto::token_hash(&token);
        let record = layout.record(&hash);
        assert!(record.starts_with(&format!("atoms:session:{{{tag}}}:s:")), "{record}");
        assert_eq!(record, format!("{}{}", layout.records(&hash_tag(&hash)), hex::encode(hash)));
        assert_eq!(
            due_member(&hash),
            format!("{}:{}", &record[record.len() - 64..][..4], &record[record.len() - 64..])
        );
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

        // Every field a script writes beside the doc, as Redis returns them (text or integers).
        let reply = Reply::Array(vec![
            data("session_id"),
            data("ses_0000_b"),
            data("user_id"),
            data("v"),
            data("created_at"),
            Reply::Int(2),
            data("absolute_expires_at"),
            data("21"),
            data("idle_expires_at"),
            data("11"),
            data("last_accessed_at"),
            data("3"),
            data("retain_until"),
            data("31"),
            data("ip_address"),
            data("198.51.100.7"),
            data("state"),
            data("revoked"),
            data("doc"),
            data(doc),
            data("unknown_field"),
            data("ignored"),
        ]);
        let r = record(reply).unwrap().unwrap();
        assert_eq!((r.session_id.as_str(), r.user_id.as_str(), r.state), ("ses_0000_b", "v", SessionState::Revoked));
        assert_eq!(
            (r.created_at, r.absolute_expires_at, r.idle_expires_at, r.last_accessed_at, r.retain_until),
            (2, 21, 11, 3, 31)
        );
        assert_eq!(r.ip_address.as_deref(), Some("198.51.100.7"));
        assert_eq!((r.version, r.idle_timeout_ms, r.tokens.access.as_str()), (1, 9, "x"), "the rest from the doc");

        // Malformed replies are errors, never panics.
        for bad in [
            vec![data("state"), data("active")],
            vec![data("doc"), data("[1]")],
            vec![data("doc"), data(doc), data("state"), data("sleeping")],
            vec![data("doc"), data(doc), data("version"), data("-1")],
            vec![data("doc"), data(doc), data("created_at"), data("soon")],
            vec![data("doc"), data(doc), data("user_id")],
            vec![data("doc"), Reply::Int(1)],
        ] {
            assert!(record(Reply::Array(bad.clone())).is_err(), "{bad:?}");
        }
    }
}
