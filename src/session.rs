//! Sessions: the record every backend stores, and [`SessionManager`], which implements the
//! lifecycle over any [`SessionStore`]: create under the per-user cap, validate (the hot path),
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
use serde::{Deserialize, Serialize};

use crate::clock::{self, Clock, Millis};
use crate::crypto::{self, KeyRing};
use crate::error::{Error, Result};
use crate::revocation::RevocationKind;
use crate::store::{CasOutcome, DynSessionStore, EndOutcome, EndSession, TokenHash, Touch};

pub mod device;

pub use device::Fingerprint;

/// Lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Usable.
    Active,
    /// A timeout passed.
    Expired,
    /// Revoked through the revocation service.
    Revoked,
    /// Terminated (logout, admin, cap eviction, hijack, refused refresh).
    Terminated,
}

impl SessionState {
    /// Whether the state is final.
    pub fn is_terminal(self) -> bool {
        self != SessionState::Active
    }
}

/// Upstream tokens, each sealed by the key ring (base64 of the sealed bytes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SealedTokens {
    /// Token type, usually "Bearer".
    pub token_type: String,
    /// Sealed access token.
    pub access: String,
    /// Sealed refresh token.
    pub refresh: Option<String>,
    /// Sealed id token.
    pub id: Option<String>,
}

/// The schema version of the records this build creates.
pub const RECORD_SCHEMA: u32 = 1;

/// A session as every backend stores it. Holds no secret in the clear.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Schema of the record: [`RECORD_SCHEMA`] for records this build creates, 0 for records
    /// from before the field existed. A record read and rewritten keeps the number it had.
    #[serde(default)]
    pub schema_version: u32,
    /// Public id: `ses_<shard tag>_<uuid>`.
    pub session_id: String,
    /// SHA-256 of the session token (hex in storage).
    #[serde(with = "hex_32")]
    pub token_hash: TokenHash,
    /// Owner.
    pub user_id: String,
    /// Stored state (see [`SessionRecord::effective_state`] for the state at a given time).
    pub state: SessionState,
    /// Creation time.
    #[serde(default)]
    pub created_at: Millis,
    /// Last access written (to the slide step).
    #[serde(default)]
    pub last_accessed_at: Millis,
    /// Idle expiry.
    #[serde(default)]
    pub idle_expires_at: Millis,
    /// Absolute expiry.
    #[serde(default)]
    pub absolute_expires_at: Millis,
    /// Idle timeout in force, in milliseconds.
    #[serde(default)]
    pub idle_timeout_ms: Millis,
    /// Absolute timeout in force, in milliseconds.
    #[serde(default)]
    pub absolute_timeout_ms: Millis,
    /// Upstream access-token expiry.
    #[serde(default)]
    pub token_expires_at: Option<Millis>,
    /// Granted scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Provider name.
    #[serde(default)]
    pub provider: String,
    /// Last known client IP.
    #[serde(default)]
    pub ip_address: Option<String>,
    /// User agent at creation.
    #[serde(default)]
    pub user_agent: Option<String>,
    /// Caller metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Why it ended.
    #[serde(default)]
    pub end_reason: Option<String>,
    /// When it ended.
    #[serde(default)]
    pub ended_at: Option<Millis>,
    /// When the record may be purged.
    #[serde(default)]
    pub retain_until: Millis,
    /// Device fingerprint presented at creation (or set by UpdateSession). Boxed: most
    /// sessions have none, and inline it would triple the size of every record in memory.
    #[serde(default)]
    pub fingerprint: Option<Box<Fingerprint>>,
    /// Sealed upstream tokens.
    #[serde(default)]
    pub tokens: SealedTokens,
    /// Incremented by every compare-and-swap and state change.
    #[serde(default)]
    pub version: u64,
    /// [`crypto::upstream_token_hash`] (hex) of the upstream tokens the session holds and of
    /// those the last rotation replaced (at most six), for IsRevoked and RevokeSession by
    /// upstream token. Records from before the field have none and are found by id or token only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream_hashes: Vec<String>,
    /// Successful upstream refreshes.
    #[serde(default)]
    pub refresh_count: u32,
    /// Last successful refresh.
    #[serde(default)]
    pub last_refreshed_at: Option<Millis>,
    /// Fields this build does not know (written by a newer replica), kept as they are so a
    /// rolling deploy never drops them on a rewrite.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

