//! Sessions: the record every backend stores, and [`SessionManager`], which implements the
//! lifecycle over any [`SessionStore`](crate::store::SessionStore): create under the per-user cap, validate (the hot path),
//! read, list, update, terminate, and the cleanup sweep.
//!
//! Rules worth knowing:
//! - A session is expired at the instant `now >= idle_expires_at` or `now >= absolute_expires_at`.
//! - Terminal states (`Expired`, `Revoked`, `Terminated`) are final; the store refuses to
//!   rewrite them, and an ended session keeps a tombstone for the revocation-list TTL so that
//!   validation can say why it ended.
//! - Validation reads once; it writes only when the idle expiry would move by more than the
//!   slide step, when the client's IP changed, or once when it finds a session newly expired.
//! - Tokens: the session token is 256 random bits shown once, stored as its SHA-256; the
//!   upstream tokens are sealed by the key ring with the session id as associated data.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use secrecy::{ExposeSecret, SecretString};

use crate::clock::{self, Clock, Millis};
use crate::crypto::{self, KeyRing};
use crate::error::{Error, Result};
use crate::model::limiter::Decision;
use crate::model::{RevocationKind, SecurityEvent};
use crate::store::{CasOutcome, CreateOutcome, CreateWith, DynSessionStore, EndOutcome, EndSession, LimitCheck, Touch};

pub use crate::model::fingerprint as device;
mod hooks;
mod record;
mod settings;
mod validate;

pub use crate::model::session::*;
pub use device::Fingerprint;
pub use hooks::*;
use record::*;
pub use settings::SessionSettings;
pub use validate::HijackScore;

/// The name of the rate-limit rule checked on creation, keyed by user id.
pub const SESSION_CREATE_RULE: &str = "session_create";

/// The rule checked per client network when ValidateSession answers "not valid" for a reason
/// that [counts against the client](InvalidReason::counts_against_client).
pub const VALIDATE_FAILURE_RULE: &str = "validate_failure";

/// The name of the provider the flat `token.*` settings describe, which a session that names
/// none uses.
pub const DEFAULT_PROVIDER: &str = "default";

/// The key of a client address in [`VALIDATE_FAILURE_RULE`]: an IPv4 address as it is (also when
/// written as an IPv4-mapped IPv6 address), an IPv6 address as its /64, for example
/// `2001:db8:1:2::/64`. A /64 is what one subscriber, one LAN or one host is given, and any
/// address in it is the client's to pick, so an exact IPv6 key would hand a guesser 2^64 fresh
/// allowances.
pub fn client_network_key(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let network = std::net::Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX));
            format!("{network}/64")
        }
    }
}

/// Everything needed to create a session.
#[derive(Debug, Default)]
pub struct NewSession {
    /// Owner.
    pub user_id: String,
    /// Upstream access token.
    pub access_token: SecretString,
    /// Upstream refresh token.
    pub refresh_token: Option<SecretString>,
    /// Upstream id token.
    pub id_token: Option<SecretString>,
    /// Token type; "Bearer" when empty.
    pub token_type: String,
    /// Access-token lifetime.
    pub expires_in: Option<Duration>,
    pub scopes: Vec<String>,
    /// Device at login.
    pub fingerprint: Option<Fingerprint>,
    /// Client IP.
    pub ip_address: Option<IpAddr>,
    /// Client user agent.
    pub user_agent: Option<String>,
    /// Provider name.
    pub provider: String,
    /// Idle timeout override.
    pub idle_timeout: Option<Duration>,
    /// Absolute timeout override.
    pub absolute_timeout: Option<Duration>,
    pub metadata: BTreeMap<String, String>,
}

/// A created session.
#[derive(Debug)]
pub struct Created {
    /// The record.
    pub session: SessionRecord,
    /// The bearer secret, shown once.
    pub token: SecretString,
    /// Sessions the cap ended, oldest first.
    pub evicted: Vec<SessionRecord>,
}

/// Why a validation said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidReason {
    /// No session has this token.
    NotFound,
    /// A timeout passed.
    Expired,
    /// Revoked.
    Revoked,
    /// Terminated.
    Terminated,
    /// The device does not match.
    DeviceMismatch,
    /// Hijack detection ended the session.
    HijackSuspected,
}

