//! The VM's KVM state: guest memory, the VM file descriptor, the vCPUs.

pub mod dirty;
pub mod memory;
pub mod vcpu;
pub mod vm;
