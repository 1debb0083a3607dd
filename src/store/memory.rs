//! The memory backend: every index in process memory behind one lock per concern (sessions with
//! the revocation log, rate limits, security events). For tests and ephemeral deployments;
//! nothing survives a restart. Each trait operation holds its lock for its whole step, which is
//! what makes it atomic; the revocation log sits behind the sessions' lock, so an end and its
//! event are one step too.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;

use crate::clock::Millis;
use crate::error::Result;
use crate::model::limiter::{self, Decision, LimiterState, Rule};
use crate::model::{RefreshLease, RefreshRecord};
use crate::model::{RevocationEvent, SecurityEvent, SessionRecord};
use crate::store::{
    CasOutcome, CreateOutcome, CreateWith, EndOutcome, EndSession, EventQuery, LeaseOutcome, LogPosition, LogRead,
    RateLimitStore, RevocationLog, RevocationPage, RevocationQuery, SecurityEventStore, SessionStore, TimedOut,
    TokenHash, TokenStore, Touch, type_matches,
};

/// Sessions, the revocation log, rate-limit state and security events in memory.
#[derive(Debug)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
    // Random per process: a cursor from an earlier process's log is then out of range instead of
    // being read as a position in this fresh one.
    log_id: String,
    limits: Mutex<Limits>,
    events: RwLock<Events>,
    tokens: Mutex<Tokens>,
}

/// Refresh leases by session id, and refresh records per session by record id with an expiry
/// index.
#[derive(Debug, Default)]
struct Tokens {
    leases: HashMap<String, RefreshLease>,
    records: HashMap<String, BTreeMap<String, RefreshRecord>>,
    expiry: BTreeSet<(Millis, String, String)>,
    checkpoints: HashMap<String, String>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            inner: RwLock::default(),
            log_id: crate::model::new_log_id(),
            limits: Mutex::new(Limits { max_keys: limiter::DEFAULT_MAX_KEYS, ..Limits::default() }),
            events: RwLock::default(),
            tokens: Mutex::default(),
        }
    }
}

/// Rate-limit state by rule and key, with an index by the time it can be forgotten. A rule
/// holds at most `max_keys` keys (see [`limiter`]'s "Bounded state"). Names and keys are shared
/// (`Arc<str>`) between the table and the index, so a check of a stored key allocates no string.
#[derive(Debug, Default)]
struct Limits {
    rules: HashMap<Arc<str>, RuleStates>,
    forget: BTreeSet<(Millis, Arc<str>, Arc<str>)>,
    max_keys: usize,
}

/// The stored states of one rule.
#[derive(Debug)]
struct RuleStates {
    name: Arc<str>,
    keys: HashMap<Arc<str>, Slot>,
}

/// One key's state, and the time it is indexed under in [`Limits::forget`].
#[derive(Debug)]
struct Slot {
    key: Arc<str>,
    state: LimiterState,
    forget_at: Millis,
}

/// States a check at the bound drops, at most, before it decides whether a new key fits.
const PURGE_AT_BOUND: usize = 1000;

impl Limits {
    fn state(&self, rule: &str, key: &str) -> Option<LimiterState> {
        self.rules.get(rule)?.keys.get(key).map(|slot| slot.state)
    }

    /// Stores `state` for (`rule`, `key`), indexed to be forgotten at `forget_at`.
    fn store(&mut self, rule: &str, key: &str, state: LimiterState, forget_at: Millis) {
        let Limits { rules, forget, .. } = self;
        if !rules.contains_key(rule) {
            let name: Arc<str> = Arc::from(rule);
            rules.insert(name.clone(), RuleStates { name, keys: HashMap::new() });
        }
        let Some(states) = rules.get_mut(rule) else { return };
        match states.keys.get_mut(key) {
            Some(slot) => {
                if slot.forget_at != forget_at {
                    forget.remove(&(slot.forget_at, states.name.clone(), slot.key.clone()));
                    forget.insert((forget_at, states.name.clone(), slot.key.clone()));
                    slot.forget_at = forget_at;
                }
                slot.state = state;
            }
            None => {
                let key: Arc<str> = Arc::from(key);
                forget.insert((forget_at, states.name.clone(), key.clone()));
                states.keys.insert(key.clone(), Slot { key, state, forget_at });
            }
        }
    }

