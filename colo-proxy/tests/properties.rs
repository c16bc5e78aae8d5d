//! Property tests of the compare engine (docs/compare.md):
//! - the same byte stream cut into different segments on the two sides always matches;
//! - any single differing payload byte always causes a checkpoint request;
//! - no frame is released twice, and every primary frame is eventually released or counted as
//!   dropped, whatever the mix of traffic, mismatches, flushes, mode changes and timeouts.

use std::collections::HashMap;
use std::time::Duration;

use colo_proxy::builder::*;
use colo_proxy::compare::{Collect, Config, DropCause, Engine, Mode, Push, Verdict};
use colo_proxy::wire::ipv4::protocol;
use colo_proxy::{Frame, ManualClock, Side};
use proptest::prelude::*;

const ISN: u32 = 0xffff_ff00; // close to wrapping, so every case crosses 2^32

/// Cuts `len` bytes into segments at the given (sorted, deduplicated) cut points.
fn segments(len: usize, cuts: &[usize]) -> Vec<(usize, usize)> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % len.max(1)).filter(|&c| c > 0).collect();
    points.sort_unstable();
    points.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for p in points.into_iter().chain(std::iter::once(len)) {
        if p > start {
            out.push((start, p));
            start = p;
        }
    }
    out
}

fn tcp_frame(ident: u16, seq: u32, payload: &[u8]) -> Frame {
    let l4 = tcp_segment(80, 40000, seq, Some(77), 0, payload);
    Frame::new(ipv4_frame(VM_IP, CLIENT_IP, protocol::TCP, ident, l4, Some(16)))
}

/// Pushes P and S segment lists, interleaving the two sides as `order` says (true = P next).
fn push_interleaved(e: &mut Engine<ManualClock>, out: &mut Collect, p: Vec<Frame>, s: Vec<Frame>, order: &[bool]) {
    let (mut p, mut s) = (p.into_iter().peekable(), s.into_iter().peekable());
    let mut i = 0;
    while p.peek().is_some() || s.peek().is_some() {
        let take_p = match (p.peek(), s.peek()) {
            (Some(_), None) => true,
            (None, Some(_)) => false,
            _ => order.get(i).copied().unwrap_or(true),
        };
        i += 1;
        let (side, f) = if take_p { (Side::Primary, p.next()) } else { (Side::Secondary, s.next()) };
        assert_eq!(e.push(side, f.unwrap(), out), Push::Accepted);
    }
}

fn tcp_payload(f: &Frame) -> &[u8] {
    &f.ethernet()[14 + 20 + 20..]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn same_stream_differently_segmented_always_matches(
        stream in prop::collection::vec(any::<u8>(), 1..3000),
        p_cuts in prop::collection::vec(0usize..3000, 0..12),
        s_cuts in prop::collection::vec(0usize..3000, 0..12),
        order in prop::collection::vec(any::<bool>(), 0..40),
    ) {
        let clock = ManualClock::new();
        let mut e = Engine::new(Config::default(), clock);
        let mut out = Collect::default();
        let cut = |cuts: &[usize]| -> Vec<Frame> {
            segments(stream.len(), cuts).into_iter()
                .map(|(a, b)| tcp_frame(0, ISN.wrapping_add(a as u32), &stream[a..b])).collect()
        };
        let (p, s) = (cut(&p_cuts), cut(&s_cuts));
        let n_p = p.len();
        push_interleaved(&mut e, &mut out, p, s, &order);
        prop_assert!(out.events.is_empty(), "miscompare on identical streams: {:?}", out.events);
        prop_assert_eq!(e.held(), [0, 0]);
        prop_assert_eq!(e.held_bytes(), [0, 0]);
        let released: Vec<u8> = out.released().iter().flat_map(|f| tcp_payload(f).to_vec()).collect();
        prop_assert_eq!(out.released().len(), n_p);
        prop_assert_eq!(released, stream);
    }

    #[test]
    fn any_single_differing_tcp_byte_notifies(
        stream in prop::collection::vec(any::<u8>(), 1..2000),
        p_cuts in prop::collection::vec(0usize..2000, 0..8),
        s_cuts in prop::collection::vec(0usize..2000, 0..8),
        order in prop::collection::vec(any::<bool>(), 0..30),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let at = at.index(stream.len());
        let mut other = stream.clone();
        other[at] ^= flip;
        let mut e = Engine::new(Config::default(), ManualClock::new());
        let mut out = Collect::default();
        let cut = |data: &[u8], cuts: &[usize]| -> Vec<Frame> {
            segments(data.len(), cuts).into_iter()
                .map(|(a, b)| tcp_frame(0, ISN.wrapping_add(a as u32), &data[a..b])).collect()
        };
        push_interleaved(&mut e, &mut out, cut(&stream, &p_cuts), cut(&other, &s_cuts), &order);
        prop_assert_eq!(out.events.len(), 1, "exactly one (rate-limited) checkpoint request");
        // No released byte range covers the differing byte.
        let released: usize = out.released().iter().map(|f| tcp_payload(f).len()).sum();
        prop_assert!(released <= at, "released {} bytes, difference at {}", released, at);
    }

    #[test]
    fn any_single_differing_datagram_byte_notifies(
        datagrams in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..200), 1..10),
        which in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let which = which.index(datagrams.len());
        let mut e = Engine::new(Config::default(), ManualClock::new());
        let mut out = Collect::default();
        for (i, d) in datagrams.iter().enumerate() {
            let mut s = d.clone();
            if i == which {
                let at = at.index(s.len());
                s[at] ^= flip;
            }
            e.push(Side::Primary, Frame::new(udp4(5, 6, d)), &mut out);
            e.push(Side::Secondary, Frame::new(udp4(5, 6, &s)), &mut out);
        }
        prop_assert_eq!(out.events.len(), 1);
        prop_assert_eq!(out.released().len(), which, "frames before the difference go, the rest wait");
    }
}

