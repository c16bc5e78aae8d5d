//! Snapshot files: a state stream holding the machine description, every non-zero page of
//! guest RAM, every non-zero block of the disk (unless it is read-only: then the restoring VM
//! needs the same image), and the vCPU, VM and device state.
//!
//! ```text
//! State { machine }  Pages*  Blocks*  State { paused: vCPUs, VM, devices }  End
//! ```
//! Restoring reads everything into fresh memory and a stage beside the image, and applies the
//! state and the disk only once the end record has verified the whole stream.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::state::{MachineState, StateRecord};
use super::stream::{blocks, pages, Kind, StreamError, StreamReader, StreamWriter, PAGE_SIZE};
use crate::devices::block::disk::{Disk, DiskError};
use crate::devices::block::overlay::{Overlay, RUN};
use crate::devices::block::BLOCK_SIZE;
use crate::migratable::{while_paused, Migratable, MigratableError};
use crate::vstate::memory::GuestMemoryMmap;

/// What kind of machine the state belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Bytes of guest RAM.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// TSC frequency of the source, kHz.
    pub tsc_khz: u64,
    /// Which program wrote it.
    pub writer: String,
    /// The disk, if the VM has one (stream 2.1; a 2.0 stream has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskMeta>,
}

/// The disk a VM has: a destination's `--disk` must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskMeta {
    /// Bytes.
    pub bytes: u64,
    /// The guest may only read it: its blocks are not carried (the destination must have the
    /// same image).
    pub readonly: bool,
}

/// What a snapshot contained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Pages written (non-zero pages).
    pub pages: u64,
    /// Disk blocks written (non-zero blocks).
    pub blocks: u64,
    /// Bytes of the whole stream.
    pub bytes: u64,
}

