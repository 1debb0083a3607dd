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
//!
//! # Tokens
//!
//! **Providers** (`src/token/provider.rs`). The flat `token.*` settings are the provider `default`;
//! `[token.providers.NAME]` adds more, and a session records its provider at creation (an unknown
//! name is `INVALID_ARGUMENT`). Endpoints are configured, or found through OpenID discovery from the
//! issuer at first use (the document's `issuer` must match). Every endpoint must be `https`, or
//! `http` on a loopback host. Refresh and introspection go through the `oauth2` crate with
//! `client_secret_basic` or `client_secret_post`; `oauth2` takes our own async HTTP function over
//! reqwest 0.13 (its `reqwest` feature pins 0.12), built with `rustls-no-provider` and ring
//! installed as the rustls provider (no aws-lc build) and redirects off. That function turns 5xx and
//! 429 into transient errors carrying `Retry-After` before `oauth2` parses anything. RFC 7009
//! revocation is a hand-built form POST with the same client authentication, because `oauth2`'s
//! `revoke_token` refuses any non-`https` URL.
//!
//! **GetAccessToken.** Reads the session; if its access token expires within
//! `token.proactive_refresh` (5 min) and no successful refresh happened within the grace period
//! while the token is still unexpired, it refreshes first (reason `proactive`, or `expired`), then
//! opens the sealed access token. A session without a refresh token gets its stored token until it
//! expires, then `FAILED_PRECONDITION`.
//!
//! **RefreshSession and single flight.**
//!
//! 1. Not forced, refreshed within `token.grace_period` (5 min), access token unexpired: the stored
//!    result and its record, `refreshed = false`, no upstream call.
//! 2. Callers on one replica queue on a per-session async mutex (the map entry goes when nobody
//!    waits). The caller in turn re-reads the session: a `refresh_count` above the one it started
//!    with means a refresh completed while it waited: that is its result. A failed record newer
//!    than the caller's start means the refresh it waited for failed: it answers that failure
//!    instead of calling the provider again.
//! 3. It takes the session's lease in storage (`TokenStore::acquire_lease`: atomic, expires after
//!    `token.lease_ttl`, 15 s). Held by another replica: sleep 20 ms doubling to 250 ms and go back
//!    to 2, up to `max(4 × lease_ttl, 60 s)`, then `UNAVAILABLE`. Acquired: it makes step 2's
//!    checks once more with the lease held, because another replica's holder may have written its
//!    result and released the lease between that read and this acquisition (refreshing from the
//!    older read would present a refresh token already redeemed; found by the soak).
//! 4. The holder calls the provider (retried only when the request provably was not processed, see
//!    **Retries**) while a task renews the lease every
//!    third of its lifetime (a lease lapsing mid-call would let a second replica redeem the same
//!    refresh token, which a rotating provider punishes by revoking the grant). Steps 4 to 6 run in
//!    a spawned task that the caller awaits: a caller that goes away (its deadline: with the
//!    defaults, four 10 s attempts and their backoff outlast `server.request_timeout`) never drops
//!    a refresh between the provider's answer and the write, which would lose a rotated token;
//!    later callers find the result through the grace period.
//! 5. It writes the new tokens (sealed), expiry, scopes, `refresh_count + 1` and
//!    `last_refreshed_at` by `compare_and_swap` on the version it read after taking the lease: the
//!    fence. A conflict with an unchanged `refresh_count` was an unrelated write (UpdateSession): the
//!    result is re-applied on the fresh record, so a rotated refresh token is never dropped. A
//!    conflict with a moved `refresh_count` (a stale holder, overtaken after its lease lapsed) or an
//!    ended session writes nothing (`superseded`). The old refresh token exists only in the
//!    replaced sealed field, so it is never sent again. A storage error on this write is retried
//!    (50 ms doubling to 1 s, up to `max(4 × lease_ttl, 60 s)`) with the lease still renewed: the
//!    provider has already rotated the token, so giving up would lose the only valid one. A retried
//!    swap that conflicts with a record already holding this result's access token was applied
//!    before its answer was lost, and counts as written. An answer without `expires_in` (or 0)
//!    keeps the previous token lifetime, never "expires never".
//! 6. A refresh record (below) for every attempt; release the lease.
//!
//! **Retries** (`src/token/retry.rs`). `token.max_retries` (3) retries after the first attempt. The
//! refresh grant is retried only when the provider provably did not process it (a connect error,
//! nothing sent; 429 or 503 with `Retry-After`): with rotation a processed request has spent the
//! refresh token, and sending it again is reuse, which the provider answers with `invalid_grant`
//! and (RFC 9700 reuse detection, oidc-provider) by revoking the grant. An ambiguous failure (a
//! timeout after sending, another 5xx, a connection lost mid-request) is `UNAVAILABLE` "refresh
//! outcome unknown" at once, the session kept; an `invalid_grant` for the same refresh token after
//! such an attempt is `UNAVAILABLE` "refresh outcome unknown" too (cause `outcome_unknown`), never
//! the end of the session: the service cannot tell a lost answer from a refused token, and says so.
//! Introspection and revocation (idempotent) are retried on network errors, timeouts
//! (`token.request_timeout` per request), 5xx and 429; the wait before
//! retry n is uniform in `[0, min(retry_max_delay, retry_initial_delay · 2ⁿ))` (full jitter), or the
//! provider's `Retry-After` when longer (one beyond `retry_max_delay` ends the retries). Exhausted:
//! `UNAVAILABLE`, the session untouched. `invalid_grant` (other than after an ambiguous attempt,
//! above) is never retried: the session ends through `SessionManager::end_as(.., RefreshFailed,
//! "refresh_failed", ..)` (state `Terminated`, a `REFRESH_FAILED` revocation event in the same
//! atomic step) and the caller gets `FAILED_PRECONDITION`. Other 4xx (`invalid_client`, ...) are
//! `FAILED_PRECONDITION` without ending the session. Every failure is reported through
//! `SessionManager::report(SessionEvent::RefreshFailed)` (a `token_refreshed` security event with
//! `success=false`).
//!
//! **Refresh records.** `RefreshRecord` holds hex SHA-256 hashes of the old and new access and
//! refresh tokens (never tokens), times, old and new expiry, reason, success, the sanitised error
//! and a bounded cause, `rotated`, `attempts` and the grace-period end. The newest 100 per session
//! are kept; each expires at its session's `retain_until` (when written) and the cleanup task purges
//! expired ones through an expiry index. Record ids are `rr_<13-digit millis>_<random>`, so id order
//! is time order.
//!
//! **Introspection.** RFC 7662 through the provider named in the request (or `default`), with the
//! same retry policy. Active answers are cached in process by SHA-256 of (provider, hint, token) for
//! `token.introspection_cache_ttl` (30 s) but never past the token's `exp`; inactive answers are
//! never cached; the cache holds at most 10 000 entries. Revoking a session through this replica
//! drops its access token from the cache.
//!
//! **Upstream revocation** (`ProviderRevoker`, the `UpstreamRevoker` of the cascade). Revokes the
//! refresh token, then the access token, at the session's provider (RFC 7009), with retries; a
//! failure leaves the session revoked locally, is returned as `UpstreamOutcome::Failed` (worth
//! retrying: the queue does) or `Rejected` (not), and is recorded as a `token_revoked` security
//! event with `success=false`.
//!
//! **Secrets.** Tokens and the client secret live in `SecretString` and `oauth2`'s secret types
//! (redacted `Debug`); the id-token field of the token response has a redacted `Debug`; errors
//! carry only an OAuth2 error code checked to be a short lower-case word, never the provider's
//! `error_description` or a response body; reqwest errors are reduced to their kind and endpoint.
//! A test runs a full flow (refreshes, 503s, `invalid_grant`, revocation) with `RUST_LOG=debug` in
//! text and JSON and finds none of the tokens, the client secret or any JWT in the logs.
//!
//! **Storage** (`TokenStore`, one atomic step each):
//!
//! | operation | guarantee | memory | embedded (redb) | Redis, Redis Cluster, kv-rest (one Lua script each in the session's slot) |
//! |---|---|---|---|---|
//! | `acquire_lease(lease, now)` | stores `lease` if the session has none or it expired at `now`; otherwise returns the current one | one mutex | `refresh_leases` (session id → lease JSON), `Durability::None` | script `acquire_lease` on `P{S}:lease:<session id>` (a hash), after `ZADD LT` of `P{tokens}:leases` |
//! | `renew_lease(session, holder, expires_at, now)` | moves the expiry forward only if `holder` holds an unexpired lease | mutex | one write transaction | script `renew_lease`: holder and `expires_at` > now checked, `expires_at` raised only |
//! | `release_lease(session, holder)` | deletes only `holder`'s lease | mutex | one write transaction | script `release_lease`: `DEL` only if `holder` matches |
//! | `append_refresh_record(record, keep)` | appends and trims the session's records to the newest `keep` | per-session `BTreeMap` + expiry set | `refresh_records` ((session id, record id) → JSON) and `refresh_expiry` ((expires at, session id, record id) → ()) in one transaction | `ZADD P{tokens}:due`, then script `append_record` on `P{S}:rr:` / `P{S}:rri:<session id>`: add, then `ZRANGE` + `ZREMRANGEBYRANK` + `HDEL` of the oldest beyond `keep` |
//! | `refresh_history(session, limit)` | newest first by record id | reverse range | reverse range | read-only script: `ZREVRANGE rri 0 limit-1`, `HGET rr` each |
//! | `purge_refresh_records(now, limit)` | deletes records whose `expires_at` passed (and expired leases) | expiry set | `refresh_expiry` range | walks `P{tokens}:due` ≤ now with script `purge_record` (exact count), then expired leases through `P{tokens}:leases`; no Redis TTLs |
//! | `checkpoint(name)`, `save_checkpoint(name, value)` | the last value saved under `name` (the upstream revocation queue's position) | map | `checkpoints` (name → value), `Durability::Immediate` | `GET` / `SET` of `P{tokens}:cp:<name>` |
//!
//! The `{tag}` (`S` in the Redis key layout of the `store` module docs) is the session id's shard tag (`ses_<tag>_…`),
//! so a session's lease and records share its slot. Like every Redis key here they have no TTL:
//! the app's clock decides expiry, and the purges walk `P{tokens}:due` and `P{tokens}:leases`. Two replicas over one store are tested with two `App`s in one process over one
//! `MemoryStore` (two processes cannot open one redb file): 100 concurrent GetAccessToken calls on
//! an expiring session, split between them, make exactly one token request at the provider.

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

/// Settings of the token work (the configuration builds them from `token.*`; [`Default`] is
/// its defaults).
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

/// What GetAccessToken returns.
pub struct AccessToken {
    /// The upstream access token.
    pub token: SecretString,
    pub token_type: String,
    /// Its expiry, when known.
    pub expires_at: Option<Millis>,
    /// Whether this call refreshed it first (or waited for a refresh in flight).
    pub refreshed: bool,
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
