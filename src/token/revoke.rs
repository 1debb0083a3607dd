//! RFC 7009 revocation of a session's upstream tokens, for the revocation queue.

use super::*;

impl TokenManager {
    /// Revokes a session's upstream tokens at its provider (RFC 7009): the refresh token first
    /// (which revokes the grant at most providers), then the access token, each with the retry
    /// policy. `Failed` is worth another try later (the revocation queue makes it); `Rejected`
    /// is not. The caller records the failure (the queue once per revocation, not per try).
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
                return if e.is_transient() {
                    UpstreamOutcome::Failed(message)
                } else {
                    UpstreamOutcome::Rejected(message)
                };
            }
        }
        UpstreamOutcome::Revoked
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
