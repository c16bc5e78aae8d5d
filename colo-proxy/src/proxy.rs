//! The COLO proxy as transports use it: the compare engine plus the secondary's rewriter, and
//! the mirroring of inbound traffic.
//!
//! - Primary output goes to the engine (after the rewriter has learned from its SYNs).
//! - Secondary output is rewritten into the primary's sequence space, then compared.
//! - Inbound frames are mirrored as the mode says: to both VMs in `colo` (the secondary's copy
//!   rewritten), to the primary only in `passive` (the paused secondary is overwritten at the
//!   next checkpoint anyway) and `primary-only`, to the secondary only in `secondary-only`.
//! - A checkpoint flushes the engine and zeroes the rewriter's offsets.

use crate::classify::{classify, Class};
use crate::clock::{Clock, Timestamp};
use crate::compare::{Config, Engine, FlushSummary, Mode, Push, Sink, Stats};
use crate::frame::{Frame, Side};
use crate::rewrite::{Rewriter, RewriterStats};

/// Where an inbound frame goes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Mirrored {
    /// The copy for the primary, if it gets one.
    pub primary: Option<Frame>,
    /// The copy for the secondary (rewritten), if it gets one.
    pub secondary: Option<Frame>,
}

/// Engine and rewriter together.
pub struct Proxy<C: Clock> {
    engine: Engine<C>,
    rewriter: Rewriter,
    /// Whether the secondary gets its copy in passive mode (see [`Proxy::inbound`]).
    passive_mirror: bool,
}

impl<C: Clock> Proxy<C> {
    /// A proxy in `colo` mode.
    pub fn new(config: Config, clock: C) -> Self {
        Proxy { engine: Engine::new(config, clock), rewriter: Rewriter::new(), passive_mirror: false }
    }

    /// Whether the secondary gets its copy of inbound frames in passive mode too, though its VM
    /// is paused. Only for a transport that keeps that copy queued and aligns the queue with
    /// the primary's at each checkpoint (vhost-net-compare's ports): a failover then resumes
    /// the SVM from the last checkpoint with every frame since, and the client needs to send
    /// nothing again. A tap cannot be aligned (frames the PVM took before the checkpoint would
    /// reach the SVM twice), so off by default.
    pub fn set_passive_mirror(&mut self, on: bool) {
        self.passive_mirror = on;
    }

    /// The compare engine.
    pub fn engine(&self) -> &Engine<C> {
        &self.engine
    }

    /// The compare engine, mutable (configuration changes).
    pub fn engine_mut(&mut self) -> &mut Engine<C> {
        &mut self.engine
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.engine.mode()
    }

    /// Engine counters.
    pub fn stats(&self) -> Stats {
        self.engine.stats()
    }

    /// Rewriter counters.
    pub fn rewriter_stats(&self) -> RewriterStats {
        self.rewriter.stats()
    }

    fn now(&self) -> Timestamp {
        self.engine.clock().now()
    }

    /// A frame the primary sent.
    pub fn from_primary<S: Sink>(&mut self, frame: Frame, sink: &mut S) -> Push {
        let class = classify(frame.ethernet());
        if let Class::Compared(c) = &class {
            let now = self.now();
            self.rewriter.observe_primary(c, now);
        }
        self.engine.push_classified(Side::Primary, frame, class, sink)
    }

    /// A frame the secondary sent: rewritten into the primary's sequence space, then compared.
    pub fn from_secondary<S: Sink>(&mut self, mut frame: Frame, sink: &mut S) -> Push {
        let mut class = classify(frame.ethernet());
        if let Class::Compared(c) = &mut class {
            let now = self.now();
            self.rewriter.rewrite_secondary(&mut frame, c, now);
        }
        self.engine.push_classified(Side::Secondary, frame, class, sink)
    }

    /// An inbound frame (from the clients): the copies each VM gets in the current mode (in
    /// passive mode, see [`Proxy::set_passive_mirror`]).
    pub fn inbound(&mut self, frame: Frame) -> Mirrored {
        match self.engine.mode() {
            Mode::Passive if !self.passive_mirror => Mirrored { primary: Some(frame), secondary: None },
            Mode::Colo | Mode::Passive => {
                let mut copy = frame.clone();
                self.rewrite_inbound(&mut copy);
                Mirrored { primary: Some(frame), secondary: Some(copy) }
            }
            Mode::PrimaryOnly => Mirrored { primary: Some(frame), secondary: None },
            Mode::SecondaryOnly => {
                let mut frame = frame;
                self.rewrite_inbound(&mut frame);
                Mirrored { primary: None, secondary: Some(frame) }
            }
        }
    }

    fn rewrite_inbound(&mut self, frame: &mut Frame) {
        if let Class::Compared(c) = classify(frame.ethernet()) {
            let now = self.now();
            self.rewriter.rewrite_inbound(frame, &c, now);
        }
    }

    /// The checkpoint: flush the engine, zero the rewriter's offsets.
    pub fn checkpoint<S: Sink>(&mut self, sink: &mut S) -> FlushSummary {
        self.rewriter.checkpoint();
        self.engine.flush(sink)
    }

