//! The hardware-free parts of colo-guest, colo-vmm's reference guest.
//!
//! Everything here is plain logic over memory — the command line, the line and HTTP protocols,
//! the statistics page, the split virtqueue's ring bookkeeping — so it builds for the host and
//! `cargo test` runs it with std. The unikernel itself (`src/main.rs`: entry, port I/O, the
//! MMIO transport, smoltcp glue, the services' socket handling) builds on these.

#![no_std]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod cmdline;
pub mod fmt;
pub mod kvlog;
pub mod proto;
pub mod stats;
pub mod virtqueue;
