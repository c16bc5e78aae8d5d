//! The replica's routing, role by role, with two replicas wired back to back as on two hosts.

use std::collections::VecDeque;

use super::*;
use crate::builder::*;
use crate::clock::ManualClock;
use crate::wire::tcp::Flags;

/// What a secondary sent its peer, in order.
#[derive(Debug, PartialEq)]
enum ToPeer {
    Frame(Frame),
    Loading(u64),
}

/// Records what a replica asked its transport to do.
#[derive(Default)]
struct Wire {
    lan: Vec<Frame>,
    local: Vec<(Frame, Option<u64>)>,
    mirrored: VecDeque<(u64, Frame)>,
    to_peer: VecDeque<ToPeer>,
    miscompares: Vec<Miscompare>,
    lease: bool,
    room: bool,
    granted: usize,
}

impl Wire {
    fn new() -> Wire {
        Wire { lease: true, room: true, ..Wire::default() }
    }
}

impl ReplicaOutput for Wire {
    fn to_lan(&mut self, frame: Frame) {
        self.lan.push(frame);
    }
    fn to_local(&mut self, frame: Frame, seq: Option<u64>) {
        self.local.push((frame, seq));
    }
    fn mirror(&mut self, seq: u64, frame: &Frame) -> bool {
        self.mirrored.push_back((seq, frame.clone()));
        true
    }
    fn peer_has_room(&self, _len: usize) -> bool {
        self.room
    }
    fn to_peer(&mut self, frame: Frame) {
        self.to_peer.push_back(ToPeer::Frame(frame));
    }
    fn loading_to_peer(&mut self, mark: u64) {
        self.to_peer.push_back(ToPeer::Loading(mark));
    }
    fn grant(&mut self, bytes: usize) {
        self.granted += bytes;
    }
    fn lease_fresh(&self) -> bool {
        self.lease
    }
    fn miscompare(&mut self, event: &Miscompare) {
        self.miscompares.push(event.clone());
    }
}

fn replica() -> Replica<ManualClock> {
    Replica::new(Config::default(), ManualClock::new())
}

fn to_guest(seq: u32, ack: Option<u32>, flags: u8, payload: &[u8]) -> Frame {
    Frame::new(tcp4_to(CLIENT_IP, VM_IP, 40000, 80, seq, ack, flags, payload))
}

fn from_guest(seq: u32, ack: Option<u32>, flags: u8, payload: &[u8]) -> Frame {
    Frame::new(tcp4(80, 40000, seq, ack, flags, payload))
}

fn seq_of(f: &Frame) -> u32 {
    u32::from_be_bytes(f.ethernet()[14 + 20 + 4..14 + 20 + 8].try_into().unwrap())
}

fn ack_of(f: &Frame) -> u32 {
    u32::from_be_bytes(f.ethernet()[14 + 20 + 8..14 + 20 + 12].try_into().unwrap())
}

/// Two hosts: what the primary mirrors reaches the secondary, what the secondary sends reaches
/// the primary.
struct Pair {
    p: Replica<ManualClock>,
    pw: Wire,
    s: Replica<ManualClock>,
    sw: Wire,
}

impl Pair {
    fn new() -> Pair {
        let mut pair = Pair { p: replica(), pw: Wire::new(), s: replica(), sw: Wire::new() };
        pair.s.set_role(Role::Secondary, &mut pair.sw);
        pair.p.set_role(Role::Alone, &mut pair.pw);
        pair.p.set_role(Role::Primary, &mut pair.pw);
        pair.p.set_mode(Mode::Colo, &mut pair.pw).unwrap();
        pair
    }

    /// Carries what is in flight between the two.
    fn pump(&mut self) {
        while let Some((seq, f)) = self.pw.mirrored.pop_front() {
            self.s.from_peer_inbound(seq, f, &mut self.sw);
        }
        while let Some(sent) = self.sw.to_peer.pop_front() {
            match sent {
                ToPeer::Frame(f) => self.p.from_peer_outbound(f, &mut self.pw),
                ToPeer::Loading(mark) => self.p.from_peer_loading(mark, &mut self.pw),
            }
        }
    }

