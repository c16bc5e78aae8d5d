//! The secondary's RAM cache: a private copy of the primary's memory as of the checkpoint being
//! received. Pages arrive here first; only once the whole checkpoint is in does the secondary
//! copy them (and the pages its own SVM dirtied) into guest memory, so a checkpoint cut short
//! by a failover never leaves the SVM with half of one.

use vm_memory::{Bytes, GuestAddress};

use crate::persist::stream::PAGE_SIZE;
use crate::vstate::memory::GuestMemoryMmap;

/// The cache.
pub struct RamCache {
    data: Vec<u8>,
}

impl RamCache {
    /// A cache holding a copy of `mem`'s `size` bytes.
    pub fn copy_of(mem: &GuestMemoryMmap, size: u64) -> Result<RamCache, String> {
        let mut data = vec![0u8; size as usize];
        mem.read_slice(&mut data, GuestAddress(0)).map_err(|e| format!("filling the RAM cache: {e}"))?;
        Ok(RamCache { data })
    }

    /// Stores one page; `false` if it lies outside the guest's memory.
    pub fn store(&mut self, gpa: u64, page: &[u8]) -> bool {
        let at = gpa as usize;
        if !gpa.is_multiple_of(PAGE_SIZE as u64) || page.len() != PAGE_SIZE || at + PAGE_SIZE > self.data.len() {
            return false;
        }
        self.data[at..at + PAGE_SIZE].copy_from_slice(page);
        true
    }

    /// One page.
    pub fn page(&self, page: usize) -> &[u8] {
        &self.data[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]
    }

    /// Copies pages (by number) from the cache into guest memory.
    pub fn apply(&self, mem: &GuestMemoryMmap, pages: impl Iterator<Item = usize>) -> Result<u64, String> {
        let mut n = 0;
        for p in pages {
            mem.write_slice(self.page(p), GuestAddress((p * PAGE_SIZE) as u64))
                .map_err(|e| format!("loading page {p} from the RAM cache: {e}"))?;
            n += 1;
        }
        Ok(n)
    }
}
