//! Flow keys: which connection a frame belongs to.

use std::fmt;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

    #[test]
    fn reversed_swaps_endpoints() {
        let k = key("10.0.0.2", "10.0.0.1", 80, 40000);
        assert_eq!(k.reversed(), key("10.0.0.1", "10.0.0.2", 40000, 80));
        assert_eq!(k.reversed().reversed(), k);
    }
}
