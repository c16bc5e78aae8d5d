//! The virtio-mmio transport (virtio 1.x, register layout version 2) in front of a device whose
//! data path lives elsewhere (a vhost-user backend). The transport keeps the registers and the
//! queue configuration; on DRIVER_OK it hands the negotiated features and queues to the device.
//!
//! Queue notifications of a device with kick eventfds never reach this code: the VMM registers
//! an ioeventfd on QUEUE_NOTIFY per queue, which the backend reads directly. A device served by
//! the VMM itself (virtio-blk) has none: its notifications arrive here as register writes and
//! go to [`VirtioDevice::notify`].

use std::os::fd::RawFd;

use vmm_sys_util::eventfd::EventFd;

use super::DeviceError;

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of QUEUE_NOTIFY, where the kick ioeventfds are registered.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// "virt"
const MAGIC: u32 = 0x7472_6976;
/// Vendor id: "COLO".
const VENDOR: u32 = 0x4f4c_4f43;

/// Device status bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: activate.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation done.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error; the driver must reset it.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// A virtqueue as the driver configured it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueConfig {
    /// Maximum size the device allows.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver set QUEUE_READY.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc: u64,
    /// Guest-physical address of the available (driver) ring.
    pub avail: u64,
    /// Guest-physical address of the used (device) ring.
    pub used: u64,
}

/// A device behind the transport.
pub trait VirtioDevice: Send {
    /// Virtio device type (1 = network).
    fn device_type(&self) -> u32;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads from the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the configuration space (ignored by devices that have nothing writable).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the data path with these features and queues; `bases[i]` is where queue `i`'s
    /// device side resumes (0 for a fresh driver; the saved position after a snapshot).
    fn activate(&mut self, acked_features: u64, queues: &[QueueConfig], bases: &[u16]) -> Result<(), DeviceError>;
    /// Stops the data path so guest memory and the rings stay still, and returns each queue's
    /// position. [`VirtioDevice::activate`] with these bases resumes it.
    fn quiesce(&mut self) -> Result<Vec<u16>, DeviceError>;
    /// The driver reset the device: stop the data path.
    fn reset(&mut self);
    /// Lets go of whatever serves the data path (a migration hands it to the destination).
    fn disconnect(&mut self) {}
    /// Takes the data path back after [`VirtioDevice::disconnect`] (a failed handover).
    fn reconnect(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The eventfds the guest kicks, one per queue (registered as ioeventfds by the VMM); none
    /// for a device whose notifications the VMM serves itself ([`VirtioDevice::notify`]).
    fn kick_fds(&self) -> Vec<&EventFd>;
    /// The driver notified `queue` (devices without kick eventfds): serve it. An error means
    /// the device cannot go on (the transport then asks the driver to reset it).
    fn notify(&mut self, _queue: u32) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The eventfds the data path signals when it has news for the guest, one per queue.
    fn call_fds(&self) -> Vec<RawFd>;
}

/// The transport's registers, as saved in snapshots and checkpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// Device status.
    pub status: u32,
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// DEVICE_FEATURES_SEL.
    pub device_features_sel: u32,
    /// DRIVER_FEATURES_SEL.
    pub driver_features_sel: u32,
    /// QUEUE_SEL.
    pub queue_sel: u32,
    /// Each queue's configuration.
    pub queues: Vec<QueueConfig>,
    /// CONFIG_GENERATION.
    pub config_generation: u32,
    /// Where each queue's device side stands (from [`VirtioDevice::quiesce`]).
    pub bases: Vec<u16>,
}

/// The transport: registers plus the device.
pub struct MmioTransport {
    base: u64,
    size: u64,
    device: Box<dyn VirtioDevice>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport at `base` (a window of `size` bytes) for `device`.
    pub fn new(base: u64, size: u64, device: Box<dyn VirtioDevice>) -> MmioTransport {
        let queues =
            device.queue_max_sizes().into_iter().map(|m| QueueConfig { max_size: m, ..Default::default() }).collect();
        MmioTransport {
            base,
            size,
            device,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
            status: 0,
            config_generation: 0,
        }
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Base address of the register window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Whether `addr` is in this device's window.
    pub fn contains(&self, addr: u64) -> bool {
        (self.base..self.base + self.size).contains(&addr)
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A register read.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) {
        let offset = addr - self.base;
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let features = self.device.features();
        let v: u32 = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.queue().map_or(0, |q| u32::from(q.ready)),
            // The backend signals the guest directly; for a driver that checks, every
            // notification is a used-buffer notification.
            reg::INTERRUPT_STATUS => 1,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A register write.
    pub fn write(&mut self, addr: u64, data: &[u8]) {
        let offset = addr - self.base;
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 {
            return;
        }
        let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(v) << 32);
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            // Features are fixed once FEATURES_OK is set.
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.acked_features = lo(self.acked_features),
                1 => self.acked_features = hi(self.acked_features),
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.queue() {
                    q.size = v.min(u32::from(q.max_size)) as u16;
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.queue() {
                    q.ready = v == 1;
                }
            }
            reg::QUEUE_DESC_LOW => self.set_queue_addr(|q| &mut q.desc, lo),
            reg::QUEUE_DESC_HIGH => self.set_queue_addr(|q| &mut q.desc, hi),
            reg::QUEUE_DRIVER_LOW => self.set_queue_addr(|q| &mut q.avail, lo),
            reg::QUEUE_DRIVER_HIGH => self.set_queue_addr(|q| &mut q.avail, hi),
            reg::QUEUE_DEVICE_LOW => self.set_queue_addr(|q| &mut q.used, lo),
            reg::QUEUE_DEVICE_HIGH => self.set_queue_addr(|q| &mut q.used, hi),
            reg::QUEUE_NOTIFY if self.active() => {
                if let Err(e) = self.device.notify(v) {
                    tracing::error!(error = %e, "the device failed; the driver must reset it");
                    self.status |= status::DEVICE_NEEDS_RESET;
                    self.config_generation += 1;
                }
            }
            reg::INTERRUPT_ACK => {}
            reg::STATUS => self.set_status(v),
            _ => {}
        }
    }

