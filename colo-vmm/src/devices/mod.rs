//! Devices: the serial console, the paravirtual halt and exit ports, and virtio-mmio devices,
//! with the dispatch of the vCPU's port and MMIO exits to them.

pub mod block;
pub mod pvhalt;
pub mod serial;
pub mod vhost_user_net;
pub mod virtio_mmio;
pub mod vring_stop;

use colo_vmm_abi::port;

use serial::{SerialConsole, SerialSnapshot};
use virtio_mmio::{MmioTransport, TransportState};

/// Why a device could not be started, stopped, handed over or restored.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A vhost-user request failed.
    #[error("{step}: {source}")]
    Vhost {
        /// The request.
        step: &'static str,
        /// What the backend (or the socket) said.
        #[source]
        source: vhost::Error,
    },
    /// Stopping a ring failed.
    #[error("GET_VRING_BASE on queue {queue}: {source}")]
    VringBase {
        /// The queue.
        queue: usize,
        /// What the backend said.
        #[source]
        source: vhost::Error,
    },
    /// The backend was released (a migration handed it over).
    #[error("the vhost-user backend is disconnected")]
    Disconnected,
    /// A queue the driver set up lies outside guest memory.
    #[error("queue {queue} {what} at {gpa:#x} is outside guest memory")]
    QueueOutsideMemory {
        /// The queue.
        queue: usize,
        /// Which part.
        what: &'static str,
        /// Its guest-physical address.
        gpa: u64,
    },
    /// Connecting to the backend again failed.
    #[error(transparent)]
    Reconnect(#[from] vhost_user_net::NetError),
    /// The backend came back with fewer features.
    #[error("the backend at {path} now offers {now:#x}, less than before ({before:#x})")]
    FeaturesShrank {
        /// Its socket.
        path: std::path::PathBuf,
        /// What it offers now.
        now: u64,
        /// What it offered before.
        before: u64,
    },
    /// Saved state for another set of devices.
    #[error("the saved VM had {saved} network devices, this one has {here}")]
    DeviceCount {
        /// Devices in the state.
        saved: usize,
        /// Devices here.
        here: usize,
    },
    /// Saved state for a device with other queues.
    #[error("saved device has {saved} queues, this one {here}")]
    QueueCount {
        /// Queues in the state.
        saved: usize,
        /// Queues here.
        here: usize,
    },
    /// Saved state with a queue larger than this device allows.
    #[error("saved queue {queue} has {size} of at most {saved_max} entries; this device allows at most {max}")]
    QueueSize {
        /// The queue.
        queue: usize,
        /// Its size in the state.
        size: u16,
        /// Its maximum in the state.
        saved_max: u16,
        /// This device's maximum.
        max: u16,
    },
    /// Saved state with features this backend lacks.
    #[error("saved features {saved:#x} include some this backend does not offer ({offered:#x})")]
    Features {
        /// Acknowledged in the state.
        saved: u64,
        /// Offered here.
        offered: u64,
    },
    /// The backend cannot log the pages it writes.
    #[error("the vhost-user backend at {path} cannot log dirty pages (no LOG_SHMFD/LOG_ALL)")]
    NoDirtyLog {
        /// Its socket.
        path: std::path::PathBuf,
    },
    /// The dirty log's shared memory could not be made.
    #[error("creating the dirty log: {0}")]
    LogBuffer(#[source] std::io::Error),
    /// The dirty log was read while off.
    #[error("dirty logging is not active")]
    LogInactive,
    /// A virtqueue the VMM serves cannot be used.
    #[error("queue {queue}: {source}")]
    Queue {
        /// The queue.
        queue: usize,
        /// What virtio-queue said.
        #[source]
        source: virtio_queue::Error,
    },
}

/// Every device's saved state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    /// The console.
    pub serial: SerialSnapshot,
    /// Each virtio-mmio transport, in address order.
    pub virtio: Vec<TransportState>,
}

/// What a port write asks the vCPU loop to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    /// Nothing: continue.
    Continue,
    /// Halt for at most this many microseconds ([`colo_vmm_abi::HALT_FOREVER`]: no limit).
    Halt(u32),
    /// The guest asked to exit with this code.
    Exit(u32),
}

