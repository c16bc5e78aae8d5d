//! The driver side of a split virtqueue (virtio 1.x §2.7): descriptor table, available ring,
//! used ring, in memory shared with the device.
//!
//! The guest polls: it never asks for interrupts, leaves the available ring's flags at 0 so
//! the device signals every used buffer (the VMM's paravirtual halt waits on exactly those
//! signals), and does not negotiate `VIRTIO_F_EVENT_IDX`. It honours the device's
//! `VIRTQ_USED_F_NO_NOTIFY` hint, because every notification is an MMIO exit (~17 µs here).
//!
//! Addresses in descriptors are guest-physical; the guest's memory is identity-mapped, so
//! they are also the pointers the driver writes through.

use core::ptr;
use core::sync::atomic::{fence, AtomicU16, Ordering};

/// Descriptor flag: the chain goes on at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes the buffer (receive buffers).
pub const DESC_F_WRITE: u16 = 2;
/// Used-ring flag: the device does not need notifications now.
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Largest queue the virtio spec allows.
pub const MAX_SIZE: u16 = 32768;

/// One descriptor-table entry.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Descriptor {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    /// `DESC_F_*`.
    pub flags: u16,
    /// Next descriptor of a chain (with [`DESC_F_NEXT`]; the network's buffers are one
    /// descriptor each, a disk request is three).
    pub next: u16,
}

/// One used-ring entry: which descriptor chain the device finished, and how many bytes it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index, as the device reported it (not yet checked against the size).
    pub id: u32,
    /// Bytes the device wrote into the buffer.
    pub len: u32,
}

/// Sizes of the three areas of a queue.
pub mod layout {
    /// Bytes of the descriptor table (16-byte aligned).
    pub const fn desc_bytes(size: u16) -> usize {
        16 * size as usize
    }
    /// Bytes of the available ring: flags, idx, ring, used_event (2-byte aligned).
    pub const fn avail_bytes(size: u16) -> usize {
        6 + 2 * size as usize
    }
    /// Bytes of the used ring: flags, idx, ring of (id, len), avail_event (4-byte aligned).
    pub const fn used_bytes(size: u16) -> usize {
        6 + 8 * size as usize
    }
}

/// The driver's view of one split virtqueue.
pub struct SplitQueue {
    size: u16,
    desc: *mut Descriptor,
    avail: *mut u8,
    used: *const u8,
    /// Free-running index of the next available-ring slot (what `avail.idx` becomes).
    next_avail: u16,
    /// Free-running index of the next used-ring entry to read.
    next_used: u16,
}