mod hex_32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let bytes = hex::decode(text.as_bytes()).map_err(serde::de::Error::custom)?;
        bytes.try_into().map_err(|_| serde::de::Error::custom("expected 32 bytes"))
    }
}

impl SessionRecord {
    /// The state at `now`, and the end reason: an active record past a timeout is expired.
    pub fn effective_state(&self, now: Millis) -> (SessionState, Option<&str>) {
        match self.state {
            SessionState::Active if now >= self.absolute_expires_at => {
                (SessionState::Expired, Some("absolute_timeout"))
            }
            SessionState::Active if now >= self.idle_expires_at => (SessionState::Expired, Some("idle_timeout")),
            state => (state, self.end_reason.as_deref()),
        }
    }

    /// Whether the session is usable at `now`.
    pub fn is_active_at(&self, now: Millis) -> bool {
        self.effective_state(now).0 == SessionState::Active
    }

    /// The instant an active session times out unless it is used before: the earlier of its
    /// idle and absolute expiry.
    pub fn deadline(&self) -> Millis {
        self.idle_expires_at.min(self.absolute_expires_at)
    }

    /// Serialises for backends that store bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::internal_from("session record cannot be serialised", e))
    }

    /// Parses what [`SessionRecord::to_bytes`] wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<SessionRecord> {
        serde_json::from_slice(bytes).map_err(|e| Error::internal_from("stored session is unreadable", e))
    }
}

/// The four hex digits that route a user's keys to one shard (a Redis Cluster hash tag). They
/// are part of the session token and id so that any key can be found from either.
pub fn shard_tag(user_id: &str) -> String {
    hex::encode(&crypto::sha256(user_id.as_bytes())[..2])
}

fn new_session_id(tag: &str) -> String {
    format!("ses_{tag}_{}", uuid::Uuid::new_v4().simple())
}

fn new_session_token(tag: &str) -> String {
    format!("{}{tag}_{}", crypto::SESSION_TOKEN_PREFIX, URL_SAFE_NO_PAD.encode(crypto::random_bytes()))
}

/// Settings of the session lifecycle (from `session.*`, `revocation.list_ttl` and
/// `token.proactive_refresh`).
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Default idle timeout.
    pub idle_timeout: Duration,
    /// Default absolute timeout.
    pub absolute_timeout: Duration,
    /// Per-user cap.
    pub max_sessions_per_user: u32,
    /// Compare presented fingerprints.
    pub device_validation: bool,
    /// Fingerprint threshold.
    pub device_match_threshold: f64,
    /// A session that stored a fingerprint requires one: an empty presented fingerprint is a
    /// mismatch instead of a skipped check.
    pub device_fingerprint_required: bool,
    /// Minimum movement of the idle expiry before it is written.
    pub idle_slide_step: Duration,
    /// How long an ended session's tombstone is kept.
    pub tombstone_ttl: Duration,
    /// `needs_refresh` when the access token expires within this.
    pub proactive_refresh: Duration,
}

impl SessionSettings {
    /// The settings a configuration describes.
    pub fn from_config(config: &crate::Config) -> SessionSettings {
        SessionSettings {
            idle_timeout: config.session.idle_timeout,
            absolute_timeout: config.session.absolute_timeout,
            max_sessions_per_user: config.session.max_sessions_per_user,
            device_validation: config.session.device_validation,
            device_match_threshold: config.session.device_match_threshold,
            device_fingerprint_required: config.session.device_fingerprint_required,
            idle_slide_step: config.session.idle_slide_step,
            tombstone_ttl: config.revocation.list_ttl,
            proactive_refresh: config.token.proactive_refresh,
        }
    }
}

/// Checked before a session is created: the `session_create` rate limit. The security work
/// plugs its limiter in here; until then [`NoRateLimit`] allows everything.
#[async_trait::async_trait]
pub trait CreateGuard: Send + Sync + std::fmt::Debug + 'static {
    /// `Ok` to proceed, `Err(Error::RateLimited { .. })` to refuse.
    async fn check(&self, rule: &str, key: &str) -> Result<()>;
}

