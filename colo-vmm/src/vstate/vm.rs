//! The KVM VM: created from /dev/kvm with its guest memory in slot 0 and an in-kernel
//! interrupt controller (for the interrupt path devices may use later).

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};

use super::memory::GuestRam;

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (colo-vmm needs KVM; is the kvm module loaded and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    /// /dev/kvm is there but does not answer like KVM.
    #[error("/dev/kvm does not behave like KVM ({0}); colo-vmm needs KVM")]
    NotKvm(String),
    /// A KVM ioctl failed.
    #[error("{what}: {error}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The error.
        error: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |error| VmError::Kvm { what, error }
}

/// The VM and its memory slot.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

/// Slot of guest RAM.
pub const RAM_SLOT: u32 = 0;
/// Where KVM may put the TSS it needs for real mode (unused by us, required on Intel).
const TSS_ADDRESS: usize = 0xfffb_d000;

impl Vm {
    /// Opens KVM and creates a VM with `ram` in slot 0.
    pub fn new(ram: &GuestRam) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        // Opening succeeds on anything at that path; the API version says whether it is KVM.
        match kvm.get_api_version() {
            12 => {}
            v if v < 0 => return Err(VmError::NotKvm(std::io::Error::from_raw_os_error(-v).to_string())),
            v => return Err(VmError::NotKvm(format!("API version {v}, expected 12"))),
        }
        let fd = kvm.create_vm().map_err(kvm_err("creating the VM"))?;
        fd.set_tss_address(TSS_ADDRESS).map_err(kvm_err("setting the TSS address"))?;
        fd.create_irq_chip().map_err(kvm_err("creating the interrupt controller"))?;
        let vm = Vm { kvm, fd };
        vm.set_ram(ram, false)?;
        Ok(vm)
    }

    /// (Re-)registers RAM, with or without KVM's dirty-page logging.
    pub fn set_ram(&self, ram: &GuestRam, log_dirty: bool) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot: RAM_SLOT,
            flags: if log_dirty { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_base(),
        };
        // SAFETY: the mapping at `userspace_addr` lives as long as `ram`, which the VMM keeps
        // for the VM's lifetime.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(kvm_err("registering guest memory"))
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM handle.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// TSC frequency in kHz (from a temporary vCPU if needed).
    pub fn tsc_khz(&self, vcpu: &kvm_ioctls::VcpuFd) -> u64 {
        vcpu.get_tsc_khz().map(u64::from).unwrap_or(0)
    }
}
