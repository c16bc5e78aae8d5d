//! x86 port I/O, allowed at CPL3 because the VMM starts the guest with IOPL = 3.
//!
//! Every access is a VM exit (~18 µs on the nested PVM machines), so callers keep them rare.
//! The ports the guest uses (console, halt, exit) cannot touch memory, so these are safe.

use core::arch::asm;

/// Writes a byte to `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; IOPL = 3 makes it legal at CPL3.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

/// Reads a byte from `port`.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Writes a 32-bit value to `port`.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) };
}
