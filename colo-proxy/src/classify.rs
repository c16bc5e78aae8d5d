//! Reading, once per frame, what the compare engine and the rewriter need to know about it.

use std::net::IpAddr;

use crate::flow::{FlowKey, FlowKind};
use crate::wire::ethernet::{self, ether_type};
use crate::wire::ipv4::{self, protocol};
use crate::wire::tcp::{self, Flags, SeqNumber};
use crate::wire::{icmp, ipv6, udp, Error};

/// What kind of frame this is, as far as comparison goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Not compared: released at once from the primary, dropped at once from the secondary.
    Uncompared(Uncompared),
    /// An IP frame that is compared within its flow.
    Compared(Compared),
}

/// Why a frame is not compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uncompared {
    /// An ARP frame.
    Arp,
    /// Neither IPv4 nor IPv6 (the EtherType after any VLAN tags).
    NotIp(u16),
    /// IPv6 neighbour or multicast-listener discovery: like ARP, driven by caches, not by the
    /// application.
    LinkHousekeeping,
    /// A header could not be parsed (too short, inconsistent lengths).
    Malformed(Error),
}

/// A compared frame: its flow and where the compared bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compared {
    /// The flow the frame belongs to.
    pub key: FlowKey,
    /// Offset in the Ethernet frame where compared bytes begin (datagrams: the transport header;
    /// other protocols: 0; fragments: the fragment's data).
    pub compare_from: usize,
    /// Offset in the Ethernet frame where the IP datagram ends (Ethernet padding excluded).
    pub ip_end: usize,
    /// Fragments only: the fragment offset and the more-fragments flag, compared as well.
    pub fragment_word: u32,
    /// TCP frames only: the fields the TCP comparison and the rewriter use.
    pub tcp: Option<TcpInfo>,
}

/// What the TCP comparison and the rewriter read from a TCP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpInfo {
    /// Sequence number of the first payload byte.
    pub seq: SeqNumber,
    /// Acknowledgement number, when the ACK flag is set.
    pub ack: Option<SeqNumber>,
    /// The flags.
    pub flags: Flags,
    /// Offset of the TCP header in the Ethernet frame.
    pub header_at: usize,
    /// Offset of the payload in the Ethernet frame.
    pub payload_at: usize,
    /// Payload length in bytes (bounded by the IP length, so Ethernet padding is excluded).
    pub payload_len: u32,
}

impl TcpInfo {
    /// Sequence number just after the payload.
    pub fn seq_end(&self) -> SeqNumber {
        self.seq + self.payload_len
    }
}

/// Classifies an Ethernet frame (without virtio-net header).
pub fn classify(frame: &[u8]) -> Class {
    match classify_ip(frame) {
        Ok(class) => class,
        Err(e) => Class::Uncompared(Uncompared::Malformed(e)),
    }
}

