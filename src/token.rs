//! Upstream tokens: [`TokenManager`] hands out a session's access token, refreshing it first when
//! it expires within the proactive window; refreshes with rotation, a grace period, retries and
//! single flight across replicas; introspects tokens (RFC 7662) with a short cache; keeps the
//! refresh records; and revokes a revoked session's tokens at its provider (RFC 7009).
//!
//! A refresh, step by step:
//! 1. Unless `force`, a session refreshed within the grace period whose access token has not
//!    expired is answered from the record as it is (no upstream call).
//! 2. Callers on this replica queue on a per-session async mutex; when one gets in it re-reads
//!    the session, and if `refresh_count` moved since it started, another refresh completed
//!    while it waited: it returns that result.
//! 3. Otherwise it takes the session's lease in storage (atomic, with an expiry). If another
//!    replica holds it, it sleeps briefly and goes back to 2: the holder's result shows up as a
//!    moved `refresh_count`. A failed refresh shows up as a newer failed record, which waiters
//!    return instead of calling the provider a second time.
//! 4. The holder calls the provider (retried only when the request provably was not processed:
//!    a rotating provider has spent the token of a processed one) while a task renews the lease,
//!    then writes the new tokens (storage errors retried, the lease still held) with a compare-and-swap on the session version it read after taking the lease:
//!    a holder that was overtaken (its lease expired and another replica refreshed) fails the
//!    swap and can never overwrite the newer result. A swap that lost only to an unrelated write
//!    (UpdateSession's metadata) is re-applied on the fresh record, so a rotated refresh token is
//!    never dropped.
//! 5. Every attempt, success or failure, becomes a refresh record (hashes only); `invalid_grant`
//!    ends the session through the revocation path (`REFRESH_FAILED`), except right after an
//!    attempt with the same token whose outcome is unknown (then `UNAVAILABLE`, session kept).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::clock::{self, Clock, Millis};
use crate::crypto;
use crate::error::{Error, Result};
use crate::revocation::{RevocationKind, UpstreamOutcome, UpstreamRevoker};
use crate::session::{SessionEvent, SessionManager, SessionRecord, SessionRef, SessionState};
use crate::store::{CasOutcome, DynTokenStore, LeaseOutcome};

pub mod provider;
pub mod retry;

pub use provider::{ClientAuth, DEFAULT_PROVIDER, Introspection, Provider, ProviderSettings, Providers, UpstreamError};
pub use retry::RetryPolicy;

/// The end reason of a session whose refresh token the provider refused.
pub const REFRESH_FAILED_REASON: &str = "refresh_failed";

/// The cause recorded for an `invalid_grant` that followed an attempt the provider may have
/// processed: the session is kept, the outcome is unknown.
const OUTCOME_UNKNOWN: &str = "outcome_unknown";

/// Whether a failed attempt with this recorded cause may have been processed by the provider.
/// (A connect error is recorded as `network` too and counts here: cautious, never an end.)
fn outcome_unknown_cause(cause: &str) -> bool {
    matches!(cause, "timeout" | "network" | "server_error" | OUTCOME_UNKNOWN)
}

/// The refresh lease of one session in storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshLease {
    /// The session.
    pub session_id: String,
    /// Who holds it: random per attempt (never a secret).
    pub holder: String,
    /// The session version the holder read before asking for the lease (for diagnosis; its
    /// swap expects the version it reads again once it holds the lease).
    pub version: u64,
    /// When the lease lapses unless renewed.
    pub expires_at: Millis,
}

/// One upstream refresh attempt (with its retries), success or failure. Holds SHA-256 hashes of
/// tokens (hex), never tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshRecord {
    /// `rr_<13-digit millis>_<random>`: sorts by time.
    pub record_id: String,
    /// The session.
    pub session_id: String,
    /// Its owner.
    pub user_id: String,
    /// When the attempt finished.
    pub refreshed_at: Millis,
    /// Why: proactive, expired, user_requested, forced, or the caller's text.
    pub reason: String,
    /// Whether new tokens were stored.
    pub success: bool,
    /// For a failure: what failed, without secrets.
    pub error: Option<String>,
    /// Bounded failure cause (the metrics label).
    pub cause: Option<String>,
    /// Whether the provider rotated the refresh token.
    pub rotated: bool,
    /// Hash of the access token before.
    pub old_access_token_hash: String,
    /// Hash of the access token after.
    pub new_access_token_hash: Option<String>,
    /// Hash of the refresh token before.
    pub old_refresh_token_hash: Option<String>,
    /// Hash of the refresh token after.
    pub new_refresh_token_hash: Option<String>,
    /// Access-token expiry before.
    pub old_expires_at: Option<Millis>,
    /// Access-token expiry after.
    pub new_expires_at: Option<Millis>,
    /// Upstream attempts made (1 plus retries).
    pub attempts: u32,
    /// End of the grace period this refresh opened.
    pub grace_period_ends_at: Option<Millis>,
    /// When the record may be purged (the session's retention when it was written).
    pub expires_at: Millis,
}

