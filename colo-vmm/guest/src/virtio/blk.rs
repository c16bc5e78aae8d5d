//! The virtio block device (virtio 1.x §5.2): one request queue, one request at a time.
//!
//! A request is a chain of three descriptors — the 16-byte header, the data, the status byte —
//! always the same three, over memory carved at boot. colo-vmm serves a request inside the
//! notification's MMIO exit, so it is complete when the notify returns; the driver still waits
//! for the used entry (halting 50 µs between looks), as a device may be slower.
//!
//! Features: `VERSION_1`, `FLUSH` (a flush request makes written data durable), `RO` (the
//! disk refuses writes), `BLK_SIZE` (read, not needed: sectors are 512 bytes).

use core::ptr;

use colo_guest::kvlog::Sectors;
use colo_guest::virtqueue::{Descriptor, SplitQueue, DESC_F_NEXT, DESC_F_WRITE};
use smoltcp::time::Duration;

use super::mmio::{status, Transport};
use crate::halt;
use crate::region::{Region, PAGE};
use crate::time;

/// Bytes of a sector.
pub const SECTOR: u64 = 512;
/// Most data bytes per request.
pub const DATA_BYTES: usize = 64 << 10;

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_VERSION_1: u64 = 1 << 32;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const S_OK: u8 = 0;
const QUEUE: u16 = 0;
/// The queue size used (three descriptors per request, one request at a time).
const QUEUE_SIZE: u16 = 4;
/// How long a request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Memory of the device: the rings (a page each), a page for header and status, the data.
pub struct BlkMemory {
    rings: *mut u8,
    header: *mut u8,
    data: *mut u8,
}

impl BlkMemory {
    /// Bytes [`BlkMemory::carve`] takes.
    pub const BYTES: u64 = 4 * PAGE + DATA_BYTES as u64;

    /// Takes the device's memory from `region`.
    pub fn carve(region: &mut Region) -> Option<BlkMemory> {
        let rings = region.take(3 * PAGE)?;
        let header = region.take(PAGE)?;
        let data = region.take(DATA_BYTES as u64)?;
        Some(BlkMemory { rings, header, data })
    }

    fn status(&self) -> *mut u8 {
        // SAFETY: byte 64 of the header page.
        unsafe { self.header.add(64) }
    }
}

/// The driver.
pub struct VirtioBlk {
    transport: Transport,
    queue: SplitQueue,
    mem: BlkMemory,
    sectors: u64,
    readonly: bool,
    flush: bool,
}

// SAFETY: the rings and buffers are memory carved for this device alone, reached only through
// this value, which one vCPU at a time holds (behind the disk's lock).
unsafe impl Send for VirtioBlk {}