    fn client(&mut self, f: Frame) {
        self.p.from_lan(f, &mut self.pw);
        self.pump();
    }

    fn both_send(&mut self, pf: Frame, sf: Frame) {
        assert!(matches!(self.p.from_local(pf, &mut self.pw), Push::Accepted));
        assert!(matches!(self.s.from_local(sf, &mut self.sw), Push::Accepted));
        self.pump();
    }
}

#[test]
fn without_a_role_nothing_passes_either_way() {
    let (mut r, mut w) = (replica(), Wire::new());
    assert_eq!(r.role(), Role::Unset);
    r.from_lan(Frame::new(udp4_to(CLIENT_IP, VM_IP, 1, 2, b"in")), &mut w);
    assert!(matches!(r.from_local(Frame::new(udp4(2, 1, b"out")), &mut w), Push::Accepted));
    assert!(w.lan.is_empty() && w.local.is_empty() && w.mirrored.is_empty() && w.to_peer.is_empty());
    assert_eq!(r.counters().unset_dropped, 2);
}

#[test]
fn alone_is_a_passthrough() {
    let (mut r, mut w) = (replica(), Wire::new());
    r.set_role(Role::Alone, &mut w);
    r.from_lan(Frame::new(udp4_to(CLIENT_IP, VM_IP, 1, 2, b"in")), &mut w);
    r.from_local(Frame::new(udp4(2, 1, b"out")), &mut w);
    assert_eq!((w.local.len(), w.lan.len()), (1, 1));
    assert_eq!(w.local[0].1, None, "not numbered: nothing is mirrored");
    assert!(r.set_mode(Mode::PrimaryOnly, &mut w).is_ok());
    assert!(r.set_mode(Mode::Colo, &mut w).unwrap_err().contains("needs the role primary"));
}

#[test]
fn across_two_hosts_a_connection_is_compared_released_once_and_survives_a_takeover() {
    let mut h = Pair::new();
    h.client(to_guest(100, None, Flags::SYN, b""));
    assert_eq!(h.pw.local.len(), 1, "the PVM got the SYN");
    assert_eq!(h.sw.local.len(), 1, "so did the SVM, over the frame link");
    assert_eq!((h.pw.local[0].1, h.sw.local[0].1), (Some(0), Some(0)), "numbered alike");
    // Different initial sequence numbers: the SYN+ACKs are pure, released once S has spoken.
    h.both_send(
        from_guest(1000, Some(101), Flags::SYN | Flags::ACK, b""),
        from_guest(5000, Some(101), Flags::SYN | Flags::ACK, b""),
    );
    assert_eq!(h.pw.lan.len(), 1);
    assert_eq!(seq_of(&h.pw.lan[0]), 1000, "the primary's own");
    // The client's ACK teaches the secondary's rewriter the primary's ISN.
    h.client(to_guest(101, Some(1001), Flags::ACK, b"GET"));
    assert_eq!(ack_of(&h.sw.local[1].0), 5001, "the SVM sees its own numbers");
    assert_eq!(ack_of(&h.pw.local[1].0), 1001);
    h.both_send(
        from_guest(1001, Some(104), Flags::PSH | Flags::ACK, b"200 OK"),
        from_guest(5001, Some(104), Flags::PSH | Flags::ACK, b"200 OK"),
    );
    assert_eq!(h.pw.lan.len(), 2, "matched and released once");
    assert!(h.pw.miscompares.is_empty(), "{:?}", h.pw.miscompares);
    assert!(h.sw.lan.is_empty(), "nothing of the secondary reaches its LAN");

    // Host A dies: the secondary takes over, announces the VM, and keeps the numbers.
    let change = h.s.set_role(Role::Alone, &mut h.sw);
    assert_eq!(change.announce, Some(vec![VM_IP]));
    h.s.from_local(from_guest(5007, Some(104), Flags::PSH | Flags::ACK, b"more"), &mut h.sw);
    assert_eq!(seq_of(&h.sw.lan[0]), 1007, "in the sequence space the client knows");
    h.s.from_lan(to_guest(104, Some(1011), Flags::ACK, b""), &mut h.sw);
    assert_eq!(ack_of(&h.sw.local.last().unwrap().0), 5011);
}

