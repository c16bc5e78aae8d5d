//! Giving up the vCPU: the paravirtual halt (wait for a device or a deadline) and the exit port.

use smoltcp::time::Duration;

use colo_vmm_abi::{port, HALT_FOREVER};

use crate::port::outl;

/// Sleeps until a device signals (a virtqueue has used buffers), `timeout` passes (`None`: no
/// limit), or the VMM wants the vCPU. The caller re-checks everything afterwards: a wakeup
/// says nothing about why.
pub fn halt(timeout: Option<Duration>) {
    let micros = match timeout {
        // HALT_FOREVER is u32::MAX, so anything longer than ~71 minutes means "no limit" —
        // harmless, the caller re-checks its deadlines after every wakeup.
        Some(timeout) => u32::try_from(timeout.total_micros()).unwrap_or(HALT_FOREVER),
        None => HALT_FOREVER,
    };
    outl(port::HALT, micros);
}

/// Ends the guest: the VMM exits with `code` (its low 8 bits).
pub fn exit(code: u32) -> ! {
    outl(port::EXIT, code);
    // A VMM that does not exit at once gets an idle guest, not a spinning one.
    loop {
        outl(port::HALT, HALT_FOREVER);
    }
}

/// Prints `colo-guest: fatal: <args>` and exits with code 1.
pub fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    status!("fatal: {args}");
    exit(1)
}
