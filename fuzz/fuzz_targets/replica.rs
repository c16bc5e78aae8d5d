//! The backend of one VM (the two-host replica core) fed any frames from its VM, the LAN and the
//! peer host (frames and `loading`), role and mode changes, checkpoints, resyncs, lease changes
//! and time.
//!
//! Invariants:
//! - nothing panics;
//! - fail-safe: nothing reaches the LAN unless the role is `alone` or `primary`, and as primary
//!   only under a fresh lease; a secondary's frames never reach its own LAN;
//! - as primary, only the local VM's frames reach the LAN (the peer's are compared, never sent),
//!   unless the controller put the engine in `secondary-only`;
//! - no frame reaches the LAN twice;
//! - a resync hands back only frames numbered from the mark on, in order.

#![no_main]

use std::collections::HashSet;
use std::time::Duration;

use arbitrary::Arbitrary;
use colo_fuzz::{tag_of, tagged, FrameSpec};
use colo_proxy::compare::{Config, Miscompare, Mode, Push};
use colo_proxy::replica::{Replica, ReplicaOutput, Role};
use colo_proxy::{Frame, ManualClock};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op {
    Local(FrameSpec),
    Lan(FrameSpec),
    /// A mirrored frame: the next number (skipping some), or any number (a peer gone wrong).
    PeerInbound(Result<u8, u64>, FrameSpec),
    PeerOutbound(FrameSpec),
    PeerLoading(u64),
    Role(u8),
    Mode(u8),
    Checkpoint,
    Resync(u8),
    Lease(bool),
    Room(bool),
    ReleaseGated,
    Tick(u16),
}

/// Ids: the local VM's frames are odd, the peer's even (and LAN frames are never output as LAN).
struct Out {
    lease: bool,
    room: bool,
    role: Role,
    mode: Mode,
    to_lan: HashSet<u64>,
}

impl ReplicaOutput for Out {
    fn to_lan(&mut self, frame: Frame) {
        let id = tag_of(&frame);
        assert!(matches!(self.role, Role::Alone | Role::Primary), "frame {id} to the LAN as {:?}", self.role);
        if self.role == Role::Primary {
            assert!(self.lease, "frame {id} released to the LAN without a lease");
            if self.mode != Mode::SecondaryOnly {
                assert!(id % 2 == 1, "the peer's frame {id} reached the primary's LAN");
            }
        }
        assert!(id != 0, "a LAN frame went back to the LAN");
        assert!(self.to_lan.insert(id), "frame {id} sent to the LAN twice");
    }
    fn to_local(&mut self, _: Frame, _: Option<u64>) {}
    fn mirror(&mut self, _: u64, _: &Frame) -> bool {
        self.room
    }
    fn peer_has_room(&self, _: usize) -> bool {
        self.room
    }
    fn to_peer(&mut self, _: Frame) {
        assert_eq!(self.role, Role::Secondary, "only a secondary sends its VM's frames to the peer");
    }
    fn loading_to_peer(&mut self, _: u64) {
        assert_eq!(self.role, Role::Secondary, "only a secondary tells the peer it loads");
    }
    fn grant(&mut self, _: usize) {}
    fn lease_fresh(&self) -> bool {
        self.lease
    }
    fn miscompare(&mut self, _: &Miscompare) {}
}

fn role(n: u8) -> Role {
    [Role::Unset, Role::Alone, Role::Primary, Role::Secondary][usize::from(n % 4)]
}

fn mode(n: u8) -> Mode {
    [Mode::Colo, Mode::Passive, Mode::PrimaryOnly, Mode::SecondaryOnly][usize::from(n % 4)]
}

fuzz_target!(|ops: Vec<Op>| {
    let clock = ManualClock::new();
    let config = Config { max_queue_size: 4, max_queue_bytes: 4096, max_flows: 4, ..Config::default() };
    let mut r = Replica::new(config, clock.clone());
    let mut out = Out { lease: true, room: true, role: Role::Unset, mode: r.mode(), to_lan: HashSet::new() };
    let mut next = 0u64;
    let mut id = |odd: bool| {
        next += 2;
        next + u64::from(odd)
    };
    let mut peer_seq = 0u64;
    for op in ops.iter().take(300) {
        out.role = r.role();
        out.mode = r.mode();
        match op {
            Op::Local(spec) => {
                let f = tagged(&spec.build(), id(true), false);
                if let Push::Full(f) = r.from_local(f, &mut out) {
                    let _ = f; // left on the VM's ring
                }
            }
            Op::Lan(spec) => r.from_lan(tagged(&spec.build(), 0, false), &mut out),
            Op::PeerInbound(seq, spec) => {
                let seq = match seq {
                    Ok(skip) => {
                        peer_seq += u64::from(*skip % 3);
                        peer_seq
                    }
                    Err(any) => *any,
                };
                r.from_peer_inbound(seq, tagged(&spec.build(), 0, false), &mut out);
            }
            Op::PeerOutbound(spec) => r.from_peer_outbound(tagged(&spec.build(), id(false), false), &mut out),
            Op::PeerLoading(mark) => r.from_peer_loading(*mark, &mut out),
            Op::Role(n) => {
                // The outlet judges each frame by the role in force when it leaves.
                let to = role(*n);
                out.role = if to == Role::Secondary { Role::Unset } else { to };
                r.set_role(to, &mut out);
            }
            Op::Mode(n) => {
                out.mode = mode(*n);
                let _ = r.set_mode(mode(*n), &mut out);
            }
            Op::Checkpoint => {
                r.checkpoint(&mut out);
            }
            Op::Resync(back) => {
                let mark = peer_seq.saturating_sub(u64::from(*back % 8));
                let frames = r.resync(mark, &mut out);
                assert!(frames.windows(2).all(|w| w[0].0 <= w[1].0), "resync out of order");
                assert!(frames.iter().all(|(s, _)| *s >= mark), "resync before the mark {mark}");
            }
            Op::Lease(l) => out.lease = *l,
            Op::Room(room) => out.room = *room,
            Op::ReleaseGated => {
                r.release_gated(&mut out);
            }
            Op::Tick(ms) => {
                clock.advance(Duration::from_millis(u64::from(*ms) * 4));
                r.poll_timers(&mut out);
            }
        }
    }
});