    /// Switches mode (see [`Engine::set_mode`]).
    pub fn set_mode<S: Sink>(&mut self, mode: Mode, sink: &mut S) {
        self.engine.set_mode(mode, sink);
    }

    /// Counts inbound frames the transport could not deliver to a VM.
    pub fn count_inbound_dropped(&mut self, frames: u64) {
        self.engine.count_inbound_dropped(frames);
    }

    /// Takes back a frame the engine refused with [`Push::Full`] and discards it as overflow.
    pub fn discard_overflow<S: Sink>(&mut self, side: Side, frame: Frame, sink: &mut S) {
        self.engine.discard_overflow(side, frame, sink);
    }

    /// Runs due timers: held-frame timeouts and rewriter expiry.
    pub fn poll_timers<S: Sink>(&mut self, sink: &mut S) {
        self.engine.poll_timeouts(sink);
        let now = self.now();
        self.rewriter.expire(now);
    }

    /// When [`Proxy::poll_timers`] next has work (see [`Engine::next_deadline`]).
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.engine.next_deadline()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::*;
    use crate::clock::ManualClock;
    use crate::compare::Collect;
    use crate::wire::tcp::Flags;

    fn proxy() -> (Proxy<ManualClock>, Collect) {
        (Proxy::new(Config::default(), ManualClock::new()), Collect::default())
    }

    fn to_guest(seq: u32, ack: Option<u32>, flags: u8, payload: &[u8]) -> Frame {
        Frame::new(tcp4_to(CLIENT_IP, VM_IP, 40000, 80, seq, ack, flags, payload))
    }

    fn from_guest(seq: u32, ack: Option<u32>, flags: u8, payload: &[u8]) -> Frame {
        Frame::new(tcp4(80, 40000, seq, ack, flags, payload))
    }

    #[test]
    fn a_client_connection_with_different_isns_matches_after_rewriting() {
        let (mut px, mut out) = proxy();
        let m = px.inbound(to_guest(100, None, Flags::SYN, b""));
        assert!(m.primary.is_some() && m.secondary.is_some());
        px.from_primary(from_guest(1000, Some(101), Flags::SYN, b""), &mut out);
        px.from_secondary(from_guest(5000, Some(101), Flags::SYN, b""), &mut out);
        assert_eq!(out.released().len(), 1, "SYN+ACK released");
        let m = px.inbound(to_guest(101, Some(1001), 0, b"GET"));
        let s_copy = m.secondary.unwrap();
        assert_eq!(&s_copy.ethernet()[14 + 20 + 8..14 + 20 + 12], &5001u32.to_be_bytes(), "ACK mapped for the SVM");
        px.from_primary(from_guest(1001, Some(104), Flags::PSH, b"200 OK"), &mut out);
        px.from_secondary(from_guest(5001, Some(104), Flags::PSH, b"200 OK"), &mut out);
        assert_eq!(out.released().len(), 2);
        assert!(out.events.is_empty(), "no miscompare: {:?}", out.events);
    }

    #[test]
    fn inbound_mirroring_follows_the_mode() {
        let (mut px, mut out) = proxy();
        let f = Frame::new(udp4_to(CLIENT_IP, VM_IP, 1, 2, b"in"));
        px.set_mode(Mode::Passive, &mut out);
        assert_eq!(px.inbound(f.clone()), Mirrored { primary: Some(f.clone()), secondary: None });
        px.set_passive_mirror(true);
        assert_eq!(px.inbound(f.clone()), Mirrored { primary: Some(f.clone()), secondary: Some(f.clone()) });
        px.set_mode(Mode::PrimaryOnly, &mut out);
        assert_eq!(px.inbound(f.clone()), Mirrored { primary: Some(f.clone()), secondary: None });
        px.set_mode(Mode::SecondaryOnly, &mut out);
        assert_eq!(px.inbound(f.clone()), Mirrored { primary: None, secondary: Some(f) });
    }

    #[test]
    fn checkpoint_flushes_and_zeroes_offsets() {
        let (mut px, mut out) = proxy();
        px.from_primary(from_guest(1000, None, Flags::SYN, b""), &mut out);
        px.from_secondary(from_guest(7000, None, Flags::SYN, b""), &mut out);
        px.from_primary(from_guest(1001, Some(1), 0, b"p"), &mut out);
        px.from_secondary(from_guest(7001, Some(1), 0, b"s"), &mut out);
        assert_eq!(out.events.len(), 1);
        let s = px.checkpoint(&mut out);
        assert_eq!((s.released, s.dropped), (1, 1));
        // The secondary now continues from the primary's numbers, without rewriting.
        px.from_primary(from_guest(1002, Some(1), 0, b"next"), &mut out);
        px.from_secondary(from_guest(1002, Some(1), 0, b"next"), &mut out);
        assert_eq!(out.released().len(), 3);
        assert_eq!(out.events.len(), 1);
    }
}