    fn set_queue_addr(&mut self, field: impl Fn(&mut QueueConfig) -> &mut u64, f: impl Fn(u64) -> u64) {
        if let Some(q) = self.queue() {
            if !q.ready {
                let slot = field(q);
                *slot = f(*slot);
            }
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            if self.status & status::DRIVER_OK != 0 {
                self.device.reset();
            }
            self.reset();
            return;
        }
        let newly = v & !self.status;
        if newly & status::FEATURES_OK != 0 && self.acked_features & !self.device.features() != 0 {
            tracing::warn!(
                acked = format_args!("{:#x}", self.acked_features),
                offered = format_args!("{:#x}", self.device.features()),
                "driver acked features the device did not offer"
            );
            self.status = v & !status::FEATURES_OK;
            return;
        }
        self.status = v;
        if newly & status::DRIVER_OK != 0 {
            let queues: Vec<QueueConfig> = self.queues.clone();
            let bases = vec![0; queues.len()];
            if let Err(e) = self.device.activate(self.acked_features, &queues, &bases) {
                tracing::error!(error = %e, "device activation failed");
                self.status |= status::DEVICE_NEEDS_RESET;
                self.config_generation = self.config_generation.wrapping_add(1);
            }
        }
    }

    fn active(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0
    }

    /// Stops the device's data path (if the driver started it) and returns the saved state.
    pub fn pause(&mut self) -> Result<TransportState, DeviceError> {
        let bases = if self.active() { self.device.quiesce()? } else { vec![0; self.queues.len()] };
        Ok(self.state_with(bases))
    }

    /// Releases the device's backend (after [`MmioTransport::pause`]).
    pub fn disconnect(&mut self) {
        self.device.disconnect();
    }

    /// Re-attaches the backend and restarts the data path where `state` left it.
    pub fn reconnect(&mut self, state: &TransportState) -> Result<(), DeviceError> {
        self.device.reconnect()?;
        self.resume(state)
    }

    /// Restarts the data path after [`MmioTransport::pause`].
    pub fn resume(&mut self, state: &TransportState) -> Result<(), DeviceError> {
        if self.active() {
            self.device.activate(self.acked_features, &self.queues.clone(), &state.bases)?;
        }
        Ok(())
    }

    fn state_with(&self, bases: Vec<u16>) -> TransportState {
        TransportState {
            status: self.status,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            queues: self.queues.clone(),
            config_generation: self.config_generation,
            bases,
        }
    }

