//! The GDT and the TSS.
//!
//! The layout is Linux's (kernel code 0x08, kernel data 0x10, 32-bit user code 0x23, user data
//! 0x2b, 64-bit user code 0x33, TSS 0x40): on PVM the guest's user mode runs in the host's ring 3
//! with the host's user selectors, and PVM checks the guest's against them (MSR_STAR).
//!
//! The TSS carries an I/O permission bitmap that allows every port below [`IO_BITMAP_PORTS`].
//! PVM traps a CPL3 `in`/`out` as #GP and emulates it; it does not keep the guest's IOPL across
//! exits (RFLAGS is refreshed from the hardware, which runs with IOPL 0), so the emulator's
//! permission check falls back to this bitmap, exactly as a CPU does when CPL > IOPL.

use colo_vmm_abi::{selector, GDT, TSS};
use kvm_bindings::kvm_segment;

/// Size of the 64-bit TSS proper: 104 bytes; the I/O bitmap follows it.
pub const TSS_SIZE: u64 = 0x68;
/// Ports below this are allowed to CPL3 code by the TSS I/O bitmap.
pub const IO_BITMAP_PORTS: u64 = 0x800;
/// The TSS with its I/O bitmap and the bitmap's terminating byte.
pub const TSS_TOTAL: u64 = TSS_SIZE + IO_BITMAP_PORTS / 8 + 1;

/// A GDT descriptor for a code or data segment: base 0, limit 4 GiB (ignored in long mode).
const fn descriptor(access: u8, flags: u8) -> u64 {
    let limit_low = 0xffffu64;
    let limit_high = 0xfu64;
    limit_low | ((access as u64) << 40) | (limit_high << 48) | (((flags as u64) & 0xf) << 52)
}

/// Access byte bits.
const PRESENT: u8 = 0x80;
const DPL3: u8 = 0x60;
const CODE_DATA: u8 = 0x10; // S: code or data (not system)
const EXEC: u8 = 0x08;
const RW: u8 = 0x02;
const ACCESSED: u8 = 0x01;
/// Flags nibble: G (4 KiB granularity), L (64-bit code), DB (32-bit default size).
const G: u8 = 0x8;
const L: u8 = 0x2;
const DB: u8 = 0x4;

/// The GDT entries, indexed by selector / 8. Entries 8 and 9 are the 16-byte TSS descriptor.
pub fn entries() -> [u64; 10] {
    let tss_low = {
        let base = TSS;
        let limit = TSS_TOTAL - 1;
        (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89u64 << 40) // present, type 9: available 64-bit TSS
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56)
    };
    let tss_high = TSS >> 32;
    [
        0,
        descriptor(PRESENT | CODE_DATA | EXEC | RW | ACCESSED, G | L),
        descriptor(PRESENT | CODE_DATA | RW | ACCESSED, G | DB),
        0,
        descriptor(PRESENT | DPL3 | CODE_DATA | EXEC | RW | ACCESSED, G | DB),
        descriptor(PRESENT | DPL3 | CODE_DATA | RW | ACCESSED, G | DB),
        descriptor(PRESENT | DPL3 | CODE_DATA | EXEC | RW | ACCESSED, G | L),
        0,
        tss_low,
        tss_high,
    ]
}

/// The TSS as bytes, to be written at [`TSS`]: no stacks (the guest never changes privilege),
/// the I/O bitmap right after the TSS, all zero (allowed), then the terminating 0xff byte.
pub fn tss_bytes() -> Vec<u8> {
    let mut t = vec![0u8; TSS_TOTAL as usize];
    t[0x66..0x68].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    t[TSS_TOTAL as usize - 1] = 0xff;
    t
}

/// The GDT as bytes, to be written at [`GDT`].
pub fn bytes() -> Vec<u8> {
    entries().iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// The GDT limit for GDTR.
pub fn limit() -> u16 {
    (entries().len() * 8 - 1) as u16
}

/// The base address of the GDT.
pub fn base() -> u64 {
    GDT
}

/// The `kvm_segment` for a selector, decoded from its descriptor (what the CPU would cache).
pub fn segment(sel: u16) -> kvm_segment {
    let e = entries()[usize::from(sel >> 3)];
    let access = ((e >> 40) & 0xff) as u8;
    let flags = ((e >> 52) & 0xf) as u8;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_: access & 0xf,
        present: (access >> 7) & 1,
        dpl: (access >> 5) & 3,
        db: (flags >> 2) & 1,
        s: (access >> 4) & 1,
        l: (flags >> 1) & 1,
        g: (flags >> 3) & 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The task register's segment: the busy 64-bit TSS.
pub fn tss_segment() -> kvm_segment {
    kvm_segment {
        base: TSS,
        limit: (TSS_TOTAL - 1) as u32,
        selector: selector::TSS,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_segments_are_dpl3_and_long_mode_code() {
        let cs = segment(selector::USER_CODE);
        assert_eq!((cs.dpl, cs.l, cs.s, cs.present, cs.db), (3, 1, 1, 1, 0));
        assert_eq!(cs.type_ & 0x8, 0x8, "executable");
        let ss = segment(selector::USER_DATA);
        assert_eq!((ss.dpl, ss.l, ss.db, ss.type_), (3, 0, 1, 0x3));
        assert_eq!(ss.selector & 3, 3, "RPL 3");
    }

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let e = entries();
        let low = e[usize::from(selector::TSS >> 3)];
        assert_eq!(low & 0xffff, TSS_TOTAL - 1);
        assert_eq!((low >> 16) & 0xff_ffff, TSS & 0xff_ffff);
        assert_eq!((low >> 40) & 0xff, 0x89);
        assert_eq!(bytes().len(), 80);
        assert_eq!(limit(), 79);
    }

    #[test]
    fn io_bitmap_allows_the_abi_ports() {
        let t = tss_bytes();
        let base = usize::from(u16::from_le_bytes([t[0x66], t[0x67]]));
        for port in [colo_vmm_abi::port::SERIAL, colo_vmm_abi::port::HALT, colo_vmm_abi::port::EXIT] {
            let byte = base + usize::from(port) / 8;
            assert!(byte < t.len() - 1, "port {port:#x} is inside the bitmap");
            assert_eq!(t[byte] & (1 << (port % 8)), 0, "port {port:#x} allowed");
        }
        assert_eq!(*t.last().unwrap(), 0xff);
        const { assert!(TSS + TSS_TOTAL <= colo_vmm_abi::BOOT_INFO, "the TSS fits before the boot info") };
    }

    #[test]
    fn selectors_follow_the_linux_layout() {
        assert_eq!((selector::USER_DATA, selector::USER_CODE), (0x2b, 0x33));
        assert_eq!(segment(0x23).l, 0, "0x23 is 32-bit user code, as in Linux");
    }
}
