//! Saving and restoring a vCPU, in the orders KVM needs (Firecracker's, see
//! shared/notes/rust-vmm.md §5): MP state first and VCPU_EVENTS last when saving; on restore
//! LAPIC after SREGS (APIC base) and before MSRs, TSC_DEADLINE after TSC, events last.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

use super::state::VcpuState;

/// MSRs whose value depends on TSC and must be written after it.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Largest MSR batch per ioctl.
const MSR_CHUNK: usize = 64;

/// Errors saving or restoring vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("vCPU {what}: {error}")]
    Kvm {
        /// Which part of the state.
        what: &'static str,
        /// The error.
        error: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("vCPU MSRs: KVM accepted {set} of {total}, refused {index:#x}")]
    Msrs {
        /// Accepted.
        set: usize,
        /// Given.
        total: usize,
        /// The first refused.
        index: u32,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |error| VcpuStateError::Kvm { what, error }
}

/// The MSRs to save: every MSR KVM lists as saveable that this vCPU can actually read (some,
/// like PMU MSRs, are listed but refused depending on CPUID).
pub fn saveable_msrs(kvm_fd: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VcpuStateError> {
    let list = kvm_fd.get_msr_index_list().map_err(kvm("MSR list"))?;
    Ok(read_msrs(vcpu, list.as_slice())?.into_iter().map(|(i, _)| i).collect())
}

/// Reads the MSRs that can be read; KVM stops at the first it refuses, which is skipped.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut start = 0;
    while start < indices.len() {
        let chunk = &indices[start..(start + MSR_CHUNK).min(indices.len())];
        let entries: Vec<kvm_msr_entry> =
            chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).expect("chunk within FAM limits");
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("reading MSRs"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        start += n;
        if n < chunk.len() {
            start += 1; // the refused one
        }
    }
    Ok(out)
}

fn write_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), VcpuStateError> {
    for chunk in msrs.chunks(MSR_CHUNK) {
        let entries: Vec<kvm_msr_entry> =
            chunk.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let m = Msrs::from_entries(&entries).expect("chunk within FAM limits");
        let n = vcpu.set_msrs(&m).map_err(kvm("writing MSRs"))?;
        if n != chunk.len() {
            return Err(VcpuStateError::Msrs { set: n, total: chunk.len(), index: chunk[n].0 });
        }
    }
    Ok(())
}

/// Lets KVM finish an instruction whose I/O the VMM already completed (a port write or MMIO
/// exit leaves RIP on the instruction until the next KVM_RUN). Without this, a restored guest
/// would execute it again: a console character printed twice, a halt repeated.
pub fn complete_pending_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

/// Saves a vCPU. It must be paused (out of KVM_RUN, its pending I/O completed: a vCPU thread
/// does that as it pauses) and every vCPU paused.
pub fn save(vcpu: &mut VcpuFd, msr_list: &[u32]) -> Result<VcpuState, VcpuStateError> {
    Ok(VcpuState {
        mp_state: vcpu.get_mp_state().map_err(kvm("MP state"))?,
        regs: vcpu.get_regs().map_err(kvm("registers"))?,
        sregs: vcpu.get_sregs().map_err(kvm("special registers"))?,
        xsave: vcpu.get_xsave().map_err(kvm("XSAVE area"))?,
        xcrs: vcpu.get_xcrs().map_err(kvm("XCRs"))?,
        debugregs: vcpu.get_debug_regs().map_err(kvm("debug registers"))?,
        lapic: vcpu.get_lapic().map_err(kvm("local APIC"))?,
        msrs: read_msrs(vcpu, msr_list)?,
        events: vcpu.get_vcpu_events().map_err(kvm("events"))?,
    })
}

/// Restores a vCPU. CPUID must already be set (it is part of creating the vCPU).
pub fn restore(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), VcpuStateError> {
    vcpu.set_mp_state(s.mp_state).map_err(kvm("MP state"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("registers"))?;
    vcpu.set_sregs(&s.sregs).map_err(kvm("special registers"))?;
    // SAFETY: a legacy 4 KiB XSAVE area, read by get_xsave on this kind of host; set_xsave copies
    // exactly that much.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(kvm("XSAVE area"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm("XCRs"))?;
    vcpu.set_debug_regs(&s.debugregs).map_err(kvm("debug registers"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm("local APIC"))?;
    let (deadline, others): (Vec<_>, Vec<_>) = s.msrs.iter().copied().partition(|(i, _)| *i == MSR_IA32_TSC_DEADLINE);
    write_msrs(vcpu, &others)?;
    // A zero deadline would mean "no timer"; re-arming at the current TSC loses no interrupt.
    let tsc = others.iter().find(|(i, _)| *i == MSR_IA32_TSC).map_or(0, |(_, v)| *v);
    let deadline: Vec<_> = deadline.into_iter().map(|(i, v)| (i, if v == 0 { tsc } else { v })).collect();
    write_msrs(vcpu, &deadline)?;
    vcpu.set_vcpu_events(&s.events).map_err(kvm("events"))?;
    // Tell a kvmclock-aware guest it was paused; guests without kvmclock refuse it, harmlessly.
    let _ = vcpu.kvmclock_ctrl();
    Ok(())
}
