//! The secondary's RAM cache: a private copy of the primary's memory as of the checkpoint being
//! received. Pages arrive here first; only once the whole checkpoint is in does the secondary
//! copy them (and the pages its own SVM dirtied) into guest memory, so a checkpoint cut short
//! by a failover never leaves the SVM with half of one.

use vm_memory::{Bytes, GuestAddress};

use crate::persist::stream::PAGE_SIZE;
use crate::vstate::dirty::DirtyBitmap;
use crate::vstate::memory::GuestMemoryMmap;

/// The cache.
pub struct RamCache {
    data: Vec<u8>,
}

impl RamCache {
    /// A cache holding a copy of `mem`'s `size` bytes.
    pub fn copy_of(mem: &GuestMemoryMmap, size: u64) -> Result<RamCache, vm_memory::GuestMemoryError> {
        let mut data = vec![0u8; size as usize];
        mem.read_slice(&mut data, GuestAddress(0))?;
        Ok(RamCache { data })
    }

    /// A cache holding a copy of `mem`'s `size` bytes, of which only the pages in `written`
    /// can be non-zero (a migration destination: it starts from zeroed memory and the source
    /// skips zero pages). Only those are copied — the rest of the cache stays untouched
    /// zeroed memory — which keeps the copy, done while the primary waits paused, short.
    pub fn copy_pages_of(
        mem: &GuestMemoryMmap,
        size: u64,
        written: &DirtyBitmap,
    ) -> Result<RamCache, vm_memory::GuestMemoryError> {
        let mut data = vec![0u8; size as usize];
        for p in written.iter() {
            let at = p * PAGE_SIZE;
            if let Some(page) = data.get_mut(at..at + PAGE_SIZE) {
                mem.read_slice(page, GuestAddress(at as u64))?;
            }
        }
        Ok(RamCache { data })
    }

    /// A cache holding a copy of `vm`'s memory.
    pub fn copy_of_vm<V: crate::migratable::Migratable + ?Sized>(
        vm: &V,
    ) -> Result<RamCache, crate::migratable::MigratableError> {
        let mut data = vec![0u8; vm.page_count() * PAGE_SIZE];
        for (p, page) in data.chunks_exact_mut(PAGE_SIZE).enumerate() {
            vm.read_page(p, page)?;
        }
        Ok(RamCache { data })
    }

    /// Stores one page; `false` if it lies outside the guest's memory (the address comes from
    /// the checkpoint stream: any value, the highest included, must be refused, not wrap).
    pub fn store(&mut self, gpa: u64, page: &[u8]) -> bool {
        let fits = usize::try_from(gpa)
            .ok()
            .and_then(|at| Some((at, at.checked_add(PAGE_SIZE)?)))
            .filter(|&(_, end)| end <= self.data.len());
        let Some((at, end)) = fits else { return false };
        if !gpa.is_multiple_of(PAGE_SIZE as u64) || page.len() != PAGE_SIZE {
            return false;
        }
        self.data[at..end].copy_from_slice(page);
        true
    }

    /// One page.
    pub fn page(&self, page: usize) -> &[u8] {
        &self.data[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]
    }

    /// Copies pages (by number) from the cache into guest memory (`write` stores one page).
    pub fn apply<E>(
        &self,
        pages: impl Iterator<Item = usize>,
        mut write: impl FnMut(usize, &[u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut n = 0;
        for p in pages {
            write(p, self.page(p))?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::GuestRam;

    #[test]
    fn pages_are_stored_privately_and_applied_on_demand() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mem = ram.memory();
        mem.write_slice(&[1u8; PAGE_SIZE], GuestAddress(0x3000)).unwrap();
        let mut cache = RamCache::copy_of(mem, ram.size()).unwrap();
        assert_eq!(cache.page(3), &[1u8; PAGE_SIZE][..], "a copy of memory at the start");
        assert!(cache.store(0x5000, &[9u8; PAGE_SIZE]));
        assert!(!cache.store(0x5001, &[9u8; PAGE_SIZE]), "unaligned");
        assert!(!cache.store(16 << 20, &[9u8; PAGE_SIZE]), "outside guest memory");
        assert!(!cache.store(0x6000, &[9u8; 100]), "not a page");
        // The highest page address: adding the page size wraps to 0, which must not pass.
        assert!(!cache.store(0xFFFF_FFFF_FFFF_F000, &[9u8; PAGE_SIZE]), "the last page of the address space");
        let mut page = [0u8; PAGE_SIZE];
        mem.read_slice(&mut page, GuestAddress(0x5000)).unwrap();
        assert_eq!(page, [0u8; PAGE_SIZE], "storing does not touch guest memory");
        // The guest wrote page 3 meanwhile; applying pages 3 and 5 puts the cache's back.
        mem.write_slice(&[7u8; PAGE_SIZE], GuestAddress(0x3000)).unwrap();
        let write = |p: usize, data: &[u8]| mem.write_slice(data, GuestAddress((p * PAGE_SIZE) as u64));
        assert_eq!(cache.apply([3, 5].into_iter(), write).unwrap(), 2);
        mem.read_slice(&mut page, GuestAddress(0x5000)).unwrap();
        assert_eq!(page, [9u8; PAGE_SIZE]);
        mem.read_slice(&mut page, GuestAddress(0x3000)).unwrap();
        assert_eq!(page, [1u8; PAGE_SIZE]);
    }

    #[test]
    fn a_cache_of_the_written_pages_equals_a_full_copy() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mem = ram.memory();
        let pages = (ram.size() as usize) / PAGE_SIZE;
        let mut written = DirtyBitmap::empty(pages);
        for p in [0usize, 7, pages - 1] {
            mem.write_slice(&[(p % 200) as u8 + 1; PAGE_SIZE], GuestAddress((p * PAGE_SIZE) as u64)).unwrap();
            written.set(p);
        }
        let part = RamCache::copy_pages_of(mem, ram.size(), &written).unwrap();
        let full = RamCache::copy_of(mem, ram.size()).unwrap();
        for p in 0..pages {
            assert_eq!(part.page(p), full.page(p), "page {p}");
        }
    }
}
