//! The global allocator: a first-fit linked-list heap (linked_list_allocator) over the part of
//! the free RAM that the virtqueues and the dirtier do not take.
//!
//! The heap holds socket buffers and per-client state, allocated when a connection is
//! accepted; nothing is allocated per packet.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Gives the allocator `[start, start + size)`.
///
/// # Safety
/// Once only; the memory must be RAM nothing else uses, for the rest of the guest's life.
pub unsafe fn init(start: *mut u8, size: usize) {
    // SAFETY: the caller's contract.
    unsafe { HEAP.lock().init(start, size) };
}

/// Bytes in use and bytes free.
pub fn usage() -> (usize, usize) {
    let heap = HEAP.lock();
    (heap.used(), heap.free())
}
