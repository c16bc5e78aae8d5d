//! CPUID for the guest: what KVM supports, with this vCPU's APIC id.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// The supported CPUID with leaf 1 (and leaf 0xb) reporting `apic_id`.
pub fn for_vcpu(kvm: &Kvm, apic_id: u8) -> Result<CpuId, kvm_ioctls::Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(apic_id) << 24);
            }
            0xb => {
                e.edx = u32::from(apic_id);
            }
            _ => {}
        }
    }
    Ok(cpuid)
}