/// A [`CreateGuard`] that allows everything.
#[derive(Debug, Default)]
pub struct NoRateLimit;

#[async_trait::async_trait]
impl CreateGuard for NoRateLimit {
    async fn check(&self, _rule: &str, _key: &str) -> Result<()> {
        Ok(())
    }
}

/// The name of the rate-limit rule checked on creation, keyed by user id.
pub const SESSION_CREATE_RULE: &str = "session_create";

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
    /// Scopes.
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
    /// Metadata.
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

/// Scores a validation request for hijacking; see `security::hijack`.
pub trait HijackScorer: Send + Sync + std::fmt::Debug + 'static {
    /// Risk in [0, 1] and reasons, comparing `request` with what `session` stored.
    fn score(&self, session: &SessionRecord, request: &RequestContext) -> (f64, Vec<String>);
    /// Scores strictly above this end the session.
    fn threshold(&self) -> f64;
}

/// What the lifecycle reports to a [`SessionObserver`] (the security event log).
#[derive(Debug, Clone, Copy)]
pub enum SessionEvent<'a> {
    /// A session was created.
    Created(&'a SessionRecord),
    /// A session ended (the record in its ended form: state, reason, time).
    Ended(&'a SessionRecord),
    /// A presented device did not match the session's.
    DeviceMismatch {
        /// The session as stored.
        session: &'a SessionRecord,
        /// The client IP of the request.
        ip: Option<IpAddr>,
    },
    /// Hijack scoring found at least one signal.
    HijackScored {
        /// The session as stored before the request.
        session: &'a SessionRecord,
        /// The client IP of the request.
        ip: Option<IpAddr>,
        /// The score.
        risk_score: f64,
        /// The reasons.
        reasons: &'a [String],
        /// Whether the score ended the session.
        ended: bool,
    },
    /// An upstream refresh failed (reported by the token work).
    RefreshFailed {
        /// The session.
        session: &'a SessionRecord,
        /// What failed, without secrets.
        error: &'a str,
    },
    /// Revoking a revoked session's tokens at its provider failed (best effort; reported by the
    /// token work).
    UpstreamRevocationFailed {
        /// The session (already ended).
        session: &'a SessionRecord,
        /// What failed, without secrets.
        error: &'a str,
    },
}

/// Told about lifecycle events that are not the common case; the security work records them.
/// Observation never fails the operation it describes.
#[async_trait::async_trait]
pub trait SessionObserver: Send + Sync + std::fmt::Debug + 'static {
    /// Called after the event happened.
    async fn observe(&self, event: SessionEvent<'_>);
}

/// A [`SessionObserver`] that ignores everything.
#[derive(Debug, Default)]
pub struct NoObserver;

#[async_trait::async_trait]
impl SessionObserver for NoObserver {
    async fn observe(&self, _event: SessionEvent<'_>) {}
}

/// The session lifecycle over a store.
#[derive(Debug, Clone)]
pub struct SessionManager {
    store: DynSessionStore,
    keys: Arc<KeyRing>,
    clock: Arc<dyn Clock>,
    settings: SessionSettings,
    guard: Arc<dyn CreateGuard>,
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

    /// Checks `guard` before every creation.
    pub fn with_create_guard(mut self, guard: Arc<dyn CreateGuard>) -> Self {
        self.guard = guard;
        self
    }

    /// Scores every validation with `scorer`.
    pub fn with_hijack_scorer(mut self, scorer: Arc<dyn HijackScorer>) -> Self {
        self.hijack = Some(scorer);
        self
    }

    /// The store.
    pub fn store(&self) -> &DynSessionStore {
        &self.store
    }

    /// The settings.
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
    pub async fn create(&self, new: NewSession) -> Result<Created> {
        self.guard.check(SESSION_CREATE_RULE, &new.user_id).await?;
        let (record, token) = self.prepare(new);
        let eviction = self.eviction(record.created_at);
        let evicted = self.store.create(record.clone(), self.settings.max_sessions_per_user, eviction).await?;
        if !evicted.is_empty() {
            self.log_signal.notify_one();
            metrics::counter!(crate::metrics::REVOCATIONS_ISSUED, "kind" => RevocationKind::Evicted.as_str())
                .increment(evicted.len() as u64);
        }
        metrics::counter!(crate::metrics::SESSION_CREATED).increment(1);
        self.observer.observe(SessionEvent::Created(&record)).await;
        for ended in &evicted {
            self.observer.observe(SessionEvent::Ended(ended)).await;
        }
        Ok(Created { session: record, token, evicted })
    }

    /// Stores a new session directly, without the create rate limit, the security log or
    /// metrics, and with no per-user cap (so it never evicts): for seeding a benchmark's memory
    /// store in process.
    pub async fn seed(&self, new: NewSession) -> Result<SecretString> {
        let (record, token) = self.prepare(new);
        let eviction = self.eviction(record.created_at);
        self.store.create(record, u32::MAX, eviction).await?;
        Ok(token)
    }

    /// How a create at `at` ends the sessions it evicts over the per-user cap.
    fn eviction(&self, at: Millis) -> EndSession {
        EndSession {
            state: SessionState::Terminated,
            reason: EVICTION_REASON.into(),
            at,
            retain_until: self.tombstone_until(at),
            kind: Some(RevocationKind::Evicted),
            revoked_by: None,
        }
    }

    /// Builds the record of a new session and its token, without storing anything (the
    /// offline seeding tool stores such records in bulk).
    pub fn prepare(&self, new: NewSession) -> (SessionRecord, SecretString) {
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

    /// The hot path: is this token a usable session for this request?
    pub async fn validate(&self, token: &str, request: &RequestContext) -> Result<Validation> {
        let now = self.clock.now();
        let invalid = |reason, end_reason: Option<&str>| Validation::Invalid {
            reason,
            end_reason: end_reason.map(str::to_owned),
            risk_score: 0.0,
            reasons: Vec::new(),
        };
        let Some(session) = self.store.get_by_token(&crypto::token_hash(token)).await? else {
            return Ok(invalid(InvalidReason::NotFound, None));
        };
        match session.effective_state(now) {
            (SessionState::Active, _) => {}
            (SessionState::Expired, reason) if session.state == SessionState::Active => {
                // Record the expiry once, so the state is visible everywhere and final.
                let reason = reason.unwrap_or("expired").to_owned();
                self.end_session(&session, SessionState::Expired, &reason).await?;
                return Ok(invalid(InvalidReason::Expired, Some(&reason)));
            }
            (state, reason) => return Ok(invalid(reason_for(state), reason)),
        }

        // Hijack detection compares with what was stored before this request changes anything.
        let (risk_score, reasons) = match &self.hijack {
            Some(scorer) => scorer.score(&session, request),
            None => (0.0, Vec::new()),
        };
        let over_threshold = self.hijack.as_ref().is_some_and(|scorer| risk_score > scorer.threshold());
        if risk_score > 0.0 {
            let scored = SessionEvent::HijackScored {
                session: &session,
                ip: request.ip_address,
                risk_score,
                reasons: &reasons,
                ended: over_threshold,
            };
            self.observer.observe(scored).await;
        }
        if over_threshold {
            self.end_as(&session, RevocationKind::Hijack, HIJACK_REASON, None).await?;
            return Ok(Validation::Invalid {
                reason: InvalidReason::HijackSuspected,
                end_reason: Some(HIJACK_REASON.into()),
                risk_score,
                reasons,
            });
        }

        if let Some(presented) = &request.fingerprint
            && !self.device_matches(&session, presented)
        {
            self.observer.observe(SessionEvent::DeviceMismatch { session: &session, ip: request.ip_address }).await;
            return Ok(Validation::Invalid {
                reason: InvalidReason::DeviceMismatch,
                end_reason: None,
                risk_score,
                reasons,
            });
        }

        let session = self.slide(session, now, request.ip_address).await?;
        let needs_refresh =
            session.token_expires_at.is_some_and(|at| at - now <= clock::millis(self.settings.proactive_refresh));
        Ok(Validation::Valid { session: Box::new(session), needs_refresh, risk_score, reasons })
    }

    /// Whether `presented` passes the device check of `session`. A session that stored no
    /// fingerprint has nothing to compare. An empty presented fingerprint (the field sent, nothing
    /// in it) is no evidence of the stored device: with `session.device_fingerprint_required` it
    /// is a mismatch, otherwise the check is skipped as before. An absent field is no device
    /// check at all; the callers decide that before calling this.
    fn device_matches(&self, session: &SessionRecord, presented: &Fingerprint) -> bool {
        if !self.settings.device_validation {
            return true;
        }
        let Some(stored) = &session.fingerprint else { return true };
        if presented.is_empty() {
            return !self.settings.device_fingerprint_required;
        }
        stored.compare(presented, self.settings.device_match_threshold).matches
    }

    /// Writes the idle slide when it moves by more than the step or the IP changed.
    async fn slide(&self, mut session: SessionRecord, now: Millis, ip: Option<IpAddr>) -> Result<SessionRecord> {
        let idle_expires_at = now.saturating_add(session.idle_timeout_ms).min(session.absolute_expires_at);
        let moved = idle_expires_at - session.idle_expires_at > clock::millis(self.settings.idle_slide_step);
        let ip = ip.map(|ip| ip.to_string());
        let ip_changed = ip.is_some() && ip != session.ip_address;
        if moved || ip_changed {
            let touch = Touch {
                last_accessed_at: now,
                idle_expires_at: idle_expires_at.max(session.idle_expires_at),
                ip_address: if ip_changed { ip } else { None },
            };
            self.store.touch(&session.token_hash, touch.clone()).await?;
            session.last_accessed_at = touch.last_accessed_at;
            session.idle_expires_at = touch.idle_expires_at;
            if let Some(ip) = touch.ip_address {
                session.ip_address = Some(ip);
            }
        }
        Ok(session)
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

fn reason_for(state: SessionState) -> InvalidReason {
    match state {
        SessionState::Active | SessionState::Expired => InvalidReason::Expired,
        SessionState::Revoked => InvalidReason::Revoked,
        SessionState::Terminated => InvalidReason::Terminated,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::clock::ManualClock;
    use crate::store::memory::MemoryStore;

    #[derive(Debug, Default)]
    struct Recording {
        calls: Mutex<Vec<(String, String)>>,
        deny: bool,
    }

    #[async_trait::async_trait]
    impl CreateGuard for Recording {
        async fn check(&self, rule: &str, key: &str) -> Result<()> {
            self.calls.lock().unwrap().push((rule.to_owned(), key.to_owned()));
            if self.deny {
                return Err(Error::RateLimited { rule: rule.to_owned(), retry_after: Duration::from_secs(300) });
            }
            Ok(())
        }
    }

    fn manager(guard: Arc<Recording>) -> SessionManager {
        let settings = SessionSettings {
            idle_timeout: Duration::from_secs(1800),
            absolute_timeout: Duration::from_secs(8 * 3600),
            max_sessions_per_user: 5,
            device_validation: true,
            device_match_threshold: 0.8,
            device_fingerprint_required: true,
            idle_slide_step: Duration::from_secs(60),
            tombstone_ttl: Duration::from_secs(86400),
            proactive_refresh: Duration::from_secs(300),
        };
        SessionManager::new(
            Arc::new(MemoryStore::new()),
            Arc::new(KeyRing::new(&[1; 32], &[])),
            Arc::new(ManualClock::new(1_000_000)),
            settings,
        )
        .with_create_guard(guard)
    }

    fn new(user: &str) -> NewSession {
        NewSession { user_id: user.into(), access_token: SecretString::from("a".to_string()), ..Default::default() }
    }

    #[tokio::test]
    async fn creation_checks_the_session_create_rule_per_user() {
        let guard = Arc::new(Recording::default());
        let m = manager(guard.clone());
        m.create(new("alice")).await.unwrap();
        assert_eq!(*guard.calls.lock().unwrap(), vec![("session_create".to_string(), "alice".to_string())]);
        // The default guard is a no-op rule that allows every creation.
        let open = SessionManager::new(
            m.store().clone(),
            Arc::new(KeyRing::new(&[1; 32], &[])),
            Arc::new(ManualClock::new(1_000_000)),
            m.settings().clone(),
        );
        for _ in 0..20 {
            open.create(new("bob")).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_denied_creation_writes_nothing() {
        let guard = Arc::new(Recording { deny: true, ..Default::default() });
        let m = manager(guard);
        let e = m.create(new("mallory")).await.unwrap_err();
        assert!(matches!(e, Error::RateLimited { ref rule, .. } if rule == "session_create"), "{e:?}");
        assert_eq!(m.store().count().await.unwrap(), 0);
    }

    #[test]
    fn tokens_and_ids_carry_the_users_shard_tag() {
        let tag = shard_tag("alice");
        assert_eq!(tag.len(), 4);
        let token = new_session_token(&tag);
        let id = new_session_id(&tag);
        assert_eq!(&token[4..8], tag);
        assert_eq!(&id[4..8], tag);
        // 4 + 4 + 1 + 43: the random part alone is 256 bits.
        assert_eq!(token.len(), 52);
    }

    #[test]
    fn effective_state_expires_at_the_instant() {
        let record = SessionRecord {
            schema_version: RECORD_SCHEMA,
            extra: serde_json::Map::new(),
            session_id: "s".into(),
            token_hash: [0; 32],
            user_id: "u".into(),
            state: SessionState::Active,
            created_at: 0,
            last_accessed_at: 0,
            idle_expires_at: 100,
            absolute_expires_at: 200,
            idle_timeout_ms: 100,
            absolute_timeout_ms: 200,
            token_expires_at: None,
            scopes: vec![],
            provider: String::new(),
            ip_address: None,
            user_agent: None,
            metadata: BTreeMap::new(),
            end_reason: None,
            ended_at: None,
            retain_until: 300,
            fingerprint: None,
            tokens: SealedTokens::default(),
            version: 1,
            upstream_hashes: Vec::new(),
            refresh_count: 0,
            last_refreshed_at: None,
        };
        assert_eq!(record.effective_state(99).0, SessionState::Active);
        assert_eq!(record.effective_state(100), (SessionState::Expired, Some("idle_timeout")));
        let revoked = SessionRecord { state: SessionState::Revoked, end_reason: Some("x".into()), ..record.clone() };
        assert_eq!(revoked.effective_state(1_000), (SessionState::Revoked, Some("x")));
        assert_eq!(SessionRecord::from_bytes(&record.to_bytes().unwrap()).unwrap(), record);
    }

    /// Issue 16 point 15a: a record a newer replica wrote, with a field this build does not know,
    /// keeps that field through a read and rewrite; a record of an older build without the newer
    /// fields reads with their defaults.
    #[test]
    fn records_keep_unknown_fields_and_default_missing_ones() {
        let newer = serde_json::json!({
            "schema_version": 9, "session_id": "s", "token_hash": "00".repeat(32), "user_id": "u",
            "state": "active", "created_at": 1, "last_accessed_at": 1, "idle_expires_at": 100,
            "absolute_expires_at": 200, "idle_timeout_ms": 100, "absolute_timeout_ms": 200,
            "token_expires_at": null, "scopes": [], "provider": "p", "ip_address": null,
            "user_agent": null, "metadata": {}, "end_reason": null, "ended_at": null,
            "retain_until": 300, "fingerprint": null,
            "tokens": {"token_type": "Bearer", "access": "a", "refresh": null, "id": null},
            "version": 4, "refresh_count": 0, "last_refreshed_at": null,
            "future_field": {"kept": [1, 2]}
        });
        let mut record = SessionRecord::from_bytes(&serde_json::to_vec(&newer).unwrap()).unwrap();
        record.version += 1;
        let written: serde_json::Value = serde_json::from_slice(&record.to_bytes().unwrap()).unwrap();
        assert_eq!(written["future_field"], serde_json::json!({"kept": [1, 2]}), "{written}");
        assert_eq!(written["schema_version"], 9);
        assert_eq!(written["version"], 5);

        // An older record: no schema version, no refresh bookkeeping, no fingerprint.
        let mut older = newer.clone();
        for field in ["schema_version", "refresh_count", "last_refreshed_at", "fingerprint", "future_field"] {
            older.as_object_mut().unwrap().remove(field);
        }
        let record = SessionRecord::from_bytes(&serde_json::to_vec(&older).unwrap()).unwrap();
        assert_eq!((record.schema_version, record.refresh_count, record.fingerprint), (0, 0, None));
        assert!(record.extra.is_empty());
    }
}
