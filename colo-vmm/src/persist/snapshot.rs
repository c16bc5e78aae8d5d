//! Snapshot files: a state stream holding the machine description, every non-zero page of
//! guest RAM, and the vCPU, VM and device state.
//!
//! ```text
//! State { "meta" }  Pages*  State { "vcpu0.*", "vm.*", "devices" }  End
//! ```
//! Restoring reads everything into fresh memory and applies the state only once the end record
//! has verified the whole stream.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::sections::Sections;
use super::stream::{pages, Kind, StreamError, StreamReader, StreamWriter, PAGE_SIZE};
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

/// Writes a full snapshot of `mem` and `state` to `w`.
pub fn write<W: Write>(
    w: W,
    meta: &Meta,
    mem: &GuestMemoryMmap,
    state: &Sections,
) -> Result<SnapshotStats, StreamError> {
    let mut counting = CountingWriter { w, n: 0 };
    let mut s = StreamWriter::new(&mut counting)?;
    let mut m = Sections::new();
    m.put_json("meta", meta);
    s.record(Kind::State, &m.encode())?;
    let mut page = vec![0u8; PAGE_SIZE];
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::with_capacity(super::stream::PAGES_PER_RECORD);
    let mut written = 0;
    for gpa in (0..meta.mem_size).step_by(PAGE_SIZE) {
        mem.read_slice(&mut page, GuestAddress(gpa)).map_err(|e| StreamError::Io(std::io::Error::other(e)))?;
        if is_zero(&page) {
            continue;
        }
        batch.push((gpa, page.clone()));
        if batch.len() == super::stream::PAGES_PER_RECORD {
            written += s.pages(batch.iter().map(|(a, d)| (*a, &d[..])))?;
            batch.clear();
        }
    }
    written += s.pages(batch.iter().map(|(a, d)| (*a, &d[..])))?;
    s.record(Kind::State, &state.encode())?;
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

/// Reads the machine description at the start of a snapshot.
pub fn read_meta<R: Read>(r: &mut StreamReader<R>) -> Result<Meta, StreamError> {
    match r.next_record()? {
        Some(rec) if rec.kind == Kind::State => Sections::decode(&rec.payload)?.json("meta"),
        _ => Err(StreamError::Corrupt("a snapshot starts with its machine description".into())),
    }
}

/// Reads the pages into `mem` (of `mem_size` bytes) and returns the final state; fails unless
/// the whole stream verifies.
pub fn read_rest<R: Read>(
    r: &mut StreamReader<R>,
    mem: &GuestMemoryMmap,
    mem_size: u64,
) -> Result<Sections, StreamError> {
    let mut state = None;
    while let Some(rec) = r.next_record()? {
        match rec.kind {
            Kind::Pages => load_pages(&rec.payload, mem, mem_size)?,
            Kind::State => state = Some(Sections::decode(&rec.payload)?),
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
    let mut page = vec![0u8; PAGE_SIZE];
    (0..mem_size)
        .step_by(PAGE_SIZE)
        .map(|gpa| {
            mem.read_slice(&mut page, GuestAddress(gpa)).map_err(|e| StreamError::Io(std::io::Error::other(e)))?;
            Ok(xxhash_rust::xxh3::xxh3_64(&page))
        })
        .collect()
}

/// Encodes digests for a state section.
pub fn encode_digests(d: &[u64]) -> Vec<u8> {
    d.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Compares `mem` with digests from [`page_digests`]; returns the addresses of differing pages.
pub fn differing_pages(mem: &GuestMemoryMmap, mem_size: u64, encoded: &[u8]) -> Result<Vec<u64>, StreamError> {
    let ours = page_digests(mem, mem_size)?;
    if encoded.len() != ours.len() * 8 {
        return Err(StreamError::Corrupt(format!("{} page digests for {} pages", encoded.len() / 8, ours.len())));
    }
    Ok(ours
        .iter()
        .zip(encoded.chunks_exact(8))
        .enumerate()
        .filter(|(_, (a, b))| a.to_le_bytes() != **b)
        .map(|(i, _)| (i * PAGE_SIZE) as u64)
        .collect())
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
        let mut state = Sections::new();
        state.put_bytes("x", vec![42]);
        let mut file = Vec::new();
        let stats = write(&mut file, &meta, mem, &state).unwrap();
        assert_eq!(stats.pages, 2);
        assert_eq!(stats.bytes, file.len() as u64);

        let back = GuestRam::new(16 << 20).unwrap();
        let mut r = StreamReader::new(&file[..]).unwrap();
        assert_eq!(read_meta(&mut r).unwrap(), meta);
        let s = read_rest(&mut r, back.memory(), 16 << 20).unwrap();
        assert_eq!(s, state);
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
