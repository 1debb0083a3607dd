//! ValidateSession, the hot path: one read, a write only when the idle expiry would move by
//! more than the slide step, when the client's IP changed, or once for a newly expired session.

use super::*;

/// What [`SessionManager::score_hijack`] found and did.
#[derive(Debug)]
pub struct HijackScore {
    /// Risk in [0, 1].
    pub risk_score: f64,
    /// Why, one line per signal.
    pub reasons: Vec<String>,
    /// The end of the session when the score was above the threshold.
    pub ended: Option<EndOutcome>,
}

impl SessionManager {
    /// Scores `request` against `session` as stored with `scorer`, reports a score above zero to
    /// the observer, and above the scorer's threshold ends the session (`suspected_hijacking`,
    /// a `hijack` revocation). ValidateSession and DetectHijacking both judge through this.
    pub async fn score_hijack(
        &self,
        session: &SessionRecord,
        request: &RequestContext,
        scorer: &dyn HijackScorer,
    ) -> Result<HijackScore> {
        let (risk_score, reasons) = scorer.score(session, request);
        let over_threshold = risk_score > scorer.threshold();
        if risk_score > 0.0 {
            let scored = SessionEvent::HijackScored {
                session,
                ip: request.ip_address,
                risk_score,
                reasons: &reasons,
                ended: over_threshold,
            };
            self.observer.observe(scored).await;
        }
        let ended = match over_threshold {
            true => Some(self.end_as(session, RevocationKind::Hijack, HIJACK_REASON, None).await?),
            false => None,
        };
        Ok(HijackScore { risk_score, reasons, ended })
    }

    /// The hot path: is this token a usable session for this request? An answer that
    /// [counts against the client](InvalidReason::counts_against_client) is counted against the
    /// client's network in [`VALIDATE_FAILURE_RULE`]; beyond it the caller gets
    /// `RESOURCE_EXHAUSTED` instead of the answer.
    pub async fn validate(&self, token: &str, request: &RequestContext) -> Result<Validation> {
        let validation = self.validate_once(token, request).await?;
        if let (Validation::Invalid { reason, .. }, Some(ip)) = (&validation, request.ip_address)
            && reason.counts_against_client()
        {
            self.guard.check(VALIDATE_FAILURE_RULE, &client_network_key(ip)).await?;
        }
        Ok(validation)
    }

    async fn validate_once(&self, token: &str, request: &RequestContext) -> Result<Validation> {
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
            Some(scorer) => {
                let scored = self.score_hijack(&session, request, scorer.as_ref()).await?;
                if scored.ended.is_some() {
                    return Ok(Validation::Invalid {
                        reason: InvalidReason::HijackSuspected,
                        end_reason: Some(HIJACK_REASON.into()),
                        risk_score: scored.risk_score,
                        reasons: scored.reasons,
                    });
                }
                (scored.risk_score, scored.reasons)
            }
            None => (0.0, Vec::new()),
        };

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
    pub(super) fn device_matches(&self, session: &SessionRecord, presented: &Fingerprint) -> bool {
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
    pub(super) async fn slide(
        &self,
        mut session: SessionRecord,
        now: Millis,
        ip: Option<IpAddr>,
    ) -> Result<SessionRecord> {
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
}

pub(super) fn reason_for(state: SessionState) -> InvalidReason {
    match state {
        SessionState::Active | SessionState::Expired => InvalidReason::Expired,
        SessionState::Revoked => InvalidReason::Revoked,
        SessionState::Terminated => InvalidReason::Terminated,
    }
}
