//! Announcing a VM on the LAN after a takeover, so that switches send its clients' frames to
//! the new host at once instead of after their forwarding entries age out (300 s by default).
//!
//! As QEMU does after a migration: a few rounds of broadcast RARP frames from the VM's MAC
//! (switches learn the source address of any frame), here with a gratuitous ARP for each IPv4
//! address the VM was seen using, over about half a second.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::wire::MacAddr;

/// When each round goes out, after the takeover.
pub const SCHEDULE: [Duration; 5] = [
    Duration::from_millis(0),
    Duration::from_millis(50),
    Duration::from_millis(150),
    Duration::from_millis(300),
    Duration::from_millis(500),
];

const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_RARP: u16 = 0x8035;
/// RARP "request reverse" (RFC 903), what QEMU sends.
const RARP_REQUEST_REVERSE: u16 = 3;
const ARP_REQUEST: u16 = 1;
/// Frames are padded to Ethernet's minimum (without FCS).
const MIN_FRAME: usize = 60;

/// A broadcast RARP frame from `mac` (Ethernet, no virtio-net header).
pub fn rarp(mac: MacAddr) -> Vec<u8> {
    arp_frame(ETHERTYPE_RARP, RARP_REQUEST_REVERSE, mac, Ipv4Addr::UNSPECIFIED, mac, Ipv4Addr::UNSPECIFIED)
}

/// A broadcast gratuitous ARP request: `mac` is at `ip`.
pub fn gratuitous_arp(mac: MacAddr, ip: Ipv4Addr) -> Vec<u8> {
    arp_frame(ETHERTYPE_ARP, ARP_REQUEST, mac, ip, MacAddr([0; 6]), ip)
}

/// One round: the RARP and a gratuitous ARP per address.
pub fn round(mac: MacAddr, addresses: &[Ipv4Addr]) -> Vec<Vec<u8>> {
    std::iter::once(rarp(mac)).chain(addresses.iter().map(|&ip| gratuitous_arp(mac, ip))).collect()
}

fn arp_frame(ethertype: u16, op: u16, sha: MacAddr, spa: Ipv4Addr, tha: MacAddr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME);
    f.extend_from_slice(&MacAddr::BROADCAST.0);
    f.extend_from_slice(&sha.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha.0);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha.0);
    f.extend_from_slice(&tpa.octets());
    f.resize(MIN_FRAME, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::arp;

    #[test]
    fn rarp_and_gratuitous_arp_carry_the_vm_mac_as_source() {
        let mac = MacAddr([0x52, 0x54, 0, 1, 2, 3]);
        let r = rarp(mac);
        assert_eq!(r.len(), 60);
        assert_eq!(&r[..6], &[0xff; 6]);
        assert_eq!(mac, r[6..12]);
        assert_eq!(&r[12..14], &[0x80, 0x35]);
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        let g = gratuitous_arp(mac, ip);
        let p = arp::Packet::new_checked(&g[14..]).unwrap();
        assert_eq!((p.operation(), p.sender_mac(), p.sender_ip(), p.target_ip()), (1, mac, ip, ip));
        assert_eq!(round(mac, &[ip, ip]).len(), 3);
        assert!(SCHEDULE.last().unwrap() <= &Duration::from_millis(600), "about half a second");
    }
}
