//! The retry policy for upstream calls: exponential backoff with full jitter, only for transient
//! failures (network errors, timeouts, 5xx, 429), honouring `Retry-After`.
//!
//! Full jitter (the delay before retry `n` is uniform in `[0, min(max, initial * 2^n))`) spreads
//! the retries of many sessions that failed together, instead of moving the thundering herd a
//! fixed distance. `max_retries` counts retries: 3 means up to 4 attempts (the original library
//! counted attempts and retried everything, `invalid_grant` included).

use std::future::Future;
use std::time::Duration;

use crate::token::provider::UpstreamError;

/// How upstream calls are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Cap of the first backoff.
    pub initial_delay: Duration,
    /// Cap of every backoff; a `Retry-After` beyond it ends the retries.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_retries: 3, initial_delay: Duration::from_secs(1), max_delay: Duration::from_secs(30) }
    }
}

impl RetryPolicy {
    /// The backoff before retry `retry` (0 for the first retry) for a uniform draw `unit` in
    /// `[0, 1)`: `unit * min(max_delay, initial_delay * 2^retry)`.
    pub fn backoff(&self, retry: u32, unit: f64) -> Duration {
        let ceiling = self.initial_delay.saturating_mul(2u32.saturating_pow(retry.min(31))).min(self.max_delay);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The wait before retry `retry` after `error`, or `None` when no retry should be made
    /// (permanent error, retries exhausted, or a `Retry-After` longer than `max_delay`).
    pub fn next_delay(&self, retry: u32, error: &UpstreamError, unit: f64) -> Option<Duration> {
        if !error.is_transient() || retry >= self.max_retries {
            return None;
        }
        let jittered = self.backoff(retry, unit);
        match error.retry_after() {
            Some(after) if after > self.max_delay => None,
            Some(after) => Some(after.max(jittered)),
            None => Some(jittered),
        }
    }

    /// Runs `attempt` until it succeeds, fails permanently, or the retries are spent. Returns the
    /// last result and the number of attempts made. For idempotent calls (introspection,
    /// revocation).
    pub async fn run<T, F, Fut>(&self, attempt: F) -> (Result<T, UpstreamError>, u32)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        self.run_when(attempt, |_| true).await
    }

    /// [`RetryPolicy::run`] for a call that must not be repeated once the provider may have
    /// processed it (the refresh grant: a rotating provider spends the refresh token, and a
    /// second attempt with it is reuse): retries only failures the provider provably did not
    /// process ([`UpstreamError::unprocessed`]).
    pub async fn run_unprocessed_only<T, F, Fut>(&self, attempt: F) -> (Result<T, UpstreamError>, u32)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        self.run_when(attempt, UpstreamError::unprocessed).await
    }

    async fn run_when<T, F, Fut>(
        &self,
        mut attempt: F,
        may_retry: fn(&UpstreamError) -> bool,
    ) -> (Result<T, UpstreamError>, u32)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match attempt().await {
                Ok(value) => return (Ok(value), attempts),
                Err(error) if !may_retry(&error) => return (Err(error), attempts),
                Err(error) => {
                    let unit: f64 = rand::random();
                    match self.next_delay(attempts - 1, &error, unit) {
                        Some(delay) => {
                            tracing::info!(
                                attempt = attempts,
                                cause = error.cause(),
                                delay_ms = delay.as_millis() as u64,
                                "upstream call failed; retrying"
                            );
                            tokio::time::sleep(delay).await;
                        }
                        None => return (Err(error), attempts),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transient(retry_after: Option<Duration>) -> UpstreamError {
        UpstreamError::Transient {
            cause: "server_error",
            message: "HTTP status 503".into(),
            retry_after,
            unprocessed: retry_after.is_some(),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_is_fully_jittered() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(0, 0.999_999).as_millis(), 999);
        assert_eq!(p.backoff(1, 0.5), Duration::from_secs(1));
        assert_eq!(p.backoff(2, 0.5), Duration::from_secs(2));
        assert_eq!(p.backoff(10, 0.5), Duration::from_secs(15));
        assert_eq!(p.backoff(40, 1.0), Duration::from_secs(30));
        assert_eq!(p.backoff(3, 0.0), Duration::ZERO);
    }

    #[test]
    fn only_transient_errors_are_retried_and_only_max_retries_times() {
        let p = RetryPolicy::default();
        assert!(p.next_delay(0, &transient(None), 0.5).is_some());
        assert!(p.next_delay(2, &transient(None), 0.5).is_some());
        assert!(p.next_delay(3, &transient(None), 0.5).is_none());
        assert!(p.next_delay(0, &UpstreamError::InvalidGrant, 0.5).is_none());
        assert!(p.next_delay(0, &UpstreamError::Rejected("invalid_client".into()), 0.5).is_none());
        assert!(p.next_delay(0, &UpstreamError::Malformed("x".into()), 0.5).is_none());
    }

    #[test]
    fn retry_after_is_honoured_unless_beyond_the_cap() {
        let p = RetryPolicy::default();
        assert_eq!(p.next_delay(0, &transient(Some(Duration::from_secs(7))), 0.5), Some(Duration::from_secs(7)));
        assert_eq!(p.next_delay(0, &transient(Some(Duration::from_secs(60))), 0.5), None);
    }

    #[tokio::test]
    async fn run_counts_attempts() {
        let p = RetryPolicy {
            max_retries: 2,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        };
        let mut calls = 0;
        let (result, attempts) = p
            .run(|| {
                calls += 1;
                async { Err::<(), _>(transient(None)) }
            })
            .await;
        assert!(result.is_err());
        assert_eq!((attempts, calls), (3, 3));
        let (result, attempts) = p.run(|| async { Err::<(), _>(UpstreamError::InvalidGrant) }).await;
        assert_eq!((result, attempts), (Err(UpstreamError::InvalidGrant), 1));
    }

    #[tokio::test]
    async fn run_unprocessed_only_never_repeats_a_call_the_provider_may_have_processed() {
        let p = RetryPolicy {
            max_retries: 2,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        };
        // A 503 without Retry-After (or a timeout after sending) may have been processed.
        let (result, attempts) = p.run_unprocessed_only(|| async { Err::<(), _>(transient(None)) }).await;
        assert!(result.is_err());
        assert_eq!(attempts, 1);
        // A 503 with Retry-After was refused unprocessed: retried.
        let (_, attempts) =
            p.run_unprocessed_only(|| async { Err::<(), _>(transient(Some(Duration::from_millis(1)))) }).await;
        assert_eq!(attempts, 3);
    }
}
