//! A state record (the machine's vCPUs, VM and devices at a pause, or a snapshot's machine
//! description, in CBOR, as a snapshot, a migration or a checkpoint carries it) from any
//! bytes, and the console state in it as the VMM loads it.
//!
//! Invariants:
//! - nothing panics;
//! - a record that decodes re-encodes to bytes that decode to the same encoding;
//! - a machine state built from the input survives its record field for field;
//! - the console takes any saved registers and input, and the guest can then read and write
//!   every register.

#![no_main]

use arbitrary::Arbitrary;
use colo_vmm::devices::serial::{SerialConsole, SerialOutput, SerialSnapshot};
use colo_vmm::devices::virtio_mmio::{QueueConfig, TransportState};
use colo_vmm::persist::state::{MachineState, StateRecord, VcpuState};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Vcpu {
    rip: u64,
    cr0: u64,
    msrs: Vec<(u32, u64)>,
    lapic_byte: (u16, i8),
}

#[derive(Debug, Arbitrary)]
struct Input {
    record: Vec<u8>,
    vcpus: Vec<Vcpu>,
    queues: Vec<(u16, u16, bool, u64)>,
    bases: Vec<u16>,
    page_digests: Option<Vec<u64>>,
    registers: [u8; 9],
    in_buffer: Vec<u8>,
    accesses: Vec<(u8, Option<u8>)>,
}

fuzz_target!(|input: Input| {
    // Any bytes.
    let decoded = StateRecord::decode(&input.record);
    if let Ok(rec) = &decoded {
        let bytes = rec.encode();
        let again = StateRecord::decode(&bytes).expect("an encoded record decodes");
        assert_eq!(again.encode(), bytes, "a record re-encodes to other bytes");
    }

    // A machine built from the input, through its record.
    let mut state = MachineState::default();
    for v in input.vcpus.iter().take(8) {
        let mut s = VcpuState::default();
        s.regs.rip = v.rip;
        s.sregs.cr0 = v.cr0;
        s.msrs = v.msrs.iter().take(64).copied().collect();
        let (at, value) = v.lapic_byte;
        let len = s.lapic.regs.len();
        s.lapic.regs[usize::from(at) % len] = value as _;
        state.vcpus.push(s);
    }
    state.devices.serial = SerialSnapshot { registers: input.registers, in_buffer: input.in_buffer.clone() };
    let queues = input
        .queues
        .iter()
        .take(4)
        .map(|&(max_size, size, ready, desc)| QueueConfig { max_size, size, ready, desc, avail: !desc, used: desc / 2 })
        .collect();
    state.devices.virtio.push(TransportState {
        status: 0xf,
        acked_features: 1 << 32,
        queues,
        bases: input.bases.iter().take(4).copied().collect(),
        ..Default::default()
    });
    let rec =
        StateRecord::Paused { state: Box::new(state), page_digests: input.page_digests.clone(), block_digests: None };
    let bytes = rec.encode();
    let (back, digests, blocks) =
        StateRecord::decode(&bytes).expect("a machine's record decodes").into_parts().unwrap();
    let StateRecord::Paused { state, .. } = rec else { unreachable!() };
    assert_eq!(back.vcpus.len(), state.vcpus.len());
    for (a, b) in back.vcpus.iter().zip(&state.vcpus) {
        assert_eq!((a.regs.rip, a.sregs.cr0, &a.msrs), (b.regs.rip, b.sregs.cr0, &b.msrs));
        assert_eq!(a.lapic.regs, b.lapic.regs);
    }
    assert_eq!(back.devices, state.devices);
    assert_eq!((digests, blocks), (input.page_digests.clone(), None));

    // The console, from the saved registers and input, and from any decoded record's.
    let mut consoles = Vec::new();
    let snap = SerialSnapshot { registers: input.registers, in_buffer: input.in_buffer.clone() };
    let mut c = SerialConsole::appending(&SerialOutput::None).unwrap();
    c.load(&snap);
    consoles.push(c);
    let mut c = SerialConsole::new(&SerialOutput::None).unwrap();
    c.load(&snap);
    consoles.push(c);
    if let Ok((machine, _, _)) = decoded.and_then(StateRecord::into_parts) {
        let mut c = SerialConsole::new(&SerialOutput::None).unwrap();
        c.load(&machine.devices.serial);
        consoles.push(c);
    }
    for c in &mut consoles {
        for (offset, value) in input.accesses.iter().take(64) {
            match value {
                Some(v) => c.write(offset % 8, *v),
                None => {
                    c.read(offset % 8);
                }
            }
        }
        let _ = c.snapshot();
    }
});
