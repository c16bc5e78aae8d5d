//! The virtio-mmio transport driven by any guest register accesses (reads and writes of any
//! width, anywhere in its window), pauses and resumes, and restores of any saved transport
//! state (built from JSON here; a snapshot or checkpoint carries it in its state record), in
//! front of a device that checks what it is given.
//!
//! Invariants:
//! - nothing panics;
//! - the device is only ever started with the queues it has, each no larger than its maximum,
//!   and with features it offered;
//! - the guest reads back the device's own limits, whatever it wrote or a state restored.

#![no_main]

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use colo_vmm::devices::virtio_mmio::{MmioTransport, QueueConfig, TransportState, VirtioDevice};
use colo_vmm::devices::DeviceError;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

const BASE: u64 = 0xd000_0000;
const SIZE: u64 = 0x1000;
const FEATURES: u64 = (1 << 32) | (1 << 5) | (1 << 16);
const MAX: [u16; 2] = [256, 256];

#[derive(Default)]
struct Seen {
    fail: bool,
    active: bool,
}

struct Device(Arc<Mutex<Seen>>, EventFd);

impl VirtioDevice for Device {
    fn device_type(&self) -> u32 {
        1
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        MAX.to_vec()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(&mut self, acked: u64, queues: &[QueueConfig], _bases: &[u16]) -> Result<(), DeviceError> {
        assert_eq!(acked & !FEATURES, 0, "started with features never offered: {acked:#x}");
        assert_eq!(queues.len(), MAX.len(), "started with {} queues", queues.len());
        for (q, max) in queues.iter().zip(MAX) {
            assert_eq!(q.max_size, max, "a queue's maximum changed");
            assert!(q.size <= max, "queue of {} entries, at most {max}", q.size);
        }
        let mut s = self.0.lock().unwrap();
        if s.fail {
            return Err(DeviceError::Disconnected);
        }
        s.active = true;
        Ok(())
    }
    fn quiesce(&mut self) -> Result<Vec<u16>, DeviceError> {
        self.0.lock().unwrap().active = false;
        Ok(vec![3, 4])
    }
    fn reset(&mut self) {
        self.0.lock().unwrap().active = false;
    }
    fn kick_fds(&self) -> Vec<&EventFd> {
        vec![&self.1]
    }
    fn call_fds(&self) -> Vec<RawFd> {
        vec![]
    }
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// A guest write: register (any offset in the window, or a known register), width, value.
    Write(Offset, u8, u32),
    Read(Offset, u8),
    Pause,
    Resume,
    /// A saved state restored: built from fields, or as JSON text.
    Restore(State),
    RestoreJson(String),
    /// The backend starts refusing (or accepting) activation.
    Fail(bool),
}

#[derive(Debug, Arbitrary)]
enum Offset {
    Register(u8),
    Any(u16),
}

impl Offset {
    fn addr(&self) -> u64 {
        BASE + match self {
            Offset::Register(r) => u64::from(*r % 0x2c) * 4,
            Offset::Any(a) => u64::from(*a) % SIZE,
        }
    }
}

#[derive(Debug, Arbitrary)]
struct State {
    status: u32,
    acked_features: u64,
    sels: (u32, u32, u32),
    queues: Vec<(u16, u16, bool, u64)>,
    config_generation: u32,
    bases: Vec<u16>,
}

fuzz_target!(|ops: Vec<Op>| {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut t = MmioTransport::new(BASE, SIZE, Box::new(Device(seen.clone(), EventFd::new(0).unwrap())));
    let mut paused: Option<TransportState> = None;
    for op in ops.iter().take(500) {
        match op {
            Op::Write(off, width, v) => {
                let bytes = v.to_le_bytes();
                let width = [1, 2, 4, 8][usize::from(*width % 4)];
                let data: Vec<u8> = bytes.iter().copied().cycle().take(width).collect();
                t.write(off.addr(), &data);
            }
            Op::Read(off, width) => {
                let mut data = vec![0u8; [1, 2, 4, 8][usize::from(*width % 4)]];
                t.read(off.addr(), &mut data);
            }
            Op::Pause => paused = t.pause().ok(),
            Op::Resume => {
                if let Some(s) = paused.take() {
                    let _ = t.resume(&s);
                }
            }
            Op::Restore(s) => {
                let state = TransportState {
                    status: s.status,
                    acked_features: s.acked_features,
                    device_features_sel: s.sels.0,
                    driver_features_sel: s.sels.1,
                    queue_sel: s.sels.2,
                    queues: s
                        .queues
                        .iter()
                        .take(4)
                        .map(|&(max_size, size, ready, addr)| QueueConfig {
                            max_size,
                            size,
                            ready,
                            desc: addr,
                            avail: addr.wrapping_add(0x1000),
                            used: addr.wrapping_add(0x2000),
                        })
                        .collect(),
                    config_generation: s.config_generation,
                    bases: s.bases.clone(),
                };
                let _ = t.restore(&state);
            }
            Op::RestoreJson(text) => {
                if let Ok(state) = serde_json::from_str::<TransportState>(text) {
                    let _ = t.restore(&state);
                }
            }
            Op::Fail(f) => seen.lock().unwrap().fail = *f,
        }
    }
    // The guest reads the device's own limits, whatever happened.
    for (i, max) in MAX.iter().enumerate() {
        t.write(BASE + 0x30, &(i as u32).to_le_bytes());
        let mut b = [0u8; 4];
        t.read(BASE + 0x34, &mut b);
        assert_eq!(u32::from_le_bytes(b), u32::from(*max), "QUEUE_NUM_MAX of queue {i}");
    }
});
