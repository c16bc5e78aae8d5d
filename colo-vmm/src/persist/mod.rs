//! Saving and restoring VM state: the stream format, named sections, the state of vCPUs, the
//! VM and devices, and snapshots.

pub mod message;
pub mod sections;
pub mod snapshot;
pub mod stream;
pub mod vcpu_state;
pub mod vm_state;
