//! RefreshSession: the refresh grant in single flight (a local gate, then the store's lease
//! across replicas), rotation, the grace period, the history of attempts.

use super::*;

impl TokenManager {
    /// RefreshSession: one refresh (or the result of one within the grace period, unless
    /// `force`). `reason` is recorded; empty means "user_requested".
    pub async fn refresh(&self, by: &SessionRef, force: bool, reason: &str) -> Result<Refreshed> {
        let session = self.sessions.find(by).await?;
        self.active(&session)?;
        let reason = if reason.is_empty() { "user_requested" } else { reason };
        self.refresh_session(&session, Want { force, reason }).await
    }

    pub(super) async fn newest_record(&self, session_id: &str) -> Result<Option<RefreshRecord>> {
        Ok(self.store.refresh_history(session_id, 1).await?.into_iter().next())
    }

    pub(super) async fn completed(&self, session: SessionRecord, refreshed: bool) -> Result<Refreshed> {
        let record = self.newest_record(&session.session_id).await?.filter(|r| r.success);
        Ok(Refreshed { rotated: record.as_ref().is_some_and(|r| r.rotated), session, refreshed, record })
    }

    pub(super) fn local_gate(&self, session_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        local.entry(session_id.to_owned()).or_default().clone()
    }

    pub(super) fn forget_gate(&self, session_id: &str, gate: Arc<tokio::sync::Mutex<()>>) {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        drop(gate);
        // Only the map's own reference left: nobody is queued on this session.
        if local.get(session_id).is_some_and(|g| Arc::strong_count(g) == 1) {
            local.remove(session_id);
        }
    }

    pub(super) async fn refresh_session(&self, start: &SessionRecord, want: Want<'_>) -> Result<Refreshed> {
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
    pub(super) async fn refresh_in_turn(
        &self,
        start: &SessionRecord,
        want: Want<'_>,
        started_at: Millis,
    ) -> Result<Refreshed> {
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
    pub(super) async fn look_again(&self, start: &SessionRecord, started_at: Millis) -> Result<Settled> {
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

    pub(super) fn failure_error(&self, cause: Option<&str>, message: &str) -> Error {
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
    pub(super) async fn refresh_holding(
        &self,
        current: SessionRecord,
        lease: &RefreshLease,
        want: Want<'_>,
    ) -> Result<Refreshed> {
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

    pub(super) fn holds_access_token(&self, session: &SessionRecord, token: &SecretString) -> bool {
        self.sessions
            .open(&session.tokens.access, session, crypto::TokenField::Access)
            .is_ok_and(|t| t.expose_secret() == token.expose_secret())
    }

    pub(super) async fn append(&self, record: &RefreshRecord) {
        if let Err(e) = self.store.append_refresh_record(record, self.settings.history_keep).await {
            tracing::warn!(session_id = %record.session_id, error = %e, "storing a refresh record failed");
        }
    }

    /// Records a failed refresh, ends the session on `invalid_grant`, and returns the error for
    /// the caller.
    pub(super) async fn refresh_failed(
        &self,
        session: SessionRecord,
        mut record: RefreshRecord,
        error: UpstreamError,
    ) -> Error {
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

    pub(super) async fn newest_failure_cause(&self, session_id: &str) -> String {
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
}

/// Renews `lease` every third of its lifetime until aborted; stops (with a warning) when the
/// lease is lost. A lost lease does not stop the call in flight: the version fence keeps a late
/// result from overwriting a newer one.
pub(super) async fn renew_lease(store: DynTokenStore, clock: Arc<dyn Clock>, lease: RefreshLease, ttl: Duration) {
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
