//! The compare engine (with the secondary's rewriter in front, as transports use it) fed any
//! sequence of primary and secondary frames, inbound frames, flushes, mode changes and time.
//!
//! Invariants:
//! - nothing panics;
//! - no frame leaves the engine twice, and every frame it took leaves by the end;
//! - a flush empties every queue (frames and bytes);
//! - only the primary's frames are released, except in `secondary-only` (only the secondary's);
//! - in `passive` nothing is released but by a flush or a mode change;
//! - a datagram the primary sent is released by comparison only next to a secondary datagram of
//!   the same flow with the same compared bytes (dropped as matched);
//! - the counters agree with what left.

#![no_main]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use arbitrary::Arbitrary;
use colo_fuzz::{tag_of, tagged, FrameSpec};
use colo_proxy::classify::{classify, Class};
use colo_proxy::compare::{Config, Disposal, DropCause, Miscompare, Mode, Push, Sink, Verdict};
use colo_proxy::flow::FlowKind;
use colo_proxy::proxy::Proxy;
use colo_proxy::{Frame, ManualClock, Side};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op {
    Primary(FrameSpec, bool),
    Secondary(FrameSpec, bool),
    /// The same frame from both VMs.
    Both(FrameSpec),
    /// The same frame from both VMs but for one byte of the secondary's.
    BothBut(FrameSpec, u16, u8),
    Inbound(FrameSpec),
    Checkpoint,
    Mode(u8),
    Tick(u16),
}

#[derive(Debug, Arbitrary)]
struct Input {
    max_queue_size: u8,
    max_queue_bytes: u16,
    max_flows: u8,
    /// Refused frames are kept and offered again (backpressure) rather than discarded.
    keep_refused: bool,
    ops: Vec<Op>,
}

/// Records what left, and checks each frame leaves once.
#[derive(Default)]
struct Out {
    left: HashSet<u64>,
    /// Frames that left during the current operation: (frame, disposal).
    now: Vec<(Frame, Disposal)>,
    released: u64,
    dropped_overflow: u64,
}

impl Sink for Out {
    fn frame(&mut self, frame: Frame, d: Disposal) {
        let id = tag_of(&frame);
        assert!(self.left.insert(id), "frame {id} left the engine twice");
        match d.verdict {
            Verdict::Released => self.released += 1,
            Verdict::Dropped(DropCause::Overflow) => self.dropped_overflow += 1,
            Verdict::Dropped(_) => {}
        }
        self.now.push((frame, d));
    }
    fn miscompare(&mut self, _: &Miscompare) {}
}

fn mode(n: u8) -> Mode {
    [Mode::Colo, Mode::Passive, Mode::PrimaryOnly, Mode::SecondaryOnly][usize::from(n % 4)]
}

struct Run {
    proxy: Proxy<ManualClock>,
    clock: ManualClock,
    out: Out,
    next_id: u64,
    /// Frames the engine took (id → side).
    taken: HashMap<u64, Side>,
    refused: Vec<(Side, Frame)>,
    keep_refused: bool,
}

impl Run {
    fn push(&mut self, side: Side, frame: Frame) {
        let id = tag_of(&frame);
        let pushed = match side {
            Side::Primary => self.proxy.from_primary(frame, &mut self.out),
            Side::Secondary => self.proxy.from_secondary(frame, &mut self.out),
        };
        match pushed {
            Push::Accepted => {
                assert!(self.taken.insert(id, side).is_none(), "frame {id} taken twice");
            }
            Push::Full(frame) => {
                assert_eq!(tag_of(&frame), id, "the refused frame is handed back");
                if self.keep_refused && self.refused.len() < 64 {
                    self.refused.push((side, frame));
                } else {
                    self.taken.insert(id, side);
                    self.proxy.discard_overflow(side, frame, &mut self.out);
                }
            }
        }
    }

    fn tag(&mut self, eth: &[u8], needs_csum: bool) -> Frame {
        self.next_id += 1;
        tagged(eth, self.next_id, needs_csum)
    }

    /// Offers refused frames again, as transports do after a flush or a mode change.
    fn retry(&mut self) {
        for (side, frame) in std::mem::take(&mut self.refused) {
            self.push(side, frame);
        }
    }
}

