//! UDP datagrams (RFC 768).

use super::{be16, need, Result};

/// Length of the UDP header.
pub const HEADER_LEN: usize = 8;

/// A view of a UDP datagram. `new_checked` guarantees the 8-byte header is inside the buffer.
#[derive(Debug, Clone)]
pub struct Datagram<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Datagram<T> {
    /// Wraps `buffer` after checking it holds a UDP header.
    pub fn new_checked(buffer: T) -> Result<Self> {
        need("udp header", HEADER_LEN, buffer.as_ref().len())?;
        Ok(Datagram { buffer })
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 0)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 2)
    }

    /// Length of header and payload, as declared.
    pub fn len(&self) -> u16 {
        be16(self.buffer.as_ref(), 4)
    }

    /// Whether the declared length leaves no payload.
    pub fn is_empty(&self) -> bool {
        usize::from(self.len()) <= HEADER_LEN
    }

    /// Checksum (0: none, IPv4 only).
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), 6)
    }

    /// The payload, bounded by the declared length when it is consistent with the buffer.
    pub fn payload(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        let end = usize::from(self.len()).clamp(HEADER_LEN, b.len());
        &b[HEADER_LEN..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_bounded_payload() {
        let mut d = [0u8; 14];
        d[0..2].copy_from_slice(&53u16.to_be_bytes());
        d[2..4].copy_from_slice(&1000u16.to_be_bytes());
        d[4..6].copy_from_slice(&12u16.to_be_bytes());
        d[8..12].copy_from_slice(b"abcd");
        let u = Datagram::new_checked(&d[..]).unwrap();
        assert_eq!((u.src_port(), u.dst_port(), u.len()), (53, 1000, 12));
        assert_eq!(u.payload(), b"abcd");
        d[4..6].copy_from_slice(&9999u16.to_be_bytes());
        assert_eq!(Datagram::new_checked(&d[..]).unwrap().payload().len(), 6);
        assert!(Datagram::new_checked(&d[..7]).is_err());
    }
}
