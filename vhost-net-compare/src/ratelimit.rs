//! Rate-limited warnings: a hostile guest can produce bad descriptors as fast as it can kick,
//! and each one must not cost a log line.

use std::time::{Duration, Instant};

/// Allows one report per interval and counts what it suppressed in between.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// At most one report per `interval`.
    pub fn new(interval: Duration) -> RateLimit {
        RateLimit { interval, last: None, suppressed: 0 }
    }

    /// Whether to report now. `Some(n)`: report, mentioning the `n` occurrences suppressed since
    /// the previous report; `None`: stay quiet (counted).
    pub fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

impl Default for RateLimit {
    /// One report per second.
    fn default() -> Self {
        RateLimit::new(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_once_per_interval_and_counts_the_rest() {
        let mut r = RateLimit::new(Duration::from_millis(50));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert_eq!(r.check(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(r.check(), Some(2));
    }
}