/// One step of the random workload.
#[derive(Debug, Clone)]
enum Op {
    /// A frame on flow `flow` from `primary` side; `diverge` makes the secondary's differ.
    Udp {
        flow: u8,
        primary: bool,
        diverge: bool,
        len: u8,
    },
    Tcp {
        primary: bool,
        diverge: bool,
        len: u8,
    },
    Flush,
    Mode(Mode),
    Tick(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..4, any::<bool>(), prop::bool::weighted(0.1), 1u8..60)
            .prop_map(|(flow, primary, diverge, len)| Op::Udp { flow, primary, diverge, len }),
        4 => (any::<bool>(), prop::bool::weighted(0.1), 1u8..60)
            .prop_map(|(primary, diverge, len)| Op::Tcp { primary, diverge, len }),
        1 => Just(Op::Flush),
        1 => prop_oneof![Just(Mode::Colo), Just(Mode::Passive), Just(Mode::PrimaryOnly), Just(Mode::SecondaryOnly)]
            .prop_map(Op::Mode),
        1 => (0u16..2000).prop_map(Op::Tick),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn every_frame_leaves_exactly_once(
        ops in prop::collection::vec(op(), 1..300),
        queue in 1usize..8,
        budget in 50usize..1000,
    ) {
        let clock = ManualClock::new();
        let config = Config { max_queue_size: queue, max_queue_bytes: budget, max_flows: 3, ..Config::default() };
        let mut e = Engine::new(config, clock.clone());
        let mut out = Collect::default();
        let mut ident: u16 = 0;
        let mut sent: HashMap<u16, Side> = HashMap::new();
        let mut overflow = 0u64;
        let mut largest = 0usize;
        let mut tcp_next = [ISN, ISN];
        for op in ops {
            match op {
                Op::Udp { flow, primary, diverge, len } => {
                    ident += 1;
                    let side = if primary { Side::Primary } else { Side::Secondary };
                    let fill = if diverge && !primary { 0xee } else { len };
                    let l4 = udp_segment(u16::from(flow), 7, &vec![fill; usize::from(len)]);
                    let f = Frame::new(ipv4_frame(VM_IP, CLIENT_IP, protocol::UDP, ident, l4, Some(6)));
                    sent.insert(ident, side);
                    largest = largest.max(f.data.len());
                    if let Push::Full(f) = e.push(side, f, &mut out) {
                        e.discard_overflow(side, f, &mut out);
                        overflow += 1;
                    }
                    // The byte budget holds, but for a frame larger than it taken alone.
                    prop_assert!(e.held_bytes()[side.index()] <= budget.max(largest));
                }
                Op::Tcp { primary, diverge, len } => {
                    ident += 1;
                    let side = if primary { Side::Primary } else { Side::Secondary };
                    let i = side.index();
                    let fill = if diverge && !primary { 0xee } else { 0x11 };
                    let f = tcp_frame(ident, tcp_next[i], &vec![fill; usize::from(len)]);
                    tcp_next[i] = tcp_next[i].wrapping_add(u32::from(len));
                    sent.insert(ident, side);
                    largest = largest.max(f.data.len());
                    if let Push::Full(f) = e.push(side, f, &mut out) {
                        e.discard_overflow(side, f, &mut out);
                        overflow += 1;
                    }
                    prop_assert!(e.held_bytes()[side.index()] <= budget.max(largest));
                }
                Op::Flush => { e.flush(&mut out); }
                Op::Mode(m) => e.set_mode(m, &mut out),
                Op::Tick(ms) => {
                    clock.advance(Duration::from_millis(u64::from(ms)));
                    e.poll_timeouts(&mut out);
                }
            }
        }
        // The end of the run: a flush, then primary-only, so nothing can stay held.
        e.flush(&mut out);
        e.set_mode(Mode::PrimaryOnly, &mut out);
        prop_assert_eq!(e.held(), [0, 0]);
        let mut seen: HashMap<u16, (Side, Verdict)> = HashMap::new();
        for (f, d) in &out.frames {
            let id = u16::from_be_bytes([f.ethernet()[18], f.ethernet()[19]]);
            prop_assert_eq!(sent.get(&id).copied(), Some(d.side), "frame {} from the wrong side", id);
            prop_assert!(seen.insert(id, (d.side, d.verdict)).is_none(), "frame {} left twice", id);
        }
        prop_assert_eq!(seen.len(), sent.len(), "every frame leaves the engine exactly once");
        let stats = e.stats();
        prop_assert_eq!(stats.dropped_overflow, overflow);
        let released = out.frames.iter().filter(|(_, d)| d.verdict == Verdict::Released).count() as u64;
        prop_assert_eq!(stats.released, released);
        let dropped_p = out.frames.iter()
            .filter(|(_, d)| d.side == Side::Primary && matches!(d.verdict, Verdict::Dropped(c) if c != DropCause::Overflow))
            .count() as u64;
        prop_assert_eq!(stats.dropped_primary, dropped_p);
    }
}