/// Whether a page is all zeros (a restored VM starts from zeroed memory, so those are skipped).
pub fn is_zero(page: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u64; align_to handles the unaligned ends.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Errors saving a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Pausing, saving or resuming the VM failed.
    #[error(transparent)]
    Vm(#[from] MigratableError),
    /// Writing the file failed.
    #[error("writing the snapshot: {0}")]
    Write(#[from] StreamError),
    /// Creating the file failed.
    #[error("cannot create {path}: {source}")]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Saves `vm` to the file `path`: paused while saving, resumed after (a VM the user stopped
/// stays stopped).
pub fn save<V: Migratable + ?Sized>(vm: &V, path: &Path) -> Result<SnapshotStats, SnapshotError> {
    let t = std::time::Instant::now();
    let stats = while_paused(vm, || -> Result<SnapshotStats, SnapshotError> {
        let state = vm.save_state()?;
        let file = std::fs::File::create(path).map_err(|source| SnapshotError::Create { path: path.into(), source })?;
        let w = std::io::BufWriter::with_capacity(1 << 20, file);
        let disk = vm.disk().filter(|d| !d.readonly());
        Ok(write(w, &vm.describe(), |p, buf| vm.read_page(p, buf), disk, state)?)
    })?;
    tracing::info!(path = %path.display(), pages = stats.pages, blocks = stats.blocks, bytes = stats.bytes, ms = t.elapsed().as_millis() as u64, "snapshot saved");
    Ok(stats)
}

/// Writes a full snapshot to `w`: `meta`, every non-zero page (`read` fills page N), every
/// non-zero block of `disk`, `state`.
pub fn write<W: Write, E: std::fmt::Display>(
    w: W,
    meta: &Meta,
    mut read: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    disk: Option<&Disk>,
    state: MachineState,
) -> Result<SnapshotStats, StreamError> {
    let mut counting = CountingWriter { w, n: 0 };
    let mut s = StreamWriter::new(&mut counting)?;
    s.record(Kind::State, &StateRecord::Machine(meta.clone()).encode())?;
    let mut page = vec![0u8; PAGE_SIZE];
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::with_capacity(super::stream::PAGES_PER_RECORD);
    let mut written = 0;
    for p in 0..(meta.mem_size / PAGE_SIZE as u64) as usize {
        read(p, &mut page).map_err(|e| StreamError::Io(std::io::Error::other(e.to_string())))?;
        if is_zero(&page) {
            continue;
        }
        batch.push(((p * PAGE_SIZE) as u64, page.clone()));
        if batch.len() == super::stream::PAGES_PER_RECORD {
            written += s.pages(batch.iter().map(|(a, d)| (*a, &d[..])))?;
            batch.clear();
        }
    }
    written += s.pages(batch.iter().map(|(a, d)| (*a, &d[..])))?;
    let blocks = match disk {
        Some(disk) => write_blocks(&mut s, disk, 0..disk.blocks(), true)?,
        None => 0,
    };
    let paused = StateRecord::Paused { state: Box::new(state), page_digests: None, block_digests: None };
    s.record(Kind::State, &paused.encode())?;
    s.finish()?;
    Ok(SnapshotStats { pages: written, blocks, bytes: counting.n })
}

/// Writes the blocks `set` (ascending) of `disk` as the guest sees them (skipping zero ones
/// when `skip_zero`), batched, reading each run of consecutive blocks at once; returns how many
/// were written.
pub fn write_blocks<W: Write>(
    s: &mut StreamWriter<W>,
    disk: &Disk,
    set: impl Iterator<Item = u64>,
    skip_zero: bool,
) -> Result<u64, StreamError> {
    let mut buf = vec![0u8; RUN * BLOCK_SIZE];
    let mut written = 0;
    let mut flush_run = |s: &mut StreamWriter<W>, first: u64, n: usize| -> Result<(), StreamError> {
        let run = &mut buf[..n * BLOCK_SIZE];
        disk.read_blocks(first, run).map_err(|e| StreamError::Io(std::io::Error::other(e)))?;
        let blocks = run
            .chunks(BLOCK_SIZE)
            .enumerate()
            .filter(|(_, d)| !(skip_zero && is_zero(d)))
            .map(|(i, d)| (first + i as u64, d));
        written += s.blocks(blocks)?;
        Ok(())
    };
    let mut run: Option<(u64, usize)> = None;
    for b in set {
        run = match run {
            Some((first, n)) if b == first + n as u64 && n < RUN => Some((first, n + 1)),
            Some((first, n)) => {
                flush_run(s, first, n)?;
                Some((b, 1))
            }
            None => Some((b, 1)),
        };
    }
    if let Some((first, n)) = run {
        flush_run(s, first, n)?;
    }
    Ok(written)
}

/// A stage for the blocks a stream carries for `disk` (none for a read-only disk, whose blocks
/// are never carried).
pub fn disk_stage(disk: Option<&Disk>) -> Result<Option<Overlay>, DiskError> {
    disk.filter(|d| !d.readonly()).map(Disk::new_stage).transpose()
}

/// Stores the blocks of a [`Kind::Blocks`] payload in `stage`, refusing any outside the disk
/// (and any at all when the VM has no disk, or a read-only one); returns how many.
pub fn stage_blocks(payload: &[u8], stage: Option<&mut Overlay>) -> Result<u64, StreamError> {
    let Some(stage) = stage else {
        return Err(StreamError::Corrupt("disk blocks for a VM without a writable disk".into()));
    };
    let batch: Vec<(u64, &[u8])> = blocks(payload).collect();
    if !stage.store_many(&batch)? {
        let outside = batch.iter().map(|(b, _)| *b).max().unwrap_or(0);
        return Err(StreamError::Corrupt(format!("disk block {outside} is outside the disk")));
    }
    Ok(batch.len() as u64)
}

struct CountingWriter<W: Write> {
    w: W,
    n: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// Reads the machine description at the start of a snapshot or transfer.
pub fn read_meta<R: Read>(r: &mut StreamReader<R>) -> Result<Meta, StreamError> {
    match r.next_record()? {
        Some(rec) if rec.kind == Kind::State => match StateRecord::decode(&rec.payload)? {
            StateRecord::Machine(meta) => Ok(meta),
            StateRecord::Paused { .. } => {
                Err(StreamError::Corrupt("the state came before the machine description".into()))
            }
        },
        _ => Err(StreamError::Corrupt("a snapshot starts with its machine description".into())),
    }
}

/// Reads the pages into `mem` (of `mem_size` bytes) and the disk's blocks into `stage`, and
/// returns the final state; fails unless the whole stream verifies.
pub fn read_rest<R: Read>(
    r: &mut StreamReader<R>,
    mem: &GuestMemoryMmap,
    mem_size: u64,
    mut stage: Option<&mut Overlay>,
) -> Result<MachineState, StreamError> {
    let mut state = None;
    while let Some(rec) = r.next_record()? {
        match rec.kind {
            Kind::Pages => load_pages(&rec.payload, mem, mem_size)?,
            Kind::Blocks => {
                stage_blocks(&rec.payload, stage.as_deref_mut())?;
            }
            Kind::State => state = Some(StateRecord::decode(&rec.payload)?.into_paused()?.0),
            other => return Err(StreamError::Corrupt(format!("unexpected {other:?} record in a snapshot"))),
        }
    }
    if !r.is_complete() {
        return Err(StreamError::Truncated("before its end record"));
    }
    state.ok_or_else(|| StreamError::Corrupt("snapshot without vCPU and device state".into()))
}

/// Writes the pages of a [`Kind::Pages`] payload into guest memory, refusing any outside it.
pub fn load_pages(payload: &[u8], mem: &GuestMemoryMmap, mem_size: u64) -> Result<(), StreamError> {
    for (gpa, data) in pages(payload) {
        if gpa % PAGE_SIZE as u64 != 0 || gpa.checked_add(PAGE_SIZE as u64).is_none_or(|end| end > mem_size) {
            return Err(StreamError::Corrupt(format!("page at {gpa:#x} is outside the guest's {mem_size} bytes")));
        }
        mem.write_slice(data, GuestAddress(gpa)).map_err(|e| StreamError::Io(std::io::Error::other(e)))?;
    }
    Ok(())
}

/// A 64-bit hash of every page of guest memory, in address order (for the migration test mode).
pub fn page_digests(mem: &GuestMemoryMmap, mem_size: u64) -> Result<Vec<u64>, StreamError> {
    digests((mem_size / PAGE_SIZE as u64) as usize, |p, page| {
        mem.read_slice(page, GuestAddress((p * PAGE_SIZE) as u64))
            .map_err(|e| StreamError::Io(std::io::Error::other(e)))
    })
}

/// The digest of each of `pages` pages, read one by one with `read`.
pub fn digests<E>(pages: usize, mut read: impl FnMut(usize, &mut [u8]) -> Result<(), E>) -> Result<Vec<u64>, E> {
    let mut page = vec![0u8; PAGE_SIZE];
    (0..pages)
        .map(|p| {
            read(p, &mut page)?;
            Ok(xxhash_rust::xxh3::xxh3_64(&page))
        })
        .collect()
}

/// Compares `mem` with digests from [`page_digests`]; returns the addresses of differing pages.
pub fn differing_pages(mem: &GuestMemoryMmap, mem_size: u64, theirs: &[u64]) -> Result<Vec<u64>, StreamError> {
    compare_digests(&page_digests(mem, mem_size)?, theirs)
}

/// The addresses of the pages whose digests in `ours` differ from `theirs`.
pub fn compare_digests(ours: &[u64], theirs: &[u64]) -> Result<Vec<u64>, StreamError> {
    if theirs.len() != ours.len() {
        return Err(StreamError::Corrupt(format!("{} page digests for {} pages", theirs.len(), ours.len())));
    }
    Ok(ours.iter().zip(theirs).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| (i * PAGE_SIZE) as u64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::GuestRam;

    #[test]
    fn round_trip_skips_zero_pages_and_refuses_damage() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mem = ram.memory();
        mem.write_slice(&[1, 2, 3], GuestAddress(0x5000)).unwrap();
        mem.write_slice(&[9; 4096], GuestAddress(0xff_f000)).unwrap();
        let meta = Meta { mem_size: 16 << 20, vcpus: 1, tsc_khz: 1, writer: "test".into(), disk: None };
        let mut state = MachineState::default();
        state.vm.clock.clock = 42;
        let mut file = Vec::new();
        let read = |p: usize, buf: &mut [u8]| mem.read_slice(buf, GuestAddress((p * PAGE_SIZE) as u64));
        let stats = write(&mut file, &meta, read, None, state).unwrap();
        assert_eq!(stats.pages, 2);
        assert_eq!(stats.bytes, file.len() as u64);

        let back = GuestRam::new(16 << 20).unwrap();
        let mut r = StreamReader::new(&file[..]).unwrap();
        assert_eq!(read_meta(&mut r).unwrap(), meta);
        let s = read_rest(&mut r, back.memory(), 16 << 20, None).unwrap();
        assert_eq!(s.vm.clock.clock, 42);
        let mut b = [0u8; 3];
        back.memory().read_slice(&mut b, GuestAddress(0x5000)).unwrap();
        assert_eq!(b, [1, 2, 3]);

        // Truncated: refused, whatever was read.
        let cut = &file[..file.len() - 10];
        let mut r = StreamReader::new(cut).unwrap();
        read_meta(&mut r).unwrap();
        assert!(read_rest(&mut r, GuestRam::new(16 << 20).unwrap().memory(), 16 << 20, None).is_err());
        // A page beyond the guest's memory: refused.
        let mut r = StreamReader::new(&file[..]).unwrap();
        read_meta(&mut r).unwrap();
        assert!(read_rest(&mut r, GuestRam::new(16 << 20).unwrap().memory(), 8 << 20, None).is_err());
    }

    #[test]
    fn a_snapshot_carries_the_disk_and_a_restore_makes_the_image_that_disk() {
        use crate::devices::block::testing::image;
        let (_a, ca) = image(1);
        let (_b, cb) = image(1);
        let source = Disk::open(&ca).unwrap();
        source.write(0, &[1u8; 4096]).unwrap();
        source.write(100 * 4096, &[2u8; 512]).unwrap();
        let target = Disk::open(&cb).unwrap();
        target.write(50 * 4096, &[9u8; 4096]).unwrap(); // stale: must become zero
        let ram = GuestRam::new(16 << 20).unwrap();
        let meta = Meta { mem_size: 16 << 20, vcpus: 1, tsc_khz: 1, writer: "test".into(), disk: None };
        let read = |p: usize, buf: &mut [u8]| ram.memory().read_slice(buf, GuestAddress((p * PAGE_SIZE) as u64));
        let mut file = Vec::new();
        let stats = write(&mut file, &meta, read, Some(&source), MachineState::default()).unwrap();
        assert_eq!(stats.blocks, 2, "only the blocks that are not zero");
        let mut stage = disk_stage(Some(&target)).unwrap().unwrap();
        let mut r = StreamReader::new(&file[..]).unwrap();
        read_meta(&mut r).unwrap();
        read_rest(&mut r, GuestRam::new(16 << 20).unwrap().memory(), 16 << 20, Some(&mut stage)).unwrap();
        let zero = xxhash_rust::xxh3::xxh3_64(&[0u8; BLOCK_SIZE]);
        assert_eq!(target.digests().unwrap().iter().filter(|&&d| d != zero).count(), 1, "only the stale block");
        target.replace_with(&stage).unwrap();
        assert_eq!(target.digests().unwrap(), source.digests().unwrap(), "block for block");
        // A VM without a disk refuses a stream carrying one.
        let mut r = StreamReader::new(&file[..]).unwrap();
        read_meta(&mut r).unwrap();
        let e = read_rest(&mut r, GuestRam::new(16 << 20).unwrap().memory(), 16 << 20, None).unwrap_err();
        assert!(e.to_string().contains("without a writable disk"), "{e}");
    }
}
