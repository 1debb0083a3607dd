//! The rate limiter: GCRA (the generic cell rate algorithm) with exponential backoff for repeat
//! offenders, as one pure function over a small state and the time passed in.
//!
//! GCRA keeps one number per key, the theoretical arrival time (TAT): the instant at which the
//! key would be back to a full allowance. A rule of `limit` per `period` with a `burst` spends
//! one emission interval `T = period / limit` per unit; a request of `cost` units is allowed when
//! `max(TAT, now) + cost·T − burst·T <= now`, and then moves the TAT forward by `cost·T`. So
//! `burst` requests pass at once, and the allowance returns one unit every `T` (it is a sliding
//! window without a window to reset, and exact: there is no boundary to game).
//!
//! Backoff (the original library's "repeat offenders"): the first denial only waits for the
//! GCRA (`retry_after` is when `cost` units are back). Each further denial while the key is
//! still remembered as an offender blocks the key for `period × multiplier^(v−2)` (v = the
//! violation count, 2 for the second), capped at `max_backoff`; while blocked, requests are denied
//! without being counted. The violation count decays to zero once `max_backoff` passes after the
//! last denial or block without a new denial (the library never forgot, so an occasional
//! offender eventually reached the cap). Without backoff nothing blocks, and the violation count
//! is the run of denials since the key was last allowed.
//!
//! Denial windows: a denial that opens a window is reported as such ([`Decision::repeat`] false)
//! and the rest of its window as repeats, so that a key hammering a limit is recorded once per
//! window instead of once per request. With backoff each counted denial opens a window (the GCRA
//! wait of the first, the block of each further one) and the denials while blocked are repeats;
//! without backoff the first denial after an allowed request opens a window and the run of
//! denials that follows is its repeats.
//!
//! Bounded state: a backend that keeps limiter state in this process's memory or data directory
//! holds at most [`DEFAULT_MAX_KEYS`] (`security.max_limiter_keys`) keys per rule. At the bound it
//! first drops state that decides nothing any more (see [`LimiterState::forget_at`]); if the rule
//! is still full, a new key is refused ([`refused`]: denied, nothing stored) while every held key
//! keeps its exact state. Evicting a held key instead would hand it a fresh allowance (a partly
//! spent key, or an offender's violation count), which is what a flood of keys would be for; a
//! refusal can only deny new keys of that rule until held state expires.
//!
//! Arithmetic is in integer microseconds so that the same function can be written as a Redis
//! Lua script (numbers are doubles there; every value stays below 2^53).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Millis;

/// The default of `security.max_limiter_keys`: keys of live state one rule may hold in a bounded
/// backend (memory, embedded). About 0.5 KB each in memory with short keys.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// Exponential backoff of a rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// Factor between successive blocks (2.0 by default).
    pub multiplier: f64,
    /// The longest block.
    pub max: Duration,
}

/// A named rate-limit rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Name, for example "session_create".
    pub name: String,
    /// Units per period.
    pub limit: u32,
    /// The time in which `limit` units return (one every `period / limit`).
    pub period: Duration,
    /// Units that may be spent at once (the bucket size); usually `limit`.
    pub burst: u32,
    /// Backoff for repeat offenders, when enabled.
    pub backoff: Option<Backoff>,
}

impl Rule {
    /// Microseconds per unit (at least 1).
    pub fn emission_interval_us(&self) -> i64 {
        let period_us = i64::try_from(self.period.as_micros()).unwrap_or(i64::MAX);
        (period_us / i64::from(self.limit.max(1))).max(1)
    }

    /// Microseconds of burst tolerance.
    fn tolerance_us(&self) -> i64 {
        self.emission_interval_us().saturating_mul(i64::from(self.burst.max(1)))
    }

    fn max_backoff_ms(&self) -> Millis {
        self.backoff.as_ref().map_or(0, |b| crate::clock::millis(b.max))
    }
}

/// What a store keeps per (rule, key).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimiterState {
    /// Theoretical arrival time, microseconds since the epoch.
    pub tat_us: i64,
    /// Denials counted towards backoff.
    pub violations: u32,
    /// Time of the last counted denial (ms).
    pub last_violation_ms: Millis,
    /// Blocked until this time (ms); 0 when not blocked.
    pub blocked_until_ms: Millis,
}

impl LimiterState {
    /// The last time the key misbehaved or was blocked.
    fn quiet_since(&self) -> Millis {
        self.last_violation_ms.max(self.blocked_until_ms)
    }

