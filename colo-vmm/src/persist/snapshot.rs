//! Snapshot files: a state stream holding the machine description, every non-zero page of
//! guest RAM, and the vCPU, VM and device state.
//!
//! ```text
//! State { machine }  Pages*  State { paused: vCPUs, VM, devices }  End
//! ```
//! Restoring reads everything into fresh memory and applies the state only once the end record
//! has verified the whole stream.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::state::{MachineState, StateRecord};
use super::stream::{pages, Kind, StreamError, StreamReader, StreamWriter, PAGE_SIZE};
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
}

/// What a snapshot contained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Pages written (non-zero pages).
    pub pages: u64,
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
        Ok(write(w, &vm.describe(), |p, buf| vm.read_page(p, buf), state)?)
    })?;
    tracing::info!(path = %path.display(), pages = stats.pages, bytes = stats.bytes, ms = t.elapsed().as_millis() as u64, "snapshot saved");
    Ok(stats)
}

/// Writes a full snapshot to `w`: `meta`, every non-zero page (`read` fills page N), `state`.
pub fn write<W: Write, E: std::fmt::Display>(
    w: W,
    meta: &Meta,
    mut read: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
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
    s.record(Kind::State, &StateRecord::Paused { state: Box::new(state), page_digests: None }.encode())?;
    s.finish()?;
    Ok(SnapshotStats { pages: written, bytes: counting.n })
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

/// Reads the pages into `mem` (of `mem_size` bytes) and returns the final state; fails unless
/// the whole stream verifies.
pub fn read_rest<R: Read>(
    r: &mut StreamReader<R>,
    mem: &GuestMemoryMmap,
    mem_size: u64,
) -> Result<MachineState, StreamError> {
    let mut state = None;
    while let Some(rec) = r.next_record()? {
        match rec.kind {
            Kind::Pages => load_pages(&rec.payload, mem, mem_size)?,
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
        let meta = Meta { mem_size: 16 << 20, vcpus: 1, tsc_khz: 1, writer: "test".into() };
        let mut state = MachineState::default();
        state.vm.clock.clock = 42;
        let mut file = Vec::new();
        let read = |p: usize, buf: &mut [u8]| mem.read_slice(buf, GuestAddress((p * PAGE_SIZE) as u64));
        let stats = write(&mut file, &meta, read, state).unwrap();
        assert_eq!(stats.pages, 2);
        assert_eq!(stats.bytes, file.len() as u64);

        let back = GuestRam::new(16 << 20).unwrap();
        let mut r = StreamReader::new(&file[..]).unwrap();
        assert_eq!(read_meta(&mut r).unwrap(), meta);
        let s = read_rest(&mut r, back.memory(), 16 << 20).unwrap();
        assert_eq!(s.vm.clock.clock, 42);
        let mut b = [0u8; 3];
        back.memory().read_slice(&mut b, GuestAddress(0x5000)).unwrap();
        assert_eq!(b, [1, 2, 3]);

        // Truncated: refused, whatever was read.
        let cut = &file[..file.len() - 10];
        let mut r = StreamReader::new(cut).unwrap();
        read_meta(&mut r).unwrap();
        assert!(read_rest(&mut r, GuestRam::new(16 << 20).unwrap().memory(), 16 << 20).is_err());
        // A page beyond the guest's memory: refused.
        let mut r = StreamReader::new(&file[..]).unwrap();
        read_meta(&mut r).unwrap();
        assert!(read_rest(&mut r, GuestRam::new(16 << 20).unwrap().memory(), 8 << 20).is_err());
    }
}
