//! colo-vmm's state stream (snapshot files, migrations, checkpoints), as the secondary and the
//! destination read it: records with valid checksums built from fuzz input, optionally damaged
//! or cut, read back and handed to what consumes them — pages to the RAM cache and to guest
//! memory, disk blocks to a stage, state records to their decoder, control records to the
//! migration and checkpoint message parsers.
//!
//! Invariants:
//! - nothing panics or allocates beyond one record's bound;
//! - an undamaged, complete stream reads back exactly as written, and its end record verifies;
//! - a damaged byte or a cut is always detected (never read as a complete stream), but for a
//!   minor version in the header turned into an older one, which reads the same;
//! - the RAM cache stores a page exactly when it lies inside guest memory, page-aligned;
//! - a stage takes a blocks record exactly when every block lies inside the disk;
//! - state records that decode re-encode to the same bytes;
//! - control messages that parse survive their own encoding.

#![no_main]

use std::sync::{Mutex, OnceLock};

use arbitrary::Arbitrary;
use colo_vmm::colo::cache::RamCache;
use colo_vmm::colo::message::Control as ColoControl;
use colo_vmm::devices::block::overlay::Overlay;
use colo_vmm::migration::protocol::Control as MigrationControl;
use colo_vmm::persist::message;
use colo_vmm::persist::snapshot;
use colo_vmm::persist::state::{MachineState, StateRecord, VcpuState};
use colo_vmm::persist::stream::{
    blocks, pages, Kind, Record, StreamError, StreamReader, StreamWriter, FLAG_UNSUMMED_PAGES, PAGE_SIZE,
};
use colo_vmm::vstate::memory::GuestRam;
use libfuzzer_sys::fuzz_target;

/// Guest memory of the fuzzed VM: 16 pages.
const MEM: u64 = 16 * PAGE_SIZE as u64;

/// Blocks of the fuzzed VM's disk.
const DISK_BLOCKS: u64 = 16;

fn ram() -> &'static GuestRam {
    static RAM: OnceLock<GuestRam> = OnceLock::new();
    RAM.get_or_init(|| GuestRam::new(MEM).expect("a memfd for guest RAM"))
}

/// The stage a destination keeps the disk's blocks in until the stream is complete (emptied
/// for each input). Its file lives in memory where it can (a full disk is not the input's
/// fault).
fn stage() -> &'static Mutex<Overlay> {
    static STAGE: OnceLock<Mutex<Overlay>> = OnceLock::new();
    STAGE.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        Mutex::new(Overlay::new(&dir, DISK_BLOCKS).expect("an overlay file"))
    })
}

