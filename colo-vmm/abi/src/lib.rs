//! The contract between colo-vmm and the guests it boots: where things are in guest memory,
//! what the VMM hands the guest at entry, and which I/O ports do what.
//!
//! `no_std` and dependency-free, so the VMM and the reference guest (a `no_std` unikernel built
//! as its own workspace) compile the very same definitions.
//!
//! # Entry state
//! The guest starts in 64-bit long mode **at CPL3**: KVM on the development machines is nested
//! PVM, where only user-mode guest code runs at native speed. The VMM builds:
//! - identity page tables for the first 4 GiB (2 MiB pages, user-accessible; the MMIO window
//!   uncached), at [`PAGE_TABLES`];
//! - a GDT with Linux's selector layout (user data 0x2b, 64-bit user code 0x33) and a TSS whose
//!   I/O permission bitmap allows ports below 0x800, at [`GDT`] (port I/O at CPL3 is allowed by
//!   the bitmap; RFLAGS also has IOPL=3, but PVM does not keep it);
//! - RFLAGS with interrupts disabled;
//! - CR4.OSFXSR/OSXMMEXCPT (SSE usable);
//! - RSP = [`STACK_TOP`], RDI = address of the [`BootInfo`] block ([`BOOT_INFO`]), RSI = 0,
//!   RIP = the ELF entry point.
//!
//! # More vCPUs
//! With `--cpus N`, every vCPU starts at once, in the same state, at the same entry point. The
//! boot vCPU has RSI = 0 and the stack above; each other vCPU has RSI = its index (1 to N-1)
//! and **no stack** (RSP = 0): its entry code must find one the boot vCPU set up for it (the
//! reference guest's APs halt-poll a table) before it calls anything. [`BootInfo::cpus`] says
//! how many there are. vCPUs share nothing but memory; each halts on its own, and a device's
//! signal wakes one halted vCPU.
//!
//! There is no IDT: an exception ends the guest (the VMM reports a triple fault with the
//! registers). The guest does not use interrupts; it waits with the paravirtual halt.

#![no_std]

/// Guest-physical address of the GDT (and the TSS right after it).
pub const GDT: u64 = 0x1000;
/// Guest-physical address of the 64-bit TSS and its I/O permission bitmap.
pub const TSS: u64 = 0x1100;
/// Guest-physical address of the boot-info block handed to the guest in RDI.
pub const BOOT_INFO: u64 = 0x2000;
/// Guest-physical address where the command line is copied (NUL-terminated).
pub const CMDLINE: u64 = 0x3000;
/// Most bytes of command line, NUL included.
pub const CMDLINE_MAX: usize = 4096;
/// Guest-physical address of the page tables (PML4, one PDPT, four PDs).
pub const PAGE_TABLES: u64 = 0x9000;
/// Lowest address of the initial stack.
pub const STACK_BOTTOM: u64 = 0x10_0000;
/// Initial stack pointer (the stack grows down to [`STACK_BOTTOM`]).
pub const STACK_TOP: u64 = 0x20_0000;
/// Where guest images are linked and loaded (2 MiB).
pub const IMAGE_BASE: u64 = 0x20_0000;
/// Smallest guest memory the VMM accepts.
pub const MIN_MEM: u64 = 16 << 20;
/// Base of the MMIO window where virtio-mmio devices live (3.25 GiB, above any RAM we map).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio device's register window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Most guest RAM: RAM must stay below the MMIO window.
pub const MAX_MEM: u64 = MMIO_BASE;

/// GDT selectors (RPL included for the user ones), Linux's layout.
pub mod selector {
    /// 64-bit code, DPL 0 (unused by guests; present for completeness).
    pub const KERNEL_CODE: u16 = 0x08;
    /// Data, DPL 0.
    pub const KERNEL_DATA: u16 = 0x10;
    /// 32-bit code, DPL 3 (unused).
    pub const USER32_CODE: u16 = 0x23;
    /// Data, DPL 3 (SS, DS, ES, FS, GS), RPL 3.
    pub const USER_DATA: u16 = 0x2b;
    /// 64-bit code, DPL 3, RPL 3.
    pub const USER_CODE: u16 = 0x33;
    /// The TSS (a 16-byte descriptor).
    pub const TSS: u16 = 0x40;
}

