//! The virtio-mmio transport, register layout version 2 (virtio 1.x §4.2.2).

use core::ptr;

use colo_guest::virtqueue::SplitQueue;

/// Register offsets.
mod reg {
    pub const MAGIC: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
    pub const CONFIG_GENERATION: usize = 0x0fc;
    pub const CONFIG: usize = 0x100;
}

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is done.
    pub const FEATURES_OK: u32 = 8;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Device type of a network card.
pub const DEVICE_NET: u32 = 1;
/// Device type of a block device.
pub const DEVICE_BLK: u32 = 2;

/// One device's register window.
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    base: usize,
}

impl Transport {
    /// The transport whose registers are at `base`.
    ///
    /// # Safety
    /// `base` must be the (identity-mapped, uncached) register window of a virtio-mmio device.
    pub unsafe fn new(base: u64) -> Transport {
        Transport { base: base as usize }
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: a 4-byte-aligned register of the window (constructor contract).
        unsafe { ptr::read_volatile((self.base + offset) as *const u32) }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as `read`.
        unsafe { ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }

    /// Checks the magic and the version; returns the device type (0: no device here).
    pub fn probe(&self) -> Result<u32, &'static str> {
        if self.read(reg::MAGIC) != MAGIC {
            return Err("no virtio-mmio magic at the device's address");
        }
        match self.read(reg::VERSION) {
            2 => Ok(self.read(reg::DEVICE_ID)),
            1 => Err("legacy virtio-mmio (version 1) is not supported"),
            _ => Err("unknown virtio-mmio version"),
        }
    }

    /// Resets the device (status 0).
    pub fn reset(&self) {
        self.write(reg::STATUS, 0);
    }

    /// The device status.
    pub fn status(&self) -> u32 {
        self.read(reg::STATUS)
    }

    /// Adds `bits` to the device status.
    pub fn add_status(&self, bits: u32) {
        self.write(reg::STATUS, self.status() | bits);
    }

    /// The features the device offers.
    pub fn device_features(&self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::DEVICE_FEATURES);
        (u64::from(high) << 32) | u64::from(low)
    }

    /// Tells the device which features the driver uses.
    pub fn set_driver_features(&self, features: u64) {
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, features as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// The largest size queue `index` may have (0: no such queue).
    pub fn queue_max_size(&self, index: u16) -> u16 {
        self.write(reg::QUEUE_SEL, u32::from(index));
        self.read(reg::QUEUE_NUM_MAX).min(u32::from(u16::MAX)) as u16
    }

    /// Gives queue `index` its size and memory and marks it ready.
    pub fn setup_queue(&self, index: u16, queue: &SplitQueue) -> Result<(), &'static str> {
        self.write(reg::QUEUE_SEL, u32::from(index));
        if self.read(reg::QUEUE_READY) != 0 {
            return Err("queue already in use after reset");
        }
        let (desc, avail, used) = queue.addresses();
        self.write(reg::QUEUE_NUM, u32::from(queue.size()));
        self.write(reg::QUEUE_DESC_LOW, desc as u32);
        self.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(reg::QUEUE_DRIVER_LOW, avail as u32);
        self.write(reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.write(reg::QUEUE_DEVICE_LOW, used as u32);
        self.write(reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.write(reg::QUEUE_READY, 1);
        Ok(())
    }

    /// Tells the device queue `index` has new buffers (one MMIO exit; the VMM's ioeventfd
    /// passes it to the backend).
    pub fn notify(&self, index: u16) {
        self.write(reg::QUEUE_NOTIFY, u32::from(index));
    }

    /// Reads `out.len()` bytes of the device configuration from `offset`, byte by byte (the
    /// fields read here are byte arrays), retrying if the device changed it meanwhile.
    pub fn read_config(&self, offset: usize, out: &mut [u8]) {
        loop {
            let generation = self.read(reg::CONFIG_GENERATION);
            for (i, byte) in out.iter_mut().enumerate() {
                // SAFETY: a byte of the configuration space, inside the window.
                *byte = unsafe { ptr::read_volatile((self.base + reg::CONFIG + offset + i) as *const u8) };
            }
            if self.read(reg::CONFIG_GENERATION) == generation {
                return;
            }
        }
    }
}