#[derive(Debug, Arbitrary)]
enum Rec {
    /// Pages at these addresses (a page number inside or just outside memory, or any address).
    Pages(Vec<(Result<u8, u64>, u8)>),
    /// Disk blocks (a block number inside or just outside the disk, or any number).
    Blocks(Vec<(Result<u8, u64>, u8)>),
    /// A state record: a snapshot's machine description, a paused machine, or any bytes.
    Meta {
        mem_size: Result<u8, u64>,
        vcpus: u32,
        disk: Option<(u64, bool)>,
    },
    Paused {
        vcpus: u8,
        rip: u64,
        page_digests: Option<Vec<u64>>,
        block_digests: Option<Vec<u64>>,
    },
    State(Vec<u8>),
    /// A control message as JSON text, or a well-formed one.
    ControlText(String),
    Colo(u8, u64),
    /// Any kind byte and payload (records of no kind are written through the raw writer).
    Raw(u8, Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct Input {
    records: Vec<Rec>,
    finish: bool,
    /// Write as on a Unix or keyed link: pages left out of their records' sums.
    unsummed: bool,
    damage: Option<(u16, u8)>,
    cut: Option<u16>,
}

fn gpa(a: &Result<u8, u64>) -> u64 {
    match a {
        Ok(page) => u64::from(*page % 20) * PAGE_SIZE as u64,
        Err(any) => *any,
    }
}

fn block(b: &Result<u8, u64>) -> u64 {
    match b {
        Ok(n) => u64::from(*n % 20),
        Err(any) => *any,
    }
}

/// Writes a record of any kind byte (the writer only knows valid kinds).
fn raw_record(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let mut head = [0u8; 8];
    head[0] = kind;
    head[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&head);
    h.update(payload);
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    out.extend_from_slice(&h.digest().to_le_bytes());
}

fuzz_target!(|input: Input| {
    let mut w = match input.unsummed {
        true => StreamWriter::unsummed_pages(Vec::new()).unwrap(),
        false => StreamWriter::new(Vec::new()).unwrap(),
    };
    let mut written: Vec<Record> = Vec::new();
    // Where the pages of page records lie in the stream: unsummed, damage there is not seen.
    let mut page_bytes: Vec<std::ops::Range<usize>> = Vec::new();
    let mut valid = true;
    let page = |fill: u8| vec![fill; PAGE_SIZE];
    for rec in input.records.iter().take(24) {
        match rec {
            Rec::Pages(list) => {
                let bufs: Vec<(u64, Vec<u8>)> = list.iter().take(8).map(|(a, f)| (gpa(a), page(*f))).collect();
                if bufs.is_empty() {
                    continue;
                }
                let at = w.get_mut().len();
                w.pages(bufs.iter().map(|(a, d)| (*a, &d[..]))).unwrap();
                page_bytes.push(at + 12 + 8 * bufs.len()..w.get_mut().len() - 8);
                let mut payload = (bufs.len() as u32).to_le_bytes().to_vec();
                bufs.iter().for_each(|(a, _)| payload.extend_from_slice(&a.to_le_bytes()));
                bufs.iter().for_each(|(_, d)| payload.extend_from_slice(d));
                written.push(Record { kind: Kind::Pages, payload });
            }
            Rec::Blocks(list) => {
                let bufs: Vec<(u64, Vec<u8>)> = list.iter().take(8).map(|(b, f)| (block(b), page(*f))).collect();
                if bufs.is_empty() {
                    continue;
                }
                w.blocks(bufs.iter().map(|(b, d)| (*b, &d[..]))).unwrap();
                let mut payload = (bufs.len() as u32).to_le_bytes().to_vec();
                bufs.iter().for_each(|(b, _)| payload.extend_from_slice(&b.to_le_bytes()));
                bufs.iter().for_each(|(_, d)| payload.extend_from_slice(d));
                written.push(Record { kind: Kind::Blocks, payload });
            }
            Rec::Meta { mem_size, vcpus, disk } => {
                let disk = disk.map(|(bytes, readonly)| snapshot::DiskMeta { bytes, readonly });
                let meta =
                    snapshot::Meta { mem_size: gpa(mem_size), vcpus: *vcpus, tsc_khz: 1, writer: "fuzz".into(), disk };
                let payload = StateRecord::Machine(meta).encode();
                w.record(Kind::State, &payload).unwrap();
                written.push(Record { kind: Kind::State, payload });
            }
            Rec::Paused { vcpus, rip, page_digests, block_digests } => {
                let mut state = MachineState::default();
                for i in 0..usize::from(vcpus % 4) {
                    let mut v = VcpuState::default();
                    v.regs.rip = rip.wrapping_add(i as u64);
                    state.vcpus.push(v);
                }
                let rec = StateRecord::Paused {
                    state: Box::new(state),
                    page_digests: page_digests.clone(),
                    block_digests: block_digests.clone(),
                };
                let payload = rec.encode();
                w.record(Kind::State, &payload).unwrap();
                written.push(Record { kind: Kind::State, payload });
            }
            Rec::State(bytes) => {
                w.record(Kind::State, bytes).unwrap();
                written.push(Record { kind: Kind::State, payload: bytes.clone() });
            }
            Rec::ControlText(text) => {
                w.record(Kind::Control, text.as_bytes()).unwrap();
                written.push(Record { kind: Kind::Control, payload: text.as_bytes().to_vec() });
            }
            Rec::Colo(which, seq) => {
                let msg = match which % 6 {
                    0 => ColoControl::CheckpointRequest { seq: *seq, passive: seq % 2 == 0, trigger: "fuzz".into() },
                    1 => ColoControl::VmstateSend { seq: *seq },
                    2 => ColoControl::VmstateSize {
                        seq: *seq,
                        pages: seq >> 3,
                        blocks: seq >> 5,
                        rx_marks: vec![Some(*seq), None],
                    },
                    3 => ColoControl::HeartbeatParameters { interval_ms: *seq, timeout_ms: seq.wrapping_mul(3) },
                    4 => ColoControl::Committed { seq: *seq },
                    _ => ColoControl::Heartbeat,
                };
                message::send(&mut w, &msg).unwrap();
                written.push(Record { kind: Kind::Control, payload: serde_json::to_vec(&msg).unwrap() });
            }
            Rec::Raw(kind, payload) => {
                raw_record(w.get_mut(), *kind, payload);
                // A record of an unknown kind, or one the writer did not count, spoils the stream.
                valid = false;
            }
        }
    }
    let mut bytes = if input.finish {
        w.finish().unwrap()
    } else {
        valid = false;
        std::mem::take(w.get_mut())
    };
    let mut damaged = false;
    // Damage the format does not see by design (the pages of an unsummed stream).
    let mut unseen = false;
    if let Some((at, xor)) = input.damage.filter(|(_, x)| *x != 0) {
        if !bytes.is_empty() {
            let at = usize::from(at) % bytes.len();
            bytes[at] ^= xor;
            // The header has no checksum: an older minor version of the same major reads the
            // same (see the stream's compatibility rule), and so does a stream whose flag
            // for unsummed pages flipped while it holds no page; anything else is damage.
            let older_minor = (10..12).contains(&at)
                && bytes.len() >= 12
                && u16::from_le_bytes([bytes[10], bytes[11]]) < colo_vmm::persist::stream::VERSION.minor;
            let flag_without_pages =
                at == 12 && u32::from(xor) == FLAG_UNSUMMED_PAGES && page_bytes.iter().all(|r| r.is_empty());
            unseen = input.unsummed && page_bytes.iter().any(|r| r.contains(&at));
            damaged = !older_minor && !flag_without_pages;
        }
    }
    if let Some(cut) = input.cut {
        let cut = usize::from(cut) % (bytes.len() + 1);
        damaged |= cut < bytes.len();
        bytes.truncate(cut);
    }

    // Read it back.
    let mut read = Vec::new();
    let complete = match StreamReader::from_link(&bytes[..], true) {
        Ok(mut r) => loop {
            match r.next_record() {
                Ok(Some(rec)) => {
                    assert!(rec.payload.len() <= colo_vmm::persist::stream::MAX_RECORD);
                    read.push(rec);
                }
                Ok(None) => break r.is_complete(),
                Err(_) => break false,
            }
        },
        Err(_) => false,
    };
    if unseen {
        // Read as it arrived: what the transport guarantees not to do.
    } else if damaged {
        assert!(!complete || !valid, "a damaged stream read as complete");
    } else if valid {
        assert!(complete, "an undamaged stream did not verify");
        assert_eq!(read, written, "records read back differ");
    }

    // Hand the records to their consumers.
    let mem = ram().memory();
    let mut cache = RamCache::copy_of(mem, MEM).unwrap();
    let mut stage = stage().lock().unwrap();
    stage.clear().unwrap();
    for rec in &read {
        match rec.kind {
            Kind::Pages => {
                for (addr, data) in pages(&rec.payload) {
                    let inside =
                        addr % PAGE_SIZE as u64 == 0 && addr.checked_add(PAGE_SIZE as u64).is_some_and(|e| e <= MEM);
                    assert_eq!(cache.store(addr, data), inside, "page {addr:#x} judged wrongly");
                    if inside {
                        assert_eq!(cache.page((addr / PAGE_SIZE as u64) as usize), data);
                    }
                }
                let _ = snapshot::load_pages(&rec.payload, mem, MEM);
            }
            Kind::Blocks => {
                let inside = blocks(&rec.payload).all(|(b, _)| b < DISK_BLOCKS);
                let before = stage.len();
                let taken = snapshot::stage_blocks(&rec.payload, Some(&mut stage));
                if let Err(StreamError::Io(e)) = &taken {
                    panic!("the stage's file failed (the machine, not the input): {e}");
                }
                assert_eq!(taken.is_ok(), inside, "blocks record judged wrongly");
                if !inside {
                    assert_eq!(stage.len(), before, "a refused record changed the stage");
                }
                assert!(snapshot::stage_blocks(&rec.payload, None).is_err(), "blocks for a VM without a disk");
            }
            Kind::State => {
                if let Ok(s) = StateRecord::decode(&rec.payload) {
                    let bytes = s.encode();
                    assert_eq!(StateRecord::decode(&bytes).unwrap().encode(), bytes, "a state record re-encodes");
                    let _ = s.into_parts();
                }
            }
            Kind::Control => {
                if let Ok(m) = message::parse::<ColoControl>(&rec.payload) {
                    assert_eq!(message::parse::<ColoControl>(&serde_json::to_vec(&m).unwrap()).unwrap(), m);
                }
                if let Ok(m) = message::parse::<MigrationControl>(&rec.payload) {
                    assert_eq!(message::parse::<MigrationControl>(&serde_json::to_vec(&m).unwrap()).unwrap(), m);
                }
            }
            Kind::End => unreachable!("the reader keeps end records"),
        }
    }
    let _ = cache.apply([0usize, 15].into_iter(), |_, d: &[u8]| -> Result<(), String> {
        assert_eq!(d.len(), PAGE_SIZE);
        Ok(())
    });

    // The same bytes as a snapshot file (one whose pages are not summed is refused).
    if let Ok(mut r) = StreamReader::new(&bytes[..]) {
        if snapshot::read_meta(&mut r).is_ok() {
            let _ = snapshot::read_rest(&mut r, mem, MEM, Some(&mut stage));
        }
    }
});
