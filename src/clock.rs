//! Time as the domain sees it: milliseconds since the Unix epoch, UTC, from a [`Clock`] that
//! tests can move by hand instead of sleeping.

#![warn(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (UTC).
pub type Millis = i64;

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Now, in milliseconds since the epoch.
    fn now(&self) -> Millis;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
    }
}

/// The system clock set to the shared store's clock: replicas of one Redis agree on time for
/// every decision they share (leases, the limiter, expiry), whatever their own clocks say.
/// [`AlignedClock::align`] takes a reading of the server's clock (Redis `TIME`) with the local
/// instants around it, and sets the offset to the server's time at the round trip's midpoint;
/// until the first reading it is the system clock. `skew` shifts the local clock on purpose
/// (the test-only `SESSION_AUTHORITY_CLOCK_OFFSET`) to show that the alignment holds.
#[derive(Debug, Default)]
pub struct AlignedClock {
    skew: Millis,
    offset: AtomicI64,
}

impl AlignedClock {
    /// A clock reading the system clock shifted by `skew`, until aligned.
    pub fn new(skew: Millis) -> AlignedClock {
        AlignedClock { skew, offset: AtomicI64::new(0) }
    }

    /// The local clock (system plus skew), without the offset: what `align` compares with.
    pub fn local(&self) -> Millis {
        SystemClock.now().saturating_add(self.skew)
    }

    /// Sets the offset from one reading `server` of the shared clock taken between the local
    /// instants `sent` and `received`; returns the new offset.
    pub fn align(&self, server: Millis, sent: Millis, received: Millis) -> Millis {
        let midpoint = sent + (received - sent) / 2;
        let offset = server - midpoint;
        self.offset.store(offset, Ordering::SeqCst);
        offset
    }

    /// The offset in force.
    pub fn offset(&self) -> Millis {
        self.offset.load(Ordering::SeqCst)
    }
}

impl Clock for AlignedClock {
    fn now(&self) -> Millis {
        self.local().saturating_add(self.offset.load(Ordering::Relaxed))
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: Millis) -> ManualClock {
        ManualClock { now: Arc::new(AtomicI64::new(start)) }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.now.fetch_add(millis(by), Ordering::SeqCst);
    }

    /// Sets the clock.
    pub fn set(&self, to: Millis) {
        self.now.store(to, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.now.load(Ordering::SeqCst)
    }
}

/// A duration in whole milliseconds, saturating.
pub fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

/// `at` plus `d`, saturating.
pub fn add(at: Millis, d: Duration) -> Millis {
    at.saturating_add(millis(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_aligned_clock_reads_the_servers_time_whatever_its_skew() {
        let clock = AlignedClock::new(600_000);
        let before = clock.local();
        assert!(clock.now() - SystemClock.now() >= 599_000, "unaligned, it is the skewed local clock");
        // The server answered 10 minutes behind the skewed clock, at the midpoint of a 20 ms trip.
        let offset = clock.align(before - 600_000 + 10, before, before + 20);
        assert_eq!(offset, -600_000);
        assert!((clock.now() - SystemClock.now()).abs() < 1_000);
    }
}
