//! A split ring in plain test memory, driven the way a guest driver would, for the rx and tx
//! unit tests.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// VRING_DESC_F_NEXT
pub const NEXT: u16 = 1;
/// VRING_DESC_F_WRITE
pub const WRITE: u16 = 2;

/// Buffers live from here on (the rings sit at 0).
pub const BUFFERS: u64 = 0x10000;
/// Size of the test memory.
pub const MEM_SIZE: usize = 0x100000;

/// Test memory.
pub fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A driver's view of one split ring.
pub struct Ring<'a> {
    /// The rings in memory.
    pub mock: MockSplitQueue<'a, GuestMemoryMmap<()>>,
    mem: &'a GuestMemoryMmap<()>,
    size: u16,
    avail: u16,
    used_seen: u16,
}

impl<'a> Ring<'a> {
    /// A ring of `size` entries at address 0.
    pub fn new(mem: &'a GuestMemoryMmap<()>, size: u16) -> Ring<'a> {
        Ring { mock: MockSplitQueue::new(mem, size), mem, size, avail: 0, used_seen: 0 }
    }

    /// The device side of the ring.
    pub fn queue(&self) -> Queue {
        self.mock.create_queue().unwrap()
    }

    /// Writes descriptor `i`.
    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.mock.desc_table().store(i, RawDescriptor::from(Descriptor::new(addr, len, flags, next))).unwrap();
    }

    /// Offers the chain starting at `head`.
    pub fn offer(&mut self, head: u16) {
        self.mock.avail().ring().ref_at((self.avail % self.size) as usize).unwrap().store(head);
        self.avail = self.avail.wrapping_add(1);
        self.mock.avail().idx().store(self.avail);
    }

    /// Writes `data` at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Reads `len` bytes at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Used entries added since the last call: (head, len).
    pub fn used(&mut self) -> Vec<(u32, u32)> {
        let idx = self.mock.used().idx().load();
        let mut out = vec![];
        while self.used_seen != idx {
            let e = self.mock.used().ring().ref_at((self.used_seen % self.size) as usize).unwrap().load();
            out.push((e.id(), e.len()));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A 12-byte zero vnet header followed by an Ethernet frame of `len` bytes filled with `fill`.
pub fn frame_bytes(len: usize, fill: u8) -> Vec<u8> {
    let mut v = vec![0u8; 12];
    v.extend(std::iter::repeat_n(fill, len));
    v
}
