//! IPv4 packets (RFC 791).

use std::net::Ipv4Addr;

use super::{be16, checksum, need, put_be16, Error, Result};

/// Length of an IPv4 header without options.
pub const MIN_HEADER_LEN: usize = 20;

/// IP protocol numbers (also IPv6 next-header values) we recognise.
pub mod protocol {
    /// IPv6 hop-by-hop options.
    pub const HOPOPT: u8 = 0;
    /// Internet Control Message Protocol.
    pub const ICMP: u8 = 1;
    /// Transmission Control Protocol.
    pub const TCP: u8 = 6;
    /// User Datagram Protocol.
    pub const UDP: u8 = 17;
    /// Datagram Congestion Control Protocol.
    pub const DCCP: u8 = 33;
    /// IPv6 routing header.
    pub const IPV6_ROUTE: u8 = 43;
    /// IPv6 fragment header.
    pub const IPV6_FRAG: u8 = 44;
    /// Generic Routing Encapsulation.
    pub const GRE: u8 = 47;
    /// Encapsulating Security Payload.
    pub const ESP: u8 = 50;
    /// Authentication Header.
    pub const AH: u8 = 51;
    /// ICMP for IPv6.
    pub const ICMPV6: u8 = 58;
    /// IPv6 "no next header".
    pub const IPV6_NONXT: u8 = 59;
    /// IPv6 destination options.
    pub const IPV6_OPTS: u8 = 60;
    /// Stream Control Transmission Protocol.
    pub const SCTP: u8 = 132;
    /// UDP-Lite.
    pub const UDPLITE: u8 = 136;

    /// Whether the first four bytes of this protocol's header are source and destination port.
    pub fn has_ports(p: u8) -> bool {
        matches!(p, TCP | UDP | UDPLITE | SCTP | DCCP)
    }
}

/// A view of an IPv4 packet. `new_checked` guarantees the header (with options) and the
/// `total_len` bytes it declares are inside the buffer; trailing bytes (Ethernet padding) are
/// allowed and are not part of [`Packet::payload`].
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps `buffer` after checking the version, header length and total length.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        need("ipv4 header", MIN_HEADER_LEN, b.len())?;
        let p = Packet { buffer };
        if p.version() != 4 {
            return Err(Error::Malformed("ipv4 version"));
        }
        let hl = p.header_len();
        if hl < MIN_HEADER_LEN {
            return Err(Error::Malformed("ipv4 header length"));
        }
        let total = usize::from(p.total_len());
        if total < hl {
            return Err(Error::Malformed("ipv4 total length"));
        }
        need("ipv4 packet", total, p.buffer.as_ref().len())?;
        Ok(p)
    }

    /// Returns the wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// IP version (4).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[0] >> 4
    }

    /// Header length in bytes (IHL × 4), options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[0] & 0x0f) * 4
    }

    /// DSCP and ECN bits (the old TOS byte).
    pub fn dscp_ecn(&self) -> u8 {
        self.buffer.as_ref()[1]
    }

    /// Length of header plus payload, as the header declares it.
    pub fn total_len(&self) -> u16 {
        be16(self.buffer.as_ref(), 2)
    }

    /// Identification, used to reassemble fragments.
    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), 4)
    }

    /// The "don't fragment" flag.
    pub fn dont_frag(&self) -> bool {
        self.buffer.as_ref()[6] & 0x40 != 0
    }

    /// The "more fragments" flag.
    pub fn more_frags(&self) -> bool {
        self.buffer.as_ref()[6] & 0x20 != 0
    }

    /// Fragment offset in bytes.
    pub fn frag_offset(&self) -> u16 {
        (be16(self.buffer.as_ref(), 6) & 0x1fff) << 3
    }

    /// Whether this packet is a fragment of a larger datagram.
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[8]
    }

    /// Protocol of the payload.
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[9]
    }

    /// Header checksum.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), 10)
    }

    /// Whether the header checksum is correct.
    pub fn verify_checksum(&self) -> bool {
        checksum::internet(&self.buffer.as_ref()[..self.header_len()]) == 0
    }

    /// Source address.
    pub fn src_addr(&self) -> Ipv4Addr {
        let b = self.buffer.as_ref();
        Ipv4Addr::new(b[12], b[13], b[14], b[15])
    }

    /// Destination address.
    pub fn dst_addr(&self) -> Ipv4Addr {
        let b = self.buffer.as_ref();
        Ipv4Addr::new(b[16], b[17], b[18], b[19])
    }

    /// The payload: from the end of the header to `total_len`.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..usize::from(self.total_len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the header checksum field.
    pub fn set_checksum(&mut self, v: u16) {
        put_be16(self.buffer.as_mut(), 10, v);
    }

    /// Recomputes the header checksum.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::internet(&self.buffer.as_ref()[..self.header_len()]);
        self.set_checksum(c);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid header for `payload_len` bytes of protocol `proto`.
    pub(crate) fn header(proto: u8, payload_len: usize) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1];
        h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
        let mut p = Packet::new_checked([h.clone(), vec![0; payload_len]].concat()).unwrap();
        p.fill_checksum();
        p.into_inner()[..20].to_vec()
    }

    #[test]
    fn parses_fields() {
        let bytes = [header(17, 4), vec![1, 2, 3, 4], vec![0; 6]].concat();
        let p = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(p.version(), 4);
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 24);
        assert_eq!(p.protocol(), 17);
        assert!(p.dont_frag());
        assert!(!p.is_fragment());
        assert_eq!(p.src_addr(), Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(p.payload(), &[1, 2, 3, 4]);
        assert!(p.verify_checksum());
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut h = header(17, 4);
        assert!(Packet::new_checked(&h[..]).is_err(), "total length beyond buffer");
        h[0] = 0x44;
        assert_eq!(
            Packet::new_checked([h.clone(), vec![0; 4]].concat()).unwrap_err(),
            Error::Malformed("ipv4 header length")
        );
        h[0] = 0x65;
        assert_eq!(
            Packet::new_checked([h.clone(), vec![0; 4]].concat()).unwrap_err(),
            Error::Malformed("ipv4 version")
        );
        let mut h = header(17, 4);
        h[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(Packet::new_checked([h, vec![0; 4]].concat()).unwrap_err(), Error::Malformed("ipv4 total length"));
        let mut h = header(17, 4);
        h[0] = 0x4f; // 60-byte header in a 24-byte packet
        assert!(Packet::new_checked([h, vec![0; 4]].concat()).is_err());
    }

    #[test]
    fn fragment_fields() {
        let mut h = header(17, 8);
        h[6..8].copy_from_slice(&(0x2000u16 | 3).to_be_bytes());
        let bytes = [h, vec![0; 8]].concat();
        let p = Packet::new_checked(&bytes[..]).unwrap();
        assert!(p.more_frags());
        assert_eq!(p.frag_offset(), 24);
        assert!(p.is_fragment());
    }
}
