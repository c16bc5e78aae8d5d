//! The initial vCPU registers: long mode, CPL3, IOPL 3, interrupts off, SSE on.

use colo_vmm_abi::{selector, BOOT_INFO, PAGE_TABLES, STACK_TOP};
use kvm_bindings::{kvm_fpu, kvm_mp_state, kvm_regs, kvm_sregs, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;

use super::gdt;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS: bit 1 is always set; IOPL = 3 lets CPL3 code use `in`/`out`.
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

/// General-purpose registers at entry of vCPU `index`: RIP = entry, RDI = boot info, RSI =
/// the index; the boot vCPU (0) has RSP = stack top, the others no stack (see colo_vmm_abi).
pub fn initial_regs(entry: u64, index: u64) -> kvm_regs {
    let stack = if index == 0 { STACK_TOP } else { 0 };
    kvm_regs {
        rip: entry,
        rsp: stack,
        rbp: stack,
        rdi: BOOT_INFO,
        rsi: index,
        rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
        ..Default::default()
    }
}

/// Applies long mode at CPL3 to `sregs` (read from the vCPU first, to keep the APIC base and
/// what else KVM put there).
pub fn apply_long_mode_user(sregs: &mut kvm_sregs) {
    sregs.gdt.base = gdt::base();
    sregs.gdt.limit = gdt::limit();
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = gdt::segment(selector::USER_CODE);
    let data = gdt::segment(selector::USER_DATA);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::tss_segment();
    sregs.ldt.unusable = 1;
    sregs.cr3 = PAGE_TABLES;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// x87 and SSE control words as after FNINIT / reset.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// Puts vCPU `index` in the entry state. Every vCPU starts running at once: KVM leaves the
/// others waiting for a startup IPI, which a CPL3 guest cannot send.
pub fn setup(vcpu: &VcpuFd, entry: u64, index: u64) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    apply_long_mode_user(&mut sregs);

    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&initial_regs(entry, index))?;
    vcpu.set_fpu(&initial_fpu())?;
    if index != 0 {
        vcpu.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_state_is_user_long_mode() {
        let mut s = kvm_sregs::default();
        apply_long_mode_user(&mut s);
        assert_eq!(s.cs.dpl, 3);
        assert_eq!(s.ss.dpl, 3);
        assert_eq!(s.cs.l, 1);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_ne!(s.cr0 & CR0_PG, 0);
        let r = initial_regs(0x20_1000, 0);
        assert_eq!(r.rflags & RFLAGS_IOPL3, RFLAGS_IOPL3);
        assert_eq!(r.rflags & (1 << 9), 0, "interrupts off");
        assert_eq!((r.rdi, r.rsi, r.rsp), (BOOT_INFO, 0, STACK_TOP));
        let ap = initial_regs(0x20_1000, 3);
        assert_eq!((ap.rip, ap.rdi, ap.rsi, ap.rsp), (0x20_1000, BOOT_INFO, 3, 0), "an AP has no stack");
    }
}
