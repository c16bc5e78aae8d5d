//! virtio over MMIO: the transport (register layout version 2), the network device and the
//! block device.
//!
//! Our own small driver rather than the virtio-drivers crate: every register access is an MMIO
//! exit (~17 µs on the nested PVM machines), so the driver must touch registers only to set up
//! and to notify — and only when the device's `NO_NOTIFY` hint allows; it must never ask for
//! interrupts (the guest has no IDT), must not negotiate `EVENT_IDX` (the backend has to signal
//! every used buffer: that is what ends the VMM's paravirtual halt), and must keep its rings in
//! memory carved at boot. Owning the ~400 lines that do this is simpler than steering a general
//! driver away from its defaults.

pub mod blk;
pub mod mmio;
pub mod net;
