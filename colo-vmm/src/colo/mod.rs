//! COLO (docs/colo.md): the primary's checkpoint controller with hybrid mode, the secondary's
//! RAM cache and checkpoint loading (and the disk's blocks beside the pages), the checkpoint
//! link with its heartbeat, and failover.

pub mod blocks;
pub mod cache;
pub mod compare;
pub mod histograms;
pub mod hybrid;
pub mod link;
pub mod message;
pub mod params;
pub mod primary;
pub mod secondary;
pub mod serving;
pub mod shared;
pub mod status;
pub mod takeover;
#[cfg(test)]
pub(crate) mod testing;