    /// Deletes up to `limit` states forgettable at `now`.
    fn purge(&mut self, now: Millis, limit: usize) -> usize {
        let mut dropped = 0;
        while dropped < limit && self.forget.first().is_some_and(|(at, ..)| *at <= now) {
            let Some((_, rule, key)) = self.forget.pop_first() else { break };
            if let Some(states) = self.rules.get_mut(&rule) {
                states.keys.remove(&key);
                if states.keys.is_empty() {
                    // Gives the table's memory back after a flood of keys.
                    self.rules.remove(&rule);
                }
            }
            dropped += 1;
        }
        dropped
    }

    /// Whether a new key of `rule` may be stored at `now`: below the bound, after dropping state
    /// that decides nothing any more.
    fn has_room(&mut self, rule: &str, now: Millis) -> bool {
        let held = |limits: &Limits| limits.rules.get(rule).map_or(0, |states| states.keys.len());
        if held(self) < self.max_keys {
            return true;
        }
        self.purge(now, PURGE_AT_BOUND);
        held(self) < self.max_keys
    }
}

/// Events by (time, id), and per user the (time, id) positions.
#[derive(Debug, Default)]
struct Events {
    by_time: BTreeMap<(Millis, String), SecurityEvent>,
    by_user: HashMap<String, BTreeSet<(Millis, String)>>,
}

#[derive(Debug, Default)]
struct Inner {
    // Boxed: the table then holds a pointer per slot instead of a whole record, which matters at
    // millions of sessions (the table keeps spare slots, and grows by doubling).
    sessions: HashMap<TokenHash, Box<SessionRecord>>,
    ids: HashMap<String, TokenHash>,
    users: HashMap<String, HashSet<TokenHash>>,
    expiry: BTreeSet<(Millis, TokenHash)>,
    /// The deadline index of [`SessionStore::take_timed_out`].
    deadlines: BTreeSet<(Millis, TokenHash)>,
    /// Upstream-token hash → session token hash.
    upstream: HashMap<TokenHash, TokenHash>,
    log: Log,
}

/// The revocation log and its indexes.
#[derive(Debug, Default)]
struct Log {
    events: BTreeMap<u64, RevocationEvent>,
    by_session: HashMap<String, u64>,
    by_user: BTreeSet<(String, u64)>,
    expiry: BTreeSet<(Millis, u64)>,
    head: u64,
    trimmed_through: u64,
}

impl Log {
    fn append(&mut self, end: &EndSession, record: &SessionRecord) {
        let seq = self.head + 1;
        if let Some(event) = end.event_for(record, seq) {
            self.head = seq;
            self.by_session.insert(event.session_id.clone(), seq);
            self.by_user.insert((event.user_id.clone(), seq));
            self.expiry.insert((event.expires_at, seq));
            self.events.insert(seq, event);
        }
    }

    fn position(&self) -> LogPosition {
        LogPosition { head: self.head, trimmed_through: self.trimmed_through }
    }
}

impl Inner {
    fn end(&mut self, hash: &TokenHash, end: &EndSession) -> EndOutcome {
        let Some(record) = self.sessions.get_mut(hash) else { return EndOutcome::NotFound };
        if record.state.is_terminal() {
            return EndOutcome::AlreadyEnded((**record).clone());
        }
        self.expiry.remove(&(record.retain_until, *hash));
        record.state = end.state;
        record.end_reason = Some(end.reason.clone());
        record.ended_at = Some(end.at);
        record.retain_until = end.retain_until_for(record);
        record.version += 1;
        self.expiry.insert((record.retain_until, *hash));
        let ended = (**record).clone();
        self.log.append(end, &ended);
        EndOutcome::Ended(ended)
    }

    fn remove(&mut self, hash: &TokenHash) {
        if let Some(record) = self.sessions.remove(hash) {
            self.unindex_upstream(&record.upstream_hashes, hash);
            self.ids.remove(&record.session_id);
            self.expiry.remove(&(record.retain_until, *hash));
            if let Some(set) = self.users.get_mut(&record.user_id) {
                set.remove(hash);
                if set.is_empty() {
                    self.users.remove(&record.user_id);
                }
            }
        }
    }
}

