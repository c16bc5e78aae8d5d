//! The virtio network device (virtio 1.x §5.1): one receive and one transmit queue.
//!
//! Features: `VIRTIO_F_VERSION_1` (required; its header is 12 bytes) and `VIRTIO_NET_F_MAC`
//! (required: the MAC comes from the device). No offloads and no mergeable receive buffers:
//! every receive buffer holds a whole frame, so each frame is one descriptor. Buffers are
//! fixed: descriptor `i` always points at buffer `i` of its queue.

use alloc::vec;
use alloc::vec::Vec;

use colo_guest::virtqueue::{self, Descriptor, SplitQueue, DESC_F_WRITE};

use super::mmio::{status, Transport};
use crate::region::{Region, PAGE};

/// Bytes of `virtio_net_hdr` with `VIRTIO_F_VERSION_1` (`num_buffers` included).
pub const HEADER_LEN: usize = 12;
/// Bytes of each frame buffer: header plus the largest frame (1514, or 1518 with a VLAN tag).
pub const BUFFER_SIZE: usize = 2048;
/// Largest frame the guest sends: an untagged Ethernet frame with a 1500-byte payload.
pub const MAX_FRAME: usize = 1514;
/// Most entries per queue the guest uses.
pub const MAX_QUEUE_SIZE: u16 = 256;

const RX: u16 = 0;
const TX: u16 = 1;
const F_MAC: u64 = 1 << 5;
const F_VERSION_1: u64 = 1 << 32;

/// Memory of one queue: descriptor table, available ring and used ring (a page each), then
/// the frame buffers.
const QUEUE_BYTES: u64 = 3 * PAGE + MAX_QUEUE_SIZE as u64 * BUFFER_SIZE as u64;

/// Memory for the two queues, carved from free RAM before the heap exists.
pub struct NetMemory {
    rx: *mut u8,
    tx: *mut u8,
}

impl NetMemory {
    /// Bytes [`NetMemory::carve`] takes.
    pub const BYTES: u64 = 2 * QUEUE_BYTES;

    /// Takes the queues' memory from `region`.
    pub fn carve(region: &mut Region) -> Option<NetMemory> {
        Some(NetMemory { rx: region.take(QUEUE_BYTES)?, tx: region.take(QUEUE_BYTES)? })
    }
}

/// Sets up one queue over `memory`: the largest power of two the device allows, up to
/// [`MAX_QUEUE_SIZE`].
fn make_queue(transport: &Transport, index: u16, memory: *mut u8) -> Result<SplitQueue, &'static str> {
    let max = transport.queue_max_size(index).min(MAX_QUEUE_SIZE);
    if max == 0 {
        return Err("the device has too few queues");
    }
    let size = 1 << (15 - max.leading_zeros());
    // SAFETY: `memory` is QUEUE_BYTES of zeroed RAM only this queue uses (NetMemory::carve);
    // each area is a page, enough for MAX_QUEUE_SIZE entries and aligned beyond what virtio asks.
    let queue = unsafe { SplitQueue::new(size, memory, memory.add(PAGE as usize), memory.add(2 * PAGE as usize)) };
    transport.setup_queue(index, &queue)?;
    Ok(queue)
}

/// The receive queue: every buffer not being read by the guest is with the device.
pub struct RxQueue {
    queue: SplitQueue,
    buffers: *mut u8,
    /// Which descriptors the device holds: a device that returns one twice is ignored.
    with_device: Vec<bool>,
    notify_pending: bool,
    /// Frames received.
    pub frames: u64,
    /// Used entries that were not a valid frame.
    pub errors: u64,
}

impl RxQueue {
    fn new(queue: SplitQueue, memory: *mut u8) -> RxQueue {
        let size = queue.size();
        // SAFETY: the buffers follow the three ring pages inside the queue's memory.
        let buffers = unsafe { memory.add(3 * PAGE as usize) };
        let mut rx = RxQueue {
            queue,
            buffers,
            with_device: vec![false; usize::from(size)],
            notify_pending: false,
            frames: 0,
            errors: 0,
        };
        for id in 0..size {
            let addr = rx.buffer(id) as u64;
            rx.queue.set_descriptor(id, Descriptor { addr, len: BUFFER_SIZE as u32, flags: DESC_F_WRITE, next: 0 });
            rx.give(id);
        }
        rx
    }

