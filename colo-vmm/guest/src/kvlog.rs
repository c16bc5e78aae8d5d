//! The `kv` service's store on the disk: an append-only log of one record per 512-byte sector,
//! and an index in memory of where each key's latest record is.
//!
//! ```text
//! record = "KVR1" | seq u64 | stamp u64 | key len u16 | value len u16 | key | value | … | check u32
//! ```
//! Record `n` lives in sector `n` and carries `seq = n`; `check` is FNV-1a over the rest of the
//! sector. At boot the log is read from sector 0 up to the first sector that is not the next
//! record: that is where the next one goes. A `put` writes its record, then flushes, and only
//! then counts as done. `stamp` is the TSC at the write: two VMs running the same `put` write
//! different sectors, so a secondary whose own writes were not replaced by the primary's at a
//! checkpoint would show on a block-for-block comparison.
//!
//! The log is the truth: `get` reads the value back from its sector, and [`Store::scan`] reads
//! the whole log again and compares it with the index.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

/// Bytes of a sector (one record).
pub const SECTOR: usize = 512;
/// Longest key.
pub const MAX_KEY: usize = 64;
/// Longest value.
pub const MAX_VALUE: usize = 400;
/// Sectors read at once while scanning.
const SCAN_CHUNK: u64 = 128;

const MAGIC: [u8; 4] = *b"KVR1";
const HEAD: usize = 24;
const CHECK: usize = SECTOR - 4;

/// A disk in sectors, as the store uses it.
pub trait Sectors {
    /// Reads `buf.len()` bytes (whole sectors) from `sector` on.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), &'static str>;
    /// Writes `data` (whole sectors) from `sector` on.
    fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), &'static str>;
    /// Makes what was written durable.
    fn flush(&mut self) -> Result<(), &'static str>;
}

/// FNV-1a, 32 bits.
fn check(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// One record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Its position in the log.
    pub seq: u64,
    /// The writer's TSC.
    pub stamp: u64,
    /// The key.
    pub key: &'a [u8],
    /// The value.
    pub value: &'a [u8],
}

impl Record<'_> {
    /// The sector holding this record.
    pub fn encode(&self, out: &mut [u8; SECTOR]) {
        out.fill(0);
        out[..4].copy_from_slice(&MAGIC);
        out[4..12].copy_from_slice(&self.seq.to_le_bytes());
        out[12..20].copy_from_slice(&self.stamp.to_le_bytes());
        out[20..22].copy_from_slice(&(self.key.len() as u16).to_le_bytes());
        out[22..24].copy_from_slice(&(self.value.len() as u16).to_le_bytes());
        out[HEAD..HEAD + self.key.len()].copy_from_slice(self.key);
        out[HEAD + self.key.len()..HEAD + self.key.len() + self.value.len()].copy_from_slice(self.value);
        let sum = check(&out[..CHECK]);
        out[CHECK..].copy_from_slice(&sum.to_le_bytes());
    }

    /// The record in sector `sector`, if it holds a valid one for that position.
    pub fn decode(sector: u64, buf: &[u8]) -> Option<Record<'_>> {
        let buf = buf.get(..SECTOR)?;
        if buf[..4] != MAGIC || u32::from_le_bytes(buf[CHECK..].try_into().ok()?) != check(&buf[..CHECK]) {
            return None;
        }
        let seq = u64::from_le_bytes(buf[4..12].try_into().ok()?);
        let klen = usize::from(u16::from_le_bytes(buf[20..22].try_into().ok()?));
        let vlen = usize::from(u16::from_le_bytes(buf[22..24].try_into().ok()?));
        if seq != sector || klen == 0 || klen > MAX_KEY || vlen > MAX_VALUE {
            return None;
        }
        Some(Record {
            seq,
            stamp: u64::from_le_bytes(buf[12..20].try_into().ok()?),
            key: &buf[HEAD..HEAD + klen],
            value: &buf[HEAD + klen..HEAD + klen + vlen],
        })
    }
}

/// Where a key's records are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// Its latest record's sector.
    latest: u64,
    /// How many records it has.
    records: u32,
}

/// What reading the whole log found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Records in the log.
    pub records: u64,
    /// Distinct keys.
    pub keys: u64,
    /// Keys with more than one record (a `put` of the same key twice, or one applied twice).
    pub repeated: u64,
    /// Whether the index in memory differs from what the log says.
    pub mismatch: bool,
}

/// Why a `put` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutError {
    /// The log is full.
    Full,
    /// The disk failed.
    Disk(&'static str),
}

/// The store: the index, and where the next record goes.
pub struct Store {
    index: BTreeMap<Vec<u8>, Entry>,
    tail: u64,
    capacity: u64,
}

