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

use crate::clock::{self, Clock, Millis};
use crate::crypto;
use crate::error::{Error, Result};
use crate::revocation::{RevocationKind, UpstreamOutcome, UpstreamRevoker};
use crate::session::{SessionEvent, SessionManager, SessionRecord, SessionRef, SessionState};
use crate::store::{CasOutcome, DynTokenStore, LeaseOutcome};

mod introspection;
pub mod provider;
mod refresh;
pub mod retry;
mod revoke;

pub use introspection::IntrospectionAnswer;
use introspection::*;
pub use revoke::ProviderRevoker;

pub use provider::{ClientAuth, DEFAULT_PROVIDER, Introspection, Provider, ProviderSettings, Providers, UpstreamError};
pub use retry::RetryPolicy;

pub use crate::model::token::{RefreshLease, RefreshRecord};

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

fn hash_hex(secret: &SecretString) -> String {
    crypto::sha256_hex(secret.expose_secret())
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
