//! The Redis key space shared by the `redis` and `kv-rest` backends: the key layout, the Lua
//! scripts, and [`KeyspaceStore`], which implements [`SessionStore`] once over a [`Transport`]
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
//!
//! Every key of one user shares the hash tag `{T}`, so each per-user script touches one Redis
//! Cluster slot. No key has a Redis TTL: the service's clock decides what is expired (and tests
//! move that clock), and an index TTL could drop live entries (the seed library's flaw). Records
//! are deleted only by [`SessionStore::purge_expired`], which walks `P{expiry}:due`.
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
use crate::session::{SessionRecord, SessionState, shard_tag};
use crate::store::{CasOutcome, EndOutcome, EndSession, SessionStore, TokenHash, Touch};

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
}

/// Creates a session under the cap, ending the oldest active sessions of the user.
/// KEYS: record, id, user index. ARGV: record-key prefix, now, cap, eviction state, reason,
/// retain-until, then the new record: hash hex, doc, session id, user id, created, absolute,
/// idle, last access, retain-until, version, state. Returns the evicted records (HGETALL each).
const CREATE: &str = r#"
local now = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local active = {}
for _, h in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  local f = redis.call('HMGET', ARGV[1] .. h, 'state', 'idle_expires_at', 'absolute_expires_at', 'created_at', 'session_id')
  if not f[1] then
    redis.call('ZREM', KEYS[3], h)
  elseif f[1] == 'active' and now < tonumber(f[2]) and now < tonumber(f[3]) then
    active[#active + 1] = {tonumber(f[4]), f[5], h}
  end
end
table.sort(active, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[2] < b[2]
end)
local evicted = {}
for i = 1, math.min(#active + 1 - cap, #active) do
  local key = ARGV[1] .. active[i][3]
  local version = tonumber(redis.call('HGET', key, 'version')) + 1
  redis.call('HSET', key, 'state', ARGV[4], 'end_reason', ARGV[5], 'ended_at', ARGV[2],
    'retain_until', ARGV[6], 'version', tostring(version))
  evicted[#evicted + 1] = redis.call('HGETALL', key)
end
redis.call('HSET', KEYS[1], 'doc', ARGV[8], 'session_id', ARGV[9], 'user_id', ARGV[10],
  'created_at', ARGV[11], 'absolute_expires_at', ARGV[12], 'idle_expires_at', ARGV[13],
  'last_accessed_at', ARGV[14], 'retain_until', ARGV[15], 'version', ARGV[16], 'state', ARGV[17])
redis.call('SET', KEYS[2], ARGV[7])
redis.call('ZADD', KEYS[3], ARGV[11], ARGV[7])
return evicted
"#;

/// The record a session id names. KEYS: id. ARGV: record-key prefix. Returns HGETALL or `{}`.
const GET_BY_ID: &str = r#"
local h = redis.call('GET', KEYS[1])
if not h then return {} end
return redis.call('HGETALL', ARGV[1] .. h)
"#;

/// Every record of a user. KEYS: user index. ARGV: record-key prefix. Returns HGETALL each.
const LIST_USER: &str = r#"
local out = {}
for _, h in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local r = redis.call('HGETALL', ARGV[1] .. h)
  if #r > 0 then out[#out + 1] = r end
end
return out
"#;

/// The idle slide: only forward, only while active, version untouched. KEYS: record.
/// ARGV: last access, idle expiry, '1' and the IP when it changed (else '0', '').
const TOUCH: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'state', 'idle_expires_at', 'last_accessed_at')
if f[1] ~= 'active' then return 0 end
if tonumber(ARGV[2]) > tonumber(f[2]) then redis.call('HSET', KEYS[1], 'idle_expires_at', ARGV[2]) end
if tonumber(ARGV[1]) > tonumber(f[3]) then redis.call('HSET', KEYS[1], 'last_accessed_at', ARGV[1]) end
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'ip_address', ARGV[4]) end
return 1
"#;

/// Compare-and-swap. KEYS: record. ARGV: expected version, doc, absolute expiry, idle expiry,
/// last access. Identity, creation time, state and retention stay as stored (their fields
/// override the doc). Returns {0} missing, {1} swapped, {2, HGETALL} conflict.
const COMPARE_AND_SWAP: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'state', 'version')
if not f[1] then return {0} end
if f[1] ~= 'active' or tonumber(f[2]) ~= tonumber(ARGV[1]) then
  return {2, redis.call('HGETALL', KEYS[1])}