/// Settings of the token work (from `token.*`).
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// Refresh when the access token expires within this.
    pub proactive_refresh: Duration,
    /// After a refresh, non-forced refreshes within this reuse its result.
    pub grace_period: Duration,
    /// The retry policy of refresh calls.
    pub retry: RetryPolicy,
    /// Lease lifetime; renewed every third of it while the upstream call runs.
    pub lease_ttl: Duration,
    /// How long a caller waits for another replica's refresh before giving up (UNAVAILABLE).
    pub wait_timeout: Duration,
    /// Longest time an active introspection answer is cached (never past the token's `exp`).
    pub introspection_cache_ttl: Duration,
    /// Refresh records kept per session.
    pub history_keep: usize,
}

impl Default for TokenSettings {
    fn default() -> Self {
        TokenSettings {
            proactive_refresh: Duration::from_secs(300),
            grace_period: Duration::from_secs(300),
            retry: RetryPolicy::default(),
            lease_ttl: Duration::from_secs(15),
            wait_timeout: Duration::from_secs(60),
            introspection_cache_ttl: Duration::from_secs(30),
            history_keep: 100,
        }
    }
}

impl TokenSettings {
    /// The settings a configuration describes.
    pub fn from_config(config: &crate::Config) -> TokenSettings {
        let t = &config.token;
        TokenSettings {
            proactive_refresh: t.proactive_refresh,
            grace_period: t.grace_period,
            retry: RetryPolicy {
                max_retries: t.max_retries,
                initial_delay: t.retry_initial_delay,
                max_delay: t.retry_max_delay,
            },
            lease_ttl: t.lease_ttl,
            wait_timeout: t.lease_ttl.saturating_mul(4).max(Duration::from_secs(60)),
            introspection_cache_ttl: t.introspection_cache_ttl,
            history_keep: 100,
        }
    }
}

/// What GetAccessToken returns.
pub struct AccessToken {
    /// The upstream access token.
    pub token: SecretString,
    /// Its type.
    pub token_type: String,
    /// Its expiry, when known.
    pub expires_at: Option<Millis>,
    /// Whether this call refreshed it first (or waited for a refresh in flight).
    pub refreshed: bool,
    /// Scopes.
    pub scopes: Vec<String>,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("expires_at", &self.expires_at)
            .field("refreshed", &self.refreshed)
            .finish_non_exhaustive()
    }
}

/// What RefreshSession returns.
#[derive(Debug, Clone)]
pub struct Refreshed {
    /// The session after the refresh.
    pub session: SessionRecord,
    /// False when a result within the grace period was returned instead of calling the provider.
    pub refreshed: bool,
    /// Whether the provider rotated the refresh token.
    pub rotated: bool,
    /// The record of the refresh whose result this is.
    pub record: Option<RefreshRecord>,
}

/// An introspection answer and how it was obtained.
#[derive(Debug, Clone)]
pub struct IntrospectionAnswer {
    /// The RFC 7662 fields.
    pub introspection: Introspection,
    /// Served from the cache.
    pub cached: bool,
    /// How long the answer may still be cached (active answers only).
    pub cache_ttl: Option<Duration>,
}

/// Bounded cache of active introspection answers, by SHA-256 of (provider, hint, token).
#[derive(Debug, Default)]
struct IntrospectionCache {
    entries: HashMap<[u8; 32], (Introspection, Millis)>,
}

const INTROSPECTION_CACHE_CAPACITY: usize = 10_000;