impl InvalidReason {
    /// Whether this answer counts against the client's [`VALIDATE_FAILURE_RULE`] allowance: a
    /// token that names no session, or a session presented from the wrong device. Sessions
    /// that ended normally (expired, revoked, terminated) do not count: a stale cookie behind a
    /// shared NAT must not lock out its neighbours.
    pub fn counts_against_client(self) -> bool {
        matches!(self, InvalidReason::NotFound | InvalidReason::DeviceMismatch | InvalidReason::HijackSuspected)
    }
}

/// The answer of [`SessionManager::validate`].
#[derive(Debug, Clone)]
pub enum Validation {
    /// The request may proceed.
    Valid {
        /// The session.
        session: Box<SessionRecord>,
        /// The access token expires within the proactive window.
        needs_refresh: bool,
        /// Hijack risk of this request.
        risk_score: f64,
        /// Reasons behind the risk.
        reasons: Vec<String>,
    },
    /// The request may not proceed.
    Invalid {
        /// Why.
        reason: InvalidReason,
        /// The recorded end reason of an ended session.
        end_reason: Option<String>,
        /// Hijack risk of this request, when it was scored.
        risk_score: f64,
        /// Reasons behind the risk.
        reasons: Vec<String>,
    },
}

/// The context of one validation request.
#[derive(Debug, Default, Clone)]
pub struct RequestContext {
    /// The device presented now.
    pub fingerprint: Option<Fingerprint>,
    /// The client IP now.
    pub ip_address: Option<IpAddr>,
    /// The user agent now.
    pub user_agent: Option<String>,
}

/// How a caller names a session.
#[derive(Debug, Clone)]
pub enum SessionRef {
    /// By bearer token (proves possession).
    Token(String),
    /// By public id (admin).
    Id(String),
    /// By an upstream token the session holds, or held before its last rotation.
    Upstream(String),
}

/// The upstream-token hashes (hex) of a session that holds `current` and whose previous tokens
/// hashed to `previous`: the current ones first, then as many of the previous as fit in six.
pub fn upstream_hashes<'a>(current: impl IntoIterator<Item = &'a str>, previous: &[String]) -> Vec<String> {
    let mut hashes: Vec<String> =
        current.into_iter().filter(|t| !t.is_empty()).map(|t| hex::encode(crypto::upstream_token_hash(t))).collect();
    for old in previous {
        if hashes.len() >= MAX_UPSTREAM_HASHES {
            break;
        }
        if !hashes.contains(old) {
            hashes.push(old.clone());
        }
    }
    hashes.truncate(MAX_UPSTREAM_HASHES);
    hashes
}

const MAX_UPSTREAM_HASHES: usize = 6;

/// A page of sessions.
#[derive(Debug)]
pub struct Page {
    /// Sessions, newest first.
    pub sessions: Vec<SessionRecord>,
    /// Token of the next page.
    pub next_page_token: Option<String>,
}

/// The session lifecycle over a store.
#[derive(Debug, Clone)]
pub struct SessionManager {
    store: DynSessionStore,
    keys: Arc<KeyRing>,
    clock: Arc<dyn Clock>,
    settings: SessionSettings,
    guard: Arc<dyn LimitGuard>,
    // The provider names CreateSession accepts, when the token work has said which exist.
    providers: Option<Arc<std::collections::BTreeSet<String>>>,
    hijack: Option<Arc<dyn HijackScorer>>,
    // Woken after every write that may append to the revocation log, so this replica's feed
    // publishes at once instead of at its next poll.
    log_signal: Arc<tokio::sync::Notify>,
    observer: Arc<dyn SessionObserver>,
}

/// The reason recorded for sessions evicted by the cap.
pub const EVICTION_REASON: &str = "session_limit";
/// The reason recorded for sessions ended by hijack detection.
pub const HIJACK_REASON: &str = "suspected_hijacking";

impl SessionManager {
    /// A manager over `store`.
    pub fn new(store: DynSessionStore, keys: Arc<KeyRing>, clock: Arc<dyn Clock>, settings: SessionSettings) -> Self {
        SessionManager {
            store,
            keys,
            clock,
            settings,
            guard: Arc::new(NoRateLimit),
            providers: None,
            hijack: None,
            log_signal: Arc::new(tokio::sync::Notify::new()),
            observer: Arc::new(NoObserver),
        }
    }

    /// Reports lifecycle events to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn SessionObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// Reports an event that happened outside the manager (for example a failed refresh).
    pub async fn report(&self, event: SessionEvent<'_>) {
        self.observer.observe(event).await;
    }

