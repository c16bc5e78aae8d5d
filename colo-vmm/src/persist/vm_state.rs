//! The VM-wide KVM state: the guest clock and the in-kernel interrupt controllers (PIC master,
//! PIC slave, IOAPIC).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use super::sections::Sections;
use super::vcpu_state::VcpuStateError;

const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "vm.pic_master"),
    (KVM_IRQCHIP_PIC_SLAVE, "vm.pic_slave"),
    (KVM_IRQCHIP_IOAPIC, "vm.ioapic"),
];

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |error| VcpuStateError::Kvm { what, error }
}

/// Saves the clock and interrupt controllers into `s`.
pub fn save(vm: &VmFd, s: &mut Sections) -> Result<(), VcpuStateError> {
    s.put_pod("vm.clock", &vm.get_clock().map_err(kvm("clock"))?);
    for (chip, name) in CHIPS {
        let mut c = kvm_irqchip { chip_id: chip, ..Default::default() };
        vm.get_irqchip(&mut c).map_err(kvm("interrupt controller"))?;
        s.put_pod(name, &c);
    }
    Ok(())
}

/// Restores them.
pub fn restore(vm: &VmFd, s: &Sections) -> Result<(), VcpuStateError> {
    let mut clock: kvm_clock_data = s.pod("vm.clock")?;
    // GET reports flags (e.g. TSC_STABLE) that SET refuses; keep only what SET accepts.
    clock.flags &= KVM_CLOCK_REALTIME;
    vm.set_clock(&clock).map_err(kvm("clock"))?;
    for (_, name) in CHIPS {
        vm.set_irqchip(&s.pod(name)?).map_err(kvm("interrupt controller"))?;
    }
    Ok(())
}