impl IntrospectionCache {
    fn get(&mut self, key: &[u8; 32], now: Millis) -> Option<(Introspection, Millis)> {
        match self.entries.get(key) {
            Some((answer, until)) if *until > now => Some((answer.clone(), *until)),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn put(&mut self, key: [u8; 32], answer: Introspection, until: Millis, now: Millis) {
        if self.entries.len() >= INTROSPECTION_CACHE_CAPACITY {
            self.entries.retain(|_, (_, until)| *until > now);
            if self.entries.len() >= INTROSPECTION_CACHE_CAPACITY {
                self.entries.clear();
            }
        }
        self.entries.insert(key, (answer, until));
    }
}

fn hash_hex(secret: &SecretString) -> String {
    crypto::sha256_hex(secret.expose_secret())
}

fn cache_key(provider: &str, hint: &str, token: &SecretString) -> [u8; 32] {
    let mut material = Vec::with_capacity(provider.len() + hint.len() + token.expose_secret().len() + 2);
    material.extend_from_slice(provider.as_bytes());
    material.push(0);
    material.extend_from_slice(hint.as_bytes());
    material.push(0);
    material.extend_from_slice(token.expose_secret().as_bytes());
    crypto::sha256(&material)
}

fn new_record_id(at: Millis) -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("rr_{:013}_{}", at.max(0), &random[..12])
}

fn ended_error(session: &SessionRecord, now: Millis) -> Error {
    let (state, reason) = session.effective_state(now);
    let state = match state {
        SessionState::Active => "active",
        SessionState::Expired => "expired",
        SessionState::Revoked => "revoked",
        SessionState::Terminated => "terminated",
    };
    Error::FailedPrecondition(format!("the session has ended ({state}, {})", reason.unwrap_or("no reason recorded")))
}

/// What [`TokenManager::look_again`] found.
enum Settled {
    /// Another caller's refresh completed: its result.
    Done(Box<Refreshed>),
    /// Nothing settled the call: refresh from this record.
    Refresh(Box<SessionRecord>),
}

/// Aborts a spawned task when dropped (the lease renewer).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The token work over a [`SessionManager`], a [`crate::store::TokenStore`] and the providers.
#[derive(Debug, Clone)]
pub struct TokenManager {
    sessions: SessionManager,
    store: DynTokenStore,
    providers: Arc<Providers>,
    settings: TokenSettings,
    clock: Arc<dyn Clock>,
    local: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    cache: Arc<Mutex<IntrospectionCache>>,
}

/// How a caller wants a refresh.
#[derive(Debug, Clone, Copy)]
struct Want<'a> {
    force: bool,
    reason: &'a str,
}

impl TokenManager {
    /// A manager; `clock` should be the sessions' clock.
    pub fn new(
        sessions: SessionManager,
        store: DynTokenStore,
        providers: Arc<Providers>,
        settings: TokenSettings,
        clock: Arc<dyn Clock>,
    ) -> TokenManager {
        TokenManager { sessions, store, providers, settings, clock, local: Arc::default(), cache: Arc::default() }
    }

    /// Now, by the manager's clock.
    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    /// The configured providers.
    pub fn providers(&self) -> &Providers {
        &self.providers
    }

