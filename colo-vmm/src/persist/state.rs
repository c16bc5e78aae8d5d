//! The machine's state as one typed value: every vCPU, the VM (clock, interrupt controllers)
//! and the devices, saved together at a pause and restored together. KVM's structures travel
//! as kvm-bindings serializes them (their bytes); ours as their fields. A state record of the
//! stream holds one [`StateRecord`] in CBOR (ciborium): self-describing like JSON, so a minor
//! version can add a field with a default, but with KVM's structures as byte strings (JSON
//! spells every byte as a number, 16 KB and 20 ms per checkpoint in a debug build; CBOR 8 KB
//! and 0.1 ms). Which records a reader accepts is decided once, by the stream's version (see
//! `stream::Version`).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use super::snapshot::Meta;
use super::stream::StreamError;
use crate::devices::DevicesState;

/// One vCPU.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct VcpuState {
    /// KVM_GET_MP_STATE.
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU and extended state (legacy 4 KiB area).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Every saveable MSR: (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Pending events (saved last, restored last).
    pub events: kvm_vcpu_events,
}

/// The VM-wide KVM state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct VmState {
    /// The guest clock.
    pub clock: kvm_clock_data,
    /// The master PIC.
    pub pic_master: kvm_irqchip,
    /// The slave PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
}

/// The whole machine at a pause.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct MachineState {
    /// Each vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The VM.
    pub vm: VmState,
    /// The console, the virtio transports and their rings' positions.
    pub devices: DevicesState,
}

/// What a state record of the stream holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StateRecord {
    /// First in a snapshot or transfer: what kind of machine follows.
    Machine(Meta),
    /// The machine's state at the pause; in verify mode (a test mode) also the digest of every
    /// page and every disk block at that moment.
    Paused {
        /// The state.
        state: Box<MachineState>,
        /// Verify mode: one digest per page, in address order.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        page_digests: Option<Vec<u64>>,
        /// Verify mode, a VM with a disk: one digest per disk block, in order (stream 2.1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        block_digests: Option<Vec<u64>>,
    },
}

impl StateRecord {
    /// The record's payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).expect("state records serialize");
        out
    }

    /// Reads a payload.
    pub fn decode(payload: &[u8]) -> Result<StateRecord, StreamError> {
        ciborium::from_reader(payload).map_err(|e| StreamError::Corrupt(format!("state record: {e}")))
    }

    /// A paused machine's state (and page digests), or an error naming what came instead.
    pub fn into_paused(self) -> Result<(MachineState, Option<Vec<u64>>), StreamError> {
        self.into_parts().map(|(state, pages, _)| (state, pages))
    }

    /// A paused machine's state, page digests and block digests, or an error naming what came
    /// instead.
    #[allow(clippy::type_complexity)]
    pub fn into_parts(self) -> Result<(MachineState, Option<Vec<u64>>, Option<Vec<u64>>), StreamError> {
        match self {
            StateRecord::Paused { state, page_digests, block_digests } => Ok((*state, page_digests, block_digests)),
            StateRecord::Machine(_) => {
                Err(StreamError::Corrupt("a second machine description instead of the state".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_state_round_trips_through_its_record() {
        let mut s = MachineState { vcpus: vec![VcpuState::default()], ..Default::default() };
        s.vcpus[0].regs.rip = 0x1234;
        s.vcpus[0].xsave.region[7] = 0xdead_beef;
        s.vcpus[0].msrs = vec![(0x10, 99)];
        s.vm.ioapic.chip_id = 2;
        s.devices.serial.registers[3] = 1;
        let rec =
            StateRecord::Paused { state: Box::new(s), page_digests: Some(vec![1, 2]), block_digests: Some(vec![3]) };
        let back = StateRecord::decode(&rec.encode()).unwrap();
        let (b, d, blocks) = back.into_parts().unwrap();
        assert_eq!(blocks, Some(vec![3]));
        assert_eq!(b.vcpus[0].regs.rip, 0x1234);
        assert_eq!(b.vcpus[0].xsave.region[7], 0xdead_beef);
        assert_eq!(b.vcpus[0].msrs, vec![(0x10, 99)]);
        assert_eq!(b.vm.ioapic.chip_id, 2);
        assert_eq!(b.devices.serial.registers[3], 1);
        assert_eq!(d, Some(vec![1, 2]));
        let mut partial = Vec::new();
        ciborium::into_writer(&serde_json::json!({"paused": {"state": {}}}), &mut partial).unwrap();
        assert!(StateRecord::decode(&partial).is_err(), "a state without its parts is refused");
        assert!(StateRecord::decode(b"junk").is_err());
    }
}
