//! virtio-blk (virtio 1.x §5.2) served by the VMM itself, one request queue.
//!
//! Requests are served synchronously, on the vCPU thread whose QUEUE_NOTIFY write exits to the
//! VMM: by the time that write returns to the guest, every request it offered is complete and
//! in the used ring. So there is never a request in flight when the vCPUs are paused (a
//! checkpoint needs no drain), and no used-buffer notification is needed (the device has no
//! call eventfd). Why in the VMM and not a vhost-user-blk backend: the disk's COLO state — the
//! secondary's overlay, the blocks written since the last checkpoint, their commit or discard —
//! must move in lock-step with the VMM's pause and checkpoint transaction, and vhost-user has no
//! messages for any of it; unlike the network, no other process needs to see the data path.
//!
//! Every descriptor chain is untrusted: virtio-queue's `Reader`/`Writer` check each buffer lies
//! in guest memory and lengths do not overflow, the iterator bounds chain length (loops end),
//! and each request is checked for a header, a status byte, whole sectors, a bounded size and
//! the disk's range. A bad request fails alone (status IOERR when it has a status byte, used
//! length 0 when not), is counted ([`DiskStats::bad_requests`](super::disk::DiskStats)) and
//! logged at a limited rate; the VMM keeps serving. A ring the driver broke (an available index
//! too far ahead) makes the device ask for a reset.

