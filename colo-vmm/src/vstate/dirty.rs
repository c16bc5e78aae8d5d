//! Which guest pages changed: the union of the three writers' logs — KVM's dirty log (the
//! vCPU's writes), vm-memory's bitmap (the VMM's own writes into guest RAM) and each vhost-user
//! backend's log (frames it wrote into the guest). Missing any one of them would let a
//! snapshot, migration or checkpoint carry a stale page.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryBackend;

use super::memory::GuestRam;
use super::vm::{Vm, VmError, RAM_SLOT};
use crate::devices::vhost_user_net::DirtyLog;

/// A set of guest pages, one bit per 4 KiB page from address 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl DirtyBitmap {
    /// No page, for `pages` pages.
    pub fn empty(pages: usize) -> DirtyBitmap {
        DirtyBitmap { words: vec![0; pages.div_ceil(64)], pages }
    }

    /// Every page.
    pub fn full(pages: usize) -> DirtyBitmap {
        let mut b = DirtyBitmap::empty(pages);
        for p in 0..pages {
            b.set(p);
        }
        b
    }

    /// Adds the pages of another bitmap given as words (extra bits past `pages` are ignored).
    pub fn union(&mut self, words: &[u64]) {
        for (w, o) in self.words.iter_mut().zip(words) {
            *w |= o;
        }
        self.trim();
    }

    /// Adds one page.
    pub fn set(&mut self, page: usize) {
        if page < self.pages {
            self.words[page / 64] |= 1 << (page % 64);
        }
    }

    /// Whether a page is in the set.
    pub fn contains(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    fn trim(&mut self) {
        let extra = self.words.len() * 64 - self.pages;
        if extra > 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= u64::MAX >> extra;
            }
        }
    }

    /// How many pages are in the set.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The page numbers in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(i * 64 + bit)
            })
        })
    }

    /// The words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }
}

/// Turns on, reads and turns off dirty tracking for a VM.
pub struct DirtyTracker {
    logs: Vec<DirtyLog>,
    pages: usize,
}

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// KVM refused.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Reading KVM's log failed.
    #[error("reading KVM's dirty log: {0}")]
    Kvm(kvm_ioctls::Error),
    /// A backend's log failed.
    #[error(transparent)]
    Backend(#[from] crate::devices::DeviceError),
}

fn vmm_bitmap_words(ram: &GuestRam) -> Vec<u64> {
    let mut words = Vec::new();
    for r in ram.memory().iter() {
        // The region itself (not a slice of it) owns the whole bitmap.
        let b: &AtomicBitmap = std::ops::Deref::deref(r).bitmap();
        words.extend(b.get_and_reset());
    }
    words
}

impl DirtyTracker {
    /// Starts tracking: KVM logs from now on, the VMM bitmap is cleared, each backend gets a log.
    pub fn start(vm: &Vm, ram: &GuestRam, logs: Vec<DirtyLog>) -> Result<DirtyTracker, DirtyError> {
        vm.set_ram(ram, true)?;
        let _ = vmm_bitmap_words(ram);
        let mut started: Vec<DirtyLog> = Vec::new();
        for l in logs {
            if let Err(e) = l.start() {
                for s in &started {
                    s.stop();
                }
                let _ = vm.set_ram(ram, false);
                return Err(DirtyError::Backend(e));
            }
            started.push(l);
        }
        Ok(DirtyTracker { logs: started, pages: (ram.size() / 4096) as usize })
    }

    /// The pages written since the last call (or since start), by anyone.
    pub fn collect(&self, vm: &Vm, ram: &GuestRam) -> Result<DirtyBitmap, DirtyError> {
        let mut b = DirtyBitmap::empty(self.pages);
        let kvm = vm.fd().get_dirty_log(RAM_SLOT, ram.size() as usize).map_err(DirtyError::Kvm)?;
        b.union(&kvm);
        b.union(&vmm_bitmap_words(ram));
        for l in &self.logs {
            b.union(&l.collect()?);
        }
        Ok(b)
    }

    /// Stops tracking.
    pub fn stop(self, vm: &Vm, ram: &GuestRam) {
        for l in &self.logs {
            l.stop();
        }
        if let Err(e) = vm.set_ram(ram, false) {
            tracing::warn!(error = %e, "turning KVM's dirty log off");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_union_count_and_iteration() {
        let mut b = DirtyBitmap::empty(130);
        b.union(&[0b1010, 1 << 63, u64::MAX]);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![1, 3, 127, 128, 129]);
        assert_eq!(b.count(), 5, "bits past the end are ignored");
        b.set(5);
        b.set(500);
        assert!(b.contains(5) && !b.contains(500));
        assert_eq!(DirtyBitmap::full(70).count(), 70);
    }
}
