//! IntrospectToken (RFC 7662) with a short, bounded cache of active answers.

use super::*;

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
pub(super) struct IntrospectionCache {
    entries: HashMap<[u8; 32], (Introspection, Millis)>,
}

pub(super) const INTROSPECTION_CACHE_CAPACITY: usize = 10_000;

impl IntrospectionCache {
    pub(super) fn get(&mut self, key: &[u8; 32], now: Millis) -> Option<(Introspection, Millis)> {
        match self.entries.get(key) {
            Some((answer, until)) if *until > now => Some((answer.clone(), *until)),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    pub(super) fn put(&mut self, key: [u8; 32], answer: Introspection, until: Millis, now: Millis) {
        if self.entries.len() >= INTROSPECTION_CACHE_CAPACITY {
            self.entries.retain(|_, (_, until)| *until > now);
            if self.entries.len() >= INTROSPECTION_CACHE_CAPACITY {
                self.entries.clear();
            }
        }
        self.entries.insert(key, (answer, until));
    }
}

pub(super) fn cache_key(provider: &str, hint: &str, token: &SecretString) -> [u8; 32] {
    let mut material = Vec::with_capacity(provider.len() + hint.len() + token.expose_secret().len() + 2);
    material.extend_from_slice(provider.as_bytes());
    material.push(0);
    material.extend_from_slice(hint.as_bytes());
    material.push(0);
    material.extend_from_slice(token.expose_secret().as_bytes());
    crypto::sha256(&material)
}

impl TokenManager {
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

    pub(super) fn forget_introspection(&self, provider: &str, token: &SecretString) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for hint in ["access_token", "refresh_token"] {
            cache.entries.remove(&cache_key(provider, hint, token));
        }
    }
}
