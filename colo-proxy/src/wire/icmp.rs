//! ICMP (RFC 792) and ICMPv6 (RFC 4443) messages: both start with type, code and checksum.

use super::{be16, need, Result};

/// Length of the common ICMP header (type, code, checksum).
pub const HEADER_LEN: usize = 4;

/// ICMPv4 message types we name.
pub mod v4_type {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
}

/// ICMPv6 message types we name.
pub mod v6_type {
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 128;
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 129;
    /// Multicast listener query (MLD).
    pub const MLD_QUERY: u8 = 130;
    /// Multicast listener report (MLD).
    pub const MLD_REPORT: u8 = 131;
    /// Multicast listener done (MLD).
    pub const MLD_DONE: u8 = 132;
    /// Router solicitation (NDP).
    pub const ROUTER_SOLICIT: u8 = 133;
    /// Router advertisement (NDP).
    pub const ROUTER_ADVERT: u8 = 134;
    /// Neighbor solicitation (NDP).
    pub const NEIGHBOR_SOLICIT: u8 = 135;
    /// Neighbor advertisement (NDP).
    pub const NEIGHBOR_ADVERT: u8 = 136;
    /// Redirect (NDP).
    pub const REDIRECT: u8 = 137;
    /// Multicast listener report version 2 (MLDv2).
    pub const MLD2_REPORT: u8 = 143;

    /// Whether the message is link-layer housekeeping (neighbor discovery or multicast listener
    /// discovery), the IPv6 counterpart of ARP: its timing depends on caches, not on the
    /// application, so it is not compared.
    pub fn is_link_housekeeping(t: u8) -> bool {
        matches!(t, MLD_QUERY..=REDIRECT | MLD2_REPORT)
    }
}

/// A view of an ICMP or ICMPv6 message.
#[derive(Debug, Clone)]
pub struct Message<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Message<T> {
    /// Wraps `buffer` after checking it holds the 4-byte common header.
    pub fn new_checked(buffer: T) -> Result<Self> {
        need("icmp header", HEADER_LEN, buffer.as_ref().len())?;
        Ok(Message { buffer })
    }

    /// Message type.
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[0]
    }

    /// Message code.
    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[1]
    }

    /// Checksum.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), 2)
    }

    /// Echo identifier (bytes 4..6), if the message is long enough to have one.
    pub fn echo_ident(&self) -> Option<u16> {
        let b = self.buffer.as_ref();
        (b.len() >= 8).then(|| be16(b, 4))
    }

    /// Echo sequence number (bytes 6..8), if the message is long enough to have one.
    pub fn echo_seq(&self) -> Option<u16> {
        let b = self.buffer.as_ref();
        (b.len() >= 8).then(|| be16(b, 6))
    }

    /// Everything after the common header.
    pub fn body(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_fields() {
        let m = [8u8, 0, 0xab, 0xcd, 0, 7, 0, 3, b'x'];
        let m = Message::new_checked(&m[..]).unwrap();
        assert_eq!((m.msg_type(), m.code(), m.checksum()), (8, 0, 0xabcd));
        assert_eq!((m.echo_ident(), m.echo_seq()), (Some(7), Some(3)));
        assert_eq!(m.body(), &[0, 7, 0, 3, b'x']);
        let short = [0u8, 0, 0, 0, 1];
        assert_eq!(Message::new_checked(&short[..]).unwrap().echo_ident(), None);
        assert!(Message::new_checked(&short[..3]).is_err());
    }

    #[test]
    fn housekeeping_types() {
        assert!(v6_type::is_link_housekeeping(v6_type::NEIGHBOR_SOLICIT));
        assert!(v6_type::is_link_housekeeping(v6_type::MLD2_REPORT));
        assert!(!v6_type::is_link_housekeeping(v6_type::ECHO_REPLY));
    }
}