#[test]
fn a_primary_releases_only_under_a_live_lease_and_a_stepped_down_one_never() {
    let mut h = Pair::new();
    h.pw.lease = false;
    h.both_send(Frame::new(udp4(2, 1, b"reply")), Frame::new(udp4(2, 1, b"reply")));
    assert!(h.pw.lan.is_empty(), "matched, but the lease has lapsed");
    assert_eq!(h.p.gated(), 1);
    assert_eq!(h.p.release_gated(&mut h.pw), 0, "still no lease");
    h.pw.lease = true;
    assert_eq!(h.p.release_gated(&mut h.pw), 1);
    assert_eq!(h.pw.lan.len(), 1);

    // Lease lapsed again; then the controller learns the secondary took over: step down.
    h.pw.lease = false;
    h.both_send(Frame::new(udp4(2, 1, b"two")), Frame::new(udp4(2, 1, b"two")));
    h.p.from_local(Frame::new(udp4(2, 1, b"held")), &mut h.pw);
    let change = h.p.set_role(Role::Secondary, &mut h.pw);
    assert_eq!(change.dropped, 2, "one gated, one held in the engine");
    h.pw.lease = true;
    h.p.release_gated(&mut h.pw);
    h.p.from_local(Frame::new(udp4(2, 1, b"after")), &mut h.pw);
    assert_eq!(h.pw.lan.len(), 1, "nothing after stepping down");
}

#[test]
fn a_primary_that_goes_alone_sends_what_it_held() {
    let mut h = Pair::new();
    h.pw.lease = false;
    h.both_send(Frame::new(udp4(2, 1, b"gated")), Frame::new(udp4(2, 1, b"gated")));
    h.p.from_local(Frame::new(udp4(2, 1, b"unmatched")), &mut h.pw);
    h.p.set_role(Role::Alone, &mut h.pw);
    let sent: Vec<&[u8]> = h.pw.lan.iter().map(|f| &f.ethernet()[42..]).collect();
    assert_eq!(sent, vec![&b"gated"[..], &b"unmatched"[..]], "in release order");
}

#[test]
fn a_secondary_ignores_its_lan_and_pushes_back_without_credit() {
    let mut h = Pair::new();
    h.s.from_lan(Frame::new(udp4_to(CLIENT_IP, VM_IP, 1, 2, b"broadcast")), &mut h.sw);
    assert!(h.sw.local.is_empty());
    assert_eq!(h.s.counters().lan_ignored, 1);
    h.sw.room = false;
    let f = from_guest(5000, None, Flags::SYN, b"");
    match h.s.from_local(f.clone(), &mut h.sw) {
        Push::Full(back) => assert_eq!(back, f, "given back untouched, to be retried"),
        Push::Accepted => panic!("no credit"),
    }
    assert!(h.sw.to_peer.is_empty());
}