/// I/O ports.
pub mod port {
    /// COM1: a 16550 UART, the console (eight ports from here).
    pub const SERIAL: u16 = 0x3f8;
    /// Paravirtual halt: `out` a u32 = the longest wait in microseconds ([`super::HALT_FOREVER`]
    /// for no limit). The vCPU sleeps until a device has news for the guest (a virtqueue's call
    /// eventfd fires), the time passes, or the VMM needs the vCPU. The guest then re-checks its
    /// devices; a wakeup says nothing about why.
    pub const HALT: u16 = 0x510;
    /// Exit: `out` a u32 = the exit code; the VMM process exits with it (low 8 bits).
    pub const EXIT: u16 = 0x514;
}

/// [`port::HALT`] value for "no time limit".
pub const HALT_FOREVER: u32 = u32::MAX;

/// Magic value of [`BootInfo::magic`]: "COLOBOOT" little-endian.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"COLOBOOT");
/// Version of the [`BootInfo`] layout (2: [`BootInfo::cpus`]).
pub const BOOT_VERSION: u32 = 2;
/// Most vCPUs a VM may have.
pub const MAX_CPUS: usize = 8;
/// Most virtio-mmio devices described in [`BootInfo`].
pub const MAX_VIRTIO_DEVICES: usize = 4;

/// A virtio-mmio device's register window.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest-physical address of the registers.
    pub base: u64,
    /// Size of the register window.
    pub size: u64,
    /// Interrupt line (GSI) the device would raise; guests that poll ignore it.
    pub irq: u32,
    /// Padding.
    pub reserved: u32,
}

/// What the VMM tells the guest at entry; its address is in RDI.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`BOOT_VERSION`].
    pub version: u32,
    /// `size_of::<BootInfo>()` as the VMM knows it.
    pub size: u32,
    /// Bytes of RAM, from guest-physical address 0.
    pub mem_size: u64,
    /// First free byte after the loaded image (page-aligned): the guest may use
    /// `[free_start, free_end)` as it likes (heap, DMA buffers).
    pub free_start: u64,
    /// End of usable RAM.
    pub free_end: u64,
    /// TSC frequency in kHz (RDTSC works at CPL3).
    pub tsc_khz: u64,
    /// Guest-physical address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Length of the command line without the NUL.
    pub cmdline_len: u64,
    /// Number of valid entries in `virtio`.
    pub virtio_count: u32,
    /// Padding.
    pub reserved: u32,
    /// The virtio-mmio devices.
    pub virtio: [VirtioMmioDevice; MAX_VIRTIO_DEVICES],
    /// Number of vCPUs, 1 to [`MAX_CPUS`] (version 2).
    pub cpus: u32,
    /// Padding.
    pub reserved2: u32,
}

impl BootInfo {
    /// Whether the magic and version are the ones this build knows.
    pub fn is_valid(&self) -> bool {
        self.magic == BOOT_MAGIC && self.version == BOOT_VERSION
    }

    /// The command line as bytes, if it lies inside `mem`.
    pub fn cmdline<'a>(&self, mem: &'a [u8]) -> Option<&'a [u8]> {
        let start = usize::try_from(self.cmdline_addr).ok()?;
        let len = usize::try_from(self.cmdline_len).ok()?;
        mem.get(start..start.checked_add(len)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_stable() {
        assert_eq!(core::mem::size_of::<VirtioMmioDevice>(), 24);
        assert_eq!(core::mem::size_of::<BootInfo>(), 8 + 4 + 4 + 8 * 6 + 4 + 4 + 24 * MAX_VIRTIO_DEVICES + 8);
        assert_eq!(&BOOT_MAGIC.to_le_bytes(), b"COLOBOOT");
    }

    #[test]
    fn regions_do_not_overlap() {
        let regions = [
            (GDT, 0x1000),
            (BOOT_INFO, 0x1000),
            (CMDLINE, CMDLINE_MAX as u64),
            (PAGE_TABLES, 6 * 0x1000),
            (STACK_BOTTOM, STACK_TOP - STACK_BOTTOM),
        ];
        for (i, a) in regions.iter().enumerate() {
            for b in &regions[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
        const { assert!(TSS > GDT && TSS + 0x68 <= GDT + 0x1000) };
        const { assert!(STACK_TOP == IMAGE_BASE) };
    }
}
