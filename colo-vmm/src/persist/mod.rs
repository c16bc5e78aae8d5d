//! Saving and restoring VM state: the stream format and its control messages, the typed
//! machine state (vCPUs, VM, devices), and snapshots.

pub mod message;
pub mod snapshot;
pub mod state;
pub mod stream;
pub mod vcpu_state;
pub mod vm_state;
