//! The memory dirtier: writes `rate` distinct pages per second over a region of its own,
//! round-robin, spread over the second in small batches — a guest with a known dirty-page
//! rate, for checkpoint and migration measurements.
//!
//! Pages are distinct within any second as long as the rate does not exceed the region's
//! page count (the rate is capped to it at start).

use smoltcp::time::{Duration, Instant};

use crate::region::PAGE;

/// Shortest time between two batches: bounds the wakeups at high rates.
const BATCH_INTERVAL: Duration = Duration::from_millis(10);

/// The dirtier.
pub struct Dirty {
    region: *mut u8,
    pages: u64,
    /// Pages per second.
    rate: u64,
    start: Instant,
    /// Pages due so far that are accounted for (written, or skipped after a stall).
    accounted: u64,
    /// Pages actually written.
    written: u64,
    /// The next page to write.
    cursor: u64,
    next: Instant,
}

// SAFETY: the region is RAM carved for the dirtier alone, reached only through this value,
// which the scheduler hands to one vCPU at a time.
unsafe impl Send for Dirty {}

impl Dirty {
    /// A dirtier over `pages` pages at `region` (carved for it alone), `rate` pages per second
    /// (at most `pages`), starting now.
    ///
    /// # Safety
    /// `region` must be `pages` pages of RAM only the dirtier uses, for the guest's life.
    pub unsafe fn new(region: *mut u8, pages: u64, rate: u64, now: Instant) -> Dirty {
        Dirty { region, pages, rate: rate.min(pages), start: now, accounted: 0, written: 0, cursor: 0, next: now }
    }

    /// Pages written since start.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Writes the pages due by `now`.
    pub fn poll(&mut self, now: Instant) {
        if self.rate == 0 || now < self.next {
            return;
        }
        let elapsed = (now - self.start).total_micros();
        let due = (u128::from(elapsed) * u128::from(self.rate) / 1_000_000) as u64;
        // After a stall (the VM was stopped) write at most one second's worth at once.
        let to_write = (due - self.accounted).min(self.rate);
        for _ in 0..to_write {
            let offset = (self.cursor * PAGE) as usize;
            // SAFETY: `cursor < pages`: inside the region (constructor contract). A value that
            // changes every time, so the page really differs.
            unsafe { core::ptr::write_volatile(self.region.add(offset).cast::<u64>(), self.written) };
            self.written += 1;
            self.cursor = (self.cursor + 1) % self.pages;
        }
        self.accounted = due;
        // When the next page is due, but no sooner than one batch interval from now.
        let next_due_us = (u128::from(due + 1) * 1_000_000).div_ceil(u128::from(self.rate)) as u64;
        self.next = (self.start + Duration::from_micros(next_due_us)).max(now + BATCH_INTERVAL);
    }

    /// When the next batch is due (`None`: rate 0, nothing to do).
    pub fn deadline(&self) -> Option<Instant> {
        (self.rate > 0).then_some(self.next)
    }
}
