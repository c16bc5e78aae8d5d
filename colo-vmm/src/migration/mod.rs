//! Live migration: pre-copy of guest RAM while the VM runs, then a short pause for the last
//! dirty pages and the device state, then a handover of the vhost-user backends.
//!
//! ```text
//! source                                         destination (colo-vmm run --incoming URI)
//!   State{machine}, Pages (all), Pages (round 1..n) ▶ loads pages into fresh memory
//!   pause; quiesce rings; last dirty pages;
//!   State{vCPU, VM, devices}, StateComplete     ─▶  verifies the page count
//!                                             ◀─    Ready (or Error)
//!   releases its backends; Go                  ─▶  attaches the backends, restores, starts
//!                                             ◀─    Running
//!   exits
//! ```
//! Before `Go`, any failure (a broken stream, a destination that dies or refuses) leaves the
//! source running its VM as if nothing happened; the destination never starts a VM it has not
//! received completely.

pub mod destination;
pub mod protocol;
pub mod source;
pub mod status;
pub mod uri;