#[test]
fn the_secondarys_frames_wait_in_the_backlog_for_room_and_their_credit_returns_once_taken() {
    let mut h = Pair::new();
    let max = Config::default().max_queue_size;
    // The secondary runs ahead of the primary by more than a queue holds.
    for i in 0..max + 3 {
        h.s.from_local(Frame::new(udp4(2, 1, &(i as u32).to_be_bytes())), &mut h.sw);
    }
    h.pump();
    assert_eq!(h.p.backlog(), 3);
    let frame_len = Frame::new(udp4(2, 1, &[0; 4])).ethernet().len();
    assert_eq!(h.pw.granted, max * frame_len, "credit only for what the engine took");
    // The primary catches up: room appears and the backlog drains, in order, all released once.
    for i in 0..max + 3 {
        h.p.from_local(Frame::new(udp4(2, 1, &(i as u32).to_be_bytes())), &mut h.pw);
    }
    assert_eq!(h.p.backlog(), 0);
    assert_eq!(h.pw.granted, (max + 3) * frame_len);
    assert_eq!(h.pw.lan.len(), max + 3);
    assert!(h.pw.miscompares.iter().all(|m| m.reason == crate::compare::Reason::QueueFull), "{:?}", h.pw.miscompares);
}

#[test]
fn resync_gives_the_frames_from_the_mark_with_offsets_back_at_zero() {
    let mut h = Pair::new();
    h.client(to_guest(100, None, Flags::SYN, b""));
    h.both_send(
        from_guest(1000, Some(101), Flags::SYN | Flags::ACK, b""),
        from_guest(5000, Some(101), Flags::SYN | Flags::ACK, b""),
    );
    for i in 0..4u32 {
        h.client(to_guest(101 + i, Some(1001), Flags::ACK, b"x"));
    }
    assert_eq!(ack_of(&h.sw.local.last().unwrap().0), 5001, "rewritten while the offset holds");
    // The checkpoint: the PVM had taken frames 0..3 at its pause (mark 3).
    let frames = h.s.resync(3, &mut h.sw);
    assert_eq!(h.sw.to_peer.pop_back(), Some(ToPeer::Loading(3)), "the primary is told");
    assert_eq!(frames.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![3, 4]);
    assert!(frames.iter().all(|(_, f)| ack_of(f) == 1001), "offset 0 after the checkpoint");
    h.client(to_guest(105, Some(1001), Flags::ACK, b"y"));
    assert_eq!(ack_of(&h.sw.local.last().unwrap().0), 1001);
}

#[test]
fn a_secondary_told_secondary_again_starts_a_new_pair_from_scratch() {
    let mut h = Pair::new();
    h.client(to_guest(100, None, Flags::SYN, b""));
    h.both_send(
        from_guest(1000, Some(101), Flags::SYN | Flags::ACK, b""),
        from_guest(5000, Some(101), Flags::SYN | Flags::ACK, b""),
    );
    h.client(to_guest(101, Some(1001), Flags::ACK, b"GET"));
    // Its colo-vmm exited and a new one waits for a new primary: the old offsets are of no use
    // (the new VM will be loaded from the new primary's state).
    h.s.set_role(Role::Secondary, &mut h.sw);
    h.s.set_role(Role::Alone, &mut h.sw);
    h.s.from_local(from_guest(5007, Some(104), Flags::PSH | Flags::ACK, b"more"), &mut h.sw);
    assert_eq!(seq_of(h.sw.lan.last().unwrap()), 5007, "nothing translated with the old pair's offsets");
}

fn payloads(frames: &[Frame]) -> Vec<&[u8]> {
    frames.iter().map(|f| &f.ethernet()[42..]).collect()
}

#[test]
fn the_secondarys_frames_after_its_loading_wait_for_the_primarys_flush() {
    let mut h = Pair::new();
    // The SVM answered a request the PVM has not answered yet when the checkpoint came.
    h.s.from_local(Frame::new(udp4(2, 1, b"old")), &mut h.sw);
    // The secondary received the checkpoint, loads it and resumes its VM, which answers the
    // next request, all before the primary's flush (it waits for `vmstate-received`).
    h.s.resync(0, &mut h.sw);
    h.s.from_local(Frame::new(udp4(2, 1, b"new")), &mut h.sw);
    h.s.from_peer_loading(0, &mut h.sw); // a secondary ignores a peer's `loading`
    h.pump();
    assert_eq!(h.p.backlog(), 1, "after the loading: waits for the flush");
    // A second `loading` before the flush is not from a correct peer: ignored, counted.
    h.p.from_peer_loading(9, &mut h.pw);
    assert_eq!(h.p.counters().loading_ignored, 1);
    let flushed = h.p.checkpoint(&mut h.pw);
    assert_eq!((flushed.released, flushed.dropped), (0, 1), "the old answer is flushed");
    assert_eq!(h.p.backlog(), 0, "the new one met the engine after the flush");
    h.p.from_local(Frame::new(udp4(2, 1, b"new")), &mut h.pw);
    assert_eq!(payloads(&h.pw.lan), [b"new"], "compared with the PVM's answer after the checkpoint");
    assert!(h.pw.miscompares.is_empty(), "{:?}", h.pw.miscompares);
    let frame_len = Frame::new(udp4(2, 1, b"new")).ethernet().len();
    assert_eq!(h.pw.granted, 2 * frame_len, "credit for both");
}

