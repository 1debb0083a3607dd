//! [`Limiter`]: the named rate-limit rules applied through a
//! [`RateLimitStore`](crate::store::RateLimitStore), each counted denial window recorded as one
//! `rate_limit_exceeded` event; the default rules.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::session::{LimitGuard, VALIDATE_FAILURE_RULE};
use crate::store::{DynRateLimitStore, LimitCheck};

use super::events::{EventDraft, EventType, Recorder};
use super::limiter::{Backoff, Decision, Rule};

/// (name, limit, period s, max backoff s) of [`default_rules`].
const DEFAULT_RULES: &[(&str, u32, u64, u64)] = &[
    ("token_refresh", 10, 60, 3600),
    (crate::session::SESSION_CREATE_RULE, 5, 300, 3600),
    ("login_attempt", 5, 300, 1800),
    (VALIDATE_FAILURE_RULE, 30, 60, 900),
];

/// The rules every deployment has unless configured otherwise, with the bucket as large as the
/// limit and backoff doubling up to its maximum. The first three are the original library's;
/// `validate_failure` counts "not valid" ValidateSession answers per client IP.
pub fn default_rules() -> BTreeMap<String, Rule> {
    DEFAULT_RULES
        .iter()
        .map(|&(name, limit, period, max_backoff)| {
            let backoff = Backoff { multiplier: 2.0, max: Duration::from_secs(max_backoff) };
            let rule = Rule {
                name: name.to_owned(),
                limit,
                period: Duration::from_secs(period),
                burst: limit,
                backoff: Some(backoff),
            };
            (name.to_owned(), rule)
        })
        .collect()
}

/// The address a limiter key names, for the `ip_address` of its denial events: an address, or
/// an IPv6 /64 as [`client_network_key`](crate::session::client_network_key) writes it.
pub(super) fn key_address(key: &str) -> Option<String> {
    if let Ok(ip) = key.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    let network = key.strip_suffix("/64")?.parse::<std::net::Ipv6Addr>().ok()?;
    Some(format!("{network}/64"))
}

/// Named rate-limit rules over a [`RateLimitStore`](crate::store::RateLimitStore).
#[derive(Debug, Clone)]
pub struct Limiter {
    enabled: bool,
    rules: Arc<BTreeMap<String, Rule>>,
    store: DynRateLimitStore,
    recorder: Recorder,
    clock: Arc<dyn Clock>,
    warned_full_at: Arc<std::sync::atomic::AtomicI64>,
}

impl Limiter {
    /// A limiter; with `enabled` false every check is allowed and nothing is stored.
    pub fn new(
        enabled: bool,
        rules: BTreeMap<String, Rule>,
        store: DynRateLimitStore,
        recorder: Recorder,
        clock: Arc<dyn Clock>,
    ) -> Limiter {
        Limiter { enabled, rules: Arc::new(rules), store, recorder, clock, warned_full_at: Arc::default() }
    }

