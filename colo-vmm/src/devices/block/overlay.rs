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
}
