//! The disk's part of checkpoints (docs/colo.md's transaction, with the disk's blocks beside the
//! RAM's pages), kept out of the roles' code:
//! - on the primary, [`PendingBlocks`]: the blocks the PVM wrote since the last checkpoint and
//!   not yet sent, streamed in the background once enough gathered (like RAM) and the rest in
//!   the checkpoint, read from the PVM's disk while it is paused;
//! - on the secondary, [`BlockCache`]: the primary's blocks since the last loaded checkpoint,
//!   held in a stage beside the image (the image itself is written only when a checkpoint is
//!   complete), while the SVM's own writes sit in its disk's overlay. Loading a checkpoint
//!   discards the SVM's writes and writes the stage into the image; a failover drops an
//!   incomplete stage and keeps the SVM's writes — the disk that matches the memory the
//!   survivor resumes with.

use std::io::Write;

use super::link::Link;
use crate::devices::block::disk::{Disk, DiskError};
use crate::devices::block::overlay::Overlay;
use crate::migratable::Migratable;
use crate::persist::snapshot::{stage_blocks, write_blocks};
use crate::persist::stream::{StreamError, PAGE_SIZE};
use crate::vstate::dirty::DirtyBitmap;

/// The primary's blocks written and not yet sent.
pub struct PendingBlocks {
    set: DirtyBitmap,
}

impl PendingBlocks {
    /// None pending, for `vm`'s disk (if it has a writable one: a read-only disk never changes).
    pub fn new<V: Migratable + ?Sized>(vm: &V) -> PendingBlocks {
        let blocks = vm.disk().filter(|d| !d.readonly()).map_or(0, |d| d.blocks());
        PendingBlocks { set: DirtyBitmap::empty(blocks as usize) }
    }

    /// Adds the blocks written since the last look.
    pub fn gather<V: Migratable + ?Sized>(&mut self, vm: &V) {
        if let Some(d) = vm.disk() {
            self.set.union(d.dirty_blocks().words());
        }
    }

    /// Bytes pending.
    pub fn bytes(&self) -> u64 {
        (self.set.count() * PAGE_SIZE) as u64
    }

    /// Sends the pending blocks as the disk holds them now and empties the set; returns how
    /// many. Like the pages, they leave with the link's next flush.
    pub fn send<V: Migratable + ?Sized, W: Write + Send + 'static>(
        &mut self,
        link: &Link<W>,
        vm: &V,
    ) -> Result<u64, StreamError> {
        let Some(disk) = vm.disk().filter(|d| !d.readonly()) else { return Ok(0) };
        if self.set.count() == 0 {
            return Ok(0);
        }
        let set = std::mem::replace(&mut self.set, DirtyBitmap::empty(disk.blocks() as usize));
        link.with_writer_queued(|w| write_blocks(w, disk, set.iter().map(|b| b as u64), false))
    }
}

/// The secondary's blocks from the primary since the last loaded checkpoint.
pub struct BlockCache {
    stage: Option<Overlay>,
    /// Blocks received since the checkpoint's `vmstate-send` (background ones before it do not
    /// count in its `vmstate-size`).
    received: u64,
}

/// What loading a checkpoint did to the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Blocks of the SVM's own writes discarded.
    pub discarded: u64,
    /// Blocks of the primary's written into the image.
    pub applied: u64,
}

impl BlockCache {
    /// An empty cache for `disk` (none without a writable disk).
    pub fn new(disk: Option<&Disk>) -> Result<BlockCache, DiskError> {
        let stage = disk.filter(|d| !d.readonly()).map(|d| d.new_stage()).transpose()?;
        Ok(BlockCache { stage, received: 0 })
    }

    /// Stores the blocks of a blocks record (refusing any outside the disk, or any at all for a
    /// VM without a writable disk).
    pub fn store(&mut self, payload: &[u8]) -> Result<(), StreamError> {
        self.received += stage_blocks(payload, self.stage.as_mut())?;
        Ok(())
    }

    /// The checkpoint's own blocks start now (`vmstate-send`).
    pub fn start_checkpoint(&mut self) {
        self.received = 0;
    }

    /// Blocks received since [`BlockCache::start_checkpoint`].
    pub fn received(&self) -> u64 {
        self.received
    }

    /// A complete checkpoint, the SVM paused: its own writes go, the primary's blocks go into
    /// the image.
    pub fn load<V: Migratable + ?Sized>(&mut self, vm: &V) -> Result<Loaded, DiskError> {
        let Some(disk) = vm.disk() else { return Ok(Loaded::default()) };
        let discarded = disk.discard_writes()?;
        let mut applied = 0;
        if let Some(stage) = self.stage.as_mut() {
            applied = disk.apply(stage)?;
            stage.clear().map_err(|source| DiskError::Io {
                path: disk.path().into(),
                what: "clearing the received blocks",
                source,
            })?;
        }
        self.received = 0;
        Ok(Loaded { discarded, applied })
    }

    /// Failover: a checkpoint in flight is dropped, and the SVM's own writes become its disk's
    /// (written into the image, which it writes directly from now on). Returns how many blocks
    /// it kept.
    pub fn fail_over<V: Migratable + ?Sized>(&mut self, vm: &V) -> Result<u64, DiskError> {
        let Some(disk) = vm.disk() else { return Ok(0) };
        if let Some(stage) = self.stage.as_mut() {
            let _ = stage.clear();
        }
        disk.keep_writes()
    }
}
