//! Flow keys: which connection a frame belongs to.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use crate::wire::ipv4::protocol;

/// How the frames of a flow are compared (docs/compare.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowKind {
    /// TCP: payload byte streams, aligned by sequence number.
    Tcp,
    /// UDP, ICMP, ICMPv6: equal length and equal bytes from the transport header on.
    Datagram,
    /// Any other IP protocol: the whole frame after the virtio-net header.
    Other,
    /// IP fragments: fragment offset and the IP payload (a documented limitation: fragments are
    /// not reassembled).
    Fragment,
}

/// The key of a flow: (VLAN, IP source, IP destination, source port, destination port, protocol).
/// Primary and secondary frames of the same connection and direction have the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    /// VLAN identifier of the innermost tag, or [`FlowKey::UNTAGGED`].
    pub vlan: u16,
    /// IP protocol (IPv6: the upper-layer next header).
    pub protocol: u8,
    /// How the flow is compared.
    pub kind: FlowKind,
    /// IP source address.
    pub src: IpAddr,
    /// IP destination address.
    pub dst: IpAddr,
    /// Source port (0 for protocols without ports).
    pub src_port: u16,
    /// Destination port (0 for protocols without ports).
    pub dst_port: u16,
}

/// Hashed as a few machine words, not field by field: the compare engine looks a key up for
/// every frame, and the derived hash (an enum tag and a length-prefixed byte slice per address)
/// cost several times more than the lookup itself. Equal keys give equal words. The fields that
/// vary most between flows (ports, the peer's address) go in the low bits of the last words
/// written: a multiplicative hasher such as FxHash carries a difference only towards the high
/// bits, so differences written high in an early word would never reach the bucket index.
impl Hash for FlowKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let kind = match self.kind {
            FlowKind::Tcp => 0u64,
            FlowKind::Datagram => 1,
            FlowKind::Other => 2,
            FlowKind::Fragment => 3,
        };
        let ports = u64::from(self.src_port) << 16 | u64::from(self.dst_port);
        let meta = kind << 56 | u64::from(self.protocol) << 48 | u64::from(self.vlan) << 32 | ports;
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                state.write_u64(u64::from(s.to_bits()) << 32 ^ u64::from(d.to_bits()) ^ u64::from(s.to_bits()));
                state.write_u64(meta);
            }
            (s, d) => {
                state.write_u128(ip_bits(s));
                state.write_u128(ip_bits(d));
                state.write_u64(meta | 1 << 63);
            }
        }
    }
}

/// An address as 128 bits (IPv4 in the low 32 with the top bit set; should that ever equal an
/// IPv6 address of the same key, the collision costs one key comparison, nothing more).
fn ip_bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => 1 << 127 | u128::from(a.to_bits()),
        IpAddr::V6(a) => a.to_bits(),
    }
}

impl FlowKey {
    /// `vlan` value of untagged frames (no VID can be 0xffff).
    pub const UNTAGGED: u16 = 0xffff;

    /// The key of the opposite direction.
    pub fn reversed(&self) -> FlowKey {
        FlowKey { src: self.dst, dst: self.src, src_port: self.dst_port, dst_port: self.src_port, ..*self }
    }

    /// Short protocol name for events and logs.
    pub fn proto_name(&self) -> &'static str {
        match (self.kind, self.protocol) {
            (FlowKind::Fragment, _) => "fragment",
            (_, protocol::TCP) => "tcp",
            (_, protocol::UDP) => "udp",
            (_, protocol::ICMP) => "icmp",
            (_, protocol::ICMPV6) => "icmpv6",
            (_, protocol::UDPLITE) => "udplite",
            (_, protocol::SCTP) => "sctp",
            (_, protocol::DCCP) => "dccp",
            (_, protocol::GRE) => "gre",
            (_, protocol::ESP) => "esp",
            (_, protocol::AH) => "ah",
            _ => "ip",
        }
    }
}

