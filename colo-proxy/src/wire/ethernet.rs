//! Ethernet II frames and IEEE 802.1Q / 802.1ad VLAN tags.

use super::{be16, need, Result};

/// Length of the Ethernet II header: destination, source, EtherType.
pub const HEADER_LEN: usize = 14;
/// Length of one VLAN tag: TCI and the encapsulated EtherType.
pub const VLAN_TAG_LEN: usize = 4;
/// Most VLAN tags we walk (802.1ad "QinQ" stacks two).
pub const MAX_VLAN_TAGS: usize = 2;

/// EtherType values we recognise.
pub mod ether_type {
    /// Internet Protocol version 4.
    pub const IPV4: u16 = 0x0800;
    /// Address Resolution Protocol.
    pub const ARP: u16 = 0x0806;
    /// IEEE 802.1Q customer VLAN tag.
    pub const VLAN: u16 = 0x8100;
    /// IEEE 802.1ad service VLAN tag (outer tag of QinQ).
    pub const QINQ: u16 = 0x88a8;
    /// Internet Protocol version 6.
    pub const IPV6: u16 = 0x86dd;
}

pub use super::mac::MacAddr;

/// A view of an Ethernet II frame.
#[derive(Debug, Clone)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps `buffer` after checking it holds a whole Ethernet header.
    pub fn new_checked(buffer: T) -> Result<Self> {
        need("ethernet header", HEADER_LEN, buffer.as_ref().len())?;
        Ok(Frame { buffer })
    }

    /// Returns the wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Destination MAC address (bytes 0..6).
    pub fn dst_addr(&self) -> MacAddr {
        MacAddr::from_prefix(self.buffer.as_ref()).expect("checked length")
    }

    /// Source MAC address (bytes 6..12).
    pub fn src_addr(&self) -> MacAddr {
        MacAddr::from_prefix(&self.buffer.as_ref()[6..]).expect("checked length")
    }

    /// The outer EtherType (bytes 12..14); a VLAN TPID if the frame is tagged.
    pub fn ethertype(&self) -> u16 {
        be16(self.buffer.as_ref(), 12)
    }

    /// Everything after the 14-byte header (VLAN tags included).
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }

    /// Walks the VLAN tags after the header and returns where the network layer starts.
    pub fn layer2(&self) -> Result<Layer2> {
        let b = self.buffer.as_ref();
        let mut l2 =
            Layer2 { tags: [0; MAX_VLAN_TAGS], tag_count: 0, ethertype: self.ethertype(), l3_offset: HEADER_LEN };
        while matches!(l2.ethertype, ether_type::VLAN | ether_type::QINQ) && l2.tag_count < MAX_VLAN_TAGS {
            let at = l2.l3_offset;
            need("vlan tag", at + VLAN_TAG_LEN, b.len())?;
            l2.tags[l2.tag_count] = be16(b, at);
            l2.tag_count += 1;
            l2.ethertype = be16(b, at + 2);
            l2.l3_offset = at + VLAN_TAG_LEN;
        }
        Ok(l2)
    }
}

/// What the link layer says about a frame: its VLAN tags and where its payload starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer2 {
    /// Tag control information of each VLAN tag, outermost first.
    pub tags: [u16; MAX_VLAN_TAGS],
    /// How many entries of `tags` are valid.
    pub tag_count: usize,
    /// EtherType of the payload after all tags.
    pub ethertype: u16,
    /// Offset of the payload (the network-layer header) from the frame start.
    pub l3_offset: usize,
}

impl Layer2 {
    /// VLAN identifier (low 12 bits of the TCI) of the innermost tag, if tagged.
    pub fn vid(&self) -> Option<u16> {
        (self.tag_count > 0).then(|| self.tags[self.tag_count - 1] & 0x0fff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_buffer_is_refused() {
        assert!(Frame::new_checked(&[0u8; 13][..]).is_err());
        assert!(Frame::new_checked(&[0u8; 14][..]).is_ok());
    }

    #[test]
    fn fields_and_vlan_walk() {
        let mut f = [0u8; 14 + 8 + 4];
        f[0..6].copy_from_slice(&[1, 2, 3, 4, 5, 6]);
        f[6..12].copy_from_slice(&[7, 8, 9, 10, 11, 12]);
        f[12..14].copy_from_slice(&0x88a8u16.to_be_bytes());
        f[14..16].copy_from_slice(&0x0064u16.to_be_bytes());
        f[16..18].copy_from_slice(&0x8100u16.to_be_bytes());
        f[18..20].copy_from_slice(&0x200au16.to_be_bytes());
        f[20..22].copy_from_slice(&0x0800u16.to_be_bytes());
        let frame = Frame::new_checked(&f[..]).unwrap();
        assert_eq!(frame.dst_addr(), [1, 2, 3, 4, 5, 6]);
        assert_eq!(frame.src_addr(), [7, 8, 9, 10, 11, 12]);
        let l2 = frame.layer2().unwrap();
        assert_eq!(l2.tag_count, 2);
        assert_eq!(l2.vid(), Some(10));
        assert_eq!(l2.ethertype, ether_type::IPV4);
        assert_eq!(l2.l3_offset, 22);
    }

    #[test]
    fn truncated_vlan_tag_is_an_error() {
        let mut f = [0u8; 16];
        f[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
        assert!(Frame::new_checked(&f[..]).unwrap().layer2().is_err());
    }
}
