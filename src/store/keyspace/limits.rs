//! [`RateLimitStore`] over the key space: limiter states in `P{limits}`.

use super::*;

#[async_trait]
impl<T: Transport> RateLimitStore for KeyspaceStore<T> {
    /// `limiter::apply` runs here, in Rust, and the script only compare-and-sets the state it
    /// read: one function decides on every backend, with no Lua copy of its arithmetic to drift.
    /// A conflict means another check of the key committed first; the script returns the state
    /// it found and this check runs again on it, so checks of one key are serialised exactly
    /// (lock-free: every retry follows another check's success), bounded by the storage timeout.
    /// Within one replica, checks of a key take turns first, so that N concurrent checks cost
    /// about N round trips rather than N²/2 conflicts. The turn's stripe remembers the state
    /// this replica last saw for the key ([`LimitStripe`]); the compare-and-set starts from it,
    /// so a check of a key the replica has seen is one round trip. A decision that writes
    /// nothing (a refusal while blocked) is only taken on a state just read from Redis.
    async fn check(&self, rule: &Rule, key: &str, cost: u32, now: Millis) -> Result<Decision> {
        let field = limit_field(&rule.name, key);
        let stripe = crate::crypto::sha256(field.as_bytes())[0] as usize % LIMIT_STRIPES;
        self.bounded("rate_limit_check", async {
            let mut turn = self.limit_turns[stripe].lock().await;
            let states = self.layout.limits("states");
            let (mut current, mut read) = match turn.seen.remove(&field) {
                Some(guess) => (guess, false),
                None => (self.read_limit(&states, &field).await?, true),
            };
            loop {
                let state = if current.is_empty() { None } else { Some(decode_limit(&current)?) };
                let (decision, next) = limiter::apply(state, rule, cost, now);
                let Some(next) = next else {
                    if !read {
                        current = self.read_limit(&states, &field).await?;
                        read = true;
                        continue;
                    }
                    turn.remember(&field, current);
                    return Ok(decision);
                };
                let keys = vec![states.clone(), self.layout.limits("forget")];
                let encoded = encode_limit(&next);
                let args = vec![field.clone(), current, encoded.clone(), next.forget_at(rule).to_string()];
                let (code, rest) = coded(self.transport.eval(&SCRIPTS.limit_cas, keys, args, false).await?)?;
                if code == 1 {
                    turn.remember(&field, encoded);
                    return Ok(decision);
                }
                // Another replica wrote first: its state, as the script found it, is the fresh one.
                current = text(rest.first().ok_or_else(|| malformed("rate-limit reply"))?)?.to_owned();
                read = true;
            }
        })
        .await
    }

    async fn peek(&self, rule: &Rule, key: &str, cost: u32, now: Millis) -> Result<Decision> {
        let field = limit_field(&rule.name, key);
        self.bounded("rate_limit_peek", async {
            let get = vec!["HGET".into(), self.layout.limits("states"), field];
            let state = match self.transport.command(get, true).await? {
                Reply::Nil => None,
                reply => Some(decode_limit(text(&reply)?)?),
            };
            Ok(limiter::apply(state, rule, cost, now).0)
        })
        .await
    }

    async fn purge_limits(&self, now: Millis, limit: usize) -> Result<usize> {
        // What the stripes remember of purged keys stays a guess: the next check's
        // compare-and-set finds the key gone and starts it afresh.
        self.bounded("purge_limits", async {
            let keys = vec![self.layout.limits("states"), self.layout.limits("forget")];
            let args = vec![now.to_string(), limit.to_string()];
            let n = integer(&self.transport.eval(&SCRIPTS.purge_limits, keys, args, false).await?)?;
            Ok(usize::try_from(n).unwrap_or(0))
        })
        .await
    }
}

impl<T: Transport> KeyspaceStore<T> {
    /// The encoded state of `field` in `states` ("" when there is none).
    async fn read_limit(&self, states: &str, field: &str) -> Result<String> {
        let get = vec!["HGET".into(), states.to_owned(), field.to_owned()];
        Ok(match self.transport.command(get, true).await? {
            Reply::Nil => String::new(),
            reply => text(&reply)?.to_owned(),
        })
    }
}
