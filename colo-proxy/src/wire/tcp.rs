//! TCP segments (RFC 9293) and wrap-around sequence arithmetic.

use std::cmp::Ordering;

use super::{be16, be32, need, put_be16, put_be32, Error, Result};

/// Length of a TCP header without options.
pub const MIN_HEADER_LEN: usize = 20;

/// A TCP sequence (or acknowledgement) number, compared modulo 2³² (RFC 1982 serial numbers):
/// `a < b` when `b` is less than 2³¹ ahead of `a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SeqNumber(pub u32);

impl SeqNumber {
    /// Signed distance `self − other`.
    pub fn diff(self, other: SeqNumber) -> i32 {
        self.0.wrapping_sub(other.0) as i32
    }

    /// Whether `self` comes strictly before `other`.
    pub fn before(self, other: SeqNumber) -> bool {
        self.diff(other) < 0
    }

    /// Whether `self` comes strictly after `other`.
    pub fn after(self, other: SeqNumber) -> bool {
        self.diff(other) > 0
    }

    /// The later of the two.
    pub fn max(self, other: SeqNumber) -> SeqNumber {
        if self.after(other) {
            self
        } else {
            other
        }
    }
}

/// `seq + n`, wrapping.
impl std::ops::Add<u32> for SeqNumber {
    type Output = SeqNumber;
    fn add(self, n: u32) -> SeqNumber {
        SeqNumber(self.0.wrapping_add(n))
    }
}

impl PartialOrd for SeqNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.diff(*other).cmp(&0))
    }
}

/// TCP header flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(pub u8);

impl Flags {
    /// No more data from sender.
    pub const FIN: u8 = 0x01;
    /// Synchronize sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push function.
    pub const PSH: u8 = 0x08;
    /// Acknowledgement field is significant.
    pub const ACK: u8 = 0x10;
    /// Urgent pointer field is significant.
    pub const URG: u8 = 0x20;

    /// FIN is set.
    pub fn fin(self) -> bool {
        self.0 & Self::FIN != 0
    }
    /// SYN is set.
    pub fn syn(self) -> bool {
        self.0 & Self::SYN != 0
    }
    /// RST is set.
    pub fn rst(self) -> bool {
        self.0 & Self::RST != 0
    }
    /// ACK is set.
    pub fn ack(self) -> bool {
        self.0 & Self::ACK != 0
    }
}

/// A view of a TCP segment. `new_checked` guarantees the header, options included, is inside the
/// buffer; the payload is everything after it (the caller bounds the buffer to the IP payload).
#[derive(Debug, Clone)]
pub struct Segment<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Segment<T> {
    /// Wraps `buffer` after checking the data offset.
    pub fn new_checked(buffer: T) -> Result<Self> {
        need("tcp header", MIN_HEADER_LEN, buffer.as_ref().len())?;
        let s = Segment { buffer };
        if s.header_len() < MIN_HEADER_LEN {
            return Err(Error::Malformed("tcp data offset"));
        }
        need("tcp options", s.header_len(), s.buffer.as_ref().len())?;
        Ok(s)
    }

    /// Returns the wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 0)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 2)
    }

    /// Sequence number of the first payload byte (or of the SYN).
    pub fn seq_number(&self) -> SeqNumber {
        SeqNumber(be32(self.buffer.as_ref(), 4))
    }

    /// Next sequence number the sender expects (valid when ACK is set).
    pub fn ack_number(&self) -> SeqNumber {
        SeqNumber(be32(self.buffer.as_ref(), 8))
    }

    /// Header length in bytes (data offset × 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[12] >> 4) * 4
    }

    /// The flag bits.
    pub fn flags(&self) -> Flags {
        Flags(self.buffer.as_ref()[13] & 0x3f)
    }

    /// Receive window.
    pub fn window(&self) -> u16 {
        be16(self.buffer.as_ref(), 14)
    }

    /// Checksum over pseudo-header, header and payload.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), 16)
    }

    /// The payload after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Segment<T> {
    /// Sets the sequence number.
    pub fn set_seq_number(&mut self, v: SeqNumber) {
        put_be32(self.buffer.as_mut(), 4, v.0);
    }

    /// Sets the acknowledgement number.
    pub fn set_ack_number(&mut self, v: SeqNumber) {
        put_be32(self.buffer.as_mut(), 8, v.0);
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, v: u16) {
        put_be16(self.buffer.as_mut(), 16, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_wrap() {
        let a = SeqNumber(0xffff_fff0);
        let b = a + 0x20;
        assert_eq!(b, SeqNumber(0x10));
        assert!(a.before(b));
        assert!(b.after(a));
        assert_eq!(b.diff(a), 0x20);
        assert_eq!(a.max(b), b);
        assert!(a < b);
        assert!(!a.before(a));
    }

    #[test]
    fn fields() {
        let mut s = [0u8; 24];
        s[0..2].copy_from_slice(&80u16.to_be_bytes());
        s[2..4].copy_from_slice(&4000u16.to_be_bytes());
        s[4..8].copy_from_slice(&7u32.to_be_bytes());
        s[8..12].copy_from_slice(&9u32.to_be_bytes());
        s[12] = 5 << 4;
        s[13] = Flags::ACK | Flags::PSH;
        s[20..24].copy_from_slice(b"data");
        let mut seg = Segment::new_checked(&mut s[..]).unwrap();
        assert_eq!(seg.src_port(), 80);
        assert_eq!(seg.dst_port(), 4000);
        assert_eq!(seg.seq_number(), SeqNumber(7));
        assert_eq!(seg.ack_number(), SeqNumber(9));
        assert!(seg.flags().ack() && !seg.flags().syn());
        assert_eq!(seg.payload(), b"data");
        seg.set_seq_number(SeqNumber(100));
        seg.set_ack_number(SeqNumber(200));
        assert_eq!(seg.seq_number(), SeqNumber(100));
        assert_eq!(seg.ack_number(), SeqNumber(200));
    }

    #[test]
    fn bad_data_offset() {
        let mut s = [0u8; 20];
        s[12] = 4 << 4;
        assert_eq!(Segment::new_checked(&s[..]).unwrap_err(), Error::Malformed("tcp data offset"));
        s[12] = 15 << 4; // 60-byte header in 20 bytes
        assert!(Segment::new_checked(&s[..]).is_err());
    }
}