/// Every device of the VM, as the vCPU threads see them (one at a time: they share it behind
/// a lock).
pub struct Devices {
    /// COM1.
    pub serial: SerialConsole,
    /// virtio-mmio devices.
    pub mmio: Vec<MmioTransport>,
    /// Port writes to unknown ports (counted, logged the first time).
    pub unknown_io: u64,
}

impl Devices {
    /// The eventfds by which devices signal the guest (used buffers): a halted vCPU wakes on
    /// them.
    pub fn call_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.mmio.iter().flat_map(|t| t.device().call_fds()).collect()
    }

    /// Stops every device's data path (vhost-user rings included, so backends no longer write
    /// guest memory) and returns their state. [`Devices::resume`] restarts them.
    pub fn pause(&mut self) -> Result<DevicesState, DeviceError> {
        let virtio = self.mmio.iter_mut().map(MmioTransport::pause).collect::<Result<_, _>>()?;
        Ok(DevicesState { serial: self.serial.snapshot(), virtio })
    }

    /// Restarts the data paths stopped by [`Devices::pause`].
    pub fn resume(&mut self, state: &DevicesState) -> Result<(), DeviceError> {
        for (t, s) in self.mmio.iter_mut().zip(&state.virtio) {
            t.resume(s)?;
        }
        Ok(())
    }

    /// Releases every backend (a migration hands them to the destination).
    pub fn disconnect(&mut self) {
        for t in &mut self.mmio {
            t.disconnect();
        }
    }

    /// Re-attaches every backend and restarts the data paths (a failed handover).
    pub fn reconnect(&mut self, state: &DevicesState) -> Result<(), DeviceError> {
        for (t, s) in self.mmio.iter_mut().zip(&state.virtio) {
            t.reconnect(s)?;
        }
        Ok(())
    }

    /// Takes over saved state on fresh devices (same number and kinds, in the same order).
    pub fn restore(&mut self, state: &DevicesState) -> Result<(), DeviceError> {
        if state.virtio.len() != self.mmio.len() {
            return Err(DeviceError::DeviceCount { saved: state.virtio.len(), here: self.mmio.len() });
        }
        for (t, s) in self.mmio.iter_mut().zip(&state.virtio) {
            t.restore(s)?;
        }
        Ok(())
    }

    /// A port read.
    pub fn pio_in(&mut self, port: u16, data: &mut [u8]) {
        if (port::SERIAL..port::SERIAL + 8).contains(&port) && data.len() == 1 {
            data[0] = self.serial.read((port - port::SERIAL) as u8);
        } else {
            self.count_unknown("in", u64::from(port));
            data.fill(0xff);
        }
    }

    /// A port write.
    pub fn pio_out(&mut self, port: u16, data: &[u8]) -> PioAction {
        if (port::SERIAL..port::SERIAL + 8).contains(&port) && data.len() == 1 {
            self.serial.write((port - port::SERIAL) as u8, data[0]);
            return PioAction::Continue;
        }
        let value = || {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            u32::from_le_bytes(b)
        };
        match port {
            port::HALT => PioAction::Halt(value()),
            port::EXIT => PioAction::Exit(value()),
            _ => {
                self.count_unknown("out", u64::from(port));
                PioAction::Continue
            }
        }
    }

    /// An MMIO read; unclaimed addresses read as all ones.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        match self.mmio.iter_mut().find(|d| d.contains(addr)) {
            Some(d) => d.read(addr, data),
            None => {
                self.count_unknown("mmio read", addr);
                data.fill(0xff);
            }
        }
    }

    /// An MMIO write; unclaimed addresses are ignored.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        match self.mmio.iter_mut().find(|d| d.contains(addr)) {
            Some(d) => d.write(addr, data),
            None => self.count_unknown("mmio write", addr),
        }
    }

    fn count_unknown(&mut self, what: &str, addr: u64) {
        self.unknown_io += 1;
        if self.unknown_io.is_power_of_two() {
            tracing::warn!(
                access = what,
                addr = format_args!("{addr:#x}"),
                total = self.unknown_io,
                "guest touched nothing"
            );
        }
    }
}
