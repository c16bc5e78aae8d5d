//! A counter session on its own thread: one increment every 10 ms until stopped, each reply
//! checked to follow the one before (by [`CounterClient`]) and timed, for the gap a failover
//! leaves the client.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::colo_topology::CounterClient;

/// The running session.
pub struct CounterLoad {
    first: u64,
    stop: Arc<AtomicBool>,
    /// Replies so far, for a look while it runs.
    replies: Arc<AtomicU64>,
    thread: JoinHandle<(Vec<Instant>, u64, Option<String>)>,
}

impl CounterLoad {
    /// Starts incrementing on `c`.
    pub fn start(mut c: CounterClient) -> CounterLoad {
        let first = c.last;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let replies = Arc::new(AtomicU64::new(0));
        let counted = replies.clone();
        let thread = std::thread::spawn(move || {
            let mut times = vec![];
            while !s.load(Ordering::Relaxed) {
                if let Err(e) = c.inc() {
                    return (times, c.last, Some(e));
                }
                times.push(Instant::now());
                counted.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            (times, c.last, None)
        });
        CounterLoad { first, stop, replies, thread }
    }

    /// The value the session started from.
    pub fn first(&self) -> u64 {
        self.first
    }

    /// Replies so far (the session goes on).
    pub fn replies(&self) -> u64 {
        self.replies.load(Ordering::Relaxed)
    }

    /// Waits until the session answered `n` more increments than now, at most `limit`; whether
    /// it did. After an outage of seconds the client's TCP retransmission timer has backed off,
    /// so its session may resume seconds after the service did.
    pub fn wait_for_more(&self, n: u64, limit: Duration) -> bool {
        let (start, deadline) = (self.replies(), Instant::now() + limit);
        while self.replies() < start + n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Stops; the reply times and the last value. An error if a value was lost or repeated, or
    /// the last value is not the first plus the increments (not one session throughout).
    pub fn finish(self) -> Result<(Vec<Instant>, u64), String> {
        self.stop.store(true, Ordering::Relaxed);
        let (times, last, err) = self.thread.join().map_err(|_| "the counter thread panicked".to_string())?;
        if let Some(e) = err {
            return Err(format!("counter session: {e}"));
        }
        if last != self.first + times.len() as u64 {
            return Err(format!("not one session: from {} with {} increments to {last}", self.first, times.len()));
        }
        Ok((times, last))
    }
}

/// The longest silence between two replies ending after `at`, and the replies after it.
pub fn gap_around(times: &[Instant], at: Instant) -> (Duration, usize) {
    let after = times.iter().filter(|t| **t > at).count();
    let gap = times.windows(2).filter(|w| w[1] > at).map(|w| w[1] - w[0]).max().unwrap_or_default();
    (gap, after)
}

/// The `n` longest silences, as "gap ending at ±s" relative to `origin`, longest first.
pub fn longest_gaps(times: &[Instant], origin: Instant, n: usize) -> String {
    let rel = |t: Instant| {
        t.saturating_duration_since(origin).as_secs_f64() - origin.saturating_duration_since(t).as_secs_f64()
    };
    let mut gaps: Vec<(Duration, f64)> = times.windows(2).map(|w| (w[1] - w[0], rel(w[1]))).collect();
    gaps.sort_by_key(|g| std::cmp::Reverse(g.0));
    gaps.iter().take(n).map(|(g, at)| format!("{g:?} ending at {at:+.2}s")).collect::<Vec<_>>().join(", ")
}
