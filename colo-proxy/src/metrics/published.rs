//! State an event loop publishes for its metrics endpoint. colo-proxy's single-threaded loops
//! own their engine; the metrics server must never wait for them nor make them work per
//! scrape. So a loop leaves a copy of its counters in a shared slot — at most every
//! [`PUBLISH_EVERY`], after the iterations that may have changed them — and the server's
//! thread reads the latest copy. The slot's lock is only held to store or clone the copy.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often a busy loop copies its counters; a scrape sees them at most this old (an idle
/// loop's last copy is current: nothing changed since).
pub const PUBLISH_EVERY: Duration = Duration::from_millis(250);

/// The loop's side.
#[derive(Debug)]
pub struct Publisher<T> {
    slot: Arc<Mutex<Option<T>>>,
    last: Option<Instant>,
    /// Something may have changed since the last copy.
    dirty: bool,
}

/// The metrics thread's side.
#[derive(Debug)]
pub struct Published<T> {
    slot: Arc<Mutex<Option<T>>>,
}

impl<T> Clone for Published<T> {
    fn clone(&self) -> Self {
        Published { slot: self.slot.clone() }
    }
}

/// An empty slot's two sides.
pub fn slot<T>() -> (Publisher<T>, Published<T>) {
    let slot = Arc::new(Mutex::new(None));
    (Publisher { slot: slot.clone(), last: None, dirty: false }, Published { slot })
}

impl<T> Publisher<T> {
    /// After a loop iteration: stores `make()`'s copy if the last is [`PUBLISH_EVERY`] old,
    /// else remembers to (see [`next_due`](Self::next_due)).
    pub fn offer(&mut self, make: impl FnOnce() -> T) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < PUBLISH_EVERY) {
            self.dirty = true;
            return;
        }
        let copy = make();
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(copy);
        self.last = Some(now);
        self.dirty = false;
    }

    /// When the loop must wake to publish what changed since the last copy (None: nothing
    /// waits).
    pub fn next_due(&self) -> Option<Duration> {
        let last = self.last.filter(|_| self.dirty)?;
        Some(PUBLISH_EVERY.saturating_sub(last.elapsed()))
    }
}

impl<T: Clone> Published<T> {
    /// The latest copy (None before the first).
    pub fn latest(&self) -> Option<T> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_rate_limited_and_the_last_change_is_never_lost() {
        let (mut publisher, published) = slot::<u32>();
        assert_eq!(published.latest(), None);
        assert_eq!(publisher.next_due(), None);
        publisher.offer(|| 1);
        assert_eq!(published.latest(), Some(1));
        assert_eq!(publisher.next_due(), None, "nothing changed since");
        // Within the interval: not copied, but due within it.
        publisher.offer(|| 2);
        assert_eq!(published.latest(), Some(1));
        let due = publisher.next_due().expect("a copy is due");
        assert!(due <= PUBLISH_EVERY);
        std::thread::sleep(due);
        publisher.offer(|| 3);
        assert_eq!(published.latest(), Some(3));
        assert_eq!(publisher.next_due(), None);
    }
}
