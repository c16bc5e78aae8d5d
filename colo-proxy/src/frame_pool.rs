//! Recycled frame buffers: a transport that reads frames, holds them in the engine and writes
//! or drops them reuses their buffers instead of asking the allocator for one per frame (at
//! millions of frames a second the allocator's free lists, overflowing, cost more than the
//! compare itself).
//!
//! Buffers are kept by size class (multiples of [`CLASS_STEP`] bytes up to [`MAX_POOLED`]) and
//! a frame only ever gets a buffer of its own class, so a small frame never pins a large
//! buffer: the engine's byte budget counts frame lengths, and with classes a held frame's
//! buffer is at most `CLASS_STEP - 1` bytes larger than the frame. Larger frames are allocated
//! and freed as before. The pool keeps at most [`MAX_BUFFERS`] buffers (under 16 MiB).

/// Granularity of the size classes, in bytes.
pub const CLASS_STEP: usize = 64;

/// Largest buffer kept: a 1500-byte MTU frame with VLAN tag and virtio-net header fits.
pub const MAX_POOLED: usize = 2048;

/// Most buffers kept, all classes together.
pub const MAX_BUFFERS: usize = 8192;

const CLASSES: usize = MAX_POOLED / CLASS_STEP;

/// Free frame buffers by size class.
#[derive(Debug)]
pub struct FramePool {
    /// `free[k]` holds empty buffers of capacity `(k + 1) * CLASS_STEP`.
    free: Vec<Vec<Vec<u8>>>,
    kept: usize,
}

impl Default for FramePool {
    fn default() -> Self {
        Self::new()
    }
}

/// The class of a buffer for `len` bytes, if such buffers are pooled.
fn class_of(len: usize) -> Option<usize> {
    (len <= MAX_POOLED).then(|| len.max(1).div_ceil(CLASS_STEP) - 1)
}

impl FramePool {
    /// An empty pool.
    pub fn new() -> FramePool {
        FramePool { free: (0..CLASSES).map(|_| Vec::new()).collect(), kept: 0 }
    }

    /// A buffer holding a copy of `bytes`: a recycled one of its class if there is one.
    pub fn copy_of(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut buf = match class_of(bytes.len()) {
            Some(k) => match self.free[k].pop() {
                Some(b) => {
                    self.kept -= 1;
                    b
                }
                None => Vec::with_capacity((k + 1) * CLASS_STEP),
            },
            None => Vec::with_capacity(bytes.len()),
        };
        buf.extend_from_slice(bytes);
        buf
    }

    /// Takes back a buffer that is no longer needed. Kept if it is exactly of a class (as the
    /// pool's own buffers are) and the pool is not full; freed otherwise.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        let cap = buf.capacity();
        if self.kept >= MAX_BUFFERS || cap == 0 || !cap.is_multiple_of(CLASS_STEP) {
            return;
        }
        let Some(k) = class_of(cap) else { return };
        buf.clear();
        self.free[k].push(buf);
        self.kept += 1;
    }

    /// Buffers kept for reuse.
    pub fn kept(&self) -> usize {
        self.kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recycled_buffer_is_reused_for_a_frame_of_its_class() {
        let mut pool = FramePool::new();
        let a = pool.copy_of(&[1; 60]);
        assert_eq!(a, vec![1; 60]);
        assert_eq!(a.capacity(), 64);
        let ptr = a.as_ptr();
        pool.recycle(a);
        assert_eq!(pool.kept(), 1);
        let b = pool.copy_of(&[2; 64]);
        assert_eq!(b.as_ptr(), ptr, "the same allocation came back");
        assert_eq!(b, vec![2; 64]);
        assert_eq!(pool.kept(), 0);
    }

    #[test]
    fn a_small_frame_never_gets_a_large_buffer() {
        let mut pool = FramePool::new();
        let big = pool.copy_of(&[0; 1500]);
        assert_eq!(big.capacity(), 1536);
        pool.recycle(big);
        let small = pool.copy_of(&[0; 64]);
        assert_eq!(small.capacity(), 64);
        assert_eq!(pool.kept(), 1, "the 1536-byte buffer waits for a frame of its size");
    }

    #[test]
    fn oversized_and_foreign_buffers_are_freed_not_kept() {
        let mut pool = FramePool::new();
        let jumbo = pool.copy_of(&[0; 9000]);
        assert_eq!(jumbo.len(), 9000);
        pool.recycle(jumbo);
        pool.recycle(vec![0; 100]);
        pool.recycle(Vec::new());
        assert_eq!(pool.kept(), 0);
    }

    #[test]
    fn the_pool_is_bounded() {
        let mut pool = FramePool::new();
        for _ in 0..MAX_BUFFERS + 10 {
            pool.recycle(Vec::with_capacity(128));
        }
        assert_eq!(pool.kept(), MAX_BUFFERS);
    }
}