end
redis.call('HSET', KEYS[1], 'doc', ARGV[2], 'version', tostring(tonumber(ARGV[1]) + 1),
  'absolute_expires_at', ARGV[3], 'idle_expires_at', ARGV[4], 'last_accessed_at', ARGV[5])
redis.call('HDEL', KEYS[1], 'ip_address')
return {1}
"#;

/// Active → terminal; a terminal state is never rewritten. KEYS: record. ARGV: state, reason,
/// at, retain-until. Returns {0} missing, {1, HGETALL} ended, {2, HGETALL} already ended.
const END: &str = r#"
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0} end
if state ~= 'active' then return {2, redis.call('HGETALL', KEYS[1])} end
local version = tonumber(redis.call('HGET', KEYS[1], 'version')) + 1
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'end_reason', ARGV[2], 'ended_at', ARGV[3],
  'retain_until', ARGV[4], 'version', tostring(version))
return {1, redis.call('HGETALL', KEYS[1])}
"#;

/// Deletes a record whose retention passed, with its id key and user-index entry. KEYS: record.
/// ARGV: tag prefix (`P{T}:`), now, hash hex. Returns {0} missing, {1} deleted,
/// {2, retain_until} still retained.
const PURGE: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'retain_until', 'session_id', 'user_id')
if not f[1] then return {0} end
if tonumber(f[1]) > tonumber(ARGV[2]) then return {2, f[1]} end
redis.call('DEL', KEYS[1])
redis.call('DEL', ARGV[1] .. 'id:' .. f[2])
redis.call('ZREM', ARGV[1] .. 'u:' .. f[3], ARGV[3])
return {1}
"#;

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
fn coded(reply: Reply) -> Result<(i64, Vec<Reply>)> {
    let mut items = items(reply)?.into_iter();
    let code = integer(&items.next().ok_or_else(|| malformed("empty script reply"))?)?;
    Ok((code, items.collect()))
}

/// How many purge scripts run at once.
const PURGE_CONCURRENCY: usize = 16;

/// A [`SessionStore`] over any [`Transport`]; every operation is bounded by the storage timeout.
#[derive(Debug)]
pub struct KeyspaceStore<T: Transport> {
    transport: T,
    layout: Layout,
    timeout: Duration,
}

impl<T: Transport> KeyspaceStore<T> {
    /// A store over `transport` under `layout`; each operation fails `Unavailable` after `timeout`.
    pub fn new(transport: T, layout: Layout, timeout: Duration) -> KeyspaceStore<T> {
        KeyspaceStore { transport, layout, timeout }
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
            // The index entry first: a record never exists without one.
            let due =
                vec!["ZADD".into(), self.layout.due(), record.retain_until.to_string(), due_member(&record.token_hash)];
            self.transport.command(due, false).await?;
            let hash_hex = hex::encode(record.token_hash);
            let keys = vec![
                self.layout.record(&record.token_hash),
                self.layout.id(&tag, &record.session_id),
                self.layout.user(&tag, &record.user_id),
            ];
            let doc = String::from_utf8(record.to_bytes()).map_err(Error::internal)?;
            let args = vec![
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
            ];
            let reply = self.transport.eval(&SCRIPTS.create, keys, args, false).await?;
            let evicted = items(reply)?.into_iter().map(required).collect::<Result<Vec<_>>>()?;
            for ended in &evicted {
                self.lower_due_after_write(&ended.token_hash, ended.retain_until).await;
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
            let doc = String::from_utf8(record.to_bytes()).map_err(Error::internal)?;
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
            let args = vec![
                state_name(end.state).into(),
                end.reason.clone(),
                end.at.to_string(),
                end.retain_until.to_string(),
            ];
            let keys = vec![self.layout.record(token_hash)];
            let (code, mut rest) = coded(self.transport.eval(&SCRIPTS.end, keys, args, false).await?)?;
            Ok(match code {
                0 => EndOutcome::NotFound,
                1 => {
                    let ended = required(rest.pop().unwrap_or(Reply::Nil))?;
                    self.lower_due_after_write(token_hash, ended.retain_until).await;
                    EndOutcome::Ended(ended)
                }
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
