//! ARP packets (RFC 826) for Ethernet and IPv4.

use std::net::Ipv4Addr;

use super::ethernet::MacAddr;
use super::{be16, need, Error, Result};

/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = 28;

/// ARP operations.
pub mod operation {
    /// Who has this address?
    pub const REQUEST: u16 = 1;
    /// It is at this hardware address.
    pub const REPLY: u16 = 2;
}

/// A view of an Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps `buffer` after checking its length and that it maps IPv4 to Ethernet.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        need("arp packet", PACKET_LEN, b.len())?;
        if be16(b, 0) != 1 || be16(b, 2) != 0x0800 || b[4] != 6 || b[5] != 4 {
            return Err(Error::Malformed("arp: not ethernet/ipv4"));
        }
        Ok(Packet { buffer })
    }

    /// Operation (request or reply).
    pub fn operation(&self) -> u16 {
        be16(self.buffer.as_ref(), 6)
    }

    /// Sender hardware address.
    pub fn sender_mac(&self) -> MacAddr {
        MacAddr::from_prefix(&self.buffer.as_ref()[8..]).expect("checked length")
    }

    /// Sender protocol address.
    pub fn sender_ip(&self) -> Ipv4Addr {
        let b = self.buffer.as_ref();
        Ipv4Addr::new(b[14], b[15], b[16], b[17])
    }

    /// Target hardware address.
    pub fn target_mac(&self) -> MacAddr {
        MacAddr::from_prefix(&self.buffer.as_ref()[18..]).expect("checked length")
    }

    /// Target protocol address.
    pub fn target_ip(&self) -> Ipv4Addr {
        let b = self.buffer.as_ref();
        Ipv4Addr::new(b[24], b[25], b[26], b[27])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_fields() {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend_from_slice(&[2, 0, 0, 0, 0, 1, 10, 0, 0, 1]);
        a.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
        let p = Packet::new_checked(&a[..]).unwrap();
        assert_eq!(p.operation(), operation::REQUEST);
        assert_eq!(p.sender_mac(), [2, 0, 0, 0, 0, 1]);
        assert_eq!(p.sender_ip(), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(p.target_mac(), [0; 6]);
        assert_eq!(p.target_ip(), Ipv4Addr::new(10, 0, 0, 2));
        a[5] = 16;
        assert!(Packet::new_checked(&a[..]).is_err());
    }
}