    /// From this time on the state decides nothing a fresh state would not: it can be deleted.
    pub fn forget_at(&self, rule: &Rule) -> Millis {
        let tat_ms = self.tat_us.div_euclid(1000) + 1;
        let offender = if self.violations > 0 {
            self.quiet_since().saturating_add(rule.max_backoff_ms().max(crate::clock::millis(rule.period)))
        } else {
            0
        };
        tat_ms.max(self.blocked_until_ms).max(offender)
    }
}

/// The answer to one check.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Whether the units were granted (and consumed).
    pub allowed: bool,
    /// The rule's limit per period.
    pub limit: u32,
    /// Units available right after this decision.
    pub remaining: u32,
    /// When denied: how long until `cost` units would be granted.
    pub retry_after: Duration,
    /// How long until the full burst is available again.
    pub reset_after: Duration,
    /// When denied: whether the key is blocked by backoff.
    pub blocked: bool,
    /// Denials counted towards backoff, after this decision (without backoff: denials since the
    /// key was last allowed).
    pub violations: u32,
    /// When denied: a later denial of a window whose first denial was already reported (the key
    /// is blocked, or, for a rule without backoff, was denied before and not allowed since).
    /// Repeats are counted, not recorded as events.
    pub repeat: bool,
    /// Denied because the rule already holds as many keys as the backend may keep and this key
    /// is not one of them ([`refused`]); nothing was stored.
    pub key_refused: bool,
}

/// The decision for a new key of `rule` when the backend holds as many keys of the rule as it
/// may: denied, with the rule's period as the hint of when a held key's state may have expired.
pub fn refused(rule: &Rule) -> Decision {
    Decision {
        allowed: false,
        limit: rule.limit,
        remaining: 0,
        retry_after: rule.period,
        reset_after: rule.period,
        blocked: false,
        violations: 0,
        repeat: false,
        key_refused: true,
    }
}

fn ms_ceil(us: i64) -> Duration {
    Duration::from_millis(u64::try_from((us.max(0) + 999) / 1000).unwrap_or(0))
}

fn units(us: i64, interval: i64, burst: u32) -> u32 {
    u32::try_from((us / interval).clamp(0, i64::from(burst))).unwrap_or(0)
}

