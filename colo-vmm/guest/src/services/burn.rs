//! The CPU burner (the seed demo's `md5sum /dev/zero`): hashes a block over and over.
//!
//! Each vCPU has its own burner and runs it in slices between looks at the shared tasks, and a
//! slice ends early when a frame arrives, so the services stay responsive while every vCPU
//! stays busy.

use smoltcp::time::Duration;

use crate::time;

/// Longest slice between two network polls.
pub const SLICE: Duration = Duration::from_micros(1000);
/// Rounds between two looks at the clock and the network.
const ROUNDS_PER_CHECK: u32 = 64;

/// The burner's state: a 64-byte block, mixed once per iteration.
pub struct Burn {
    block: [u64; 8],
    iterations: u64,
}

impl Burn {
    /// A burner with a fixed starting block.
    pub fn new() -> Burn {
        Burn { block: [0x6a09_e667_f3bc_c908, 0xbb67_ae85_84ca_a73b, 1, 2, 3, 4, 5, 6], iterations: 0 }
    }

    /// Iterations since boot.
    pub fn iterations(&self) -> u64 {
        self.iterations
    }

    /// Burns for up to [`SLICE`], or until `interrupted` says there is work.
    pub fn run(&mut self, mut interrupted: impl FnMut() -> bool) {
        let end = time::rdtsc().saturating_add(time::ticks_in(SLICE));
        loop {
            for _ in 0..ROUNDS_PER_CHECK {
                self.round();
            }
            self.iterations += u64::from(ROUNDS_PER_CHECK);
            if time::rdtsc() >= end || interrupted() {
                return;
            }
        }
    }

    /// One iteration: an ARX mix of the whole block (in the spirit of a hash compression
    /// function; the result only has to be impossible to skip).
    fn round(&mut self) {
        let b = &mut self.block;
        for i in 0..8 {
            let next = b[(i + 1) % 8];
            b[i] = (b[i] ^ next).rotate_left(23).wrapping_add(next).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        core::hint::black_box(&mut self.block);
    }
}