    /// Applies `guard`'s rate limits (see [`LimitGuard`]).
    pub fn with_limit_guard(mut self, guard: Arc<dyn LimitGuard>) -> Self {
        self.guard = guard;
        self
    }

    /// Accepts only these provider names in [`create`](Self::create), besides the empty name
    /// of the default; when exactly one is configured and it is not [`DEFAULT_PROVIDER`], a
    /// session that names none gets that one.
    pub fn with_providers(mut self, names: std::collections::BTreeSet<String>) -> Self {
        self.providers = Some(Arc::new(names));
        self
    }

    /// The provider a new session that asked for `requested` gets, or `INVALID_ARGUMENT` for a
    /// name that is not configured.
    fn provider_for(&self, requested: String) -> Result<String> {
        let Some(known) = &self.providers else { return Ok(requested) };
        if requested.is_empty() {
            return Ok(match known.first() {
                Some(only) if known.len() == 1 && only != DEFAULT_PROVIDER => only.clone(),
                _ => String::new(),
            });
        }
        if known.contains(&requested) {
            return Ok(requested);
        }
        let names = known.iter().map(String::as_str).collect::<Vec<_>>().join(", ");
        let configured = if names.is_empty() { "none" } else { &names };
        Err(Error::invalid(
            "provider",
            format!("no provider named {requested:?} is configured (configured: {configured})"),
        ))
    }

    /// Scores every validation with `scorer`.
    pub fn with_hijack_scorer(mut self, scorer: Arc<dyn HijackScorer>) -> Self {
        self.hijack = Some(scorer);
        self
    }

    pub fn store(&self) -> &DynSessionStore {
        &self.store
    }

    /// The revocation log the store's ends append to (the same backend object, read through
    /// [`RevocationLog`](crate::store::RevocationLog) only).
    pub fn revocation_log(&self) -> crate::store::DynRevocationLog {
        self.store.clone()
    }

    pub fn settings(&self) -> &SessionSettings {
        &self.settings
    }

    /// Notified after every write that may have appended to the revocation log (the
    /// replica's feed waits on it).
    pub fn log_signal(&self) -> Arc<tokio::sync::Notify> {
        self.log_signal.clone()
    }

    /// Now, by the manager's clock.
    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    fn seal(&self, secret: &SecretString, session_id: &str, field: crypto::TokenField) -> String {
        STANDARD.encode(self.keys.seal(secret.expose_secret().as_bytes(), session_id.as_bytes(), field))
    }

    /// Seals an upstream token of session `session_id` for its record (the token work stores
    /// refreshed tokens with it).
    pub fn seal_token(&self, secret: &SecretString, session_id: &str, field: crypto::TokenField) -> String {
        self.seal(secret, session_id, field)
    }

    /// Opens sealed upstream token `field` of `session`.
    pub fn open(&self, sealed: &str, session: &SessionRecord, field: crypto::TokenField) -> Result<SecretString> {
        let bytes = STANDARD.decode(sealed).map_err(|_| Error::internal("stored sealed token is not base64"))?;
        let plain = self.keys.open(&bytes, session.session_id.as_bytes(), field)?;
        String::from_utf8(plain).map(SecretString::from).map_err(|_| Error::internal("stored token is not UTF-8"))
    }

    fn tombstone_until(&self, at: Millis) -> Millis {
        clock::add(at, self.settings.tombstone_ttl)
    }

    /// Creates a session under the per-user cap.
    pub async fn create(&self, mut new: NewSession) -> Result<Created> {
        new.provider = self.provider_for(std::mem::take(&mut new.provider))?;
        // The session_create check is decided in the create's own write where the guard allows
        // (one commit on the embedded store), else first, on its own.
        let limit = self.guard.planned(SESSION_CREATE_RULE, &new.user_id);
        if limit.is_none() {
            self.guard.check(SESSION_CREATE_RULE, &new.user_id).await?;
        }
        let (record, token) = self.prepare(new);
        let eviction = self.eviction(record.created_at);
        let cap = self.settings.max_sessions_per_user;
        let event = self.observer.creation_event(&record);
        let with = CreateWith { event: event.clone(), limit };
        let evicted = match self.store.create_recorded(record.clone(), cap, eviction, with).await? {
            CreateOutcome::Created(evicted) => evicted,
            CreateOutcome::Refused(decision) => {
                return Err(self.guard.refused(SESSION_CREATE_RULE, &record.user_id, decision).await);
            }
        };
        if !evicted.is_empty() {
            self.log_signal.notify_one();
            metrics::counter!(crate::metrics::REVOCATIONS_ISSUED, "kind" => RevocationKind::Evicted.as_str())
                .increment(evicted.len() as u64);
        }
        metrics::counter!(crate::metrics::SESSION_CREATED).increment(1);
        match &event {
            Some(event) => self.observer.creation_recorded(event),
            None => self.observer.observe(SessionEvent::Created(&record)).await,
        }
        for ended in &evicted {
            self.observer.observe(SessionEvent::Ended(ended)).await;
        }
        Ok(Created { session: record, token, evicted })
    }

