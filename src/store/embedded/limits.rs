//! [`RateLimitStore`] in redb: limiter states, their forget index and the per-rule key counts.

use super::*;

/// A rate-limit entry as stored: the state and the time it was filed under in the forget index.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct StoredLimit {
    state: LimiterState,
    forget_at: Millis,
}

/// States a check at the bound drops, at most, before it decides whether a new key fits.
pub(super) const PURGE_AT_BOUND: usize = 1000;

/// The stored state of (`rule`, `key`).
pub(super) fn read_limit(tx: &WriteTransaction, rule: &str, key: &str) -> Result<Option<StoredLimit>> {
    let limits = tx.open_table(RATE_LIMITS).map_err(unavailable)?;
    let stored = match limits.get((rule, key)).map_err(unavailable)? {
        Some(bytes) => Some(
            serde_json::from_slice(bytes.value())
                .map_err(|e| Error::internal_from("stored rate-limit state is unreadable", e))?,
        ),
        None => None,
    };
    Ok(stored)
}

/// Fills `rate_limit_counts` from `rate_limits` when it is empty and they are not (a database
/// from before the counts); otherwise the counts are kept with every insert and purge.
pub(super) fn count_limit_keys(tx: &WriteTransaction) -> Result<()> {
    let mut counts = tx.open_table(RATE_LIMIT_COUNTS).map_err(unavailable)?;
    if !counts.is_empty().map_err(unavailable)? {
        return Ok(());
    }
    let limits = tx.open_table(RATE_LIMITS).map_err(unavailable)?;
    let mut per_rule: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for entry in limits.iter().map_err(unavailable)? {
        let (k, _) = entry.map_err(unavailable)?;
        *per_rule.entry(k.value().0.to_owned()).or_default() += 1;
    }
    for (rule, held) in &per_rule {
        counts.insert(rule.as_str(), *held).map_err(unavailable)?;
    }
    Ok(())
}

/// Keys of `rule` held now.
pub(super) fn held_keys(tx: &WriteTransaction, rule: &str) -> Result<u64> {
    let counts = tx.open_table(RATE_LIMIT_COUNTS).map_err(unavailable)?;
    Ok(counts.get(rule).map_err(unavailable)?.map_or(0, |held| held.value()))
}

/// Adds `delta` (one, or minus the keys purged) to the keys `rule` holds.
pub(super) fn add_held_keys(tx: &WriteTransaction, rule: &str, delta: i64) -> Result<()> {
    let mut counts = tx.open_table(RATE_LIMIT_COUNTS).map_err(unavailable)?;
    let held = counts.get(rule).map_err(unavailable)?.map_or(0, |held| held.value());
    let next = held.saturating_add_signed(delta);
    if next == 0 {
        counts.remove(rule).map_err(unavailable)?;
    } else {
        counts.insert(rule, next).map_err(unavailable)?;
    }
    Ok(())
}

/// Whether a new key of `rule` may be stored at `now`: below `max`, after dropping state that
/// decides nothing any more.
pub(super) fn has_room(tx: &WriteTransaction, rule: &str, max: usize, now: Millis) -> Result<bool> {
    let max = u64::try_from(max).unwrap_or(u64::MAX);
    if held_keys(tx, rule)? < max {
        return Ok(true);
    }
    purge_limit_states(tx, now, PURGE_AT_BOUND)?;
    Ok(held_keys(tx, rule)? < max)
}

/// Deletes up to `limit` states forgettable at `now`, with their index entries and counts.
pub(super) fn purge_limit_states(tx: &WriteTransaction, now: Millis, limit: usize) -> Result<usize> {
    let due: Vec<(u64, String, String)> = {
        let forget = tx.open_table(RATE_LIMIT_FORGET).map_err(unavailable)?;
        let mut due = Vec::new();
        for entry in forget.range(..(at(now).saturating_add(1), "", "")).map_err(unavailable)?.take(limit) {
            let (k, _) = entry.map_err(unavailable)?;
            let (when, rule, key) = k.value();
            due.push((when, rule.to_owned(), key.to_owned()));
        }
        due
    };
    let mut removed: std::collections::BTreeMap<String, i64> = std::collections::BTreeMap::new();
    {
        let mut forget = tx.open_table(RATE_LIMIT_FORGET).map_err(unavailable)?;
        let mut limits = tx.open_table(RATE_LIMITS).map_err(unavailable)?;
        for (when, rule, key) in &due {
            forget.remove((*when, rule.as_str(), key.as_str())).map_err(unavailable)?;
            if limits.remove((rule.as_str(), key.as_str())).map_err(unavailable)?.is_some() {
                *removed.entry(rule.clone()).or_default() += 1;
            }
        }
    }
    for (rule, n) in &removed {
        add_held_keys(tx, rule, -n)?;
    }
    Ok(due.len())
}

impl EmbeddedStore {
    /// One limiter decision in the committer's next transaction, answered before its commit;
    /// with `keep` the new state is stored (a `check`), without it nothing is (a `peek`, which at
    /// the bound may still drop state that decides nothing any more, changing no decision).
    async fn decide(&self, rule: &Rule, key: &str, cost: u32, now: Millis, keep: bool) -> Result<Decision> {
        let rule = rule.clone();
        let key = key.to_owned();
        let max_keys = self.max_limiter_keys;
        self.write_early(move |tx| decide_in(tx, &rule, &key, cost, now, keep, max_keys)).await
    }
}

/// One limiter decision in `tx` (see [`EmbeddedStore::decide`]); at most `max_keys` keys per rule.
pub(super) fn decide_in(
    tx: &WriteTransaction,
    rule: &Rule,
    key: &str,
    cost: u32,
    now: Millis,
    keep: bool,
    max_keys: usize,
) -> Result<Decision> {
    let stored = read_limit(tx, &rule.name, key)?;
    if stored.is_none() && !has_room(tx, &rule.name, max_keys, now)? {
        return Ok(limiter::refused(rule));
    }
    let (decision, next) = limiter::apply(stored.as_ref().map(|s| s.state), rule, cost, now);
    if let Some(state) = next.filter(|_| keep) {
        if stored.is_none() {
            add_held_keys(tx, &rule.name, 1)?;
        }
        let mut limits = tx.open_table(RATE_LIMITS).map_err(unavailable)?;
        let mut forget = tx.open_table(RATE_LIMIT_FORGET).map_err(unavailable)?;
        if let Some(old) = &stored {
            forget.remove((at(old.forget_at), rule.name.as_str(), key)).map_err(unavailable)?;
        }
        let forget_at = state.forget_at(rule);
        forget.insert((at(forget_at), rule.name.as_str(), key), ()).map_err(unavailable)?;
        let bytes = serde_json::to_vec(&StoredLimit { state, forget_at }).map_err(Error::internal)?;
        limits.insert((rule.name.as_str(), key), bytes.as_slice()).map_err(unavailable)?;
    }
    Ok(decision)
}

#[async_trait]
impl RateLimitStore for EmbeddedStore {
    async fn check(&self, rule: &Rule, key: &str, cost: u32, now: Millis) -> Result<Decision> {
        self.decide(rule, key, cost, now, true).await
    }

    async fn peek(&self, rule: &Rule, key: &str, cost: u32, now: Millis) -> Result<Decision> {
        self.decide(rule, key, cost, now, false).await
    }

    async fn purge_limits(&self, now: Millis, limit: usize) -> Result<usize> {
        self.write(Durability::None, move |tx| purge_limit_states(tx, now, limit)).await
    }
}