/// Applies `rule` to `state` for a request of `cost` units at `now`. Returns the decision and
/// the state to store (`None`: leave the stored state as it is).
pub fn apply(state: Option<LimiterState>, rule: &Rule, cost: u32, now: Millis) -> (Decision, Option<LimiterState>) {
    let now_us = now.saturating_mul(1000);
    let interval = rule.emission_interval_us();
    let tolerance = rule.tolerance_us();
    let mut state = state.unwrap_or(LimiterState { tat_us: now_us, ..LimiterState::default() });
    let tat = state.tat_us.max(now_us);
    let reset_after = ms_ceil(tat - now_us);

    if now < state.blocked_until_ms {
        let decision = Decision {
            allowed: false,
            limit: rule.limit,
            remaining: 0,
            retry_after: Duration::from_millis(u64::try_from(state.blocked_until_ms - now).unwrap_or(0)),
            reset_after: reset_after
                .max(Duration::from_millis(u64::try_from(state.blocked_until_ms - now).unwrap_or(0))),
            blocked: true,
            violations: state.violations,
            repeat: true,
            key_refused: false,
        };
        return (decision, None);
    }
    if rule.backoff.is_some()
        && state.violations > 0
        && now.saturating_sub(state.quiet_since()) >= rule.max_backoff_ms()
    {
        state.violations = 0;
    }

    let new_tat = tat.saturating_add(interval.saturating_mul(i64::from(cost)));
    let allow_at = new_tat.saturating_sub(tolerance);
    if now_us >= allow_at {
        state.tat_us = new_tat;
        if rule.backoff.is_none() {
            // Without backoff the count is the run of denials since the last grant.
            state.violations = 0;
        }
        let decision = Decision {
            allowed: true,
            limit: rule.limit,
            remaining: units(now_us + tolerance - new_tat, interval, rule.burst),
            retry_after: Duration::ZERO,
            reset_after: ms_ceil(new_tat - now_us),
            blocked: false,
            violations: state.violations,
            repeat: false,
            key_refused: false,
        };
        return (decision, Some(state));
    }

    state.violations = state.violations.saturating_add(1);
    state.last_violation_ms = now;
    let mut retry_after = ms_ceil(allow_at - now_us);
    let mut blocked = false;
    if let Some(backoff) = &rule.backoff
        && state.violations >= 2
    {
        let exponent = i32::try_from(state.violations - 2).unwrap_or(i32::MAX).min(64);
        let penalty = rule.period.as_secs_f64() * backoff.multiplier.max(1.0).powi(exponent);
        let penalty = Duration::from_secs_f64(penalty.min(backoff.max.as_secs_f64()));
        let block = penalty.max(retry_after);
        state.blocked_until_ms = crate::clock::add(now, block);
        retry_after = block;
        blocked = true;
    }
    let decision = Decision {
        allowed: false,
        limit: rule.limit,
        remaining: units(now_us + tolerance - tat, interval, rule.burst),
        retry_after,
        reset_after: reset_after.max(retry_after),
        blocked,
        violations: state.violations,
        // With backoff every counted denial opens a window (a wait or a block); without, only the
        // first since the key was last allowed.
        repeat: rule.backoff.is_none() && state.violations > 1,
        key_refused: false,
    };
    (decision, Some(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: Millis = 1_800_000_000_000;

    fn rule(limit: u32, period_s: u64, backoff: bool) -> Rule {
        Rule {
            name: "r".into(),
            limit,
            period: Duration::from_secs(period_s),
            burst: limit,
            backoff: backoff.then(|| Backoff { multiplier: 2.0, max: Duration::from_secs(3600) }),
        }
    }

    /// Runs `n` checks at `now`, threading the state; returns how many were allowed.
    fn run(state: &mut Option<LimiterState>, rule: &Rule, n: usize, now: Millis) -> (usize, Vec<Decision>) {
        let mut decisions = Vec::new();
        for _ in 0..n {
            let (d, next) = apply(*state, rule, 1, now);
            if let Some(next) = next {
                *state = Some(next);
            }
            decisions.push(d);
        }
        (decisions.iter().filter(|d| d.allowed).count(), decisions)
    }

    #[test]
    fn a_burst_of_limit_passes_then_one_unit_per_interval() {
        let r = rule(10, 60, false);
        let mut state = None;
        let (allowed, decisions) = run(&mut state, &r, 100, START);
        assert_eq!(allowed, 10);
        assert_eq!(decisions[0].remaining, 9);
        assert_eq!(decisions[9].remaining, 0);
        assert_eq!(decisions[9].reset_after, Duration::from_secs(60));
        assert_eq!(decisions[10].retry_after, Duration::from_secs(6));
        // One interval later exactly one more unit is back.
        let (allowed, _) = run(&mut state, &r, 5, START + 6_000);
        assert_eq!(allowed, 1);
        // A millisecond short of the next interval: nothing.
        assert_eq!(run(&mut state, &r, 1, START + 11_999).0, 0);
        // A whole period after the last grant the full burst is back.
        assert_eq!(run(&mut state, &r, 20, START + 6_000 + 60_000).0, 10);
    }

    #[test]
    fn cost_spends_several_units_and_is_refused_whole() {
        let r = rule(10, 60, false);
        let (d, s) = apply(None, &r, 7, START);
        assert!(d.allowed);
        assert_eq!(d.remaining, 3);
        let (d, s2) = apply(s, &r, 4, START);
        assert!(!d.allowed);
        assert_eq!(d.remaining, 3);
        // Four units need one more interval.
        assert_eq!(d.retry_after, Duration::from_secs(6));
        assert!(apply(s2.or(s), &r, 4, START + 6_000).0.allowed);
    }

    #[test]
    fn repeat_offenders_back_off_exponentially_up_to_the_cap() {
        let r =
            Rule { backoff: Some(Backoff { multiplier: 2.0, max: Duration::from_secs(1800) }), ..rule(5, 300, true) };
        let mut state = None;
        let mut now = START;
        assert_eq!(run(&mut state, &r, 5, now).0, 5);
        // First denial: just the GCRA wait (300 s / 5).
        let (_, d) = run(&mut state, &r, 1, now);
        assert_eq!(d[0].retry_after, Duration::from_secs(60));
        assert!(!d[0].blocked);
        // Each further denial blocks for period × 2^(v−2), capped: 300, 600, 1200, 1800, 1800.
        for expected in [300, 600, 1200, 1800, 1800] {
            // Spend whatever came back, then offend again.
            let (_, spent) = run(&mut state, &r, 6, now);
            let d: Vec<Decision> = spent.into_iter().filter(|d| !d.allowed).take(1).collect();
            assert!(d[0].blocked, "{d:?}");
            assert_eq!(d[0].retry_after, Duration::from_secs(expected), "{d:?}");
            // While blocked, requests are denied and not counted.
            let (_, during) = run(&mut state, &r, 3, now + 1_000);
            assert!(during.iter().all(|x| !x.allowed && x.blocked && x.violations == d[0].violations));
            assert_eq!(state.unwrap().violations, d[0].violations);
            now += i64::try_from(expected).unwrap() * 1000;
        }
        // After the block, the allowance has returned.
        assert!(run(&mut state, &r, 1, now).0 == 1);
    }

    #[test]
    fn violations_decay_after_a_quiet_max_backoff() {
        let r = rule(1, 60, true);
        let mut state = None;
        run(&mut state, &r, 3, START);
        assert_eq!(state.unwrap().violations, 2);
        let later = START + 3_600_000 + 60_000;
        let (_, d) = run(&mut state, &r, 2, later);
        assert!(d[0].allowed);
        // The count started again: the next denial is a first one (no block).
        assert_eq!(d[1].violations, 1);
        assert!(!d[1].blocked);
    }

    #[test]
    fn without_backoff_denials_never_block() {
        let r = rule(2, 10, false);
        let mut state = None;
        let (_, d) = run(&mut state, &r, 50, START);
        assert!(d[2..].iter().all(|d| !d.blocked && d.retry_after == Duration::from_secs(5)));
        assert!(!d[2].repeat && d[3..].iter().all(|d| d.repeat));
    }

    #[test]
    fn denials_open_one_window_then_repeat() {
        // With backoff: the first denial (a wait) and the one that blocks each open a window;
        // every denial while blocked is a repeat; after the block the next offence opens anew.
        let r = rule(2, 2, true);
        let mut state = None;
        let (_, d) = run(&mut state, &r, 54, START);
        let opened: Vec<u32> = d.iter().filter(|d| !d.allowed && !d.repeat).map(|d| d.violations).collect();
        assert_eq!(opened, [1, 2]);
        assert!(d[4..].iter().all(|d| d.blocked && d.repeat));
        let (_, d) = run(&mut state, &r, 30, START + 2_000);
        let opened: Vec<u32> = d.iter().filter(|d| !d.allowed && !d.repeat).map(|d| d.violations).collect();
        assert_eq!(opened, [3]);
        assert!(d[..2].iter().all(|d| d.allowed) && d[3..].iter().all(|d| d.blocked && d.repeat));

        // Without backoff: one window per run of denials between grants.
        let r = rule(2, 10, false);
        let mut state = None;
        let (_, d) = run(&mut state, &r, 40, START);
        assert_eq!(d.iter().filter(|d| !d.allowed && !d.repeat).count(), 1);
        assert_eq!(d[39].violations, 38);
        // One unit back (5 s): granted, and the next denial opens a new window.
        let (_, d) = run(&mut state, &r, 3, START + 5_000);
        assert!(d[0].allowed && !d[1].allowed && !d[1].repeat && d[2].repeat, "{d:?}");
        assert_eq!(d[1].violations, 1);
    }

    #[test]
    fn state_can_be_forgotten_once_it_decides_nothing() {
        let r = rule(10, 60, false);
        let (_, s) = apply(None, &r, 1, START);
        let s = s.unwrap();
        assert_eq!(s.forget_at(&r), START + 6_001);
        let mut state = Some(s);
        run(&mut state, &r, 20, START);
        let state = state.unwrap();
        assert!(state.forget_at(&r) >= START + 60_000);
    }

    #[test]
    fn odd_periods_and_tiny_intervals_stay_exact_enough() {
        // 7 per 300 s: 42 857 142 µs per unit.
        let r = rule(7, 300, false);
        let mut state = None;
        assert_eq!(run(&mut state, &r, 10, START).0, 7);
        // 3000 per second: 333 µs per unit, never zero.
        let r = Rule { name: "fast".into(), limit: 3000, period: Duration::from_secs(1), burst: 3000, backoff: None };
        let mut state = None;
        assert_eq!(run(&mut state, &r, 4000, START).0, 3000);
    }
}