    /// How a create at `at` ends the sessions it evicts over the per-user cap.
    pub(crate) fn eviction(&self, at: Millis) -> EndSession {
        EndSession {
            state: SessionState::Terminated,
            reason: EVICTION_REASON.into(),
            at,
            retain_until: self.tombstone_until(at),
            kind: Some(RevocationKind::Evicted),
            revoked_by: None,
        }
    }

    /// Builds the record of a new session and its token, without storing anything (`create`
    /// stores it; the benchmark seeding stores such records in bulk).
    pub(crate) fn prepare(&self, new: NewSession) -> (SessionRecord, SecretString) {
        let now = self.clock.now();
        let tag = shard_tag(&new.user_id);
        let session_id = new_session_id(&tag);
        let token = new_session_token(&tag);
        let idle = new.idle_timeout.unwrap_or(self.settings.idle_timeout);
        let absolute = new.absolute_timeout.unwrap_or(self.settings.absolute_timeout);
        let absolute_expires_at = clock::add(now, absolute);
        let upstream_hashes = upstream_hashes(
            [Some(&new.access_token), new.refresh_token.as_ref(), new.id_token.as_ref()]
                .into_iter()
                .flatten()
                .map(|t| t.expose_secret()),
            &[],
        );
        let tokens = SealedTokens {
            token_type: if new.token_type.is_empty() { "Bearer".into() } else { new.token_type },
            access: self.seal(&new.access_token, &session_id, crypto::TokenField::Access),
            refresh: new.refresh_token.as_ref().map(|t| self.seal(t, &session_id, crypto::TokenField::Refresh)),
            id: new.id_token.as_ref().map(|t| self.seal(t, &session_id, crypto::TokenField::Id)),
        };
        let record = SessionRecord {
            schema_version: RECORD_SCHEMA,
            extra: serde_json::Map::new(),
            token_hash: crypto::token_hash(&token),
            session_id,
            user_id: new.user_id,
            state: SessionState::Active,
            created_at: now,
            last_accessed_at: now,
            idle_expires_at: clock::add(now, idle).min(absolute_expires_at),
            absolute_expires_at,
            idle_timeout_ms: clock::millis(idle),
            absolute_timeout_ms: clock::millis(absolute),
            token_expires_at: new.expires_in.map(|d| clock::add(now, d)),
            scopes: new.scopes,
            provider: new.provider,
            ip_address: new.ip_address.map(|ip| ip.to_string()),
            user_agent: new.user_agent,
            metadata: new.metadata,
            end_reason: None,
            ended_at: None,
            retain_until: self.tombstone_until(absolute_expires_at),
            fingerprint: new.fingerprint.filter(|f| !f.is_empty()).map(Box::new),
            tokens,
            version: 1,
            upstream_hashes,
            refresh_count: 0,
            last_refreshed_at: None,
        };
        (record, SecretString::from(token))
    }

    /// Ends `session` as `state` unless it has already ended; returns the outcome. `Expired`
    /// appends no revocation event (time expiry is not on the list); `Revoked` and
    /// `Terminated` append a `Revoked` or `Terminated` event. Ends with a more specific kind
    /// go through [`SessionManager::end_as`].
    pub async fn end_session(&self, session: &SessionRecord, state: SessionState, reason: &str) -> Result<EndOutcome> {
        let kind = match state {
            SessionState::Active | SessionState::Expired => None,
            SessionState::Revoked => Some(RevocationKind::Revoked),
            SessionState::Terminated => Some(RevocationKind::Terminated),
        };
        self.end(session, state, kind, reason, None).await
    }