/// Reads the log of `capacity` sectors and calls `f` with each record, in order; returns the
/// tail (the first sector that is not the next record).
fn read_log(dev: &mut impl Sectors, capacity: u64, mut f: impl FnMut(&Record<'_>)) -> Result<u64, &'static str> {
    let mut buf = vec![0u8; SCAN_CHUNK as usize * SECTOR];
    let mut sector = 0;
    while sector < capacity {
        let n = SCAN_CHUNK.min(capacity - sector);
        let chunk = &mut buf[..n as usize * SECTOR];
        dev.read(sector, chunk)?;
        for (i, raw) in chunk.chunks_exact(SECTOR).enumerate() {
            match Record::decode(sector + i as u64, raw) {
                Some(r) => f(&r),
                None => return Ok(sector + i as u64),
            }
        }
        sector += n;
    }
    Ok(capacity)
}

impl Store {
    /// Opens the log in the first `capacity` sectors of `dev`.
    pub fn open(dev: &mut impl Sectors, capacity: u64) -> Result<Store, &'static str> {
        let mut index: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
        let tail = read_log(dev, capacity, |r| {
            let e = index.entry(r.key.to_vec()).or_insert(Entry { latest: r.seq, records: 0 });
            e.latest = r.seq;
            e.records += 1;
        })?;
        Ok(Store { index, tail, capacity })
    }

    /// Records in the log.
    pub fn records(&self) -> u64 {
        self.tail
    }

    /// Distinct keys.
    pub fn keys(&self) -> u64 {
        self.index.len() as u64
    }

    /// Appends a record of `key` = `value` (checked by the caller: 1 to [`MAX_KEY`] and at
    /// most [`MAX_VALUE`] bytes), flushes, and only then indexes it.
    pub fn put(&mut self, dev: &mut impl Sectors, key: &[u8], value: &[u8], stamp: u64) -> Result<(), PutError> {
        if self.tail >= self.capacity {
            return Err(PutError::Full);
        }
        let mut sector = [0u8; SECTOR];
        Record { seq: self.tail, stamp, key, value }.encode(&mut sector);
        dev.write(self.tail, &sector).map_err(PutError::Disk)?;
        dev.flush().map_err(PutError::Disk)?;
        let e = self.index.entry(key.to_vec()).or_insert(Entry { latest: self.tail, records: 0 });
        e.latest = self.tail;
        e.records += 1;
        self.tail += 1;
        Ok(())
    }

    /// The value of `key`, read back from its record, into `out`; `Ok(None)` if there is none.
    pub fn get(&self, dev: &mut impl Sectors, key: &[u8], out: &mut [u8]) -> Result<Option<usize>, &'static str> {
        let Some(e) = self.index.get(key) else { return Ok(None) };
        let mut sector = [0u8; SECTOR];
        dev.read(e.latest, &mut sector)?;
        match Record::decode(e.latest, &sector) {
            Some(r) if r.key == key && r.value.len() <= out.len() => {
                out[..r.value.len()].copy_from_slice(r.value);
                Ok(Some(r.value.len()))
            }
            _ => Err("the key's record on the disk is not there"),
        }
    }

    /// Reads the whole log again and compares it with the index.
    pub fn scan(&self, dev: &mut impl Sectors) -> Result<ScanReport, &'static str> {
        let mut seen: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
        let tail = read_log(dev, self.capacity, |r| {
            let e = seen.entry(r.key.to_vec()).or_insert(Entry { latest: r.seq, records: 0 });
            e.latest = r.seq;
            e.records += 1;
        })?;
        Ok(ScanReport {
            records: tail,
            keys: seen.len() as u64,
            repeated: seen.values().filter(|e| e.records > 1).count() as u64,
            mismatch: tail != self.tail || seen != self.index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk in memory.
    struct Mem(Vec<u8>, u32);

    impl Sectors for Mem {
        fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), &'static str> {
            let at = sector as usize * SECTOR;
            buf.copy_from_slice(self.0.get(at..at + buf.len()).ok_or("beyond the disk")?);
            Ok(())
        }
        fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), &'static str> {
            let at = sector as usize * SECTOR;
            self.0.get_mut(at..at + data.len()).ok_or("beyond the disk")?.copy_from_slice(data);
            Ok(())
        }
        fn flush(&mut self) -> Result<(), &'static str> {
            self.1 += 1;
            Ok(())
        }
    }

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let mut s = [0u8; SECTOR];
        let r = Record { seq: 7, stamp: 99, key: b"k", value: b"a value" };
        r.encode(&mut s);
        assert_eq!(Record::decode(7, &s), Some(r));
        assert_eq!(Record::decode(8, &s), None, "another position");
        s[30] ^= 1;
        assert_eq!(Record::decode(7, &s), None, "a flipped bit");
        assert_eq!(Record::decode(0, &[0u8; SECTOR]), None);
    }

    #[test]
    fn puts_are_flushed_indexed_and_found_again_after_a_reboot() {
        let mut disk = Mem(vec![0; 64 * SECTOR], 0);
        let mut st = Store::open(&mut disk, 64).unwrap();
        assert_eq!((st.records(), st.keys()), (0, 0));
        st.put(&mut disk, b"a", b"1", 5).unwrap();
        st.put(&mut disk, b"b", b"2", 6).unwrap();
        st.put(&mut disk, b"a", b"3", 7).unwrap();
        assert_eq!(disk.1, 3, "each put flushed");
        let mut out = [0u8; MAX_VALUE];
        assert_eq!(st.get(&mut disk, b"a", &mut out).unwrap().map(|n| &out[..n]), Some(&b"3"[..]));
        assert_eq!(st.get(&mut disk, b"zz", &mut out).unwrap(), None);
        let again = Store::open(&mut disk, 64).unwrap();
        assert_eq!((again.records(), again.keys()), (3, 2));
        let report = again.scan(&mut disk).unwrap();
        assert_eq!(report, ScanReport { records: 3, keys: 2, repeated: 1, mismatch: false });
        // The log lost a record behind the index's back: the scan says so, and get does too.
        disk.0[2 * SECTOR] = 0;
        assert!(st.scan(&mut disk).unwrap().mismatch);
        assert!(st.get(&mut disk, b"a", &mut out).is_err());
    }

    #[test]
    fn a_full_log_refuses_more() {
        let mut disk = Mem(vec![0; 2 * SECTOR], 0);
        let mut st = Store::open(&mut disk, 2).unwrap();
        st.put(&mut disk, b"a", b"", 0).unwrap();
        st.put(&mut disk, b"b", b"", 0).unwrap();
        assert_eq!(st.put(&mut disk, b"c", b"", 0), Err(PutError::Full));
        assert_eq!(Store::open(&mut disk, 2).unwrap().records(), 2);
    }
}
