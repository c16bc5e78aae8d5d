//! Time as the engine sees it: an injectable monotonic clock, so timeouts can be tested without
//! sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A point in time: nanoseconds since the clock's origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Time elapsed from `earlier` to `self` (zero if `earlier` is later).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// `self + d`.
    pub fn plus(self, d: Duration) -> Timestamp {
        // Saturating: a duration beyond u64 nanoseconds (584 years) is "never", not its low
        // 64 bits.
        Timestamp(self.0.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
    }
}

/// A source of monotonic time.
pub trait Clock {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The real monotonic clock (`CLOCK_MONOTONIC` through [`Instant`]).
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> MonotonicClock {
        MonotonicClock { origin: Instant::now() }
    }

    /// The [`Instant`] a timestamp of this clock corresponds to.
    pub fn instant(&self, t: Timestamp) -> Instant {
        self.origin + Duration::from_nanos(t.0)
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.origin.elapsed().as_nanos() as u64)
    }
}

/// A clock that moves only when told to; clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at time zero.
    pub fn new() -> ManualClock {
        ManualClock::default()
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.nanos.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.nanos.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new();
        let shared = c.clone();
        assert_eq!(c.now(), Timestamp(0));
        shared.advance(Duration::from_millis(5));
        assert_eq!(c.now(), Timestamp(5_000_000));
        assert_eq!(c.now().since(Timestamp(1_000_000)), Duration::from_millis(4));
        assert_eq!(Timestamp(1).since(Timestamp(2)), Duration::ZERO);
    }

    #[test]
    fn plus_saturates_instead_of_wrapping() {
        // 18446744073710 ms is just over 2^64 ns; its low 64 bits are 0.45 ms.
        assert_eq!(Timestamp(1).plus(Duration::from_millis(18_446_744_073_710)), Timestamp(u64::MAX));
        assert_eq!(Timestamp(1).plus(Duration::from_millis(3)), Timestamp(3_000_001));
    }

    #[test]
    fn monotonic_clock_advances() {
        let c = MonotonicClock::new();
        let a = c.now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(c.now().since(a) >= Duration::from_millis(2));
    }
}
