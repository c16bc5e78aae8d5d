//! Building valid frames (correct lengths and checksums) for tests, benchmarks and drivers.
//!
//! The defaults describe a VM at 10.0.0.2 (MAC 52:54:00:12:34:56) answering a client at 10.0.0.1
//! (MAC 52:54:00:00:00:01); the `*_to` variants take explicit addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::wire::checksum;
use crate::wire::ethernet::{ether_type, MacAddr};
use crate::wire::ipv4::protocol;
use crate::wire::tcp::Flags;

/// MAC address of the VM in built frames.
pub const VM_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
/// MAC address of the client in built frames.
pub const CLIENT_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x00, 0x00, 0x01]);
/// IPv4 address of the VM.
pub const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// IPv4 address of the client.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// IPv6 address of the VM.
pub const VM_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// IPv6 address of the client.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);

/// An Ethernet header.
pub fn ethernet(dst: MacAddr, src: MacAddr, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(1514);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An IPv4 frame from `src` to `dst` carrying `l4` (a transport header and payload whose
/// checksum, at `csum_at` within `l4` if any, is filled in here). `ident` sets the IP ID, which
/// the comparison ignores.
pub fn ipv4_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    ident: u16,
    mut l4: Vec<u8>,
    csum_at: Option<usize>,
) -> Vec<u8> {
    let (smac, dmac) = if src == VM_IP { (VM_MAC, CLIENT_MAC) } else { (CLIENT_MAC, VM_MAC) };
    let mut f = ethernet(dmac, smac, ether_type::IPV4);
    let total = (20 + l4.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&ident.to_be_bytes());
    ip.extend_from_slice(&[0x40, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum::internet(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    if let Some(at) = csum_at {
        l4[at..at + 2].copy_from_slice(&[0, 0]);
        let acc = checksum::pseudo_header_v4(src, dst, proto, l4.len());
        let c = !checksum::fold(checksum::accumulate(acc, &l4));
        let c = if proto == protocol::UDP && c == 0 { 0xffff } else { c };
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

/// An IPv6 frame from `src` to `dst` carrying `l4` with its checksum at `csum_at`.
pub fn ipv6_frame(src: Ipv6Addr, dst: Ipv6Addr, next: u8, mut l4: Vec<u8>, csum_at: Option<usize>) -> Vec<u8> {
    let (smac, dmac) = if src == VM_IP6 { (VM_MAC, CLIENT_MAC) } else { (CLIENT_MAC, VM_MAC) };
    let mut f = ethernet(dmac, smac, ether_type::IPV6);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    f.extend_from_slice(&[next, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    if let Some(at) = csum_at {
        l4[at..at + 2].copy_from_slice(&[0, 0]);
        let acc = checksum::pseudo_header_v6(src, dst, next, l4.len());
        let c = !checksum::fold(checksum::accumulate(acc, &l4));
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    f.extend_from_slice(&l4);
    f
}

/// A UDP header and payload (checksum left for the IP builder).
pub fn udp_segment(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// A TCP header (no options) and payload (checksum left for the IP builder).
pub fn tcp_segment(sport: u16, dport: u16, seq: u32, ack: Option<u32>, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(20 + payload.len());
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.unwrap_or(0).to_be_bytes());
    let flags = if ack.is_some() { flags | Flags::ACK } else { flags };
    t.extend_from_slice(&[5 << 4, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    t.extend_from_slice(payload);
    t
}

/// UDP from the VM (10.0.0.2) to the client (10.0.0.1).
pub fn udp4(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    ipv4_frame(VM_IP, CLIENT_IP, protocol::UDP, 1, udp_segment(sport, dport, payload), Some(6))
}

/// UDP between explicit IPv4 addresses.
pub fn udp4_to(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    ipv4_frame(src, dst, protocol::UDP, 1, udp_segment(sport, dport, payload), Some(6))
}

/// TCP from the VM to the client. `ack: Some(_)` sets the ACK flag.
pub fn tcp4(sport: u16, dport: u16, seq: u32, ack: Option<u32>, flags: u8, payload: &[u8]) -> Vec<u8> {
    tcp4_to(VM_IP, CLIENT_IP, sport, dport, seq, ack, flags, payload)
}

/// TCP between explicit IPv4 addresses.
#[allow(clippy::too_many_arguments)]
pub fn tcp4_to(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: Option<u32>,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    ipv4_frame(src, dst, protocol::TCP, 1, tcp_segment(sport, dport, seq, ack, flags, payload), Some(16))
}

/// An ICMP echo reply from the VM.
pub fn icmp4_echo_reply(ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![0, 0, 0, 0];
    m.extend_from_slice(&ident.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let c = checksum::internet(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4_frame(VM_IP, CLIENT_IP, protocol::ICMP, 1, m, None)
}

/// UDP over IPv6 from the VM (fd00::2) to the client (fd00::1).
pub fn udp6(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    ipv6_frame(VM_IP6, CLIENT_IP6, protocol::UDP, udp_segment(sport, dport, payload), Some(6))
}

/// TCP over IPv6 from the VM to the client.
pub fn tcp6(sport: u16, dport: u16, seq: u32, ack: Option<u32>, flags: u8, payload: &[u8]) -> Vec<u8> {
    ipv6_frame(VM_IP6, CLIENT_IP6, protocol::TCP, tcp_segment(sport, dport, seq, ack, flags, payload), Some(16))
}

/// An ICMPv6 message of type `msg_type` from the VM; `body` follows type, code and checksum.
pub fn icmp6(msg_type: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![msg_type, 0, 0, 0];
    m.extend_from_slice(body);
    ipv6_frame(VM_IP6, CLIENT_IP6, protocol::ICMPV6, m, Some(2))
}

/// An IPv4 frame of an arbitrary protocol (e.g. GRE) from the VM, with IP ID `ident`.
pub fn ip4_other(proto: u8, ident: u16, payload: &[u8]) -> Vec<u8> {
    ipv4_frame(VM_IP, CLIENT_IP, proto, ident, payload.to_vec(), None)
}

/// An ARP request from the client for the VM's address.
pub fn arp_request() -> Vec<u8> {
    let mut f = ethernet(MacAddr::BROADCAST, CLIENT_MAC, ether_type::ARP);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC.0);
    f.extend_from_slice(&CLIENT_IP.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&VM_IP.octets());
    f
}

/// `frame` with an 802.1Q tag of VLAN `vid` inserted after the MAC addresses.
pub fn vlan_tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&ether_type::VLAN.to_be_bytes());
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// Whether the transport checksum of an IPv4 or IPv6 frame (no VLAN) verifies.
pub fn l4_checksum_ok(frame: &[u8]) -> bool {
    let et = u16::from_be_bytes([frame[12], frame[13]]);
    match et {
        ether_type::IPV4 => {
            let ip = &frame[14..];
            let hl = usize::from(ip[0] & 0xf) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            let l4 = &ip[hl..total];
            let acc = checksum::pseudo_header_v4(src, dst, ip[9], l4.len());
            checksum::fold(checksum::accumulate(acc, l4)) == 0xffff
        }
        ether_type::IPV6 => {
            let ip = &frame[14..];
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
            let l4 = &ip[40..40 + len];
            let acc = checksum::pseudo_header_v6(src, dst, ip[6], l4.len());
            checksum::fold(checksum::accumulate(acc, l4)) == 0xffff
        }
        _ => false,
    }
}

/// The IP address as an [`IpAddr`] (convenience for building flow keys in tests).
pub fn ip(a: &str) -> IpAddr {
    a.parse().expect("valid IP address")
}