    /// The rule named `name`, or `INVALID_ARGUMENT` naming `rule_name`.
    pub fn rule(&self, name: &str) -> Result<&Rule> {
        self.rules.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.rules.keys().map(String::as_str).collect();
            Error::invalid("rule_name", format!("no rule named {name:?}; configured rules: {}", known.join(", ")))
        })
    }

    /// Consumes `cost` units of rule `rule_name` for `key`. The first denial of each denial window
    /// (see [`Decision::repeat`]) is recorded as a `rate_limit_exceeded` event (with the key as
    /// user id, or as IP address when it is one); the repeats are counted in
    /// [`crate::metrics::RATE_LIMIT_DENIALS_UNRECORDED`], so a key hammering a limit cannot turn
    /// each request into an event write. Every denial counts in
    /// [`crate::metrics::RATE_LIMIT_DENIED`].
    pub async fn check(&self, rule_name: &str, key: &str, cost: u32) -> Result<Decision> {
        self.decide(rule_name, key, cost, true).await
    }

    /// The decision [`Limiter::check`] would give, consuming nothing and recording nothing.
    pub async fn peek(&self, rule_name: &str, key: &str, cost: u32) -> Result<Decision> {
        self.decide(rule_name, key, cost, false).await
    }

    async fn decide(&self, rule_name: &str, key: &str, cost: u32, consume: bool) -> Result<Decision> {
        let rule = self.rule(rule_name)?;
        let cost = cost.max(1);
        if cost > rule.burst {
            return Err(Error::invalid(
                "cost",
                format!("{cost} is more than rule {rule_name:?} can ever grant at once ({})", rule.burst),
            ));
        }
        if !self.enabled {
            return Ok(Decision {
                allowed: true,
                limit: rule.limit,
                remaining: rule.burst,
                retry_after: Duration::ZERO,
                reset_after: Duration::ZERO,
                blocked: false,
                violations: 0,
                repeat: false,
                key_refused: false,
            });
        }
        if !consume {
            return self.store.peek(rule, key, cost, self.clock.now()).await;
        }
        let decision = self.store.check(rule, key, cost, self.clock.now()).await?;
        self.settle(rule, key, decision).await
    }

    /// What a consuming check does with the store's `decision` for `key`: counts a refusal and
    /// records its security event (once per block window).
    async fn settle(&self, rule: &Rule, key: &str, decision: Decision) -> Result<Decision> {
        let rule_name = rule.name.as_str();
        if decision.key_refused {
            // Neither an event nor a denial of this key: a flood of new keys must not become
            // event writes, and the operator needs the count and a (rate-limited) warning.
            metrics::counter!(crate::metrics::RATE_LIMIT_KEYS_REFUSED, "rule" => rule.name.clone()).increment(1);
            self.warn_full(rule);
            return Ok(decision);
        }
        if !decision.allowed {
            // Rule names come from the configuration (an unknown name was refused above), so the
            // label is bounded; the key (a user id or an address) is never a label.
            metrics::counter!(crate::metrics::RATE_LIMIT_DENIED, "rule" => rule.name.clone()).increment(1);
            if decision.repeat {
                metrics::counter!(crate::metrics::RATE_LIMIT_DENIALS_UNRECORDED, "rule" => rule.name.clone())
                    .increment(1);
                return Ok(decision);
            }
            let mut draft = EventDraft::new(EventType::RateLimitExceeded)
                .details(format!("Rate limit {rule_name:?} exceeded"))
                .risk((0.2 * f64::from(decision.violations)).min(1.0))
                .meta("rule", rule_name)
                .meta("violations", decision.violations)
                .meta("blocked", decision.blocked)
                .meta("retry_after_ms", decision.retry_after.as_millis());
            draft = match key_address(key) {
                Some(address) => draft.ip(Some(address)),
                None => draft.user(key),
            };
            self.recorder.record_or_log(draft).await;
        }
        Ok(decision)
    }

    /// Logs that `rule` refuses new keys, at most once a minute per limiter.
    fn warn_full(&self, rule: &Rule) {
        let now = self.clock.now();
        let last = self.warned_full_at.load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) >= 60_000
            && self
                .warned_full_at
                .compare_exchange(last, now, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                rule = %rule.name,
                "rate limit holds as many keys as security.max_limiter_keys allows: new keys are refused until held state expires (raise the setting if this is ordinary traffic)"
            );
        }
    }

    /// [`Limiter::check`] with one unit, as an error when denied (`RESOURCE_EXHAUSTED` with
    /// `RetryInfo` on the wire; [`Error::LimiterFull`] when the rule refused a new key). A rule
    /// that is not configured allows.
    pub async fn enforce(&self, rule_name: &str, key: &str) -> Result<()> {
        if !self.rules.contains_key(rule_name) {
            return Ok(());
        }
        let decision = self.check(rule_name, key, 1).await?;
        denial(rule_name, &decision).map_or(Ok(()), Err)
    }

    /// Deletes rate-limit state that no longer matters.
    pub async fn cleanup(&self) -> Result<usize> {
        let now = self.clock.now();
        let mut total = 0;
        loop {
            let removed = self.store.purge_limits(now, 1000).await?;
            total += removed;
            if removed < 1000 {
                return Ok(total);
            }
        }
    }
}

#[async_trait::async_trait]
impl LimitGuard for Limiter {
    async fn check(&self, rule: &str, key: &str) -> Result<()> {
        self.enforce(rule, key).await
    }

    /// The check [`Limiter::enforce`] would ask the store for, when it asks one (limiting on, the
    /// rule configured).
    fn planned(&self, rule_name: &str, key: &str) -> Option<LimitCheck> {
        // A rule that cannot grant one unit is refused by `decide` as an invalid cost: not planned.
        let rule = self.rules.get(rule_name).filter(|rule| self.enabled && rule.burst >= 1)?;
        Some(LimitCheck { rule: rule.clone(), key: key.to_owned(), now: self.clock.now() })
    }

    async fn refused(&self, rule_name: &str, key: &str, decision: Decision) -> Error {
        let Some(rule) = self.rules.get(rule_name) else {
            return Error::internal(format!("rate limit {rule_name:?} is not configured"));
        };
        match self.settle(rule, key, decision).await {
            Ok(decision) => denial(rule_name, &decision)
                .unwrap_or_else(|| Error::internal(format!("rate limit {rule_name:?} refused without a denial"))),
            Err(e) => e,
        }
    }
}

/// The error of a denied `decision` of `rule_name`; `None` when it allowed.
fn denial(rule_name: &str, decision: &Decision) -> Option<Error> {
    if decision.allowed {
        None
    } else if decision.key_refused {
        Some(Error::LimiterFull { rule: rule_name.to_owned(), retry_after: decision.retry_after })
    } else {
        Some(Error::RateLimited { rule: rule_name.to_owned(), retry_after: decision.retry_after })
    }
}