impl Inner {
    fn index_upstream(&mut self, hashes: &[String], session: &TokenHash) {
        for upstream in hashes.iter().filter_map(|h| parse_hash(h)) {
            self.upstream.insert(upstream, *session);
        }
    }

    fn unindex_upstream(&mut self, hashes: &[String], session: &TokenHash) {
        for upstream in hashes.iter().filter_map(|h| parse_hash(h)) {
            if self.upstream.get(&upstream) == Some(session) {
                self.upstream.remove(&upstream);
            }
        }
    }
}

fn parse_hash(hex_hash: &str) -> Option<TokenHash> {
    hex::decode(hex_hash).ok()?.try_into().ok()
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Holds at most `max` limiter keys per rule (`security.max_limiter_keys`; at least 1).
    pub fn with_max_limiter_keys(mut self, max: usize) -> MemoryStore {
        self.limits.get_mut().unwrap_or_else(|p| p.into_inner()).max_keys = max.max(1);
        self
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave an index half-written: every operation
        // computes first and mutates last, so the data behind a poisoned lock is still whole.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn limits(&self) -> std::sync::MutexGuard<'_, Limits> {
        self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, Tokens> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl TokenStore for MemoryStore {
    async fn acquire_lease(&self, lease: &RefreshLease, now: Millis) -> Result<LeaseOutcome> {
        let mut tokens = self.tokens();
        match tokens.leases.get(&lease.session_id) {
            Some(current) if current.expires_at > now => Ok(LeaseOutcome::Held(current.clone())),
            _ => {
                tokens.leases.insert(lease.session_id.clone(), lease.clone());
                Ok(LeaseOutcome::Acquired)
            }
        }
    }

    async fn renew_lease(&self, session_id: &str, holder: &str, expires_at: Millis, now: Millis) -> Result<bool> {
        let mut tokens = self.tokens();
        match tokens.leases.get_mut(session_id) {
            Some(lease) if lease.holder == holder && lease.expires_at > now => {
                lease.expires_at = lease.expires_at.max(expires_at);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release_lease(&self, session_id: &str, holder: &str) -> Result<()> {
        let mut tokens = self.tokens();
        if tokens.leases.get(session_id).is_some_and(|lease| lease.holder == holder) {
            tokens.leases.remove(session_id);
        }
        Ok(())
    }

    async fn append_refresh_record(&self, record: &RefreshRecord, keep: usize) -> Result<()> {
        let mut tokens = self.tokens();
        let Tokens { records, expiry, .. } = &mut *tokens;
        let list = records.entry(record.session_id.clone()).or_default();
        list.insert(record.record_id.clone(), record.clone());
        expiry.insert((record.expires_at, record.session_id.clone(), record.record_id.clone()));
        while list.len() > keep.max(1) {
            let Some((_, oldest)) = list.pop_first() else { break };
            expiry.remove(&(oldest.expires_at, oldest.session_id, oldest.record_id));
        }
        Ok(())
    }

    async fn refresh_history(&self, session_id: &str, limit: usize) -> Result<Vec<RefreshRecord>> {
        let tokens = self.tokens();
        Ok(tokens
            .records
            .get(session_id)
            .into_iter()
            .flat_map(|list| list.values().rev())
            .take(limit)
            .cloned()
            .collect())
    }

    async fn purge_refresh_records(&self, now: Millis, limit: usize) -> Result<usize> {
        let mut tokens = self.tokens();
        let due: Vec<(Millis, String, String)> =
            tokens.expiry.iter().take_while(|(at, ..)| *at <= now).take(limit).cloned().collect();
        for key in &due {
            tokens.expiry.remove(key);
            let (_, session_id, record_id) = key;
            if let Some(list) = tokens.records.get_mut(session_id) {
                list.remove(record_id);
                if list.is_empty() {
                    tokens.records.remove(session_id);
                }
            }
        }
        // Leases left behind by a crashed holder expire by themselves; forget them here too.
        tokens.leases.retain(|_, lease| lease.expires_at > now);
        Ok(due.len())
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>> {
        Ok(self.tokens().checkpoints.get(name).cloned())
    }

    async fn save_checkpoint(&self, name: &str, value: &str) -> Result<()> {
        self.tokens().checkpoints.insert(name.to_owned(), value.to_owned());
        Ok(())
    }
}

#[async_trait]
impl RevocationLog for MemoryStore {
    fn log_id(&self) -> String {
        self.log_id.clone()
    }

    async fn read_revocations(&self, after: u64, limit: usize) -> Result<LogRead> {
        let inner = self.read();
        let events = inner.log.events.range(after.saturating_add(1)..).take(limit).map(|(_, e)| e.clone()).collect();
        Ok(LogRead { events, position: inner.log.position() })
    }

    async fn revocation_entry(&self, session_id: &str, now: Millis) -> Result<Option<RevocationEvent>> {
        let inner = self.read();
        let log = &inner.log;
        Ok(log.by_session.get(session_id).and_then(|seq| log.events.get(seq)).filter(|e| e.expires_at > now).cloned())
    }

    async fn list_revocations(&self, query: RevocationQuery<'_>) -> Result<RevocationPage> {
        let RevocationQuery { user_id, after, through, limit, now } = query;
        let inner = self.read();
        let log = &inner.log;
        let through = through.unwrap_or(log.head);
        let live = |e: &&RevocationEvent| e.expires_at > now;
        let entries = if after >= through {
            Vec::new()
        } else {
            match user_id {
                Some(user) => log
                    .by_user
                    .range((user.to_owned(), after + 1)..=(user.to_owned(), through))
                    .filter_map(|(_, seq)| log.events.get(seq))
                    .filter(live)
                    .take(limit)
                    .cloned()
                    .collect(),
                None => {
                    log.events.range(after + 1..=through).map(|(_, e)| e).filter(live).take(limit).cloned().collect()
                }
            }
        };
        Ok(RevocationPage { entries, position: log.position() })
    }

    async fn purge_revocations(&self, now: Millis, limit: usize) -> Result<usize> {
        let mut inner = self.write();
        let log = &mut inner.log;
        let due: Vec<(Millis, u64)> = log.expiry.range(..=(now, u64::MAX)).take(limit).copied().collect();
        for key in &due {
            log.expiry.remove(key);
            if let Some(event) = log.events.remove(&key.1) {
                log.by_session.remove(&event.session_id);
                log.by_user.remove(&(event.user_id, key.1));
            }
            log.trimmed_through = log.trimmed_through.max(key.1);
        }
        Ok(due.len())
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn create(&self, record: SessionRecord, cap: u32, eviction: EndSession) -> Result<Vec<SessionRecord>> {
        let mut inner = self.write();
        let mut active: Vec<(Millis, String, TokenHash)> = inner
            .users
            .get(&record.user_id)
            .into_iter()
            .flatten()
            .filter_map(|h| inner.sessions.get(h))
            .filter(|s| s.is_active_at(eviction.at))
            .map(|s| (s.created_at, s.session_id.clone(), s.token_hash))
            .collect();
        active.sort();
        let excess = (active.len() + 1).saturating_sub(cap as usize);
        let mut evicted = Vec::with_capacity(excess);
        for (_, _, hash) in active.into_iter().take(excess) {
            if let EndOutcome::Ended(ended) = inner.end(&hash, &eviction) {
                evicted.push(ended);
            }
        }
        let hash = record.token_hash;
        inner.ids.insert(record.session_id.clone(), hash);
        inner.users.entry(record.user_id.clone()).or_default().insert(hash);
        inner.expiry.insert((record.retain_until, hash));
        inner.deadlines.insert((record.deadline(), hash));
        inner.index_upstream(&record.upstream_hashes, &hash);
        inner.sessions.insert(hash, Box::new(record));
        Ok(evicted)
    }

    async fn create_recorded(
        &self,
        record: SessionRecord,
        cap: u32,
        eviction: EndSession,
        with: CreateWith,
    ) -> Result<CreateOutcome> {
        crate::store::create_in_steps(self, record, cap, eviction, with).await
    }

    async fn get_by_token(&self, token_hash: &TokenHash) -> Result<Option<SessionRecord>> {
        Ok(self.read().sessions.get(token_hash).map(|r| (**r).clone()))
    }

    async fn get_by_upstream(&self, upstream_hash: &TokenHash) -> Result<Option<SessionRecord>> {
        let inner = self.read();
        Ok(inner.upstream.get(upstream_hash).and_then(|h| inner.sessions.get(h)).map(|r| (**r).clone()))
    }

    async fn get_by_id(&self, session_id: &str) -> Result<Option<SessionRecord>> {
        let inner = self.read();
        Ok(inner.ids.get(session_id).and_then(|h| inner.sessions.get(h)).map(|r| (**r).clone()))
    }

    async fn list_user(&self, user_id: &str) -> Result<Vec<SessionRecord>> {
        let inner = self.read();
        Ok(inner
            .users
            .get(user_id)
            .into_iter()
            .flatten()
            .filter_map(|h| inner.sessions.get(h).map(|r| (**r).clone()))
            .collect())
    }

    async fn touch(&self, token_hash: &TokenHash, touch: Touch) -> Result<()> {
        let mut inner = self.write();
        if let Some(record) = inner.sessions.get_mut(token_hash)
            && !record.state.is_terminal()
        {
            record.idle_expires_at = record.idle_expires_at.max(touch.idle_expires_at);
            record.last_accessed_at = record.last_accessed_at.max(touch.last_accessed_at);
            if let Some(ip) = touch.ip_address {
                record.ip_address = Some(ip);
            }
        }
        Ok(())
    }

    async fn compare_and_swap(&self, record: &SessionRecord, expected_version: u64) -> Result<CasOutcome> {
        let mut inner = self.write();
        let Some(current) = inner.sessions.get_mut(&record.token_hash) else { return Ok(CasOutcome::NotFound) };
        if current.version != expected_version || current.state.is_terminal() {
            return Ok(CasOutcome::Conflict(current.clone()));
        }
        let next = record.swapped_over(current);
        let replaced = std::mem::replace(&mut **current, next);
        let hash = record.token_hash;
        let kept = &record.upstream_hashes;
        let dropped: Vec<String> = replaced.upstream_hashes.into_iter().filter(|h| !kept.contains(h)).collect();
        inner.unindex_upstream(&dropped, &hash);
        inner.index_upstream(kept, &hash);
        Ok(CasOutcome::Swapped)
    }

    async fn end(&self, token_hash: &TokenHash, end: EndSession) -> Result<EndOutcome> {
        Ok(self.write().end(token_hash, &end))
    }

    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<usize> {
        let mut inner = self.write();
        let due: Vec<TokenHash> = inner.expiry.range(..=(now, [0xff; 32])).take(limit).map(|(_, hash)| *hash).collect();
        for hash in &due {
            inner.remove(hash);
        }
        Ok(due.len())
    }

    async fn take_timed_out(&self, now: Millis, limit: usize) -> Result<TimedOut> {
        let mut inner = self.write();
        let due: Vec<(Millis, TokenHash)> = inner.deadlines.range(..=(now, [0xff; 32])).take(limit).copied().collect();
        let mut found = TimedOut { sessions: Vec::new(), walked: due.len() };
        for entry in due {
            inner.deadlines.remove(&entry);
            let Some(record) = inner.sessions.get(&entry.1) else { continue };
            if record.state.is_terminal() {
                continue;
            }
            if record.deadline() > now {
                let next = (record.deadline(), entry.1);
                inner.deadlines.insert(next);
            } else {
                found.sessions.push((**record).clone());
            }
        }
        Ok(found)
    }

    async fn count(&self) -> Result<u64> {
        Ok(self.read().sessions.len() as u64)
    }

    async fn count_active(&self, now: Millis) -> Result<Option<u64>> {
        Ok(Some(self.read().sessions.values().filter(|s| s.is_active_at(now)).count() as u64))
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl RateLimitStore for MemoryStore {
    async fn check(&self, rule: &Rule, key: &str, cost: u32, now: Millis) -> Result<Decision> {
        let mut limits = self.limits();
        let state = limits.state(&rule.name, key);
        if state.is_none() && !limits.has_room(&rule.name, now) {
            return Ok(limiter::refused(rule));
        }
        let (decision, next) = limiter::apply(state, rule, cost, now);
        if let Some(next) = next {
            limits.store(&rule.name, key, next, next.forget_at(rule));
        }
        Ok(decision)
    }

    async fn peek(&self, rule: &Rule, key: &str, cost: u32, now: Millis) -> Result<Decision> {
        let mut limits = self.limits();
        let state = limits.state(&rule.name, key);
        // Dropping state that decides nothing changes no decision, so a peek may do it too.
        if state.is_none() && !limits.has_room(&rule.name, now) {
            return Ok(limiter::refused(rule));
        }
        Ok(limiter::apply(state, rule, cost, now).0)
    }

    async fn purge_limits(&self, now: Millis, limit: usize) -> Result<usize> {
        Ok(self.limits().purge(now, limit))
    }
}

#[async_trait]
impl SecurityEventStore for MemoryStore {
    async fn append(&self, event: &SecurityEvent) -> Result<()> {
        let mut events = self.events.write().unwrap_or_else(|p| p.into_inner());
        let position = (event.occurred_at, event.event_id.clone());
        if let Some(user) = &event.user_id {
            events.by_user.entry(user.clone()).or_default().insert(position.clone());
        }
        events.by_time.insert(position, event.clone());
        Ok(())
    }

    async fn user_events(&self, query: &EventQuery) -> Result<Vec<SecurityEvent>> {
        let events = self.events.read().unwrap_or_else(|p| p.into_inner());
        let Some(positions) = events.by_user.get(&query.user_id) else { return Ok(Vec::new()) };
        if query.from >= query.until {
            return Ok(Vec::new());
        }
        let upper = match &query.after {
            Some((at, id)) if *at < query.until => (*at, id.clone()),
            _ => (query.until, String::new()),
        };
        let lower = (query.from, String::new());
        // A resume position before the range (a crafted page token) selects nothing; BTreeSet
        // would panic on a reversed range.
        if upper <= lower {
            return Ok(Vec::new());
        }
        let (lower, upper) = (std::ops::Bound::Included(lower), std::ops::Bound::Excluded(upper));
        Ok(positions
            .range((lower, upper))
            .rev()
            .filter_map(|position| events.by_time.get(position))
            .filter(|event| type_matches(query, event.event_type))
            .take(query.limit)
            .cloned()
            .collect())
    }

    async fn purge_events(&self, cutoff: Millis, limit: usize) -> Result<usize> {
        let mut events = self.events.write().unwrap_or_else(|p| p.into_inner());
        let due: Vec<(Millis, String)> =
            events.by_time.keys().take_while(|(at, _)| *at < cutoff).take(limit).cloned().collect();
        for position in &due {
            if let Some(event) = events.by_time.remove(position)
                && let Some(user) = &event.user_id
                && let Some(set) = events.by_user.get_mut(user)
            {
                set.remove(position);
                if set.is_empty() {
                    events.by_user.remove(user);
                }
            }
        }
        Ok(due.len())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn rule(name: &str) -> Rule {
        Rule { name: name.into(), limit: 2, period: Duration::from_secs(60), burst: 2, backoff: None }
    }

    /// The forget index holds one entry per stored key, under the time its state says, however
    /// often a key's state moves; and once every state is forgotten the tables are empty.
    #[tokio::test]
    async fn the_forget_index_follows_each_keys_state_and_a_full_purge_leaves_nothing() {
        let store = MemoryStore::new();
        let (a, b) = (rule("a"), rule("b"));
        for step in 0..5 {
            for key in ["k1", "k2", "k3"] {
                store.check(&a, key, 1, 1_000 + step * 7_000).await.unwrap();
            }
            store.check(&b, "k1", 1, 1_000 + step * 7_000).await.unwrap();
        }
        {
            let limits = store.limits();
            assert_eq!(limits.forget.len(), 4, "{:?}", limits.forget);
            for (at, name, key) in &limits.forget {
                let slot = &limits.rules[name].keys[key];
                assert_eq!(slot.forget_at, *at);
                let rule = if &**name == "a" { &a } else { &b };
                assert_eq!(slot.state.forget_at(rule), *at);
            }
        }
        let last = limits_latest(&store);
        assert_eq!(store.purge_limits(last - 1, 100).await.unwrap(), 0);
        assert_eq!(store.purge_limits(last, 100).await.unwrap(), 4);
        let limits = store.limits();
        assert!(limits.rules.is_empty() && limits.forget.is_empty(), "{limits:?}");
    }

    fn limits_latest(store: &MemoryStore) -> Millis {
        store.limits().forget.iter().map(|(at, ..)| *at).max().unwrap()
    }
}
