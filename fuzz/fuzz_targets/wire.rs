//! Wire views and classification on any bytes: nothing panics, and every offset the
//! classification hands to the engine and the rewriter lies inside the frame, in order.

#![no_main]

use colo_fuzz::FrameSpec;
use colo_proxy::classify::{classify, Class};
use colo_proxy::flow::FlowKind;
use colo_proxy::wire::{arp, ethernet, icmp, ipv4, ipv6, tcp, udp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (FrameSpec, Vec<u8>)| {
    let (spec, raw) = input;
    check(&spec.build());
    check(&raw);
});

fn check(frame: &[u8]) {
    views(frame);
    match classify(frame) {
        Class::Uncompared(_) => {}
        Class::Compared(c) => {
            assert!(c.ip_end <= frame.len(), "ip end {} beyond a {}-byte frame", c.ip_end, frame.len());
            assert!(c.compare_from <= c.ip_end, "compared bytes start after the datagram ends");
            if let Some(t) = c.tcp {
                assert_eq!(c.key.kind, FlowKind::Tcp);
                assert!(t.header_at + 20 <= t.payload_at, "a TCP header is at least 20 bytes");
                assert_eq!(t.payload_at + t.payload_len as usize, c.ip_end, "TCP payload ends with the datagram");
                assert_eq!(c.compare_from, t.payload_at);
                assert_eq!(t.seq_end().0, t.seq.0.wrapping_add(t.payload_len));
            }
            // What the engine and the flow display read.
            let _ = c.key.to_string();
            let _ = c.key.proto_name();
            assert_eq!(c.key.reversed().reversed(), c.key);
            let _ = &frame[c.compare_from..c.ip_end];
        }
    }
}

/// Every accessor of every view that accepts the bytes (at any offset a header could start).
fn views(b: &[u8]) {
    if let Ok(f) = ethernet::Frame::new_checked(b) {
        let _ = (f.dst_addr(), f.src_addr(), f.ethertype(), f.payload().len());
        if let Ok(l2) = f.layer2() {
            assert!(l2.l3_offset <= b.len());
            let _ = l2.vid();
        }
    }
    for at in [0, 14, 18, 22] {
        let Some(b) = b.get(at..) else { continue };
        if let Ok(p) = ipv4::Packet::new_checked(b) {
            let _ = (p.version(), p.dscp_ecn(), p.ident(), p.dont_frag(), p.more_frags(), p.frag_offset());
            let _ = (p.is_fragment(), p.ttl(), p.protocol(), p.checksum(), p.verify_checksum());
            let _ = (p.src_addr(), p.dst_addr(), p.payload().len());
            assert!(p.header_len() <= usize::from(p.total_len()) && usize::from(p.total_len()) <= b.len());
        }
        if let Ok(p) = ipv6::Packet::new_checked(b) {
            let _ = (p.version(), p.traffic_class(), p.flow_label(), p.next_header(), p.hop_limit());
            let _ = (p.src_addr(), p.dst_addr(), p.payload().len());
            if let Ok(ul) = p.upper_layer() {
                assert!(ul.offset <= ipv6::HEADER_LEN + usize::from(p.payload_len()));
            }
        }
        if let Ok(a) = arp::Packet::new_checked(b) {
            let _ = (a.operation(), a.sender_mac(), a.sender_ip(), a.target_mac(), a.target_ip());
        }
        if let Ok(s) = tcp::Segment::new_checked(b) {
            let _ = (s.src_port(), s.dst_port(), s.seq_number(), s.ack_number(), s.window(), s.checksum());
            let f = s.flags();
            let _ = (f.fin(), f.syn(), f.rst(), f.ack());
            assert_eq!(s.header_len() + s.payload().len(), b.len());
        }
        if let Ok(u) = udp::Datagram::new_checked(b) {
            let _ = (u.src_port(), u.dst_port(), u.len(), u.is_empty(), u.checksum(), u.payload().len());
        }
        if let Ok(m) = icmp::Message::new_checked(b) {
            let _ = (m.msg_type(), m.code(), m.checksum(), m.echo_ident(), m.echo_seq(), m.body().len());
        }
    }
}