    fn buffer(&self, id: u16) -> *mut u8 {
        // SAFETY: `id < size`: buffer `id` lies inside the carved memory.
        unsafe { self.buffers.add(usize::from(id) * BUFFER_SIZE) }
    }

    /// Hands buffer `id` back to the device.
    pub fn give(&mut self, id: u16) {
        self.with_device[usize::from(id)] = true;
        self.queue.push(id);
        self.notify_pending = true;
    }

    /// Whether the device has returned buffers (a memory read, no exit).
    pub fn has_frames(&self) -> bool {
        self.queue.has_used()
    }

    /// The next received frame as (buffer id, frame length). The caller reads it with
    /// [`RxQueue::frame`] and returns the buffer with [`RxQueue::give`].
    pub fn take(&mut self) -> Option<(u16, usize)> {
        while let Some(used) = self.queue.pop_used() {
            let id = match u16::try_from(used.id) {
                Ok(id) if id < self.queue.size() && self.with_device[usize::from(id)] => id,
                _ => {
                    self.errors += 1;
                    continue;
                }
            };
            self.with_device[usize::from(id)] = false;
            let len = used.len as usize;
            if len <= HEADER_LEN || len > BUFFER_SIZE {
                self.errors += 1;
                self.give(id);
                continue;
            }
            self.frames += 1;
            return Some((id, len - HEADER_LEN));
        }
        None
    }

    /// The frame in buffer `id` (as returned by [`RxQueue::take`]).
    pub fn frame(&self, id: u16, len: usize) -> &[u8] {
        debug_assert!(!self.with_device[usize::from(id)] && len <= BUFFER_SIZE - HEADER_LEN);
        // SAFETY: the device is done with the buffer (it is not `with_device`), and
        // `HEADER_LEN + len <= BUFFER_SIZE` (checked by `take`).
        unsafe { core::slice::from_raw_parts(self.buffer(id).add(HEADER_LEN), len) }
    }
}

/// The transmit queue: free buffers are the guest's, the rest are with the device.
pub struct TxQueue {
    queue: SplitQueue,
    buffers: *mut u8,
    free: Vec<u16>,
    with_device: Vec<bool>,
    notify_pending: bool,
    /// Frames sent.
    pub frames: u64,
}

impl TxQueue {
    fn new(queue: SplitQueue, memory: *mut u8) -> TxQueue {
        let size = queue.size();
        // SAFETY: the buffers follow the three ring pages inside the queue's memory.
        let buffers = unsafe { memory.add(3 * PAGE as usize) };
        TxQueue {
            queue,
            buffers,
            free: (0..size).rev().collect(),
            with_device: vec![false; usize::from(size)],
            notify_pending: false,
            frames: 0,
        }
    }

    /// Takes back the buffers the device has sent.
    pub fn reclaim(&mut self) {
        while let Some(used) = self.queue.pop_used() {
            if let Ok(id) = u16::try_from(used.id) {
                if id < self.queue.size() && self.with_device[usize::from(id)] {
                    self.with_device[usize::from(id)] = false;
                    self.free.push(id);
                }
            }
        }
    }

