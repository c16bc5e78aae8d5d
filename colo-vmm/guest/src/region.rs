//! Carving page-aligned areas out of the free RAM the VMM reports, before the heap gets the rest.

/// Page size.
pub const PAGE: u64 = 4096;

/// The part of `[BootInfo::free_start, BootInfo::free_end)` not handed out yet.
pub struct Region {
    next: u64,
    end: u64,
}

impl Region {
    /// The pages inside `[start, end)`.
    pub fn new(start: u64, end: u64) -> Region {
        let next = start.saturating_add(PAGE - 1) & !(PAGE - 1);
        let end = end & !(PAGE - 1);
        Region { next, end: end.max(next) }
    }

    /// Takes `bytes` (rounded up to pages) from the start, zeroed; `None` if they do not fit.
    pub fn take(&mut self, bytes: u64) -> Option<*mut u8> {
        let bytes = bytes.checked_add(PAGE - 1)? & !(PAGE - 1);
        if bytes > self.end - self.next {
            return None;
        }
        let area = self.next as *mut u8;
        self.next += bytes;
        // SAFETY: the area is free RAM (the VMM said so), identity-mapped, and handed out once.
        unsafe { core::ptr::write_bytes(area, 0, bytes as usize) };
        Some(area)
    }

    /// What is left, as (start, length).
    pub fn rest(&self) -> (u64, u64) {
        (self.next, self.end - self.next)
    }
}