impl VirtioBlk {
    /// Sets the device up.
    pub fn init(transport: Transport, mem: BlkMemory) -> Result<VirtioBlk, &'static str> {
        let result = Self::try_init(transport, mem);
        if result.is_err() {
            transport.add_status(status::FAILED);
        }
        result
    }

    fn try_init(transport: Transport, mem: BlkMemory) -> Result<VirtioBlk, &'static str> {
        transport.reset();
        transport.add_status(status::ACKNOWLEDGE);
        transport.add_status(status::DRIVER);
        let offered = transport.device_features();
        if offered & F_VERSION_1 == 0 {
            return Err("the device does not offer VIRTIO_F_VERSION_1");
        }
        transport.set_driver_features(offered & (F_VERSION_1 | F_FLUSH | F_RO));
        transport.add_status(status::FEATURES_OK);
        if transport.status() & status::FEATURES_OK == 0 {
            return Err("the device refused the features");
        }
        if transport.queue_max_size(QUEUE) < QUEUE_SIZE {
            return Err("the device's queue is too small");
        }
        // SAFETY: three zeroed pages carved for this queue alone (BlkMemory::carve).
        let queue = unsafe {
            SplitQueue::new(QUEUE_SIZE, mem.rings, mem.rings.add(PAGE as usize), mem.rings.add(2 * PAGE as usize))
        };
        transport.setup_queue(QUEUE, &queue)?;
        let mut capacity = [0u8; 8];
        transport.read_config(0, &mut capacity);
        transport.add_status(status::DRIVER_OK);
        Ok(VirtioBlk {
            transport,
            queue,
            mem,
            sectors: u64::from_le_bytes(capacity),
            readonly: offered & F_RO != 0,
            flush: offered & F_FLUSH != 0,
        })
    }

    /// 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether the disk refuses writes.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Offers the chain at descriptor 0 and waits for it to come back; returns the used length.
    fn submit(&mut self) -> Result<u32, &'static str> {
        self.queue.push(0);
        if self.queue.needs_notification() {
            self.transport.notify(QUEUE);
        }
        let start = time::now();
        loop {
            if let Some(used) = self.queue.pop_used() {
                if used.id != 0 {
                    return Err("the device returned a request the driver did not make");
                }
                return Ok(used.len);
            }
            if time::now() - start > TIMEOUT {
                return Err("the disk did not answer");
            }
            halt::halt(Some(Duration::from_micros(50)));
        }
    }

    /// One request: header, `len` bytes of data (written by the device when `device_writes`),
    /// status.
    fn request(&mut self, kind: u32, sector: u64, len: usize, device_writes: bool) -> Result<(), &'static str> {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        // SAFETY: the header page and the status byte are this device's memory.
        unsafe {
            ptr::copy_nonoverlapping(header.as_ptr(), self.mem.header, 16);
            ptr::write_volatile(self.mem.status(), 0xff);
        }
        let (header_at, data_at, status_at) = (self.mem.header as u64, self.mem.data as u64, self.mem.status() as u64);
        let next = if len > 0 { 1 } else { 2 };
        self.queue.set_descriptor(0, Descriptor { addr: header_at, len: 16, flags: DESC_F_NEXT, next });
        if len > 0 {
            let flags = DESC_F_NEXT | if device_writes { DESC_F_WRITE } else { 0 };
            self.queue.set_descriptor(1, Descriptor { addr: data_at, len: len as u32, flags, next: 2 });
        }
        self.queue.set_descriptor(2, Descriptor { addr: status_at, len: 1, flags: DESC_F_WRITE, next: 0 });
        self.submit()?;
        // SAFETY: the status byte, written by the device before it returned the chain.
        match unsafe { ptr::read_volatile(self.mem.status()) } {
            S_OK => Ok(()),
            1 => Err("I/O error"),
            2 => Err("unsupported request"),
            _ => Err("no status from the device"),
        }
    }

    fn check(&self, sector: u64, bytes: usize) -> Result<(), &'static str> {
        if !(bytes as u64).is_multiple_of(SECTOR) {
            return Err("not whole sectors");
        }
        match sector.checked_add(bytes as u64 / SECTOR) {
            Some(end) if end <= self.sectors => Ok(()),
            _ => Err("beyond the disk"),
        }
    }

    /// Reads `buf.len()` bytes (whole sectors) from `sector` on.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), &'static str> {
        self.check(sector, buf.len())?;
        for (i, chunk) in buf.chunks_mut(DATA_BYTES).enumerate() {
            self.request(T_IN, sector + (i * DATA_BYTES) as u64 / SECTOR, chunk.len(), true)?;
            // SAFETY: the device filled this many bytes of the data area.
            unsafe { ptr::copy_nonoverlapping(self.mem.data, chunk.as_mut_ptr(), chunk.len()) };
        }
        Ok(())
    }

    /// Writes `data` (whole sectors) from `sector` on.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), &'static str> {
        self.check(sector, data.len())?;
        for (i, chunk) in data.chunks(DATA_BYTES).enumerate() {
            // SAFETY: the data area holds DATA_BYTES, and a chunk is at most that.
            unsafe { ptr::copy_nonoverlapping(chunk.as_ptr(), self.mem.data, chunk.len()) };
            self.request(T_OUT, sector + (i * DATA_BYTES) as u64 / SECTOR, chunk.len(), false)?;
        }
        Ok(())
    }

    /// Makes what was written durable (nothing to do if the device has no FLUSH).
    pub fn flush(&mut self) -> Result<(), &'static str> {
        if self.flush {
            self.request(T_FLUSH, 0, 0, false)?;
        }
        Ok(())
    }

    /// Writes `len` bytes of `byte` from `sector` on, from the data area (no copy in).
    pub fn fill(&mut self, sector: u64, len: usize, byte: u8) -> Result<(), &'static str> {
        self.check(sector, len)?;
        // SAFETY: the data area holds DATA_BYTES.
        unsafe { ptr::write_bytes(self.mem.data, byte, len.min(DATA_BYTES)) };
        let mut done = 0;
        while done < len {
            let n = (len - done).min(DATA_BYTES);
            self.request(T_OUT, sector + done as u64 / SECTOR, n, false)?;
            done += n;
        }
        Ok(())
    }

    /// Reads `len` bytes from `sector` on into the data area (discarded).
    pub fn read_through(&mut self, sector: u64, len: usize) -> Result<(), &'static str> {
        self.check(sector, len)?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(DATA_BYTES);
            self.request(T_IN, sector + done as u64 / SECTOR, n, true)?;
            done += n;
        }
        Ok(())
    }

    /// Offers the device malformed requests (the `badblk` app, a test of the VMM): a buffer
    /// outside RAM, no status byte, a loop, a read past the end, a partial sector. Each must
    /// come back (failed) and the device must go on serving. Returns how many were sent.
    pub fn send_bad_requests(&mut self) -> Result<u32, &'static str> {
        let (header_at, data_at, status_at) = (self.mem.header as u64, self.mem.data as u64, self.mem.status() as u64);
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&T_IN.to_le_bytes());
        // SAFETY: the header page is this device's memory.
        unsafe { ptr::copy_nonoverlapping(header.as_ptr(), self.mem.header, 16) };
        let d = |addr, len, flags, next| Descriptor { addr, len, flags, next };
        let chains: [[Descriptor; 3]; 3] = [
            // Data far outside RAM (in the MMIO window).
            [
                d(header_at, 16, DESC_F_NEXT, 1),
                d(0xd800_0000, 4096, DESC_F_NEXT | DESC_F_WRITE, 2),
                d(status_at, 1, DESC_F_WRITE, 0),
            ],
            // No status byte: only the header.
            [d(header_at, 16, 0, 0), d(0, 0, 0, 0), d(0, 0, 0, 0)],
            // A loop of readable descriptors.
            [d(header_at, 16, DESC_F_NEXT, 1), d(data_at, 512, DESC_F_NEXT, 0), d(0, 0, 0, 0)],
        ];
        let mut sent = 0;
        for chain in chains {
            for (i, desc) in chain.into_iter().enumerate() {
                self.queue.set_descriptor(i as u16, desc);
            }
            self.submit()?;
            sent += 1;
        }
        // Valid chains, bad requests: past the end, a partial sector.
        if self.request(T_IN, self.sectors, 512, true).is_ok() {
            return Err("a read past the end succeeded");
        }
        sent += 1;
        if self.request(T_IN, 0, 100, true).is_ok() {
            return Err("a partial-sector read succeeded");
        }
        sent += 1;
        Ok(sent)
    }
}

/// The disk behind its lock, as the store sees it.
pub struct Locked<'a>(pub &'a spinning_top::Spinlock<VirtioBlk>);

impl Sectors for Locked<'_> {
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), &'static str> {
        self.0.lock().read(sector, buf)
    }
    fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), &'static str> {
        self.0.lock().write(sector, data)
    }
    fn flush(&mut self) -> Result<(), &'static str> {
        self.0.lock().flush()
    }
}