impl SplitQueue {
    /// A queue of `size` entries over the given areas.
    ///
    /// # Safety
    /// The areas must be valid for reads and writes, aligned as virtio requires, at least
    /// [`layout`]'s sizes, zeroed, not used by anything but this queue and the device, and
    /// live as long as the queue. `size` must be a power of two, 1..=[`MAX_SIZE`].
    pub unsafe fn new(size: u16, desc: *mut u8, avail: *mut u8, used: *mut u8) -> SplitQueue {
        debug_assert!(size.is_power_of_two() && size <= MAX_SIZE);
        SplitQueue { size, desc: desc.cast(), avail, used, next_avail: 0, next_used: 0 }
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc as u64, self.avail as u64, self.used as u64)
    }

    /// Writes descriptor `id` (taken modulo the size).
    pub fn set_descriptor(&mut self, id: u16, descriptor: Descriptor) {
        let id = usize::from(id % self.size);
        // SAFETY: `id < size` and the table holds `size` descriptors (constructor contract).
        unsafe { ptr::write_volatile(self.desc.add(id), descriptor) };
    }

    /// Makes descriptor `id` available to the device. The device sees it at once (no batching:
    /// the costly part, the notification, is separate: [`SplitQueue::needs_notification`]).
    pub fn push(&mut self, id: u16) {
        let slot = usize::from(self.next_avail % self.size);
        // SAFETY: the ring has `size` u16 slots after flags and idx (constructor contract).
        unsafe { ptr::write_volatile(self.avail.add(4 + 2 * slot).cast::<u16>(), id) };
        self.next_avail = self.next_avail.wrapping_add(1);
        // Release: the descriptor and the ring slot are visible before the new index.
        self.avail_idx().store(self.next_avail, Ordering::Release);
    }

    /// Takes the next buffer the device has finished with, if any.
    pub fn pop_used(&mut self) -> Option<Used> {
        // Acquire: the entry (and the buffer's contents) are read after the index.
        if self.used_idx().load(Ordering::Acquire) == self.next_used {
            return None;
        }
        let slot = usize::from(self.next_used % self.size);
        // SAFETY: the ring has `size` 8-byte entries after flags and idx.
        let (id, len) = unsafe {
            let entry = self.used.add(4 + 8 * slot);
            (ptr::read_volatile(entry.cast::<u32>()), ptr::read_volatile(entry.add(4).cast::<u32>()))
        };
        self.next_used = self.next_used.wrapping_add(1);
        Some(Used { id, len })
    }

    /// Whether the device has finished buffers not yet taken with [`SplitQueue::pop_used`].
    /// A plain memory read: cheap enough to check in a busy loop.
    pub fn has_used(&self) -> bool {
        self.used_idx().load(Ordering::Acquire) != self.next_used
    }

    /// Whether the device wants a notification for what was pushed. Call after pushing.
    pub fn needs_notification(&self) -> bool {
        // The store of avail.idx must be globally visible before we read the device's flag:
        // a device that sets NO_NOTIFY while it works re-checks avail.idx after clearing it,
        // and this fence makes one of the two sides see the other (store-load ordering).
        fence(Ordering::SeqCst);
        // SAFETY: the used ring starts with its u16 flags.
        let flags = unsafe { ptr::read_volatile(self.used.cast::<u16>()) };
        flags & USED_F_NO_NOTIFY == 0
    }

    fn avail_idx(&self) -> &AtomicU16 {
        // SAFETY: avail.idx is a 2-byte-aligned u16 at offset 2, shared with the device.
        unsafe { &*self.avail.add(2).cast::<AtomicU16>() }
    }

    fn used_idx(&self) -> &AtomicU16 {
        // SAFETY: used.idx is a 2-byte-aligned u16 at offset 2, shared with the device.
        unsafe { &*self.used.add(2).cast::<AtomicU16>() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// Queue memory plus a device that completes buffers, for driving a queue in tests.
    struct FakeDevice {
        _memory: Vec<u64>,
        desc: *mut Descriptor,
        avail: *mut u8,
        used: *mut u8,
        size: u16,
        last_avail: u16,
        used_idx: u16,
    }

    fn setup(size: u16) -> (SplitQueue, FakeDevice) {
        let mut memory = vec![0u64; 3 * 4096 / 8];
        let base = memory.as_mut_ptr().cast::<u8>();
        let (desc, avail, used) = unsafe { (base, base.add(4096), base.add(8192)) };
        let queue = unsafe { SplitQueue::new(size, desc, avail, used) };
        let device = FakeDevice { _memory: memory, desc: desc.cast(), avail, used, size, last_avail: 0, used_idx: 0 };
        (queue, device)
    }

    impl FakeDevice {
        /// Takes the next available descriptor, as a device would.
        fn take(&mut self) -> Option<(u16, Descriptor)> {
            let idx = unsafe { ptr::read_volatile(self.avail.add(2).cast::<u16>()) };
            if idx == self.last_avail {
                return None;
            }
            let slot = usize::from(self.last_avail % self.size);
            let id = unsafe { ptr::read_volatile(self.avail.add(4 + 2 * slot).cast::<u16>()) };
            self.last_avail = self.last_avail.wrapping_add(1);
            Some((id, unsafe { ptr::read_volatile(self.desc.add(usize::from(id))) }))
        }

        fn complete(&mut self, id: u16, len: u32) {
            let slot = usize::from(self.used_idx % self.size);
            unsafe {
                let entry = self.used.add(4 + 8 * slot);
                ptr::write_volatile(entry.cast::<u32>(), u32::from(id));
                ptr::write_volatile(entry.add(4).cast::<u32>(), len);
                self.used_idx = self.used_idx.wrapping_add(1);
                ptr::write_volatile(self.used.add(2).cast::<u16>(), self.used_idx);
            }
        }

        fn set_no_notify(&mut self, on: bool) {
            unsafe { ptr::write_volatile(self.used.cast::<u16>(), u16::from(on)) };
        }
    }

    #[test]
    fn buffers_round_trip_across_index_wraparound() {
        let (mut q, mut dev) = setup(4);
        for id in 0..4 {
            q.set_descriptor(id, Descriptor { addr: 0x1000 * u64::from(id), len: 2048, flags: DESC_F_WRITE, next: 0 });
            q.push(id);
        }
        // 70000 completions: both free-running u16 indices wrap.
        for round in 0..70_000u32 {
            let (id, desc) = dev.take().expect("a buffer is available");
            assert_eq!(desc.addr, 0x1000 * u64::from(id));
            assert_eq!((desc.len, desc.flags), (2048, DESC_F_WRITE));
            dev.complete(id, round % 2048);
            assert!(q.has_used());
            let used = q.pop_used().unwrap();
            assert_eq!(used, Used { id: u32::from(id), len: round % 2048 });
            assert!(!q.has_used() && q.pop_used().is_none());
            q.push(id);
        }
    }

    #[test]
    fn completions_out_of_order() {
        let (mut q, mut dev) = setup(8);
        for id in 0..3 {
            q.push(id);
        }
        let taken: Vec<u16> = (0..3).map(|_| dev.take().unwrap().0).collect();
        assert_eq!(taken, [0, 1, 2]);
        assert!(dev.take().is_none());
        dev.complete(2, 20);
        dev.complete(0, 0);
        assert_eq!(q.pop_used(), Some(Used { id: 2, len: 20 }));
        assert_eq!(q.pop_used(), Some(Used { id: 0, len: 0 }));
        assert_eq!(q.pop_used(), None);
    }

    #[test]
    fn notification_hint() {
        let (mut q, mut dev) = setup(4);
        q.push(0);
        assert!(q.needs_notification());
        dev.set_no_notify(true);
        assert!(!q.needs_notification());
        dev.set_no_notify(false);
        assert!(q.needs_notification());
        // The driver never asks the device to hold back its signals.
        assert_eq!(unsafe { ptr::read_volatile(dev.avail.cast::<u16>()) }, 0);
    }
}