fuzz_target!(|input: Input| {
    let config = Config {
        max_queue_size: usize::from(input.max_queue_size % 16) + 1,
        max_queue_bytes: usize::from(input.max_queue_bytes),
        max_flows: usize::from(input.max_flows % 8) + 1,
        ..Config::default()
    };
    let clock = ManualClock::new();
    let mut run = Run {
        proxy: Proxy::new(config, clock.clone()),
        clock,
        out: Out::default(),
        next_id: 0,
        taken: HashMap::new(),
        refused: Vec::new(),
        keep_refused: input.keep_refused,
    };
    for op in input.ops.iter().take(400) {
        let before = run.proxy.mode();
        let mut pushed = false;
        match op {
            Op::Primary(spec, csum) => {
                let f = run.tag(&spec.build(), *csum);
                run.push(Side::Primary, f);
                pushed = true;
            }
            Op::Secondary(spec, csum) => {
                let f = run.tag(&spec.build(), *csum);
                run.push(Side::Secondary, f);
                pushed = true;
            }
            Op::Both(spec) => {
                let eth = spec.build();
                let (p, s) = (run.tag(&eth, false), run.tag(&eth, false));
                run.push(Side::Primary, p);
                run.push(Side::Secondary, s);
                pushed = true;
            }
            Op::BothBut(spec, at, flip) => {
                let eth = spec.build();
                let mut other = eth.clone();
                if !other.is_empty() {
                    let at = usize::from(*at) % other.len();
                    other[at] ^= flip | 1;
                }
                let (p, s) = (run.tag(&eth, false), run.tag(&other, false));
                run.push(Side::Primary, p);
                run.push(Side::Secondary, s);
                pushed = true;
            }
            Op::Inbound(spec) => {
                let f = run.tag(&spec.build(), false);
                let mirrored = run.proxy.inbound(f.clone());
                for copy in [mirrored.primary, mirrored.secondary].into_iter().flatten() {
                    assert_eq!(copy.data.len(), f.data.len(), "mirroring keeps the frame's length");
                }
            }
            Op::Checkpoint => {
                run.proxy.checkpoint(&mut run.out);
                assert_eq!(run.proxy.engine().held(), [0, 0], "a flush empties every queue");
                assert_eq!(run.proxy.engine().held_bytes(), [0, 0], "a flush frees every held byte");
                run.retry();
            }
            Op::Mode(m) => {
                run.proxy.set_mode(mode(*m), &mut run.out);
                run.retry();
            }
            Op::Tick(ms) => {
                run.clock.advance(Duration::from_millis(u64::from(*ms)));
                run.proxy.poll_timers(&mut run.out);
            }
        }
        check_releases(before, run.proxy.mode(), op, pushed, &run.out.now);
        run.out.now.clear();
    }
    // The end: a flush and primary-only leave nothing held; what is still refused is given up.
    run.proxy.checkpoint(&mut run.out);
    run.proxy.set_mode(Mode::PrimaryOnly, &mut run.out);
    for (side, frame) in std::mem::take(&mut run.refused) {
        run.taken.insert(tag_of(&frame), side);
        run.proxy.discard_overflow(side, frame, &mut run.out);
    }
    assert_eq!(run.proxy.engine().held(), [0, 0]);
    let taken: HashSet<u64> = run.taken.keys().copied().collect();
    assert_eq!(taken, run.out.left, "every frame taken leaves exactly once");
    let stats = run.proxy.stats();
    assert_eq!(stats.released, run.out.released, "released counter");
    assert_eq!(stats.dropped_overflow, run.out.dropped_overflow, "overflow counter");
});

/// Checks the frames that left during one operation against the modes before and after it.
fn check_releases(before: Mode, after: Mode, op: &Op, pushed: bool, left: &[(Frame, Disposal)]) {
    for (frame, d) in left {
        if d.verdict != Verdict::Released {
            continue;
        }
        let id = tag_of(frame);
        match d.side {
            Side::Secondary => {
                assert!(after == Mode::SecondaryOnly, "secondary frame {id} released in {after:?} (op {op:?})")
            }
            Side::Primary => {
                assert!(after != Mode::SecondaryOnly, "primary frame {id} released in secondary-only (op {op:?})")
            }
        }
        if pushed && before == Mode::Passive {
            panic!("frame {id} released in passive mode outside a flush (op {op:?})");
        }
        if pushed && before == Mode::Colo && d.side == Side::Primary {
            check_matched(frame, left);
        }
    }
}

/// A primary datagram released by comparison has a matching secondary datagram dropped with it
/// (spec/compare.md: equal frame length, equal bytes from the transport header to the end).
fn check_matched(p: &Frame, left: &[(Frame, Disposal)]) {
    let Class::Compared(c) = classify(p.ethernet()) else { return };
    if c.key.kind != FlowKind::Datagram {
        return;
    }
    let found = left.iter().any(|(s, d)| {
        d.side == Side::Secondary
            && d.verdict == Verdict::Dropped(DropCause::Matched)
            && s.ethernet().len() == p.ethernet().len()
            && matches!(classify(s.ethernet()), Class::Compared(sc) if sc.key == c.key
                && s.ethernet()[sc.compare_from..] == p.ethernet()[c.compare_from..])
    });
    assert!(found, "primary datagram released without its secondary match: {c:?}");
}
