//! Typed, zero-copy, bounds-checked views over the bytes of network frames.
//!
//! Modelled on smoltcp's `wire` layer: each view wraps any `T: AsRef<[u8]>` (a borrowed slice, a
//! `Vec<u8>`, ...), `new_checked` validates every length the accessors rely on, and after that
//! no accessor can read outside the buffer. Views over `T: AsMut<[u8]>` also have setters for the
//! fields the rewriter changes. Nothing is copied.

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod ipv4;
pub mod ipv6;
pub mod mac;
pub mod tcp;
pub mod udp;

pub use mac::{MacAddr, MacError};

/// Why a buffer could not be viewed as the requested header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The buffer ends before the header (or a length it declares) does.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// Which header was being read.
        what: &'static str,
        /// Bytes the header needs.
        need: usize,
        /// Bytes the buffer has.
        have: usize,
    },
    /// A field holds a value no valid header can have.
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// Result of building a view.
pub type Result<T> = std::result::Result<T, Error>;

/// Fails with [`Error::Truncated`] unless `have >= need`.
#[inline]
pub(crate) fn need(what: &'static str, need: usize, have: usize) -> Result<()> {
    if have >= need {
        Ok(())
    } else {
        Err(Error::Truncated { what, need, have })
    }
}

#[inline]
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
pub(crate) fn put_be16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub(crate) fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