fn classify_ip(frame: &[u8]) -> Result<Class, Error> {
    let l2 = ethernet::Frame::new_checked(frame)?.layer2()?;
    let vlan = l2.vid().unwrap_or(FlowKey::UNTAGGED);
    let l3 = l2.l3_offset;
    let ip = &frame[l3..];
    // (src, dst, protocol, l4 offset in frame, ip end in frame, fragment)
    let (src, dst, proto, l4, ip_end, fragment) = match l2.ethertype {
        ether_type::IPV4 => {
            let p = ipv4::Packet::new_checked(ip)?;
            let frag = p.is_fragment().then(|| (u32::from(p.frag_offset()) << 1) | u32::from(p.more_frags()));
            let end = l3 + usize::from(p.total_len());
            (IpAddr::V4(p.src_addr()), IpAddr::V4(p.dst_addr()), p.protocol(), l3 + p.header_len(), end, frag)
        }
        ether_type::IPV6 => {
            let p = ipv6::Packet::new_checked(ip)?;
            let ul = p.upper_layer()?;
            let frag = ul.fragment.map(|f| (u32::from(f.offset) << 1) | u32::from(f.more));
            let end = l3 + ipv6::HEADER_LEN + usize::from(p.payload_len());
            (IpAddr::V6(p.src_addr()), IpAddr::V6(p.dst_addr()), ul.protocol, l3 + ul.offset, end, frag)
        }
        ether_type::ARP => return Ok(Class::Uncompared(Uncompared::Arp)),
        other => return Ok(Class::Uncompared(Uncompared::NotIp(other))),
    };
    let mut key = FlowKey { vlan, protocol: proto, kind: FlowKind::Other, src, dst, src_port: 0, dst_port: 0 };
    let l4_bytes = &frame[l4..ip_end];
    if let Some(word) = fragment {
        key.kind = FlowKind::Fragment;
        return Ok(Class::Compared(Compared { key, compare_from: l4, ip_end, fragment_word: word, tcp: None }));
    }
    if protocol::has_ports(proto) && l4_bytes.len() >= 4 {
        key.src_port = u16::from_be_bytes([l4_bytes[0], l4_bytes[1]]);
        key.dst_port = u16::from_be_bytes([l4_bytes[2], l4_bytes[3]]);
    }
    let mut compared = Compared { key, compare_from: 0, ip_end, fragment_word: 0, tcp: None };
    match proto {
        protocol::TCP => {
            let seg = tcp::Segment::new_checked(l4_bytes)?;
            let flags = seg.flags();
            compared.key.kind = FlowKind::Tcp;
            compared.compare_from = l4 + seg.header_len();
            compared.tcp = Some(TcpInfo {
                seq: seg.seq_number(),
                ack: flags.ack().then(|| seg.ack_number()),
                flags,
                header_at: l4,
                payload_at: l4 + seg.header_len(),
                payload_len: seg.payload().len() as u32,
            });
        }
        protocol::UDP => {
            udp::Datagram::new_checked(l4_bytes)?;
            compared.key.kind = FlowKind::Datagram;
            compared.compare_from = l4;
        }
        protocol::ICMP => {
            icmp::Message::new_checked(l4_bytes)?;
            compared.key.kind = FlowKind::Datagram;
            compared.compare_from = l4;
        }
        protocol::ICMPV6 => {
            let m = icmp::Message::new_checked(l4_bytes)?;
            if icmp::v6_type::is_link_housekeeping(m.msg_type()) {
                return Ok(Class::Uncompared(Uncompared::LinkHousekeeping));
            }
            compared.key.kind = FlowKind::Datagram;
            compared.compare_from = l4;
        }
        _ => {}
    }
    Ok(Class::Compared(compared))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::*;

    #[test]
    fn arp_and_non_ip_are_uncompared() {
        assert_eq!(classify(&arp_request()), Class::Uncompared(Uncompared::Arp));
        let mut f = udp4(1, 2, b"x");
        f[12..14].copy_from_slice(&0x88ccu16.to_be_bytes());
        assert_eq!(classify(&f), Class::Uncompared(Uncompared::NotIp(0x88cc)));
        assert!(matches!(classify(&f[..10]), Class::Uncompared(Uncompared::Malformed(_))));
    }

    #[test]
    fn udp_key_and_offsets() {
        let f = udp4(5000, 7, b"hello");
        let Class::Compared(c) = classify(&f) else { panic!() };
        assert_eq!(c.key.to_string(), "10.0.0.2:5000>10.0.0.1:7");
        assert_eq!(c.key.kind, FlowKind::Datagram);
        assert_eq!(c.compare_from, 14 + 20);
        assert_eq!(c.ip_end, 14 + 20 + 8 + 5);
    }

    #[test]
    fn tcp_payload_excludes_ethernet_padding() {
        let mut f = tcp4(80, 4000, 1000, Some(77), Flags::ACK, b"ab");
        f.resize(60, 0); // padded to the Ethernet minimum
        let Class::Compared(c) = classify(&f) else { panic!() };
        let t = c.tcp.unwrap();
        assert_eq!(t.payload_len, 2);
        assert_eq!(t.seq, SeqNumber(1000));
        assert_eq!(t.seq_end(), SeqNumber(1002));
        assert_eq!(t.ack, Some(SeqNumber(77)));
        assert_eq!(c.key.kind, FlowKind::Tcp);
    }

    #[test]
    fn ack_is_none_without_the_flag() {
        let f = tcp4(80, 4000, 1000, None, Flags::SYN, b"");
        let Class::Compared(c) = classify(&f) else { panic!() };
        assert_eq!(c.tcp.unwrap().ack, None);
    }

    #[test]
    fn vlan_tagged_ipv4_is_compared_with_vid_in_key() {
        let f = vlan_tagged(&udp4(1, 2, b"x"), 42);
        let Class::Compared(c) = classify(&f) else { panic!() };
        assert_eq!(c.key.vlan, 42);
        assert_eq!(c.compare_from, 18 + 20);
    }

    #[test]
    fn ipv6_udp_and_ndp() {
        let f = udp6(9, 10, b"v6");
        let Class::Compared(c) = classify(&f) else { panic!() };
        assert_eq!(c.key.to_string(), "[fd00::2]:9>[fd00::1]:10");
        assert_eq!(c.compare_from, 14 + 40);
        let ns = icmp6(135, b"\0\0\0\0neighbour");
        assert_eq!(classify(&ns), Class::Uncompared(Uncompared::LinkHousekeeping));
        let echo = icmp6(129, b"\0\x01\0\x02ping");
        assert!(matches!(classify(&echo), Class::Compared(_)));
    }

    #[test]
    fn fragments_are_their_own_kind() {
        let mut f = udp4(1, 2, b"0123456789");
        f[14 + 6] = 0x20; // MF
        let Class::Compared(c) = classify(&f) else { panic!() };
        assert_eq!(c.key.kind, FlowKind::Fragment);
        assert_eq!(c.key.src_port, 0);
        assert_eq!(c.fragment_word, 1);
    }

    #[test]
    fn truncated_tcp_header_is_malformed() {
        let f = tcp4(80, 4000, 1, None, Flags::ACK, b"");
        let mut cut = f[..14 + 20 + 10].to_vec();
        cut[14 + 2..14 + 4].copy_from_slice(&30u16.to_be_bytes());
        assert!(matches!(classify(&cut), Class::Uncompared(Uncompared::Malformed(_))));
    }
}