/// `10.0.0.2:80>10.0.0.1:40000`, `[fd00::2]:80>[fd00::1]:40000`; ports omitted when both are 0.
impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = |f: &mut fmt::Formatter<'_>, ip: &IpAddr, port: u16, ports: bool| match (ip, ports) {
            (IpAddr::V4(a), true) => write!(f, "{a}:{port}"),
            (IpAddr::V6(a), true) => write!(f, "[{a}]:{port}"),
            (a, false) => write!(f, "{a}"),
        };
        let ports = self.src_port != 0 || self.dst_port != 0;
        addr(f, &self.src, self.src_port, ports)?;
        f.write_str(">")?;
        addr(f, &self.dst, self.dst_port, ports)?;
        if self.vlan != Self::UNTAGGED {
            write!(f, "@vlan{}", self.vlan)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: &str, dst: &str, sp: u16, dp: u16) -> FlowKey {
        FlowKey {
            vlan: FlowKey::UNTAGGED,
            protocol: protocol::TCP,
            kind: FlowKind::Tcp,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            src_port: sp,
            dst_port: dp,
        }
    }

    #[test]
    fn display_matches_control_protocol_examples() {
        assert_eq!(key("10.0.0.2", "10.0.0.1", 80, 40000).to_string(), "10.0.0.2:80>10.0.0.1:40000");
        assert_eq!(key("fd00::2", "fd00::1", 80, 4).to_string(), "[fd00::2]:80>[fd00::1]:4");
        let mut k = key("10.0.0.2", "10.0.0.1", 0, 0);
        k.vlan = 7;
        assert_eq!(k.to_string(), "10.0.0.2>10.0.0.1@vlan7");
    }

    fn hash_of(k: &FlowKey) -> u64 {
        let mut h = rustc_hash::FxHasher::default();
        k.hash(&mut h);
        h.finish()
    }

    #[test]
    fn equal_keys_hash_alike_and_near_keys_apart() {
        for (src, dst) in [("10.0.0.2", "10.0.0.1"), ("fd00::2", "fd00::1")] {
            let k = key(src, dst, 80, 40000);
            assert_eq!(hash_of(&k), hash_of(&key(src, dst, 80, 40000)));
            let near = [
                k.reversed(),
                key(src, dst, 81, 40000),
                key(src, dst, 80, 40001),
                FlowKey { vlan: 7, ..k },
                FlowKey { protocol: protocol::UDP, kind: FlowKind::Datagram, ..k },
                FlowKey { kind: FlowKind::Fragment, ..k },
            ];
            for n in near {
                assert_ne!(hash_of(&k), hash_of(&n), "{k} vs {n}");
            }
        }
        let v4 = key("10.0.0.2", "10.0.0.1", 80, 40000);
        let v6 = key("::ffff:10.0.0.2", "::ffff:10.0.0.1", 80, 40000);
        assert_ne!(v4, v6);
        assert_ne!(hash_of(&v4), hash_of(&v6));
    }

    #[test]
    fn flows_that_differ_in_one_field_spread_over_buckets() {
        // A hash table with 128 buckets indexes by the low 7 bits: 64 flows differing only in
        // a port, or only in the peer's address, must not crowd into a few buckets.
        let spread = |keys: Vec<FlowKey>| {
            let buckets: std::collections::HashSet<u64> = keys.iter().map(|k| hash_of(k) & 127).collect();
            buckets.len()
        };
        let by_port = (0..64).map(|p| key("10.0.0.2", "10.0.0.1", 10_000 + p, 7)).collect();
        let by_peer = (0..64).map(|i| key("10.0.0.2", &format!("10.0.1.{i}"), 80, 40000)).collect();
        let by_peer6 = (0..64).map(|i| key("fd00::2", &format!("fd00::1:{i:x}"), 80, 40000)).collect();
        for (what, keys) in [("port", by_port), ("peer", by_peer), ("IPv6 peer", by_peer6)] {
            let n = spread(keys);
            assert!(n >= 32, "64 flows differing by {what} fill only {n} of 128 buckets");
        }
    }

    #[test]
    fn reversed_swaps_endpoints() {
        let k = key("10.0.0.2", "10.0.0.1", 80, 40000);
        assert_eq!(k.reversed(), key("10.0.0.1", "10.0.0.2", 40000, 80));
        assert_eq!(k.reversed().reversed(), k);
    }
}