    /// Takes over a saved state on a fresh transport and starts the data path where it stood.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), DeviceError> {
        if state.queues.len() != self.queues.len() {
            return Err(DeviceError::QueueCount { saved: state.queues.len(), here: self.queues.len() });
        }
        if state.acked_features & !self.device.features() != 0 {
            return Err(DeviceError::Features { saved: state.acked_features, offered: self.device.features() });
        }
        // A queue's maximum is the device's, not the state's: the guest reads it back, and the
        // backend never takes a ring larger than its own maximum.
        for (i, (saved, ours)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != ours.max_size || saved.size > saved.max_size {
                return Err(DeviceError::QueueSize {
                    queue: i,
                    size: saved.size,
                    saved_max: saved.max_size,
                    max: ours.max_size,
                });
            }
        }
        self.status = state.status;
        self.acked_features = state.acked_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.queues = state.queues.clone();
        self.config_generation = state.config_generation;
        if self.active() {
            self.device.activate(self.acked_features, &self.queues.clone(), &state.bases)?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueConfig { max_size: q.max_size, ..Default::default() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Seen {
        activated: Option<(u64, Vec<QueueConfig>)>,
        resets: u32,
        refuse: bool,
    }

    struct Fake(Arc<Mutex<Seen>>, EventFd);

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            1
        }
        fn features(&self) -> u64 {
            (1 << 32) | (1 << 5)
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![256, 256]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, f: u64, q: &[QueueConfig], _bases: &[u16]) -> Result<(), DeviceError> {
            let mut seen = self.0.lock().unwrap();
            if seen.refuse {
                return Err(DeviceError::Disconnected);
            }
            seen.activated = Some((f, q.to_vec()));
            Ok(())
        }
        fn quiesce(&mut self) -> Result<Vec<u16>, DeviceError> {
            Ok(vec![7, 9])
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
        fn kick_fds(&self) -> Vec<&EventFd> {
            vec![&self.1]
        }
        fn call_fds(&self) -> Vec<RawFd> {
            vec![]
        }
    }

    const BASE: u64 = 0xd000_0000;

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(BASE + off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(BASE + off, &v.to_le_bytes());
    }

    #[test]
    fn driver_handshake_activates_with_queues() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut t = MmioTransport::new(BASE, 0x1000, Box::new(Fake(seen.clone(), EventFd::new(0).unwrap())));
        assert_eq!(r(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 1);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 1 << 5);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        for (i, base) in [(0u32, 0x10_0000u64), (1, 0x20_0000)] {
            w(&mut t, reg::QUEUE_SEL, i);
            assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 256);
            w(&mut t, reg::QUEUE_NUM, 128);
            w(&mut t, reg::QUEUE_DESC_LOW, base as u32);
            w(&mut t, reg::QUEUE_DRIVER_LOW, base as u32 + 0x800);
            w(&mut t, reg::QUEUE_DEVICE_LOW, base as u32 + 0x1000);
            w(&mut t, reg::QUEUE_READY, 1);
        }
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        let (features, queues) = seen.lock().unwrap().activated.clone().expect("activated");
        assert_eq!(features, (1 << 32) | (1 << 5));
        assert_eq!(
            queues[1],
            QueueConfig { max_size: 256, size: 128, ready: true, desc: 0x20_0000, avail: 0x20_0800, used: 0x20_1000 }
        );
        let mut cfg = [0u8; 2];
        t.read(BASE + reg::CONFIG + 3, &mut cfg);
        assert_eq!(cfg, [3, 3]);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(seen.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn pause_and_restore_carry_registers_and_ring_positions() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut t = MmioTransport::new(BASE, 0x1000, Box::new(Fake(seen.clone(), EventFd::new(0).unwrap())));
        w(&mut t, reg::DRIVER_FEATURES, 1 << 5);
        w(&mut t, reg::QUEUE_SEL, 1);
        w(&mut t, reg::QUEUE_NUM, 64);
        w(&mut t, reg::QUEUE_READY, 1);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        let state = t.pause().unwrap();
        assert_eq!(state.bases, vec![7, 9]);
        assert_eq!(state.queues[1].size, 64);
        let json = serde_json::to_string(&state).unwrap();
        let back: TransportState = serde_json::from_str(&json).unwrap();
        let seen2 = Arc::new(Mutex::new(Seen::default()));
        let mut t2 = MmioTransport::new(BASE, 0x1000, Box::new(Fake(seen2.clone(), EventFd::new(0).unwrap())));
        t2.restore(&back).unwrap();
        assert_eq!(r(&mut t2, reg::STATUS), state.status);
        assert!(seen2.lock().unwrap().activated.is_some(), "a running device restarts on restore");
        let mut bad = back.clone();
        bad.acked_features |= 1 << 7;
        assert!(t2.restore(&bad).is_err());
    }

    #[test]
    fn a_saved_queue_larger_than_the_device_allows_is_refused() {
        // Found by fuzzing: a restored state set QUEUE_NUM_MAX to 65535 on a 256-entry device.
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut t = MmioTransport::new(BASE, 0x1000, Box::new(Fake(seen, EventFd::new(0).unwrap())));
        let good = t.pause().unwrap();
        let mut bigger = good.clone();
        bigger.queues[0] = QueueConfig { max_size: 65535, size: 65535, ..bigger.queues[0] };
        assert!(t.restore(&bigger).is_err());
        let mut oversized = good.clone();
        oversized.queues[1].size = 257;
        assert!(t.restore(&oversized).is_err());
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 256, "the device's maximum stays");
        t.restore(&good).unwrap();
    }

    #[test]
    fn failed_activations_wrap_the_config_generation() {
        let seen = Arc::new(Mutex::new(Seen { refuse: true, ..Seen::default() }));
        let mut t = MmioTransport::new(BASE, 0x1000, Box::new(Fake(seen, EventFd::new(0).unwrap())));
        let mut state = t.pause().unwrap();
        state.config_generation = u32::MAX;
        t.restore(&state).unwrap();
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(r(&mut t, reg::CONFIG_GENERATION), 0);
    }

    #[test]
    fn features_not_offered_are_refused() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut t = MmioTransport::new(BASE, 0x1000, Box::new(Fake(seen, EventFd::new(0).unwrap())));
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 1 << 7);
        w(&mut t, reg::STATUS, status::FEATURES_OK);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    }
}