#[test]
fn the_secondarys_frames_from_before_a_checkpoint_that_arrive_after_its_flush_are_dropped() {
    let mut h = Pair::new();
    h.s.from_local(Frame::new(udp4(2, 1, b"old")), &mut h.sw);
    // The flush comes first; the old answer and the `loading` are still on the link.
    assert_eq!(h.p.checkpoint(&mut h.pw).dropped, 0);
    h.s.resync(0, &mut h.sw);
    h.pump();
    assert_eq!(h.p.counters().stale_secondary, 1);
    assert_eq!(h.p.stats().frames_secondary, 0, "never compared");
    // After the `loading` the two sides pair again.
    h.both_send(Frame::new(udp4(2, 1, b"new")), Frame::new(udp4(2, 1, b"new")));
    assert_eq!(payloads(&h.pw.lan), [b"new"]);
    assert!(h.pw.miscompares.is_empty(), "{:?}", h.pw.miscompares);
    let frame_len = Frame::new(udp4(2, 1, b"new")).ethernet().len();
    assert_eq!(h.pw.granted, 2 * frame_len, "a dropped frame's credit returns too");
}

#[test]
fn a_loading_that_never_comes_stops_the_dropping_after_a_second() {
    let mut h = Pair::new();
    h.p.checkpoint(&mut h.pw);
    h.s.from_local(Frame::new(udp4(2, 1, b"before")), &mut h.sw);
    h.pump();
    assert_eq!(h.p.counters().stale_secondary, 1);
    h.p.engine().clock().advance(LOADING_WAIT + Duration::from_millis(1));
    h.both_send(Frame::new(udp4(2, 1, b"after")), Frame::new(udp4(2, 1, b"after")));
    assert_eq!(payloads(&h.pw.lan), [b"after"], "compared again");
    assert_eq!(h.p.counters().loading_missing, 1);
}

#[test]
fn the_secondarys_answers_before_the_primarys_first_mode_wait_for_it() {
    // COLO starts: the primary's backend becomes primary, mirrors what waited for its paused
    // VM; the running secondary answers before the controller has set the mode.
    let (mut p, mut pw, mut s, mut sw) = (replica(), Wire::new(), replica(), Wire::new());
    s.set_role(Role::Secondary, &mut sw);
    p.set_role(Role::Alone, &mut pw);
    p.set_role(Role::Primary, &mut pw);
    s.from_local(Frame::new(udp4(2, 1, b"answer")), &mut sw);
    let Some(ToPeer::Frame(f)) = sw.to_peer.pop_front() else { panic!("sent to the peer") };
    p.from_peer_outbound(f, &mut pw);
    assert_eq!(p.backlog(), 1, "kept, not dropped by primary-only");
    p.set_mode(Mode::Colo, &mut pw).unwrap();
    p.from_local(Frame::new(udp4(2, 1, b"answer")), &mut pw);
    assert_eq!(payloads(&pw.lan), [b"answer"], "the PVM's answer met the SVM's");
    assert!(pw.miscompares.is_empty(), "{:?}", pw.miscompares);
}
