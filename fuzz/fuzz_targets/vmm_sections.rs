//! The sections of a state record (device and vCPU state of a snapshot, a migration or a
//! checkpoint) from any bytes, and the device state in them as the VMM loads it.
//!
//! Invariants:
//! - nothing panics, and no section is read past its record;
//! - sections that decode are encoded back to an equivalent record;
//! - KVM structures are only read at their exact size;
//! - the console takes any saved registers and input (or keeps its state), and the guest can
//!   then read and write every register.

#![no_main]

use arbitrary::Arbitrary;
use colo_vmm::devices::serial::{SerialConsole, SerialOutput, SerialSnapshot};
use colo_vmm::devices::DevicesState;
use colo_vmm::persist::sections::Sections;
use colo_vmm::persist::snapshot::Meta;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    record: Vec<u8>,
    devices_json: String,
    registers: [u8; 9],
    in_buffer: Vec<u8>,
    accesses: Vec<(u8, Option<u8>)>,
}

fuzz_target!(|input: Input| {
    if let Ok(s) = Sections::decode(&input.record) {
        let again = Sections::decode(&s.encode()).expect("encoded sections decode");
        assert_eq!(again, s);
        for name in s.names().map(str::to_string).collect::<Vec<_>>() {
            let len = s.bytes(&name).unwrap().len();
            if let Ok(r) = s.pod::<kvm_bindings::kvm_regs>(&name) {
                assert_eq!(len, std::mem::size_of_val(&r));
            }
            if s.pod::<kvm_bindings::kvm_sregs>(&name).is_ok() {
                assert_eq!(len, std::mem::size_of::<kvm_bindings::kvm_sregs>());
            }
            let _ = s.pod::<kvm_bindings::kvm_lapic_state>(&name);
            let _ = s.json::<DevicesState>(&name);
            let _ = s.json::<Meta>(&name);
            let _ = s.json::<Vec<(u32, u64)>>(&name);
        }
    }
    let mut consoles = Vec::new();
    let snap = SerialSnapshot { registers: input.registers, in_buffer: input.in_buffer.clone() };
    if let Ok(c) = SerialConsole::restored(&SerialOutput::None, &snap) {
        consoles.push(c);
    }
    let mut c = SerialConsole::new(&SerialOutput::None).unwrap();
    c.load(&snap);
    consoles.push(c);
    if let Ok(devices) = serde_json::from_str::<DevicesState>(&input.devices_json) {
        let mut c = SerialConsole::new(&SerialOutput::None).unwrap();
        c.load(&devices.serial);
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
