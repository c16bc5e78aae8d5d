//! The disk dirtier: writes `rate` distinct 4 KiB blocks per second over the disk's scratch
//! area, round-robin, in batches at least 10 ms apart — a guest with a known dirty-block rate,
//! for checkpoint measurements (the disk's counterpart of `dirty`).

use smoltcp::time::{Duration, Instant};

use super::kv::{Disk, Layout};
use crate::virtio::blk::SECTOR;

const BATCH_INTERVAL: Duration = Duration::from_millis(10);
const BLOCK: u64 = 4096;

/// The dirtier.
pub struct DiskDirty {
    disk: &'static Disk,
    first: u64,
    blocks: u64,
    rate: u64,
    start: Instant,
    accounted: u64,
    written: u64,
    cursor: u64,
    next: Instant,
}

impl DiskDirty {
    /// A dirtier of `rate` blocks per second (at most the scratch area's) over `layout`'s
    /// scratch area, starting now.
    pub fn new(disk: &'static Disk, layout: &Layout, rate: u64, now: Instant) -> DiskDirty {
        let blocks = layout.scratch_len * SECTOR / BLOCK;
        DiskDirty {
            disk,
            first: layout.scratch.div_ceil(BLOCK / SECTOR) * (BLOCK / SECTOR),
            blocks: blocks.saturating_sub(1).max(1),
            rate: rate.min(blocks),
            start: now,
            accounted: 0,
            written: 0,
            cursor: 0,
            next: now,
        }
    }

    /// Blocks written since start.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Writes the blocks due by `now`, contiguous runs in one request each.
    pub fn poll(&mut self, now: Instant) {
        if self.rate == 0 || now < self.next {
            return;
        }
        let elapsed = (now - self.start).total_micros();
        let due = (u128::from(elapsed) * u128::from(self.rate) / 1_000_000) as u64;
        let mut to_write = (due - self.accounted).min(self.rate);
        let mut disk = self.disk.lock();
        while to_write > 0 {
            let run = to_write.min(self.blocks - self.cursor).min(16);
            let sector = self.first + self.cursor * (BLOCK / SECTOR);
            // A value that changes every time, so the blocks really differ.
            if disk.fill(sector, (run * BLOCK) as usize, self.written as u8).is_err() {
                break;
            }
            self.written += run;
            to_write -= run;
            self.cursor = (self.cursor + run) % self.blocks;
        }
        drop(disk);
        self.accounted = due;
        let next_due_us = (u128::from(due + 1) * 1_000_000).div_ceil(u128::from(self.rate)) as u64;
        self.next = (self.start + Duration::from_micros(next_due_us)).max(now + BATCH_INTERVAL);
    }

    /// When the next batch is due.
    pub fn deadline(&self) -> Option<Instant> {
        (self.rate > 0).then_some(self.next)
    }
}