    fn provider(&self, session: &SessionRecord) -> Result<&Arc<Provider>> {
        self.providers.get(&session.provider).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "no OAuth2 provider named {:?} is configured; set token.token_endpoint or token.issuer (or [token.providers.NAME])",
                if session.provider.is_empty() { DEFAULT_PROVIDER } else { &session.provider }
            ))
        })
    }

    fn in_grace(&self, session: &SessionRecord, now: Millis) -> bool {
        let fresh = session.last_refreshed_at.is_some_and(|at| now < clock::add(at, self.settings.grace_period));
        let usable = session.token_expires_at.is_none_or(|exp| exp > now);
        fresh && usable
    }

    fn needs_refresh(&self, session: &SessionRecord, now: Millis) -> bool {
        session.token_expires_at.is_some_and(|at| at - now <= clock::millis(self.settings.proactive_refresh))
    }

    fn active(&self, session: &SessionRecord) -> Result<()> {
        let now = self.clock.now();
        if session.is_active_at(now) { Ok(()) } else { Err(ended_error(session, now)) }
    }

    /// GetAccessToken: the stored access token, refreshed first when it expires within the
    /// proactive window (and the session has a refresh token).
    pub async fn access_token(&self, by: &SessionRef) -> Result<AccessToken> {
        let mut session = self.sessions.find(by).await?;
        self.active(&session)?;
        let now = self.clock.now();
        let mut refreshed = false;
        if self.needs_refresh(&session, now) && !self.in_grace(&session, now) {
            if session.tokens.refresh.is_some() {
                let expired = session.token_expires_at.is_some_and(|at| at <= now);
                let reason = if expired { "expired" } else { "proactive" };
                let result = self.refresh_session(&session, Want { force: false, reason }).await?;
                refreshed = result.refreshed;
                session = result.session;
            } else if session.token_expires_at.is_some_and(|at| at <= now) {
                return Err(Error::FailedPrecondition(
                    "the upstream access token has expired and the session has no refresh token".into(),
                ));
            }
        }
        Ok(AccessToken {
            token: self.sessions.open(&session.tokens.access, &session, crypto::TokenField::Access)?,
            token_type: session.tokens.token_type.clone(),
            expires_at: session.token_expires_at,
            refreshed,
            scopes: session.scopes.clone(),
        })
    }

    /// RefreshSession: one refresh (or the result of one within the grace period, unless
    /// `force`). `reason` is recorded; empty means "user_requested".
    pub async fn refresh(&self, by: &SessionRef, force: bool, reason: &str) -> Result<Refreshed> {
        let session = self.sessions.find(by).await?;
        self.active(&session)?;
        let reason = if reason.is_empty() { "user_requested" } else { reason };
        self.refresh_session(&session, Want { force, reason }).await
    }

    async fn newest_record(&self, session_id: &str) -> Result<Option<RefreshRecord>> {
        Ok(self.store.refresh_history(session_id, 1).await?.into_iter().next())
    }

    async fn completed(&self, session: SessionRecord, refreshed: bool) -> Result<Refreshed> {
        let record = self.newest_record(&session.session_id).await?.filter(|r| r.success);
        Ok(Refreshed { rotated: record.as_ref().is_some_and(|r| r.rotated), session, refreshed, record })
    }

    fn local_gate(&self, session_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        local.entry(session_id.to_owned()).or_default().clone()
    }

    fn forget_gate(&self, session_id: &str, gate: Arc<tokio::sync::Mutex<()>>) {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        drop(gate);
        // Only the map's own reference left: nobody is queued on this session.
        if local.get(session_id).is_some_and(|g| Arc::strong_count(g) == 1) {
            local.remove(session_id);
        }
    }

    async fn refresh_session(&self, start: &SessionRecord, want: Want<'_>) -> Result<Refreshed> {
        let started_at = self.clock.now();
        if !want.force && self.in_grace(start, started_at) {
            return self.completed(start.clone(), false).await;
        }
        let gate = self.local_gate(&start.session_id);
        let result = {
            let _turn = gate.lock().await;
            self.refresh_in_turn(start, want, started_at).await
        };
        self.forget_gate(&start.session_id, gate);
        result
    }

    /// Runs with this replica's per-session turn held: joins a refresh that completed while
    /// waiting, or takes the storage lease and refreshes, or waits for another replica's.
    async fn refresh_in_turn(&self, start: &SessionRecord, want: Want<'_>, started_at: Millis) -> Result<Refreshed> {
        let deadline = tokio::time::Instant::now() + self.settings.wait_timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let current = match self.look_again(start, started_at).await? {
                Settled::Done(refreshed) => return Ok(*refreshed),
                Settled::Refresh(current) => *current,
            };
            let now = self.clock.now();
            let lease = RefreshLease {
                session_id: current.session_id.clone(),
                holder: format!("h_{}", uuid::Uuid::new_v4().simple()),
                version: current.version,
                expires_at: clock::add(now, self.settings.lease_ttl),
            };
            match self.store.acquire_lease(&lease, now).await? {
                LeaseOutcome::Acquired => {
                    // The holder's work runs in its own task: a caller that gives up (its
                    // deadline, a cancelled RPC) must not drop a refresh between the provider's
                    // answer and the write, which would lose a rotated refresh token. Later
                    // callers find the result through the grace period.
                    let this = self.clone();
                    let (force, reason) = (want.force, want.reason.to_owned());
                    let start = start.clone();
                    let holder = tokio::spawn(async move {
                        // Look again with the lease held: between the read above and this
                        // acquisition, another replica's holder may have written its result and
                        // released the lease. Refreshing from the older read would present the
                        // refresh token that holder already redeemed, which a rotating provider
                        // refuses (invalid_grant) by revoking the whole grant.
                        let result = match this.look_again(&start, started_at).await {
                            Ok(Settled::Refresh(current)) => {
                                this.refresh_holding(*current, &lease, Want { force, reason: &reason }).await
                            }
                            Ok(Settled::Done(refreshed)) => Ok(*refreshed),
                            Err(e) => Err(e),
                        };
                        if let Err(e) = this.store.release_lease(&lease.session_id, &lease.holder).await {
                            tracing::warn!(session_id = %lease.session_id, error = %e, "releasing the refresh lease failed; it will expire");
                        }
                        result
                    });
                    return holder.await.map_err(|e| Error::internal_from("refresh task failed", e))?;
                }
                LeaseOutcome::Held(_) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::Unavailable {
                            message: "another replica's refresh of this session is taking too long; retry".into(),
                            retry_after: Some(Duration::from_secs(1)),
                        });
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(250));
                }
            }
        }
    }

    /// Reads the session again for a caller that started at `started_at` from `start`: its
    /// answer when the session has ended or another caller's refresh completed or failed since,
    /// otherwise the record to refresh from.
    async fn look_again(&self, start: &SessionRecord, started_at: Millis) -> Result<Settled> {
        let current = self
            .sessions
            .store()
            .get_by_token(&start.token_hash)
            .await?
            .ok_or_else(|| Error::NotFound("no such session".into()))?;
        self.active(&current)?;
        if current.refresh_count > start.refresh_count {
            // Another caller's refresh completed while this one waited: its result is ours.
            return Ok(Settled::Done(Box::new(self.completed(current, true).await?)));
        }
        if let Some(failed) =
            self.newest_record(&current.session_id).await?.filter(|r| !r.success && r.refreshed_at >= started_at)
        {
            // A concurrent refresh failed after this call started: answer with its failure
            // instead of calling the provider a second time.
            return Err(
                self.failure_error(failed.cause.as_deref(), failed.error.as_deref().unwrap_or("refresh failed"))
            );
        }
        Ok(Settled::Refresh(Box::new(current)))
    }

    fn failure_error(&self, cause: Option<&str>, message: &str) -> Error {
        match cause {
            Some("invalid_grant") => Error::FailedPrecondition(format!(
                "the provider refused the session's refresh token (invalid_grant); the session has ended with reason {REFRESH_FAILED_REASON}"
            )),
            Some(OUTCOME_UNKNOWN) => Error::Unavailable {
                message: format!("refresh outcome unknown: {message}; the session is kept, retry later"),
                retry_after: None,
            },
            Some("timeout" | "network" | "server_error" | "rate_limited") => Error::Unavailable {
                message: format!(
                    "the OAuth2 provider is unavailable: {message}; the session is unchanged, retry later"
                ),
                retry_after: None,
            },
            _ => Error::FailedPrecondition(format!("the refresh failed: {message}")),
        }
    }

    /// The refresh proper, with the lease held.
    async fn refresh_holding(&self, current: SessionRecord, lease: &RefreshLease, want: Want<'_>) -> Result<Refreshed> {
        let provider = self.provider(&current)?.clone();
        let Some(sealed_refresh) = current.tokens.refresh.clone() else {
            return Err(Error::FailedPrecondition("the session has no refresh token".into()));
        };
        let refresh_token = self.sessions.open(&sealed_refresh, &current, crypto::TokenField::Refresh)?;
        let old_access = self.sessions.open(&current.tokens.access, &current, crypto::TokenField::Access)?;

        // Renewed until the new tokens are written (or the refresh failed): the write below may
        // wait for storage, and another holder must not refresh with the spent token meanwhile.
        let renewer = AbortOnDrop(tokio::spawn(renew_lease(
            self.store.clone(),
            self.clock.clone(),
            lease.clone(),
            self.settings.lease_ttl,
        )));
        // Never repeated once the provider may have processed it: a rotating provider has then
        // spent the refresh token, and presenting it again is reuse (invalid_grant, and under
        // RFC 9700 reuse detection the whole grant is revoked).
        let (answer, attempts) =
            self.settings.retry.run_unprocessed_only(|| provider.refresh_once(&refresh_token)).await;

        let now = self.clock.now();
        let mut record = RefreshRecord {
            record_id: new_record_id(now),
            session_id: current.session_id.clone(),
            user_id: current.user_id.clone(),
            refreshed_at: now,
            reason: want.reason.to_owned(),
            success: false,
            error: None,
            cause: None,
            rotated: false,
            old_access_token_hash: hash_hex(&old_access),
            new_access_token_hash: None,
            old_refresh_token_hash: Some(hash_hex(&refresh_token)),
            new_refresh_token_hash: None,
            old_expires_at: current.token_expires_at,
            new_expires_at: None,
            attempts,
            grace_period_ends_at: None,
            expires_at: current.retain_until,
        };

        let tokens = match answer {
            Ok(tokens) => tokens,
            Err(error) => {
                drop(renewer);
                return Err(self.refresh_failed(current, record, error).await);
            }
        };

        let rotated = tokens.refresh_token.is_some();
        let new_refresh_hash = tokens.refresh_token.as_ref().map(hash_hex).or(record.old_refresh_token_hash.clone());
        // No (or a zero) `expires_in`: the new token is taken to live as long as the one it
        // replaces, so the session still refreshes; never "expires never".
        let new_expires_at = match tokens.expires_in {
            Some(d) => Some(clock::add(now, d)),
            None => current
                .token_expires_at
                .map(|exp| exp - current.last_refreshed_at.unwrap_or(current.created_at))
                .filter(|lifetime| *lifetime > 0)
                .map(|lifetime| now.saturating_add(lifetime)),
        };
        let mut base = current.clone();
        // Storage errors on the write are retried while the lease is held: the provider has
        // rotated the refresh token, so giving up here would lose the only valid one.
        let write_deadline = tokio::time::Instant::now() + self.settings.wait_timeout;
        let mut write_pause = Duration::from_millis(50);
        let written = loop {
            let mut next = base.clone();
            next.tokens.access =
                self.sessions.seal_token(&tokens.access_token, &next.session_id, crypto::TokenField::Access);
            if let Some(rt) = &tokens.refresh_token {
                next.tokens.refresh = Some(self.sessions.seal_token(rt, &next.session_id, crypto::TokenField::Refresh));
            }
            if let Some(id) = &tokens.id_token {
                next.tokens.id = Some(self.sessions.seal_token(id, &next.session_id, crypto::TokenField::Id));
            }
            if !tokens.token_type.is_empty() {
                next.tokens.token_type = tokens.token_type.clone();
            }
            next.token_expires_at = new_expires_at;
            if let Some(scopes) = &tokens.scopes {
                next.scopes = scopes.clone();
            }
            next.upstream_hashes = crate::session::upstream_hashes(
                [Some(&tokens.access_token), tokens.refresh_token.as_ref(), tokens.id_token.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(|t| t.expose_secret()),
                &base.upstream_hashes,
            );
            next.refresh_count = base.refresh_count + 1;
            next.last_refreshed_at = Some(now);
            next.version = base.version + 1;
            let outcome = match self.sessions.store().compare_and_swap(&next, base.version).await {
                Ok(outcome) => outcome,
                Err(e) if tokio::time::Instant::now() < write_deadline => {
                    tracing::warn!(session_id = %current.session_id, error = %e, "storing refreshed tokens failed; retrying with the lease held");
                    tokio::time::sleep(write_pause).await;
                    write_pause = (write_pause * 2).min(Duration::from_secs(1));
                    continue;
                }
                Err(e) => {
                    tracing::error!(session_id = %current.session_id, error = %e, "storing refreshed tokens failed; the rotated refresh token is lost");
                    return Err(e);
                }
            };
            match outcome {
                CasOutcome::Swapped => break next,
                CasOutcome::Conflict(fresh) if self.holds_access_token(&fresh, &tokens.access_token) => {
                    // A swap whose answer was lost (the storage error above) had been applied.
                    break *fresh;
                }
                CasOutcome::Conflict(fresh)
                    if fresh.refresh_count == current.refresh_count && !fresh.state.is_terminal() =>
                {
                    // An unrelated write (metadata) moved the version: re-apply on top of it.
                    base = *fresh;
                }
                CasOutcome::Conflict(fresh) => {
                    // Overtaken: the lease lapsed and another refresh won, or the session ended.
                    // The fence holds: nothing of this result is written.
                    tracing::warn!(session_id = %current.session_id, "a refresh result arrived after a newer one (or after the end of the session); discarded");
                    record.error = Some("superseded by a newer refresh or the end of the session".into());
                    record.cause = Some("superseded".into());
                    self.append(&record).await;
                    metrics::counter!("token_refresh_failed_total", "cause" => "superseded").increment(1);
                    self.active(&fresh)?;
                    return self.completed(*fresh, true).await;
                }
                CasOutcome::NotFound => return Err(Error::NotFound("no such session".into())),
            }
        };
        drop(renewer);

        record.success = true;
        record.rotated = rotated;
        record.new_access_token_hash = Some(hash_hex(&tokens.access_token));
        record.new_refresh_token_hash = new_refresh_hash;
        record.new_expires_at = new_expires_at;
        record.grace_period_ends_at = Some(clock::add(now, self.settings.grace_period));
        record.expires_at = written.retain_until;
        self.append(&record).await;
        metrics::counter!("token_refreshed_total").increment(1);
        tracing::info!(session_id = %written.session_id, rotated, attempts, reason = want.reason, "upstream tokens refreshed");
        Ok(Refreshed { session: written, refreshed: true, rotated, record: Some(record) })
    }

    fn holds_access_token(&self, session: &SessionRecord, token: &SecretString) -> bool {
        self.sessions
            .open(&session.tokens.access, session, crypto::TokenField::Access)
            .is_ok_and(|t| t.expose_secret() == token.expose_secret())
    }

    async fn append(&self, record: &RefreshRecord) {
        if let Err(e) = self.store.append_refresh_record(record, self.settings.history_keep).await {
            tracing::warn!(session_id = %record.session_id, error = %e, "storing a refresh record failed");
        }
    }

    /// Records a failed refresh, ends the session on `invalid_grant`, and returns the error for
    /// the caller.
    async fn refresh_failed(&self, session: SessionRecord, mut record: RefreshRecord, error: UpstreamError) -> Error {
        // invalid_grant for a refresh token whose last attempt may have been processed (it timed
        // out after being sent, or got a 5xx): the provider may have rotated it then and its
        // answer was lost. The session is not ended on that; the person deciding is told.
        let after_unknown = error == UpstreamError::InvalidGrant
            && self.newest_record(&session.session_id).await.ok().flatten().is_some_and(|r| {
                !r.success
                    && r.old_refresh_token_hash == record.old_refresh_token_hash
                    && r.cause.as_deref().is_some_and(outcome_unknown_cause)
            });
        let cause = if after_unknown { OUTCOME_UNKNOWN } else { error.cause() };
        let message = error.to_string();
        record.error = Some(message.clone());
        record.cause = Some(cause.to_owned());
        self.append(&record).await;
        metrics::counter!("token_refresh_failed_total", "cause" => cause).increment(1);
        tracing::warn!(session_id = %session.session_id, cause, attempts = record.attempts, error = %message, "upstream refresh failed");
        self.sessions.report(SessionEvent::RefreshFailed { session: &session, error: &message }).await;
        if after_unknown {
            return Error::Unavailable {
                message: format!(
                    "refresh outcome unknown: the provider refused the session's refresh token (invalid_grant), but an earlier refresh with it got no answer after it was sent (cause {}), so the provider may have rotated it and that answer was lost; the session is kept. If this persists, end the session (EndSession) and sign the user in again",
                    self.newest_failure_cause(&session.session_id).await
                ),
                retry_after: None,
            };
        }
        if error == UpstreamError::InvalidGrant {
            match self.sessions.end_as(&session, RevocationKind::RefreshFailed, REFRESH_FAILED_REASON, None).await {
                Ok(_) => {
                    tracing::warn!(session_id = %session.session_id, "session ended: the provider refused its refresh token")
                }
                Err(e) => {
                    tracing::error!(session_id = %session.session_id, error = %e, "ending the session after invalid_grant failed")
                }
            }
        }
        match error {
            UpstreamError::Transient { unprocessed: false, .. } => Error::Unavailable {
                message: format!(
                    "refresh outcome unknown: the OAuth2 provider did not answer the refresh ({cause}) after the request was sent, so it may have processed it; the request was not repeated (a rotating provider would refuse the spent token) and the session is unchanged; retry later"
                ),
                retry_after: None,
            },
            UpstreamError::Transient { retry_after, .. } => Error::Unavailable {
                message: format!(
                    "the OAuth2 provider is unavailable ({cause}) after {} attempts; the session is unchanged, retry later",
                    record.attempts
                ),
                retry_after,
            },
            UpstreamError::NotConfigured(what) => {
                Error::FailedPrecondition(format!("the OAuth2 provider is not configured: {what}"))
            }
            other => self.failure_error(Some(other.cause()), &other.to_string()),
        }
    }

    async fn newest_failure_cause(&self, session_id: &str) -> String {
        let history = self.store.refresh_history(session_id, 2).await.unwrap_or_default();
        history.into_iter().filter_map(|r| r.cause).find(|c| c != OUTCOME_UNKNOWN).unwrap_or_else(|| "unknown".into())
    }

    /// GetRefreshHistory: newest first.
    pub async fn history(&self, session_id: &str, limit: usize) -> Result<Vec<RefreshRecord>> {
        if self.sessions.store().get_by_id(session_id).await?.is_none() {
            return Err(Error::NotFound("no such session".into()));
        }
        self.store.refresh_history(session_id, limit).await
    }

    /// IntrospectToken through `provider` (empty: the default), with the short cache of active
    /// answers (never past the token's `exp`).
    pub async fn introspect(&self, token: &SecretString, hint: &str, provider: &str) -> Result<IntrospectionAnswer> {
        let provider = self.providers.get(provider).ok_or_else(|| {
            Error::invalid(
                "provider",
                format!(
                    "no OAuth2 provider named {:?} is configured",
                    if provider.is_empty() { DEFAULT_PROVIDER } else { provider }
                ),
            )
        })?;
        let hint = if hint.is_empty() { "access_token" } else { hint };
        let key = cache_key(provider.name(), hint, token);
        let now = self.clock.now();
        let cached = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key, now);
        if let Some((introspection, until)) = cached {
            return Ok(IntrospectionAnswer {
                introspection,
                cached: true,
                cache_ttl: Some(Duration::from_millis(u64::try_from(until - now).unwrap_or(0))),
            });
        }
        let (answer, _) = self.settings.retry.run(|| provider.introspect_once(token, hint)).await;
        let introspection = answer.map_err(|e| match e {
            UpstreamError::Transient { retry_after, .. } => {
                Error::Unavailable { message: format!("the OAuth2 provider is unavailable: {e}"), retry_after }
            }
            other => Error::FailedPrecondition(format!("introspection failed: {other}")),
        })?;
        let mut cache_ttl = None;
        if introspection.active {
            let mut until = clock::add(now, self.settings.introspection_cache_ttl);
            if let Some(exp) = introspection.exp {
                until = until.min(exp);
            }
            if until > now {
                self.cache.lock().unwrap_or_else(|p| p.into_inner()).put(key, introspection.clone(), until, now);
                cache_ttl = Some(Duration::from_millis(u64::try_from(until - now).unwrap_or(0)));
            }
        }
        Ok(IntrospectionAnswer { introspection, cached: false, cache_ttl })
    }

    fn forget_introspection(&self, provider: &str, token: &SecretString) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for hint in ["access_token", "refresh_token"] {
            cache.entries.remove(&cache_key(provider, hint, token));
        }
    }

    /// Revokes a session's upstream tokens at its provider (RFC 7009): the refresh token first
    /// (which revokes the grant at most providers), then the access token, each with the retry
    /// policy. `Failed` is worth another try later (the revocation queue makes it); `Rejected`
    /// is not.
    pub async fn revoke_upstream(&self, session: &SessionRecord) -> UpstreamOutcome {
        let Some(provider) = self.providers.get(&session.provider) else {
            return UpstreamOutcome::NotConfigured;
        };
        let mut tokens = Vec::new();
        if let Some(sealed) = &session.tokens.refresh {
            match self.sessions.open(sealed, session, crypto::TokenField::Refresh) {
                Ok(t) => tokens.push((t, true)),
                Err(e) => return UpstreamOutcome::Rejected(format!("cannot open the stored refresh token: {e}")),
            }
        }
        match self.sessions.open(&session.tokens.access, session, crypto::TokenField::Access) {
            Ok(t) => {
                self.forget_introspection(provider.name(), &t);
                tokens.push((t, false));
            }
            Err(e) => return UpstreamOutcome::Rejected(format!("cannot open the stored access token: {e}")),
        }
        for (token, refresh) in &tokens {
            let (result, _) = self.settings.retry.run(|| provider.revoke_once(token, *refresh)).await;
            if let Err(e) = result {
                let message = e.to_string();
                if matches!(e, UpstreamError::NotConfigured(_)) {
                    return UpstreamOutcome::NotConfigured;
                }
                self.sessions.report(SessionEvent::UpstreamRevocationFailed { session, error: &message }).await;
                return if e.is_transient() {
                    UpstreamOutcome::Failed(message)
                } else {
                    UpstreamOutcome::Rejected(message)
                };
            }
        }
        UpstreamOutcome::Revoked
    }

    /// Purges refresh records past their retention (and leases of crashed holders).
    pub async fn cleanup(&self) -> Result<usize> {
        let now = self.clock.now();
        let mut total = 0;
        loop {
            let removed = self.store.purge_refresh_records(now, 1000).await?;
            total += removed;
            if removed < 1000 {
                return Ok(total);
            }
        }
    }
}

/// Renews `lease` every third of its lifetime until aborted; stops (with a warning) when the
/// lease is lost. A lost lease does not stop the call in flight: the version fence keeps a late
/// result from overwriting a newer one.
async fn renew_lease(store: DynTokenStore, clock: Arc<dyn Clock>, lease: RefreshLease, ttl: Duration) {
    let every = (ttl / 3).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        let now = clock.now();
        match store.renew_lease(&lease.session_id, &lease.holder, clock::add(now, ttl), now).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(session_id = %lease.session_id, "the refresh lease was lost while the provider call ran");
                return;
            }
            Err(e) => tracing::warn!(session_id = %lease.session_id, error = %e, "renewing the refresh lease failed"),
        }
    }
}

/// The [`UpstreamRevoker`] over the configured providers.
#[derive(Debug, Clone)]
pub struct ProviderRevoker(pub TokenManager);

#[async_trait::async_trait]
impl UpstreamRevoker for ProviderRevoker {
    async fn revoke(&self, session: &SessionRecord) -> UpstreamOutcome {
        self.0.revoke_upstream(session).await
    }
}
