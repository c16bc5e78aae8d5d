//! Saving and restoring VM state: the stream format, the state of vCPUs, the VM and devices,
//! and snapshots.

pub mod stream;