use std::io::{Read, Write};
use std::os::fd::RawFd;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{ByteValued, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::disk::Disk;
use super::SECTOR_SIZE;
use crate::devices::virtio_mmio::{QueueConfig, VirtioDevice};
use crate::devices::DeviceError;
use crate::vstate::memory::GuestMemoryMmap;

/// Virtio device type of a block device.
pub const DEVICE_TYPE: u32 = 2;
/// Largest queue offered.
const QUEUE_MAX: u16 = 256;
/// Most data bytes in one request.
pub const MAX_REQUEST: usize = 1 << 20;
/// Most chains served per notification (a driver adding chains while they are served must not
/// keep the vCPU in the VMM forever).
const BUDGET: usize = 2 * QUEUE_MAX as usize;

/// The request header (`struct virtio_blk_outhdr`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RequestHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

// SAFETY: plain integers, no padding (4 + 4 + 8 bytes, 8-aligned).
unsafe impl ByteValued for RequestHeader {}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
enum Bad {
    /// A buffer outside guest memory, lengths that overflow, a chain that does not end.
    #[error("bad descriptor chain: {0}")]
    Chain(virtio_queue::Error),
    /// Fewer than 16 readable bytes of header.
    #[error("no request header")]
    Header,
    /// No writable byte for the status.
    #[error("no status byte")]
    NoStatus,
    /// Data that is not whole sectors, too much of it, or in the wrong direction.
    #[error("{0}")]
    Data(&'static str),
    /// Sectors beyond the disk.
    #[error("{bytes} bytes at sector {sector} are beyond the disk")]
    Range { sector: u64, bytes: usize },
    /// A write to a read-only disk.
    #[error("a write to a read-only disk")]
    ReadOnly,
}

/// What a served request left in the used ring.
struct Done {
    /// Bytes written into the chain (data and status).
    used: u32,
}

/// The device.
pub struct VirtioBlk {
    disk: Disk,
    memory: GuestMemoryMmap,
    queue: Option<Queue>,
    /// Reused for request data.
    scratch: Vec<u8>,
}

impl VirtioBlk {
    /// A device serving `disk` from `memory`.
    pub fn new(disk: Disk, memory: GuestMemoryMmap) -> VirtioBlk {
        VirtioBlk { disk, memory, queue: None, scratch: Vec::new() }
    }

    /// Serves every chain offered (up to the budget).
    fn process(&mut self) -> Result<(), virtio_queue::Error> {
        let Some(mut queue) = self.queue.take() else { return Ok(()) };
        let result = self.process_queue(&mut queue);
        self.queue = Some(queue);
        result
    }

    fn process_queue(&mut self, queue: &mut Queue) -> Result<(), virtio_queue::Error> {
        let mem = self.memory.clone();
        for _ in 0..BUDGET {
            let Some(chain) = queue.iter(&mem)?.next() else { return Ok(()) };
            let head = chain.head_index();
            let used = match self.serve(chain) {
                Ok(done) => done.used,
                Err((bad, used)) => {
                    self.disk.count_bad_request();
                    let total = self.disk.stats().bad_requests;
                    if total.is_power_of_two() {
                        tracing::warn!(why = %bad, total, "virtio-blk: refused a request");
                    }
                    used
                }
            };
            match queue.add_used(&mem, head, used) {
                Ok(()) | Err(virtio_queue::Error::InvalidDescriptorIndex) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Serves one request; a bad one comes back with the used length to complete it with (1
    /// when IOERR could be written to its status byte, 0 when it has none).
    fn serve(&mut self, chain: DescriptorChain<&GuestMemoryMmap>) -> Result<Done, (Bad, u32)> {
        let mem = self.memory.clone();
        let mem = &mem;
        let mut reader = Reader::new(mem, chain.clone()).map_err(|e| (Bad::Chain(e), 0))?;
        let mut writer = Writer::new(mem, chain).map_err(|e| (Bad::Chain(e), 0))?;
        let writable = writer.available_bytes();
        if writable == 0 {
            return Err((Bad::NoStatus, 0));
        }
        let mut status = writer.split_at(writable - 1).map_err(|e| (Bad::Chain(e), 0))?;
        let fail = |bad: Bad, status: &mut Writer<'_, _>| {
            let used = u32::from(status.write_all(&[VIRTIO_BLK_S_IOERR as u8]).is_ok());
            (bad, used)
        };
        if reader.available_bytes() < std::mem::size_of::<RequestHeader>() {
            return Err(fail(Bad::Header, &mut status));
        }
        let header: RequestHeader = match reader.read_obj() {
            Ok(h) => h,
            Err(_) => return Err(fail(Bad::Header, &mut status)),
        };
        let result = match header.kind {
            VIRTIO_BLK_T_IN => self.read(header.sector, &mut reader, &mut writer),
            VIRTIO_BLK_T_OUT => self.write(header.sector, &mut reader, &writer),
            VIRTIO_BLK_T_FLUSH => Ok(self.disk.flush().map(|()| 0)),
            VIRTIO_BLK_T_GET_ID => Ok(self.id(&mut writer)),
            _ => {
                let ok = status.write_all(&[VIRTIO_BLK_S_UNSUPP as u8]).is_ok();
                return Ok(Done { used: u32::from(ok) });
            }
        };
        match result {
            Err(bad) => Err(fail(bad, &mut status)),
            Ok(io) => {
                let (code, data) = match io {
                    Ok(data) => (VIRTIO_BLK_S_OK, data),
                    Err(e) => {
                        tracing::error!(error = %e, disk = %self.disk.path().display(), "virtio-blk: I/O error");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                };
                let ok = status.write_all(&[code as u8]).is_ok();
                Ok(Done { used: data + u32::from(ok) })
            }
        }
    }

    /// Checks a data transfer of `bytes` at `sector`.
    fn check(&self, sector: u64, bytes: usize) -> Result<u64, Bad> {
        if !bytes.is_multiple_of(SECTOR_SIZE as usize) {
            return Err(Bad::Data("not a whole number of sectors"));
        }
        if bytes > MAX_REQUEST {
            return Err(Bad::Data("more data than one request may carry"));
        }
        let end = sector.checked_add(bytes as u64 / SECTOR_SIZE);
        if end.is_none_or(|end| end > self.disk.sectors()) {
            return Err(Bad::Range { sector, bytes });
        }
        Ok(sector * SECTOR_SIZE)
    }

    /// `IN`: disk → the chain's writable buffers (all but the status byte).
    fn read(
        &mut self,
        sector: u64,
        reader: &mut Reader<'_, impl vm_memory::bitmap::BitmapSlice>,
        writer: &mut Writer<'_, impl vm_memory::bitmap::BitmapSlice>,
    ) -> Result<std::io::Result<u32>, Bad> {
        if reader.available_bytes() != 0 {
            return Err(Bad::Data("a read request with data to write"));
        }
        let bytes = writer.available_bytes();
        let offset = self.check(sector, bytes)?;
        self.scratch.resize(bytes, 0);
        Ok(self
            .disk
            .read(offset, &mut self.scratch)
            .and_then(|()| writer.write_all(&self.scratch))
            .map(|()| bytes as u32))
    }

    /// `OUT`: the chain's readable buffers after the header → disk.
    fn write(
        &mut self,
        sector: u64,
        reader: &mut Reader<'_, impl vm_memory::bitmap::BitmapSlice>,
        writer: &Writer<'_, impl vm_memory::bitmap::BitmapSlice>,
    ) -> Result<std::io::Result<u32>, Bad> {
        if writer.available_bytes() != 0 {
            return Err(Bad::Data("a write request with room to read into"));
        }
        let bytes = reader.available_bytes();
        let offset = self.check(sector, bytes)?;
        if self.disk.readonly() {
            return Err(Bad::ReadOnly);
        }
        self.scratch.resize(bytes, 0);
        Ok(reader.read_exact(&mut self.scratch).and_then(|()| self.disk.write(offset, &self.scratch)).map(|()| 0))
    }

    /// `GET_ID`: the image's file name, at most 20 bytes.
    fn id(&self, writer: &mut Writer<'_, impl vm_memory::bitmap::BitmapSlice>) -> std::io::Result<u32> {
        let name = self.disk.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        let n = id.len().min(writer.available_bytes());
        writer.write_all(&id[..n]).map(|()| n as u32)
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        let ro = if self.disk.readonly() { 1 << VIRTIO_BLK_F_RO } else { 0 };
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_BLK_SIZE) | ro
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config { le64 capacity; le32 size_max; le32 seg_max; geometry (4);
        // le32 blk_size; ... }
        let mut config = [0u8; 24];
        config[..8].copy_from_slice(&self.disk.sectors().to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| config.get(o + i)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, _acked: u64, queues: &[QueueConfig], bases: &[u16]) -> Result<(), DeviceError> {
        self.queue = None;
        let Some(q) = queues.first().filter(|q| q.ready && q.size > 0) else { return Ok(()) };
        let fail = |source| DeviceError::Queue { queue: 0, source };
        let mut queue = Queue::new(QUEUE_MAX).map_err(fail)?;
        queue.try_set_size(q.size).map_err(fail)?;
        queue.try_set_desc_table_address(GuestAddress(q.desc)).map_err(fail)?;
        queue.try_set_avail_ring_address(GuestAddress(q.avail)).map_err(fail)?;
        queue.try_set_used_ring_address(GuestAddress(q.used)).map_err(fail)?;
        queue.set_ready(true);
        if !queue.is_valid(&self.memory) {
            return Err(DeviceError::QueueOutsideMemory { queue: 0, what: "ring", gpa: q.desc });
        }
        // Resume where the device stood; the used index is in guest memory (every request
        // taken was completed before the pause).
        queue.set_next_avail(bases.first().copied().unwrap_or(0));
        let used = queue.used_idx(&self.memory, std::sync::atomic::Ordering::Acquire).map_err(fail)?;
        queue.set_next_used(used.0);
        self.queue = Some(queue);
        Ok(())
    }

    fn quiesce(&mut self) -> Result<Vec<u16>, DeviceError> {
        // Nothing is in flight: requests complete inside the notification.
        Ok(vec![self.queue.take().map_or(0, |q| q.next_avail())])
    }

    fn reset(&mut self) {
        self.queue = None;
    }

    fn kick_fds(&self) -> Vec<&EventFd> {
        vec![]
    }

    fn notify(&mut self, queue: u32) -> Result<(), DeviceError> {
        if queue != 0 {
            return Ok(());
        }
        self.process().map_err(|source| DeviceError::Queue { queue: 0, source })
    }

    fn call_fds(&self) -> Vec<RawFd> {
        vec![]
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    use super::*;
    use crate::devices::block::disk::Disk;
    use crate::devices::block::testing::image;
    use crate::devices::block::DiskConfig;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const HEADER: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;
    const SIZE: u16 = 16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// The driver's side of the ring, and the device.
    struct Rig<'a> {
        mem: &'a GuestMemoryMmap,
        ring: MockSplitQueue<'a, GuestMemoryMmap>,
        dev: VirtioBlk,
        disk: Disk,
        avail: u16,
        used_seen: u16,
    }

    impl<'a> Rig<'a> {
        fn new(mem: &'a GuestMemoryMmap, config: &DiskConfig) -> Rig<'a> {
            let ring = MockSplitQueue::new(mem, SIZE);
            let disk = Disk::open(config).unwrap();
            let mut dev = VirtioBlk::new(disk.clone(), mem.clone());
            let q = QueueConfig {
                max_size: QUEUE_MAX,
                size: SIZE,
                ready: true,
                desc: ring.desc_table_addr().0,
                avail: ring.avail_addr().0,
                used: ring.used_addr().0,
            };
            dev.activate(1 << VIRTIO_F_VERSION_1, &[q], &[0]).unwrap();
            Rig { mem, ring, dev, disk, avail: 0, used_seen: 0 }
        }

        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            self.ring.desc_table().store(i, RawDescriptor::from(Descriptor::new(addr, len, flags, next))).unwrap();
        }

        fn header(&self, kind: u32, sector: u64) {
            let h = RequestHeader { kind, reserved: 0, sector };
            self.mem.write_obj(h, GuestAddress(HEADER)).unwrap();
        }

        /// Offers the chain at descriptor 0 and notifies; returns its used length and status.
        fn submit(&mut self) -> (u32, u8) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            self.ring.avail().ring().ref_at((self.avail % SIZE) as usize).unwrap().store(0);
            self.avail = self.avail.wrapping_add(1);
            self.ring.avail().idx().store(self.avail);
            self.dev.notify(0).unwrap();
            let idx = self.ring.used().idx().load();
            assert_eq!(idx, self.used_seen.wrapping_add(1), "exactly one used entry per request");
            let e = self.ring.used().ring().ref_at((self.used_seen % SIZE) as usize).unwrap().load();
            self.used_seen = idx;
            assert_eq!(e.id(), 0);
            (e.len(), self.mem.read_obj(GuestAddress(STATUS)).unwrap())
        }

        /// A request with header, one data buffer (readable for a write, writable for a read)
        /// and a status byte.
        fn request(&mut self, kind: u32, sector: u64, data_len: u32) -> (u32, u8) {
            self.header(kind, sector);
            let data_flags = if kind == VIRTIO_BLK_T_IN { WRITE | NEXT } else { NEXT };
            self.desc(0, HEADER, 16, NEXT, 1);
            self.desc(1, DATA, data_len, data_flags, 2);
            self.desc(2, STATUS, 1, WRITE, 0);
            self.submit()
        }
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

    #[test]
    fn writes_and_reads_round_trip_and_mark_guest_pages_dirty() {
        let (_dir, config) = image(1);
        let mem = memory();
        let mut rig = Rig::new(&mem, &config);
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 8, 8192), (1, OK));
        mem.write_slice(&[0u8; 8192], GuestAddress(DATA)).unwrap();
        use vm_memory::GuestMemoryBackend;
        let _ = std::ops::Deref::deref(mem.iter().next().unwrap()).bitmap().get_and_reset();
        assert_eq!(rig.request(VIRTIO_BLK_T_IN, 8, 8192), (8193, OK));
        let mut back = vec![0u8; 8192];
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, data);
        let bitmap: Vec<u64> = std::ops::Deref::deref(mem.iter().next().unwrap()).bitmap().get_and_reset();
        let dirty = |gpa: u64| bitmap[(gpa / 4096 / 64) as usize] & (1 << ((gpa / 4096) % 64)) != 0;
        assert!(dirty(DATA) && dirty(DATA + 4096) && dirty(STATUS), "the device's writes are in the VMM's dirty log");
        assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, 0).1, OK);
        assert_eq!(
            rig.disk.stats(),
            crate::devices::block::disk::DiskStats { reads: 1, writes: 1, flushes: 1, bad_requests: 0 }
        );
    }

    #[test]
    fn hostile_chains_fail_alone_are_counted_and_the_device_keeps_serving() {
        let (_dir, config) = image(1);
        let mem = memory();
        let mut rig = Rig::new(&mem, &config);
        let sectors = rig.disk.sectors();
        let mut expected_bad = 0;
        let mut bad = |rig: &mut Rig<'_>, want: (u32, u8), what: &str, got: (u32, u8)| {
            expected_bad += 1;
            assert_eq!(got, want, "{what}");
            assert_eq!(rig.disk.stats().bad_requests, expected_bad, "{what} is counted");
        };
        // Beyond the disk, and a sector number that overflows.
        let got = rig.request(VIRTIO_BLK_T_IN, sectors - 1, 1024);
        bad(&mut rig, (1, IOERR), "a read past the end", got);
        let got = rig.request(VIRTIO_BLK_T_OUT, u64::MAX, 512);
        bad(&mut rig, (1, IOERR), "an overflowing sector", got);
        // Not whole sectors; too much data.
        let got = rig.request(VIRTIO_BLK_T_OUT, 0, 100);
        bad(&mut rig, (1, IOERR), "a partial sector", got);
        // A buffer outside guest memory: the chain cannot be trusted, not even its status.
        rig.header(VIRTIO_BLK_T_IN, 0);
        rig.desc(0, HEADER, 16, NEXT, 1);
        rig.desc(1, 0xffff_f000, 4096, WRITE | NEXT, 2);
        rig.desc(2, STATUS, 1, WRITE, 0);
        let got = rig.submit();
        bad(&mut rig, (0, 0xff), "a buffer outside memory", got);
        // Lengths that wrap.
        rig.desc(1, DATA, u32::MAX, NEXT, 3);
        rig.desc(3, DATA, u32::MAX, NEXT, 2);
        let got = rig.submit();
        bad(&mut rig, (0, 0xff), "huge lengths", got);
        // No status byte; a loop of readable descriptors.
        rig.desc(0, HEADER, 16, 0, 0);
        let got = rig.submit();
        bad(&mut rig, (0, 0xff), "no status", got);
        rig.desc(0, HEADER, 16, NEXT, 1);
        rig.desc(1, DATA, 512, NEXT, 0);
        let got = rig.submit();
        bad(&mut rig, (0, 0xff), "a loop", got);
        // A header too short.
        rig.desc(0, HEADER, 8, NEXT, 2);
        let got = rig.submit();
        bad(&mut rig, (1, IOERR), "a short header", got);
        // A read with data to write, a write with room to read into.
        rig.header(VIRTIO_BLK_T_IN, 0);
        rig.desc(0, HEADER, 16, NEXT, 1);
        rig.desc(1, DATA, 512, NEXT, 2);
        let got = rig.submit();
        bad(&mut rig, (1, IOERR), "a read carrying data", got);
        rig.header(VIRTIO_BLK_T_OUT, 0);
        rig.desc(1, DATA, 512, WRITE | NEXT, 2);
        let got = rig.submit();
        bad(&mut rig, (1, IOERR), "a write with writable data", got);
        // An unknown request is unsupported, not hostile.
        rig.header(77, 0);
        rig.desc(0, HEADER, 16, NEXT, 2);
        assert_eq!(rig.submit(), (1, VIRTIO_BLK_S_UNSUPP as u8));
        assert_eq!(rig.disk.stats().bad_requests, expected_bad);
        // And a good request still works.
        mem.write_slice(&[9u8; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 3, 512), (1, OK));
        // A driver that moves the available index too far breaks the ring: the device says so.
        rig.ring.avail().idx().store(rig.avail.wrapping_add(SIZE + 1));
        assert!(rig.dev.notify(0).is_err(), "a broken ring is an error of the device");
    }

    #[test]
    fn a_read_only_disk_refuses_writes_and_offers_ro() {
        let (_dir, mut config) = image(1);
        config.readonly = true;
        let mem = memory();
        let mut rig = Rig::new(&mem, &config);
        assert_ne!(rig.dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 0, 512), (1, IOERR));
        assert_eq!(rig.disk.stats().bad_requests, 1);
        assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, 512), (513, OK));
    }

    #[test]
    fn a_paused_queue_resumes_where_it_stood() {
        let (_dir, config) = image(1);
        let mem = memory();
        let mut rig = Rig::new(&mem, &config);
        assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, 0).1, OK);
        assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, 0).1, OK);
        let bases = rig.dev.quiesce().unwrap();
        assert_eq!(bases, vec![2]);
        let q = QueueConfig {
            max_size: QUEUE_MAX,
            size: SIZE,
            ready: true,
            desc: rig.ring.desc_table_addr().0,
            avail: rig.ring.avail_addr().0,
            used: rig.ring.used_addr().0,
        };
        // A fresh device (a restore) takes over at the saved position.
        let mut dev = VirtioBlk::new(rig.disk.clone(), mem.clone());
        dev.activate(0, &[q], &bases).unwrap();
        rig.dev = dev;
        assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, 0).1, OK);
        let mut cfg = [0u8; 8];
        rig.dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), (1 << 20) / 512, "capacity in sectors");
    }
}