    /// Ends `session` for `kind` (its state is `kind.state()`), appending exactly one
    /// revocation event in the same atomic step, unless it has already ended. This is the one
    /// path for every end that watchers must see: revocation, termination, eviction, hijack and
    /// a refused refresh (`RevocationKind::RefreshFailed`, for the token work).
    pub async fn end_as(
        &self,
        session: &SessionRecord,
        kind: RevocationKind,
        reason: &str,
        revoked_by: Option<&str>,
    ) -> Result<EndOutcome> {
        self.end(session, kind.state(), Some(kind), reason, revoked_by).await
    }

    async fn end(
        &self,
        session: &SessionRecord,
        state: SessionState,
        kind: Option<RevocationKind>,
        reason: &str,
        revoked_by: Option<&str>,
    ) -> Result<EndOutcome> {
        let at = self.clock.now();
        let end = EndSession {
            state,
            reason: reason.to_owned(),
            at,
            retain_until: self.tombstone_until(at),
            kind,
            revoked_by: revoked_by.map(str::to_owned),
        };
        let outcome = self.store.end(&session.token_hash, end).await?;
        if let EndOutcome::Ended(ended) = &outcome {
            // Counted here, on the one path every end takes, and only for the call that made
            // the change: a concurrent second end finds `AlreadyEnded` and counts nothing.
            if state == SessionState::Expired {
                metrics::counter!(crate::metrics::SESSION_EXPIRED).increment(1);
            }
            if let Some(kind) = kind {
                self.log_signal.notify_one();
                metrics::counter!(crate::metrics::REVOCATIONS_ISSUED, "kind" => kind.as_str()).increment(1);
                if kind == RevocationKind::Hijack {
                    metrics::counter!(crate::metrics::SESSION_HIJACK_DETECTED).increment(1);
                }
            }
            self.observer.observe(SessionEvent::Ended(ended)).await;
        }
        Ok(outcome)
    }

    /// Finds a session by token or id, as stored (no device check, no expiry write).
    pub async fn find(&self, by: &SessionRef) -> Result<SessionRecord> {
        let found = match by {
            SessionRef::Token(token) => self.store.get_by_token(&crypto::token_hash(token)).await?,
            SessionRef::Id(id) => self.store.get_by_id(id).await?,
            SessionRef::Upstream(token) => {
                let hash = crypto::upstream_token_hash(token);
                let hex_hash = hex::encode(hash);
                // The index is a hint: the record itself must list the hash.
                let found = self.store.get_by_upstream(&hash).await?.filter(|s| s.upstream_hashes.contains(&hex_hash));
                return found.ok_or_else(|| Error::NotFound("no stored session holds this upstream token".into()));
            }
        };
        found.ok_or_else(|| Error::NotFound("no such session".into()))
    }

    /// Reads a session; with a presented fingerprint the stored one must match.
    pub async fn get(&self, by: &SessionRef, fingerprint: Option<&Fingerprint>) -> Result<SessionRecord> {
        let session = self.find(by).await?;
        if let Some(presented) = fingerprint
            && !self.device_matches(&session, presented)
        {
            return Err(Error::FailedPrecondition("the presented device does not match the session's device".into()));
        }
        Ok(session)
    }

    /// GetSession by a client (`client_ip` set, the guide's `get_session(.., ip_address)`): the
    /// device check of [`SessionManager::get`], and for an active session a use that slides its
    /// idle timeout as ValidateSession does. The stored IP address is left as it is, so that a
    /// DetectHijacking that follows (the guide's middleware) compares with the address the
    /// session was created or last validated from, not with this request's.
    pub async fn get_used(
        &self,
        by: &SessionRef,
        fingerprint: Option<&Fingerprint>,
        client_ip: Option<IpAddr>,
    ) -> Result<SessionRecord> {
        let session = self.get(by, fingerprint).await?;
        let now = self.clock.now();
        if client_ip.is_none() || !session.is_active_at(now) {
            return Ok(session);
        }
        self.slide(session, now, None).await
    }

