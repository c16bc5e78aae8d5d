//! Walking one descriptor chain a guest offered, and refusing it when it is malformed.
//!
//! Everything here is guest input: a chain may loop, point outside guest memory, mix readable
//! and writable descriptors, be absurdly long, or reference a head index outside the ring.
//! virtio-queue stops iterating on all of these without saying why, so the rule used is: a
//! chain is well formed only if it yielded at least one descriptor and the last one it
//! yielded does not announce a successor (`VIRTQ_DESC_F_NEXT`). A loop exhausts the chain's
//! TTL on a descriptor that still has NEXT; a `next` index outside the table, an unreadable
//! descriptor or a broken indirect table end the walk the same way.

use std::ops::Deref;

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend};

/// Why a descriptor chain was refused. Every refused chain is completed with used length 0 (if
/// its head index allows) and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum BadChain {
    /// The chain yielded no descriptor (head index outside the ring, unreadable descriptor table
    /// entry, broken indirect table).
    #[error("empty chain or head index {0} outside the ring")]
    Empty(u16),
    /// The walk stopped on a descriptor that still has NEXT: a loop, a chain longer than the
    /// ring, or a `next` index outside the table.
    #[error("chain does not terminate (loop, or next index outside the table)")]
    Unterminated,
    /// A device-writable descriptor in a TX chain, or a device-readable one in an RX chain.
    #[error("descriptor has the wrong direction for this queue")]
    WrongDirection,
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer outside guest memory")]
    OutsideMemory,
    /// Too short for a virtio-net header and an Ethernet header (TX), or for the header (RX).
    #[error("chain too short ({0} bytes)")]
    TooShort(u64),
    /// Longer than any legitimate frame (TX).
    #[error("chain too long ({0} bytes)")]
    TooLong(u64),
    /// A TX virtio-net header asking for offloads that were never negotiated.
    #[error("virtio-net header asks for offloads (flags {flags:#x}, gso_type {gso_type:#x})")]
    BadHeader {
        /// The header's `flags` byte.
        flags: u8,
        /// The header's `gso_type` byte.
        gso_type: u8,
    },
}

impl BadChain {
    /// Number of distinct reasons (for per-reason counters).
    pub const KINDS: usize = 7;

    /// Index of this reason in per-reason counters.
    pub fn kind(&self) -> usize {
        match self {
            BadChain::Empty(_) => 0,
            BadChain::Unterminated => 1,
            BadChain::WrongDirection => 2,
            BadChain::OutsideMemory => 3,
            BadChain::TooShort(_) => 4,
            BadChain::TooLong(_) => 5,
            BadChain::BadHeader { .. } => 6,
        }
    }

    /// Short name of reason `kind`, for logs.
    pub fn kind_name(kind: usize) -> &'static str {
        ["empty", "unterminated", "wrong_direction", "outside_memory", "too_short", "too_long", "bad_header"]
            .get(kind)
            .copied()
            .unwrap_or("?")
    }
}

/// One buffer of a chain: guest-physical address and length.
pub type Region = (GuestAddress, usize);

/// The buffers of one well-formed chain, in order.
#[derive(Debug, Default, Clone)]
pub struct Buffers {
    /// The chain's head index (what goes into the used ring).
    pub head: u16,
    /// The buffers (zero-length descriptors skipped).
    pub regions: Vec<Region>,
    /// Total bytes.
    pub len: u64,
    /// Descriptors walked, including zero-length ones.
    pub descriptors: usize,
}

/// Walks `chain`, which must consist only of device-writable (`writable`) or only of
/// device-readable descriptors, and checks every buffer lies in `mem`. `max_len` bounds the
/// total so that an absurd chain is refused before anything is read or allocated.
///
/// The walk always runs to the end (it is bounded by the ring size, or the indirect table's),
/// so the reason reported is the most basic one: an empty or unterminated chain before a wrong
/// direction, before an excessive length, before a buffer outside memory.
pub fn walk<M, B>(
    chain: virtio_queue::DescriptorChain<M>,
    mem: &B,
    writable: bool,
    max_len: u64,
) -> Result<Buffers, BadChain>
where
    M: Deref,
    M::Target: GuestMemory,
    B: GuestMemoryBackend,
{
    let head = chain.head_index();
    let mut out = Buffers { head, ..Buffers::default() };
    let mut last_has_next = false;
    let (mut wrong_direction, mut outside) = (false, false);
    for desc in chain {
        out.descriptors += 1;
        last_has_next = desc.has_next();
        if desc.is_write_only() != writable {
            wrong_direction = true;
        }
        let len = desc.len() as usize;
        if len == 0 || wrong_direction || outside || out.len > max_len {
            out.len = out.len.saturating_add(len as u64);
            continue;
        }
        out.len += len as u64;
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            outside = true;
            continue;
        }
        out.regions.push((desc.addr(), len));
    }
    if out.descriptors == 0 {
        Err(BadChain::Empty(head))
    } else if last_has_next {
        Err(BadChain::Unterminated)
    } else if wrong_direction {
        Err(BadChain::WrongDirection)
    } else if out.len > max_len {
        Err(BadChain::TooLong(out.len))
    } else if outside {
        Err(BadChain::OutsideMemory)
    } else {
        Ok(out)
    }
}
