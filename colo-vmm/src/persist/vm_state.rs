//! The VM-wide KVM state: the guest clock and the in-kernel interrupt controllers (PIC master,
//! PIC slave, IOAPIC).

use kvm_bindings::{
    kvm_irqchip, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use super::state::VmState;
use super::vcpu_state::VcpuStateError;

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |error| VcpuStateError::Kvm { what, error }
}

fn chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VcpuStateError> {
    let mut c = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut c).map_err(kvm("interrupt controller"))?;
    Ok(c)
}

/// Saves the clock and interrupt controllers.
pub fn save(vm: &VmFd) -> Result<VmState, VcpuStateError> {
    Ok(VmState {
        clock: vm.get_clock().map_err(kvm("clock"))?,
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
    })
}

/// Restores them.
pub fn restore(vm: &VmFd, s: &VmState) -> Result<(), VcpuStateError> {
    let mut clock = s.clock;
    // GET reports flags (e.g. TSC_STABLE) that SET refuses; keep only what SET accepts.
    clock.flags &= KVM_CLOCK_REALTIME;
    vm.set_clock(&clock).map_err(kvm("clock"))?;
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(c).map_err(kvm("interrupt controller"))?;
    }
    Ok(())
}
