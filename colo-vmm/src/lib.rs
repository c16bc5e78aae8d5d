//! colo-vmm: a minimal KVM VMM for COLO.
//!
//! One process per VM. Guest RAM is a memfd shared with the vhost-user backend; the guest is a
//! CPL3 long-mode image (the reference guest by default, see `colo_vmm_abi`); devices are a
//! 16550 console, a paravirtual halt and exit port, and virtio-net over virtio-mmio whose data
//! path is a vhost-user backend. A JSON control API (QMP-shaped) drives it.
//!
//! Modules follow Firecracker's split: [`arch`] (x86-64 boot state), [`vstate`] (memory, VM,
//! vCPU), [`devices`], [`loader`], [`persist`] (the state stream and the typed machine state),
//! and [`vmm`] which ties them into a running VM. The orchestrators — [`migration`], [`colo`]
//! and the snapshot — drive that VM only through [`migratable`]'s traits; [`api`] sits above
//! them all and dispatches the control API's commands; [`metrics`] shows the COLO status to
//! Prometheus.

pub mod api;
pub mod arbiter;
pub mod arch;
pub mod colo;
pub mod devices;
pub mod loader;
pub mod metrics;
pub mod migratable;
pub mod migration;
pub mod panic_guard;
pub mod persist;
pub mod unix_socket;
pub mod vmm;
pub mod vstate;
