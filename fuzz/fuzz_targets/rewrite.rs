//! The secondary's TCP rewriter fed any frames from the primary, the secondary and the clients,
//! checkpoints and time.
//!
//! Invariants:
//! - nothing panics;
//! - a rewritten frame keeps its length, its flow and every byte outside the sequence number,
//!   the acknowledgement number, SACK blocks and the TCP checksum;
//! - a TCP checksum that verified before a rewrite verifies after it (unless the virtio-net
//!   header leaves the checksum to the device, in which case it is not touched);
//! - a secondary frame's sequence number moves by exactly the connection's offset, an inbound
//!   frame's acknowledgement number by exactly the opposite;
//! - the metadata handed back follows the rewrite.

#![no_main]

use std::net::IpAddr;
use std::time::Duration;

use arbitrary::Arbitrary;
use colo_fuzz::{tagged, FrameSpec};
use colo_proxy::classify::{classify, Class, Compared};
use colo_proxy::flow::FlowKind;
use colo_proxy::rewrite::Rewriter;
use colo_proxy::wire::checksum;
use colo_proxy::wire::ipv4::protocol;
use colo_proxy::{Frame, Timestamp};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op {
    Primary(FrameSpec),
    Secondary(FrameSpec, bool),
    Inbound(FrameSpec, bool),
    Checkpoint,
    Expire(u16),
}

fuzz_target!(|ops: Vec<Op>| {
    let mut rw = Rewriter::new();
    let mut now = Timestamp(0);
    for op in ops.iter().take(300) {
        match op {
            Op::Primary(spec) => {
                if let Class::Compared(c) = classify(&spec.build()) {
                    rw.observe_primary(&c, now);
                }
            }
            Op::Secondary(spec, needs_csum) => {
                let mut f = tagged(&spec.build(), 0, *needs_csum);
                let Class::Compared(mut c) = classify(f.ethernet()) else { continue };
                let before = f.clone();
                rw.rewrite_secondary(&mut f, &mut c, now);
                let offset = guest_offset(&rw, &c);
                check(&before, &f, &c, *needs_csum);
                if let (Some(t0), Some(t1), Some(o)) = (tcp(&before), tcp(&f), offset) {
                    assert_eq!(t1.seq.0, t0.seq.0.wrapping_sub(o), "seq moves by the offset");
                    assert_eq!(c.tcp.map(|t| t.seq), Some(t1.seq), "the metadata follows the rewrite");
                }
            }
            Op::Inbound(spec, needs_csum) => {
                let mut f = tagged(&spec.build(), 0, *needs_csum);
                let Class::Compared(c) = classify(f.ethernet()) else { continue };
                let before = f.clone();
                rw.rewrite_inbound(&mut f, &c, now);
                let reversed = Compared { key: c.key.reversed(), ..c };
                let offset = guest_offset(&rw, &reversed);
                check(&before, &f, &c, *needs_csum);
                if let (Some(t0), Some(t1), Some(o)) = (tcp(&before), tcp(&f), offset) {
                    if let (Some(a0), Some(a1)) = (t0.ack, t1.ack) {
                        assert_eq!(a1.0, a0.0.wrapping_add(o), "ack moves by the offset");
                    }
                }
            }
            Op::Checkpoint => {
                rw.checkpoint();
                assert!(!rw.translating(), "no offset survives a checkpoint");
            }
            Op::Expire(s) => {
                now = now.plus(Duration::from_secs(u64::from(*s % 200)));
                rw.expire(now);
            }
        }
    }
});

/// The connection's offset after the call (`None` for untracked connections, and for a reset,
/// which ends the mapping after rewriting its frame).
fn guest_offset(rw: &Rewriter, guest_frame: &Compared) -> Option<u32> {
    let t = guest_frame.tcp?;
    if t.flags.rst() {
        return None;
    }
    rw.offset_of(guest_frame)
}

fn tcp(f: &Frame) -> Option<colo_proxy::classify::TcpInfo> {
    match classify(f.ethernet()) {
        Class::Compared(c) if c.key.kind == FlowKind::Tcp => c.tcp,
        _ => None,
    }
}

fn check(before: &Frame, after: &Frame, c: &Compared, needs_csum: bool) {
    assert_eq!(before.data.len(), after.data.len(), "length kept");
    assert_eq!(before.vnet_hdr(), after.vnet_hdr(), "virtio-net header kept");
    let Some(t) = c.tcp.filter(|_| c.key.kind == FlowKind::Tcp) else {
        assert_eq!(before, after, "only TCP frames are rewritten");
        return;
    };
    let (b, a) = (before.ethernet(), after.ethernet());
    match classify(a) {
        Class::Compared(c2) => assert_eq!(c2.key, c.key, "the flow is kept"),
        other => panic!("a rewritten frame no longer classifies: {other:?}"),
    }
    // Bytes that may change: seq, ack, checksum, and the options (SACK blocks).
    let h = t.header_at;
    for i in 0..a.len() {
        let allowed =
            (h + 4..h + 12).contains(&i) || (h + 16..h + 18).contains(&i) || (h + 20..t.payload_at).contains(&i);
        assert!(allowed || a[i] == b[i], "byte {i} changed (TCP header at {h})");
    }
    if needs_csum {
        assert_eq!(a[h + 16..h + 18], b[h + 16..h + 18], "a checksum left to the device is not touched");
    } else if checksum_ok(b, c) {
        assert!(checksum_ok(a, c), "the rewrite broke a valid TCP checksum");
    }
}

/// Whether the TCP checksum of a classified frame verifies.
fn checksum_ok(eth: &[u8], c: &Compared) -> bool {
    let t = c.tcp.expect("a TCP frame");
    let l4 = &eth[t.header_at..c.ip_end];
    let acc = match (c.key.src, c.key.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => checksum::pseudo_header_v4(s, d, protocol::TCP, l4.len()),
        (IpAddr::V6(s), IpAddr::V6(d)) => checksum::pseudo_header_v6(s, d, protocol::TCP, l4.len()),
        _ => return false,
    };
    checksum::fold(checksum::accumulate(acc, l4)) == 0xffff
}