    /// One user's sessions in the given states (active only when `states` is empty), newest
    /// first, paged by an opaque token.
    pub async fn list_user(
        &self,
        user_id: &str,
        states: &[SessionState],
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page> {
        let now = self.clock.now();
        let wanted = |state: SessionState| {
            if states.is_empty() { state == SessionState::Active } else { states.contains(&state) }
        };
        let after = page_token.map(crate::paging::decode).transpose()?;
        let mut sessions: Vec<SessionRecord> =
            self.store.list_user(user_id).await?.into_iter().filter(|s| wanted(s.effective_state(now).0)).collect();
        sessions.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.session_id.cmp(&a.session_id)));
        if let Some((created_at, id)) = after {
            sessions.retain(|s| (s.created_at, s.session_id.as_str()) < (created_at, id.as_str()));
        }
        let next_page_token = (sessions.len() > page_size).then(|| {
            let last = &sessions[page_size - 1];
            crate::paging::encode(last.created_at, &last.session_id)
        });
        sessions.truncate(page_size);
        Ok(Page { sessions, next_page_token })
    }

    /// Merges metadata, removes keys and optionally replaces the fingerprint of an active
    /// session (compare-and-swap, retried on conflict).
    pub async fn update(
        &self,
        by: &SessionRef,
        merge: BTreeMap<String, String>,
        remove: &[String],
        fingerprint: Option<Fingerprint>,
    ) -> Result<SessionRecord> {
        let mut session = self.find(by).await?;
        for _ in 0..8 {
            if !session.is_active_at(self.clock.now()) {
                return Err(Error::FailedPrecondition("the session has ended; it can no longer be updated".into()));
            }
            let expected = session.version;
            let mut next = session.clone();
            for key in remove {
                next.metadata.remove(key);
            }
            next.metadata.extend(merge.clone());
            if crate::limits::metadata_too_large(&next.metadata) {
                return Err(Error::invalid("metadata", "the merged metadata would exceed the size limits"));
            }
            if let Some(fp) = &fingerprint {
                next.fingerprint = Some(fp.clone()).filter(|f| !f.is_empty()).map(Box::new);
            }
            next.version = expected + 1;
            match self.store.compare_and_swap(&next, expected).await? {
                CasOutcome::Swapped => return Ok(next),
                CasOutcome::Conflict(current) => session = *current,
                CasOutcome::NotFound => return Err(Error::NotFound("no such session".into())),
            }
        }
        Err(Error::Aborted("the session kept changing during the update; retry".into()))
    }

    /// Ends a session as terminated; an ended session (or one found past a timeout, which is
    /// recorded as expired) is reported as it is, with `true` for "had already ended".
    pub async fn terminate(&self, by: &SessionRef, reason: &str) -> Result<(SessionRecord, bool)> {
        let session = self.find(by).await?;
        let (state, expiry_reason) = session.effective_state(self.clock.now());
        let timed_out = session.state == SessionState::Active && state == SessionState::Expired;
        let (end_state, end_reason) = if timed_out {
            (SessionState::Expired, expiry_reason.unwrap_or("expired").to_owned())
        } else {
            (SessionState::Terminated, reason.to_owned())
        };
        match self.end_session(&session, end_state, &end_reason).await? {
            EndOutcome::Ended(record) => Ok((record, timed_out)),
            EndOutcome::AlreadyEnded(record) => Ok((record, true)),
            EndOutcome::NotFound => Err(Error::NotFound("no such session".into())),
        }
    }

    /// Ends, as expired, the active sessions that timed out without anyone validating them
    /// since (ValidateSession records such an end when it finds one; this is the sweep for the
    /// rest), in batches; returns how many this call ended. Each end takes the one path every
    /// end takes, so it emits the `session_expired` security event and counts
    /// `session_expired_total`; time expiry appends no revocation event.
    pub async fn expire_timed_out(&self) -> Result<usize> {
        const BATCH: usize = 1000;
        let mut ended = 0;
        loop {
            let now = self.clock.now();
            let found = self.store.take_timed_out(now, BATCH).await?;
            for session in &found.sessions {
                let (state, reason) = session.effective_state(now);
                if state != SessionState::Expired {
                    continue;
                }
                let reason = reason.unwrap_or("expired").to_owned();
                if let EndOutcome::Ended(_) = self.end_session(session, SessionState::Expired, &reason).await? {
                    ended += 1;
                }
            }
            if found.walked < BATCH {
                return Ok(ended);
            }
        }
    }

    /// Purges tombstones and expired sessions past their retention, in batches; returns how
    /// many were removed.
    pub async fn cleanup(&self) -> Result<usize> {
        let now = self.clock.now();
        let mut total = 0;
        loop {
            let removed = self.store.purge_expired(now, 1000).await?;
            total += removed;
            if removed < 1000 {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests;
