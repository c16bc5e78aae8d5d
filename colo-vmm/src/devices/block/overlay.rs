//! Blocks kept beside an image: a private, unlinked file in the image's directory (so a large
//! write set costs disk, not memory) and an index of which block sits in which slot. Writing a
//! block again overwrites its slot; the index costs a few dozen bytes per block held, and a
//! block is held once however often it is written, so an overlay never holds more than the
//! image.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::BLOCK_SIZE;

/// Most blocks read or written at once (1 MiB).
pub const RUN: usize = 256;

/// An overlay of whole blocks.
pub struct Overlay {
    file: File,
    /// Block number → slot in the file.
    slots: BTreeMap<u64, u64>,
    /// Blocks of the image it belongs to: anything beyond is refused.
    blocks: u64,
}

impl Overlay {
    /// An empty overlay for an image of `blocks` blocks, its file in `dir`.
    pub fn new(dir: &Path, blocks: u64) -> io::Result<Overlay> {
        let file = tempfile::tempfile_in(dir)?;
        Ok(Overlay { file, slots: BTreeMap::new(), blocks })
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Whether block `block` is held.
    pub fn contains(&self, block: u64) -> bool {
        self.slots.contains_key(&block)
    }

    /// Stores block `block` (`data` is [`BLOCK_SIZE`] bytes); `false` if the block lies outside
    /// the image or `data` is not a block (the number may come from a stream: any value must be
    /// refused, not wrap).
    pub fn store(&mut self, block: u64, data: &[u8]) -> io::Result<bool> {
        if block >= self.blocks || data.len() != BLOCK_SIZE {
            return Ok(false);
        }
        let next = self.slots.len() as u64;
        let slot = *self.slots.entry(block).or_insert(next);
        self.file.write_all_at(data, slot * BLOCK_SIZE as u64)?;
        Ok(true)
    }

    /// Stores a batch of blocks (as [`Overlay::store`]; all or none are refused), with one
    /// write per run of blocks that land in consecutive slots.
    pub fn store_many(&mut self, blocks: &[(u64, &[u8])]) -> io::Result<bool> {
        if blocks.iter().any(|&(b, d)| b >= self.blocks || d.len() != BLOCK_SIZE) {
            return Ok(false);
        }
        let mut run: Vec<u8> = Vec::with_capacity(blocks.len().min(RUN) * BLOCK_SIZE);
        let mut run_start = 0u64;
        for &(block, data) in blocks {
            let next = self.slots.len() as u64;
            let slot = *self.slots.entry(block).or_insert(next);
            if !run.is_empty() && (slot != run_start + (run.len() / BLOCK_SIZE) as u64 || run.len() >= RUN * BLOCK_SIZE)
            {
                self.file.write_all_at(&run, run_start * BLOCK_SIZE as u64)?;
                run.clear();
            }
            if run.is_empty() {
                run_start = slot;
            }
            run.extend_from_slice(data);
        }
        if !run.is_empty() {
            self.file.write_all_at(&run, run_start * BLOCK_SIZE as u64)?;
        }
        Ok(true)
    }

    /// Calls `f` with each run of consecutive blocks held in consecutive slots (at most
    /// [`RUN`] blocks), ascending: the first block's number and the run's contents, read at once.
    pub fn for_each_run(&self, mut f: impl FnMut(u64, &[u8]) -> io::Result<()>) -> io::Result<()> {
        let mut buf = vec![0u8; RUN * BLOCK_SIZE];
        let mut it = self.slots.iter().peekable();
        while let Some((&first, &slot)) = it.next() {
            let mut n = 1u64;
            while let Some(&(&b, &s)) = it.peek() {
                if b != first + n || s != slot + n || n as usize >= RUN {
                    break;
                }
                n += 1;
                it.next();
            }
            let run = &mut buf[..n as usize * BLOCK_SIZE];
            self.file.read_exact_at(run, slot * BLOCK_SIZE as u64)?;
            f(first, run)?;
        }
        Ok(())
    }

    /// Reads block `block` into `buf` if it is held.
    pub fn read(&self, block: u64, buf: &mut [u8]) -> io::Result<bool> {
        match self.slots.get(&block) {
            Some(&slot) => {
                self.file.read_exact_at(&mut buf[..BLOCK_SIZE], slot * BLOCK_SIZE as u64)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The blocks held, ascending.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.keys().copied()
    }

    /// Calls `f` with each block held and its contents, ascending.
    pub fn for_each(&self, mut f: impl FnMut(u64, &[u8]) -> io::Result<()>) -> io::Result<()> {
        let mut buf = vec![0u8; BLOCK_SIZE];
        for (&block, &slot) in &self.slots {
            self.file.read_exact_at(&mut buf, slot * BLOCK_SIZE as u64)?;
            f(block, &buf)?;
        }
        Ok(())
    }

    /// Drops every block (and gives the file's space back).
    pub fn clear(&mut self) -> io::Result<()> {
        self.slots.clear();
        self.file.set_len(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_stored_once_read_back_and_cleared() {
        let dir = std::env::temp_dir();
        let mut o = Overlay::new(&dir, 16).unwrap();
        assert!(o.store(3, &[3u8; BLOCK_SIZE]).unwrap());
        assert!(o.store(1, &[1u8; BLOCK_SIZE]).unwrap());
        assert!(o.store(3, &[33u8; BLOCK_SIZE]).unwrap(), "a block written again keeps its slot");
        assert_eq!(o.len(), 2);
        assert!(!o.store(16, &[0u8; BLOCK_SIZE]).unwrap(), "outside the image");
        assert!(!o.store(u64::MAX, &[0u8; BLOCK_SIZE]).unwrap(), "the largest number");
        assert!(!o.store(2, &[0u8; 100]).unwrap(), "not a block");
        let mut buf = vec![0u8; BLOCK_SIZE];
        assert!(o.read(3, &mut buf).unwrap());
        assert_eq!(buf, vec![33u8; BLOCK_SIZE]);
        assert!(!o.read(2, &mut buf).unwrap());
        let mut seen = vec![];
        o.for_each(|b, d| {
            seen.push((b, d[0]));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(1, 1), (3, 33)], "ascending, latest contents");
        o.clear().unwrap();
        assert!(o.is_empty() && !o.contains(3));
    }

    #[test]
    fn batches_are_stored_and_read_back_in_runs() {
        let mut o = Overlay::new(&std::env::temp_dir(), 1024).unwrap();
        let data: Vec<Vec<u8>> = (0..600u32).map(|i| vec![(i % 251) as u8; BLOCK_SIZE]).collect();
        // Blocks 100..400 then 10..12 then 5, block 200 again (its old slot).
        let mut batch: Vec<(u64, &[u8])> = (0..300).map(|i| (100 + i as u64, &data[i][..])).collect();
        batch.extend([(10, &data[300][..]), (11, &data[301][..]), (5, &data[302][..]), (200, &data[303][..])]);
        assert!(o.store_many(&batch).unwrap());
        assert!(!o.store_many(&[(2000, &data[0][..])]).unwrap(), "a block outside: refused");
        let mut seen = vec![];
        o.for_each_run(|first, run| {
            for (i, b) in run.chunks(BLOCK_SIZE).enumerate() {
                seen.push((first + i as u64, b[0], run.len() / BLOCK_SIZE));
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 303);
        let get = |b: u64| seen.iter().find(|s| s.0 == b).map(|s| s.1);
        assert_eq!(get(5), Some(data[302][0]));
        assert_eq!(get(10), Some(data[300][0]));
        assert_eq!(get(150), Some(data[50][0]));
        assert_eq!(get(200), Some(data[303][0]), "the latest contents");
        assert!(seen.iter().all(|s| s.2 <= RUN), "runs of at most {RUN} blocks");
        assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "ascending");
    }
}
