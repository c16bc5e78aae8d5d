//! IPv6 packets (RFC 8200) and the walk over their extension headers.

use std::net::Ipv6Addr;

use super::ipv4::protocol;
use super::{be16, be32, need, Error, Result};

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = 40;
/// Most extension headers we walk before giving up (a hostile chain could be long).
pub const MAX_EXTENSION_HEADERS: usize = 16;

/// A view of an IPv6 packet. `new_checked` guarantees the fixed header and the `payload_len`
/// bytes it declares are inside the buffer (Jumbograms, payload length 0 with a hop-by-hop
/// option, are not supported and are refused).
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

/// Where the upper-layer (transport) header of an IPv6 packet is, after the extension headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpperLayer {
    /// Next-header value of the upper layer (TCP, UDP, ICMPv6, ...), or of the header where the
    /// walk stopped (ESP, "no next header", or an unknown header).
    pub protocol: u8,
    /// Offset of the upper-layer header from the start of the IPv6 packet.
    pub offset: usize,
    /// The fragment header, if the packet is a fragment.
    pub fragment: Option<Fragment>,
}

/// The fields of an IPv6 fragment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// Offset of this fragment's data in the original payload, in bytes.
    pub offset: u16,
    /// The "more fragments" flag.
    pub more: bool,
    /// Identification shared by the fragments of one packet.
    pub ident: u32,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps `buffer` after checking the version and the declared payload length.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        need("ipv6 header", HEADER_LEN, b.len())?;
        let p = Packet { buffer };
        if p.version() != 6 {
            return Err(Error::Malformed("ipv6 version"));
        }
        need("ipv6 payload", HEADER_LEN + usize::from(p.payload_len()), p.buffer.as_ref().len())?;
        Ok(p)
    }

    /// Returns the wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// IP version (6).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[0] >> 4
    }

    /// Traffic class.
    pub fn traffic_class(&self) -> u8 {
        ((be16(self.buffer.as_ref(), 0) >> 4) & 0xff) as u8
    }

    /// Flow label (20 bits).
    pub fn flow_label(&self) -> u32 {
        be32(self.buffer.as_ref(), 0) & 0x000f_ffff
    }

    /// Length of everything after the fixed header, extension headers included.
    pub fn payload_len(&self) -> u16 {
        be16(self.buffer.as_ref(), 4)
    }

    /// Next header after the fixed header.
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[6]
    }

    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[7]
    }

    /// Source address.
    pub fn src_addr(&self) -> Ipv6Addr {
        let a: [u8; 16] = self.buffer.as_ref()[8..24].try_into().expect("checked length");
        Ipv6Addr::from(a)
    }

    /// Destination address.
    pub fn dst_addr(&self) -> Ipv6Addr {
        let a: [u8; 16] = self.buffer.as_ref()[24..40].try_into().expect("checked length");
        Ipv6Addr::from(a)
    }

    /// The payload: extension headers and upper layer, `payload_len` bytes.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..HEADER_LEN + usize::from(self.payload_len())]
    }

    /// Walks the extension headers (hop-by-hop, routing, fragment, destination options, AH and
    /// the other RFC 8200 ones) to the upper-layer header. Stops at ESP and "no next header",
    /// whose contents cannot be walked, and at a non-first fragment, which carries no upper-layer
    /// header. Errors if a header runs past the payload or the chain is absurdly long.
    pub fn upper_layer(&self) -> Result<UpperLayer> {
        let b = &self.buffer.as_ref()[..HEADER_LEN + usize::from(self.payload_len())];
        let mut next = self.next_header();
        let mut at = HEADER_LEN;
        let mut fragment = None;
        for _ in 0..MAX_EXTENSION_HEADERS {
            let len = match next {
                protocol::HOPOPT | protocol::IPV6_ROUTE | protocol::IPV6_OPTS | 135 | 139 | 140 => {
                    need("ipv6 extension header", at + 2, b.len())?;
                    (usize::from(b[at + 1]) + 1) * 8
                }
                protocol::AH => {
                    need("ipv6 authentication header", at + 2, b.len())?;
                    (usize::from(b[at + 1]) + 2) * 4
                }
                protocol::IPV6_FRAG => {
                    need("ipv6 fragment header", at + 8, b.len())?;
                    let off_flags = be16(b, at + 2);
                    let frag = Fragment { offset: off_flags & !0x7, more: off_flags & 1 != 0, ident: be32(b, at + 4) };
                    fragment = Some(frag);
                    if frag.offset != 0 {
                        // Later fragments carry no upper-layer header.
                        return Ok(UpperLayer { protocol: b[at], offset: at + 8, fragment });
                    }
                    8
                }
                _ => return Ok(UpperLayer { protocol: next, offset: at, fragment }),
            };
            need("ipv6 extension header", at + len, b.len())?;
            next = b[at];
            at += len;
        }
        Err(Error::Malformed("ipv6 extension header chain too long"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fixed header for `payload_len` bytes starting with next header `next`.
    pub(crate) fn header(next: u8, payload_len: usize) -> Vec<u8> {
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
        h[6] = next;
        h[7] = 64;
        h[8..24].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        h[24..40].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        h
    }

    #[test]
    fn plain_udp() {
        let bytes = [header(17, 8), vec![0; 8]].concat();
        let p = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(p.src_addr(), "fd00::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.hop_limit(), 64);
        assert_eq!(p.upper_layer().unwrap(), UpperLayer { protocol: 17, offset: 40, fragment: None });
    }

    #[test]
    fn walks_hop_by_hop_dest_opts_and_first_fragment() {
        let hbh = vec![60, 0, 0, 0, 0, 0, 0, 0]; // next: dest opts, 8 bytes
        let dst = vec![44, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]; // next: frag, 16 bytes
        let frag = vec![6, 0, 0, 1, 0, 0, 0, 9]; // next: tcp, offset 0, M=1, id 9
        let payload = [hbh, dst, frag, vec![0; 20]].concat();
        let bytes = [header(0, payload.len()), payload].concat();
        let p = Packet::new_checked(&bytes[..]).unwrap();
        let ul = p.upper_layer().unwrap();
        assert_eq!(ul.protocol, 6);
        assert_eq!(ul.offset, 40 + 8 + 16 + 8);
        assert_eq!(ul.fragment, Some(Fragment { offset: 0, more: true, ident: 9 }));
    }

    #[test]
    fn later_fragment_has_no_upper_layer() {
        let frag = vec![17, 0, 0x05, 0x00, 0, 0, 0, 1]; // offset 1280
        let payload = [frag, vec![0; 16]].concat();
        let bytes = [header(44, payload.len()), payload].concat();
        let ul = Packet::new_checked(&bytes[..]).unwrap().upper_layer().unwrap();
        assert_eq!(ul.fragment.unwrap().offset, 1280);
        assert_eq!(ul.offset, 48);
    }

    #[test]
    fn hostile_chains_are_errors() {
        // An extension header whose length runs past the payload.
        let bytes = [header(0, 8), vec![17, 5, 0, 0, 0, 0, 0, 0]].concat();
        assert!(Packet::new_checked(&bytes[..]).unwrap().upper_layer().is_err());
        // A loop of hop-by-hop headers longer than we walk.
        let chain: Vec<u8> = (0..20).flat_map(|_| vec![0u8, 0, 0, 0, 0, 0, 0, 0]).collect();
        let bytes = [header(0, chain.len()), chain].concat();
        assert!(Packet::new_checked(&bytes[..]).unwrap().upper_layer().is_err());
        // Payload length beyond the buffer.
        assert!(Packet::new_checked(&header(17, 8)[..]).is_err());
        // Wrong version.
        let mut h = header(17, 0);
        h[0] = 0x40;
        assert!(Packet::new_checked(&h[..]).is_err());
    }
}