    /// Whether every buffer is with the device (after [`TxQueue::reclaim`]).
    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// A free buffer's id.
    pub fn alloc(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// Returns an allocated buffer unused.
    pub fn release(&mut self, id: u16) {
        self.free.push(id);
    }

    /// The frame area of buffer `id` (after the header), [`MAX_FRAME`] bytes or more.
    pub fn frame_mut(&mut self, id: u16) -> &mut [u8] {
        // SAFETY: buffer `id` is allocated to the caller (not with the device), inside the
        // carved memory.
        unsafe {
            let buffer = self.buffers.add(usize::from(id) * BUFFER_SIZE);
            core::slice::from_raw_parts_mut(buffer.add(HEADER_LEN), BUFFER_SIZE - HEADER_LEN)
        }
    }

    /// Sends the first `len` bytes of buffer `id`'s frame area.
    pub fn send(&mut self, id: u16, len: usize) {
        let len = len.min(BUFFER_SIZE - HEADER_LEN);
        let addr = self.buffers as u64 + u64::from(id) * BUFFER_SIZE as u64;
        // No offloads: an all-zero header (and num_buffers must be 0 on transmit).
        // SAFETY: the header is the buffer's first HEADER_LEN bytes, ours until pushed.
        unsafe { core::ptr::write_bytes(addr as *mut u8, 0, HEADER_LEN) };
        self.queue.set_descriptor(id, Descriptor { addr, len: (HEADER_LEN + len) as u32, flags: 0, next: 0 });
        self.with_device[usize::from(id)] = true;
        self.queue.push(id);
        self.notify_pending = true;
        self.frames += 1;
    }
}

/// A virtio-net device, set up and running.
pub struct VirtioNet {
    transport: Transport,
    mac: [u8; 6],
    /// The receive queue.
    pub rx: RxQueue,
    /// The transmit queue.
    pub tx: TxQueue,
}

impl VirtioNet {
    /// Resets the device behind `transport`, negotiates features, sets up both queues over
    /// `memory`, gives every receive buffer to the device and starts it.
    pub fn init(transport: Transport, memory: NetMemory) -> Result<VirtioNet, &'static str> {
        let result = Self::try_init(transport, memory);
        if result.is_err() {
            transport.add_status(status::FAILED);
        }
        result
    }

    fn try_init(transport: Transport, memory: NetMemory) -> Result<VirtioNet, &'static str> {
        transport.reset();
        transport.add_status(status::ACKNOWLEDGE);
        transport.add_status(status::DRIVER);
        let offered = transport.device_features();
        if offered & F_VERSION_1 == 0 {
            return Err("the device does not offer VIRTIO_F_VERSION_1");
        }
        if offered & F_MAC == 0 {
            return Err("the device does not offer a MAC address (VIRTIO_NET_F_MAC)");
        }
        transport.set_driver_features(F_VERSION_1 | F_MAC);
        transport.add_status(status::FEATURES_OK);
        if transport.status() & status::FEATURES_OK == 0 {
            return Err("the device refused the features");
        }
        let rx = RxQueue::new(make_queue(&transport, RX, memory.rx)?, memory.rx);
        let tx = TxQueue::new(make_queue(&transport, TX, memory.tx)?, memory.tx);
        let mut mac = [0u8; 6];
        transport.read_config(0, &mut mac);
        transport.add_status(status::DRIVER_OK);
        let mut net = VirtioNet { transport, mac, rx, tx };
        // The receive buffers were queued before DRIVER_OK; tell the device about them now.
        net.flush();
        Ok(net)
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Notifies the device of buffers queued since the last flush, where it wants to know.
    /// Call once per main-loop pass: a notification is an MMIO exit.
    pub fn flush(&mut self) {
        if core::mem::take(&mut self.rx.notify_pending) && self.rx.queue.needs_notification() {
            self.transport.notify(RX);
        }
        if core::mem::take(&mut self.tx.notify_pending) && self.tx.queue.needs_notification() {
            self.transport.notify(TX);
        }
    }
}

// The queue layout constants must agree with what a queue of MAX_QUEUE_SIZE needs.
const _: () = {
    assert!(virtqueue::layout::desc_bytes(MAX_QUEUE_SIZE) <= PAGE as usize);
    assert!(virtqueue::layout::avail_bytes(MAX_QUEUE_SIZE) <= PAGE as usize);
    assert!(virtqueue::layout::used_bytes(MAX_QUEUE_SIZE) <= PAGE as usize);
    assert!(MAX_FRAME + 4 + HEADER_LEN <= BUFFER_SIZE);
};
