//! The backend of one VM on one host, whatever its role: the routing of its frames between the
//! VM, the LAN and the peer host's backend, with the compare engine (as primary) and the TCP
//! sequence rewriter (learned as secondary), and no I/O of its own — the transport (vhost-user
//! rings and a tap in vhost-net-compare, interfaces in `colo-proxy run`) passes frames in and
//! carries out what it is given through a [`ReplicaOutput`].
//!
//! | role | from the LAN | the VM's output | from the peer |
//! |---|---|---|---|
//! | `unset` | dropped | dropped | — |
//! | `alone` | to the VM | to the LAN | — |
//! | `primary` | to the VM, and numbered to the peer | compared as P | compared as S |
//! | `secondary` | ignored | rewritten, to the peer | inbound: rewritten, to the VM |
//!
//! - **Rewriter.** It lives with the secondary, as QEMU keeps filter-rewriter on the secondary
//!   host: the secondary's output is rewritten into the primary's sequence space before it
//!   crosses to the primary, and inbound frames from the primary are rewritten into the
//!   secondary's. It learns the primary's initial numbers from the client's first ACK (or its
//!   SYN+ACK, for connections the guest opens), so it needs nothing but the inbound frames.
//!   After a takeover the same rewriter stays between the VM and the LAN for as long as it
//!   translates a connection, so every connection keeps its numbers.
//! - **Release under a lease.** As primary, a released frame goes to the LAN only while the
//!   frame link's lease is fresh ([`ReplicaOutput::lease_fresh`]); otherwise it waits in a
//!   [`Gate`] until the lease is renewed or the controller decides (`alone`: send,
//!   `secondary`: drop).
//! - **Fail-safe.** Only `alone` and `primary` ever send to the LAN; a role not set yet means
//!   drop.
//! - **Numbered inbound frames.** The primary numbers every frame it mirrors; the secondary
//!   keeps the newest in an [`InboundWindow`], so that after loading a checkpoint its VM can be
//!   given exactly the frames numbered from the primary VM's mark at the pause
//!   ([`Replica::resync`]).
//! - **Checkpoint boundaries in the secondary's output.** The secondary's VM restarts its rings
//!   with a checkpoint's load, and may send what was on its restored TX ring, before the primary
//!   has flushed that checkpoint (the flush waits for the secondary's `vmstate-received`; the
//!   load follows it at once; only the vCPUs wait for the primary's `committed`); and frames it sent
//!   before the checkpoint may still be on the link after the flush. Either way, frames from
//!   the two sides of a checkpoint would be compared with each other. So the secondary sends
//!   `loading` on the frame link before its VM loads ([`Replica::resync`]), and the primary
//!   pairs it with its flush ([`Replica::checkpoint`]): the secondary's frames after a
//!   `loading` wait for the flush, and those still arriving after a flush but before its
//!   `loading` are dropped (their counterparts were flushed).

mod gate;
mod role;
mod window;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::classify::{classify, Class};
use crate::clock::{Clock, Timestamp};
use crate::compare::{Config, Disposal, Engine, FlushSummary, Miscompare, Mode, Push, Sink, Stats, Verdict};
use crate::frame::{Frame, Side};
use crate::rewrite::{Rewriter, RewriterStats};

pub use gate::Gate;
pub use role::Role;
pub use window::InboundWindow;

/// Bytes of released frames a primary holds while its lease has lapsed.
pub const GATE_BYTES: usize = 16 << 20;
/// Bytes of numbered inbound frames a secondary keeps for resynchronisation.
pub const WINDOW_BYTES: usize = 8 << 20;
/// IPv4 addresses remembered per VM for the announcement.
const MAX_ADDRESSES: usize = 4;
/// How long after a flush a primary drops the secondary's frames while its `loading` has not
/// come. The secondary sends it before the primary can flush (right after
/// `vmstate-received`), so it is only ever behind by the link's latency; a peer that never
/// sends one (a bug, another version) costs at most this much of its output per checkpoint.
const LOADING_WAIT: Duration = Duration::from_secs(1);

/// Where the replica's decisions go (implemented by the transport).
pub trait ReplicaOutput {
    /// A frame for the LAN (the uplink), Ethernet with the frame's virtio-net header if any.
    fn to_lan(&mut self, frame: Frame);
    /// A frame for the local VM; `seq` is its number on the frame link, if mirrored.
    fn to_local(&mut self, frame: Frame, seq: Option<u64>);
    /// Mirrors an inbound frame to the peer; false if it could not be sent.
    fn mirror(&mut self, seq: u64, frame: &Frame) -> bool;
    /// Whether the peer can take `len` more bytes of the secondary's output now.
    fn peer_has_room(&self, len: usize) -> bool;
    /// The secondary VM's frame (rewritten) to the peer, after `peer_has_room` said yes.
    fn to_peer(&mut self, frame: Frame);
    /// As primary: the engine took `bytes` of the secondary's frames; return that much credit.
    fn grant(&mut self, bytes: usize);
    /// Whether the frame link's lease is fresh (a primary may release).
    fn lease_fresh(&self) -> bool;
    /// As secondary: the VM loads the checkpoint with inbound mark `mark`; tell the peer, in
    /// order with the frames sent to it.
    fn loading_to_peer(&mut self, mark: u64);
    /// The fate of every frame the engine decided on (for the capture).
    fn record(&mut self, _frame: &Frame, _disposal: &Disposal) {}
    /// A checkpoint request from the engine.
    fn miscompare(&mut self, event: &Miscompare);
}

/// What a role change asks of the transport.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoleChange {
    /// The VM took over: announce it on the LAN (RARP, gratuitous ARP for these addresses).
    pub announce: Option<Vec<Ipv4Addr>>,
    /// Held frames dropped (a primary that stepped down).
    pub dropped: u64,
}

/// Counters of the routing around the engine (the engine's own are in [`Stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReplicaCounters {
    /// LAN frames a secondary ignored (it takes inbound frames from the primary only).
    pub lan_ignored: u64,
    /// Frames dropped while no role was set.
    pub unset_dropped: u64,
    /// Inbound frames mirrored to the peer.
    pub mirrored: u64,
    /// Inbound frames the link could not take (its queue full, or it was down).
    pub mirror_failed: u64,
    /// Inbound frames received from the peer.
    pub peer_inbound: u64,
    /// Frames of the secondary VM sent to the peer.
    pub to_peer: u64,
    /// Released frames that waited for the lease.
    pub gated: u64,
    /// Of those, dropped because the gate was full.
    pub gate_overflow: u64,
    /// Released frames dropped because the role no longer allows sending (stepped down).
    pub fenced: u64,
    /// Numbered inbound frames the secondary's window let go.
    pub window_dropped: u64,
    /// Times the VM was announced after a takeover.
    pub takeovers: u64,
    /// As primary: frames of the secondary VM from before a checkpoint that arrived after its
    /// flush (dropped: their counterparts were released or dropped by the flush).
    pub stale_secondary: u64,
    /// As primary: `loading` messages ignored because one was already waiting for its flush (a
    /// correct secondary never sends a second before the first is paired).
    pub loading_ignored: u64,
    /// As primary: flushes whose `loading` did not come within a second (the secondary's
    /// frames were compared again without it).
    pub loading_missing: u64,
}

/// What came from the secondary's side of the frame link and waits for the engine, in order.
#[derive(Debug)]
enum FromPeer {
    /// A frame of the secondary VM.
    Frame(Frame),
    /// The secondary VM loads a checkpoint: what follows waits for the primary's flush of that
    /// checkpoint.
    Loading,
}

/// The backend of one VM.
pub struct Replica<C: Clock> {
    role: Role,
    engine: Engine<C>,
    rewriter: Rewriter,
    /// The rewriter still translates a connection (the VM took over as secondary): in `alone`
    /// and `primary` every frame passes it.
    translating: bool,
    gate: Gate,
    window: InboundWindow,
    /// As primary: the secondary's frames the engine had no room for yet, and those waiting
    /// behind a `loading` for the flush, in arrival order (at most one credit window of
    /// frames, and at most one `loading`).
    backlog: VecDeque<FromPeer>,
    /// As primary: when a flush happened whose `loading` has not come yet (the secondary's
    /// frames arriving meanwhile are from before the checkpoint).
    awaiting_loading: Option<Timestamp>,
    /// As primary: the controller has not set a mode since this VM became primary. COLO
    /// starts with the role (the frame link comes up, the frames waiting for the paused VM
    /// are mirrored) and then the mode; the running secondary may answer those frames in
    /// between, and an engine still in `primary-only` would drop its answers, leaving the
    /// primary's to wait for a timeout. So the secondary's frames wait for the mode.
    awaiting_mode: bool,
    next_seq: u64,
    addresses: Vec<Ipv4Addr>,
    counters: ReplicaCounters,
}

/// The engine's sink: released frames go to the LAN as the role allows.
struct Outlet<'a, O: ReplicaOutput> {
    role: Role,
    out: &'a mut O,
    rewriter: &'a mut Rewriter,
    translating: bool,
    gate: &'a mut Gate,
    counters: &'a mut ReplicaCounters,
    now: Timestamp,
}

impl<O: ReplicaOutput> Sink for Outlet<'_, O> {
    fn frame(&mut self, mut frame: Frame, d: Disposal) {
        self.out.record(&frame, &d);
        if d.verdict != Verdict::Released {
            return;
        }
        if self.translating {
            rewrite_outbound(self.rewriter, &mut frame, self.now);
        }
        match self.role {
            Role::Alone => self.out.to_lan(frame),
            Role::Primary if self.gate.is_empty() && self.out.lease_fresh() => self.out.to_lan(frame),
            Role::Primary => {
                self.counters.gated += 1;
                self.gate.hold(frame);
            }
            Role::Unset | Role::Secondary => self.counters.fenced += 1,
        }
    }

    fn miscompare(&mut self, event: &Miscompare) {
        self.out.miscompare(event);
    }
}

fn rewrite_outbound(rewriter: &mut Rewriter, frame: &mut Frame, now: Timestamp) {
    if let Class::Compared(mut c) = classify(frame.ethernet()) {
        rewriter.rewrite_secondary(frame, &mut c, now);
    }
}

fn rewrite_inbound(rewriter: &mut Rewriter, frame: &mut Frame, now: Timestamp) {
    if let Class::Compared(c) = classify(frame.ethernet()) {
        rewriter.rewrite_inbound(frame, &c, now);
    }
}

impl<C: Clock> Replica<C> {
    /// A backend with no role yet, its engine configured with `config`.
    pub fn new(config: Config, clock: C) -> Self {
        let mut engine = Engine::new(config, clock);
        engine.set_mode(Mode::PrimaryOnly, &mut crate::compare::Collect::default());
        Replica {
            role: Role::Unset,
            engine,
            rewriter: Rewriter::new(),
            translating: false,
            gate: Gate::new(GATE_BYTES),
            window: InboundWindow::new(WINDOW_BYTES),
            backlog: VecDeque::new(),
            awaiting_loading: None,
            awaiting_mode: false,
            next_seq: 0,
            addresses: Vec::new(),
            counters: ReplicaCounters::default(),
        }
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The engine's mode (meaningful as primary).
    pub fn mode(&self) -> Mode {
        self.engine.mode()
    }

    /// The engine.
    pub fn engine(&self) -> &Engine<C> {
        &self.engine
    }

    /// The engine's counters.
    pub fn stats(&self) -> Stats {
        self.engine.stats()
    }

    /// The routing counters.
    pub fn counters(&self) -> ReplicaCounters {
        ReplicaCounters { gate_overflow: self.gate.overflow, window_dropped: self.window.dropped, ..self.counters }
    }

    /// The rewriter's counters.
    pub fn rewriter_stats(&self) -> RewriterStats {
        self.rewriter.stats()
    }

    /// Frames waiting for the lease.
    pub fn gated(&self) -> usize {
        self.gate.len()
    }

    /// The number the next mirrored frame gets (as primary: the mark when nothing is pending).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Takes a number for an inbound frame the transport mirrors itself (frames that were
    /// waiting for the VM before the link came up).
    pub fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// IPv4 addresses the VM was seen sending from.
    pub fn addresses(&self) -> &[Ipv4Addr] {
        &self.addresses
    }

    fn now(&self) -> Timestamp {
        self.engine.clock().now()
    }

    /// Runs `op` on the engine with a sink for the current role.
    fn with_outlet<O: ReplicaOutput, R>(
        &mut self,
        out: &mut O,
        op: impl FnOnce(&mut Engine<C>, &mut Outlet<'_, O>) -> R,
    ) -> R {
        let now = self.now();
        let mut outlet = Outlet {
            role: self.role,
            out,
            rewriter: &mut self.rewriter,
            translating: self.translating,
            gate: &mut self.gate,
            counters: &mut self.counters,
            now,
        };
        op(&mut self.engine, &mut outlet)
    }

    /// A frame the local VM sent. `Push::Full` gives it back: leave it on the VM's ring and try
    /// again when room appears (compare queue full as primary, no credit as secondary).
    pub fn from_local<O: ReplicaOutput>(&mut self, mut frame: Frame, out: &mut O) -> Push {
        self.learn_address(&frame);
        match self.role {
            Role::Unset => {
                self.counters.unset_dropped += 1;
                Push::Accepted
            }
            Role::Alone => {
                if self.translating {
                    let now = self.now();
                    rewrite_outbound(&mut self.rewriter, &mut frame, now);
                }
                out.to_lan(frame);
                Push::Accepted
            }
            Role::Primary => {
                let pushed = self.with_outlet(out, |engine, outlet| engine.push(Side::Primary, frame, outlet));
                self.settle(out);
                pushed
            }
            Role::Secondary => {
                if !out.peer_has_room(frame.ethernet().len()) {
                    return Push::Full(frame);
                }
                let now = self.now();
                rewrite_outbound(&mut self.rewriter, &mut frame, now);
                self.counters.to_peer += 1;
                out.to_peer(frame);
                Push::Accepted
            }
        }
    }

    /// A frame from the LAN.
    pub fn from_lan<O: ReplicaOutput>(&mut self, mut frame: Frame, out: &mut O) {
        match self.role {
            Role::Unset => self.counters.unset_dropped += 1,
            Role::Secondary => self.counters.lan_ignored += 1,
            Role::Alone | Role::Primary => {
                if self.translating {
                    let now = self.now();
                    rewrite_inbound(&mut self.rewriter, &mut frame, now);
                }
                if self.role == Role::Primary {
                    let seq = self.take_seq();
                    if out.mirror(seq, &frame) {
                        self.counters.mirrored += 1;
                    } else {
                        self.counters.mirror_failed += 1;
                    }
                    out.to_local(frame, Some(seq));
                } else {
                    out.to_local(frame, None);
                }
            }
        }
    }

    /// A mirrored frame from the primary (as secondary), numbered `seq`.
    pub fn from_peer_inbound<O: ReplicaOutput>(&mut self, seq: u64, frame: Frame, out: &mut O) {
        if self.role != Role::Secondary {
            return;
        }
        self.counters.peer_inbound += 1;
        self.window.keep(seq, frame.clone());
        let mut frame = frame;
        let now = self.now();
        rewrite_inbound(&mut self.rewriter, &mut frame, now);
        out.to_local(frame, Some(seq));
    }

    /// A frame of the secondary VM from the peer (as primary). Taken by the engine, or kept in
    /// the backlog until room appears; its credit is returned ([`ReplicaOutput::grant`]) once
    /// taken.
    pub fn from_peer_outbound<O: ReplicaOutput>(&mut self, frame: Frame, out: &mut O) {
        if self.role != Role::Primary {
            return;
        }
        self.backlog.push_back(FromPeer::Frame(frame));
        self.settle(out);
    }

    /// The peer's `loading` (as primary): the secondary's VM loads the checkpoint with inbound
    /// mark `mark`, so its frames from here on pair with the primary's after that
    /// checkpoint's flush.
    pub fn from_peer_loading<O: ReplicaOutput>(&mut self, mark: u64, out: &mut O) {
        if self.role != Role::Primary {
            return;
        }
        if self.backlog.iter().any(|item| matches!(item, FromPeer::Loading)) {
            self.counters.loading_ignored += 1;
            return;
        }
        tracing::debug!(mark, "the secondary loads a checkpoint");
        self.backlog.push_back(FromPeer::Loading);
        self.settle(out);
    }

    /// Frames of the secondary waiting for room in the engine or for a flush.
    pub fn backlog(&self) -> usize {
        self.backlog.iter().filter(|item| matches!(item, FromPeer::Frame(_))).count()
    }

    /// Offers the backlog to the engine, oldest first, as far as it has room, and up to a
    /// `loading` whose flush has not happened yet.
    fn settle<O: ReplicaOutput>(&mut self, out: &mut O) {
        if self.awaiting_mode {
            return;
        }
        if self.awaiting_loading.is_some_and(|since| self.now().since(since) > LOADING_WAIT) {
            self.awaiting_loading = None;
            self.counters.loading_missing += 1;
            tracing::warn!(
                "no `loading` from the secondary within {LOADING_WAIT:?} of a flush: comparing its frames again"
            );
        }
        while let Some(item) = self.backlog.pop_front() {
            match item {
                FromPeer::Frame(frame) if self.awaiting_loading.is_some() => {
                    self.counters.stale_secondary += 1;
                    out.grant(frame.ethernet().len());
                }
                FromPeer::Frame(frame) => {
                    let len = frame.ethernet().len();
                    match self.with_outlet(out, |engine, outlet| engine.push(Side::Secondary, frame, outlet)) {
                        Push::Accepted => out.grant(len),
                        Push::Full(frame) => {
                            self.backlog.push_front(FromPeer::Frame(frame));
                            return;
                        }
                    }
                }
                FromPeer::Loading if self.awaiting_loading.is_some() => self.awaiting_loading = None,
                FromPeer::Loading => {
                    self.backlog.push_front(FromPeer::Loading);
                    return;
                }
            }
        }
    }

    /// The checkpoint's flush (as primary; a no-op otherwise). The secondary's frames before
    /// its `loading` of this checkpoint are from before it: the flush drops those the engine
    /// holds, and the ones still to come are dropped as they arrive.
    pub fn checkpoint<O: ReplicaOutput>(&mut self, out: &mut O) -> FlushSummary {
        if self.role != Role::Primary {
            return FlushSummary::default();
        }
        let summary = self.with_outlet(out, |engine, outlet| engine.flush(outlet));
        self.awaiting_loading = Some(self.now());
        self.settle(out);
        summary
    }

    /// Switches the engine's mode. As primary any mode; alone accepts `primary-only` (what it
    /// does anyway); other roles compare nothing.
    pub fn set_mode<O: ReplicaOutput>(&mut self, mode: Mode, out: &mut O) -> Result<(), String> {
        match (self.role, mode) {
            (Role::Primary, _) => {
                self.with_outlet(out, |engine, outlet| engine.set_mode(mode, outlet));
                self.awaiting_mode = false;
                self.settle(out);
                Ok(())
            }
            (Role::Alone, Mode::PrimaryOnly) => Ok(()),
            (role, mode) => Err(format!(
                "mode '{}' needs the role primary; this backend's VM is {} (modes apply to the primary's compare engine)",
                mode.name(),
                role.name()
            )),
        }
    }

    /// Changes the role. Frames held as primary are sent (to `alone`: the controller decided
    /// this VM serves) or dropped (to `secondary`: it stepped down).
    pub fn set_role<O: ReplicaOutput>(&mut self, role: Role, out: &mut O) -> RoleChange {
        let before = self.role;
        let mut change = RoleChange::default();
        // Secondary again: a new pair (a restarted colo-vmm) starts from scratch.
        if role == before && role != Role::Secondary {
            return change;
        }
        self.role = role;
        // Whatever the secondary sent ahead is of no use to any other role (nor to a new pair).
        self.backlog.clear();
        self.awaiting_loading = None;
        self.awaiting_mode = role == Role::Primary;
        match role {
            Role::Unset => {}
            Role::Alone => {
                for frame in self.gate.take() {
                    out.to_lan(frame);
                }
                // Held primary frames go out now; nothing comes from a peer any more.
                self.with_outlet(out, |engine, outlet| engine.set_mode(Mode::PrimaryOnly, outlet));
                if before == Role::Secondary {
                    self.translating = self.rewriter.translating();
                    self.window.clear();
                    self.counters.takeovers += 1;
                    change.announce = Some(self.addresses.clone());
                }
            }
            Role::Primary => {
                // The secondary-to-be loads this VM's state: numbering restarts nothing, and
                // the engine waits for the controller's mode.
                if before == Role::Secondary {
                    self.translating = self.rewriter.translating();
                    self.window.clear();
                }
            }
            Role::Secondary => {
                let gated = self.gate.take().len() as u64;
                let before_held: usize = self.engine.held().iter().sum();
                // Everything held is dropped: the other side serves.
                self.with_outlet(out, |engine, outlet| engine.set_mode(Mode::SecondaryOnly, outlet));
                self.with_outlet(out, |engine, outlet| engine.set_mode(Mode::PrimaryOnly, outlet));
                change.dropped = gated + before_held as u64;
                // The VM will be loaded from the primary's state: a fresh rewriter learns its
                // connections from the inbound frames.
                self.rewriter = Rewriter::new();
                self.translating = false;
                self.window.clear();
            }
        }
        change
    }

    /// As secondary, when the local VM (paused) is about to load a checkpoint: every offset is
    /// 0 again, the peer is told (`loading`, behind every frame the VM sent before), and the
    /// VM's inbound queue must become the frames numbered from `mark` (the first the primary VM
    /// had not taken at its pause), rewritten. Returns them, oldest first.
    pub fn resync<O: ReplicaOutput>(&mut self, mark: u64, out: &mut O) -> Vec<(u64, Frame)> {
        self.rewriter.checkpoint();
        if self.role == Role::Secondary {
            out.loading_to_peer(mark);
        }
        let now = self.now();
        let kept: Vec<(u64, Frame)> = self.window.from_mark(mark).cloned().collect();
        kept.into_iter()
            .map(|(seq, mut f)| {
                rewrite_inbound(&mut self.rewriter, &mut f, now);
                (seq, f)
            })
            .collect()
    }

    /// Sends the frames that waited for the lease (call when it is fresh again).
    pub fn release_gated<O: ReplicaOutput>(&mut self, out: &mut O) -> usize {
        if self.role != Role::Primary || self.gate.is_empty() || !out.lease_fresh() {
            return 0;
        }
        let frames = self.gate.take();
        let n = frames.len();
        for frame in frames {
            out.to_lan(frame);
        }
        n
    }

    /// Runs the engine's and the rewriter's timers.
    pub fn poll_timers<O: ReplicaOutput>(&mut self, out: &mut O) {
        self.with_outlet(out, |engine, outlet| engine.poll_timeouts(outlet));
        self.settle(out);
        let now = self.now();
        self.rewriter.expire(now);
    }

    /// When [`Replica::poll_timers`] next has work.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.engine.next_deadline()
    }

    /// Counts inbound frames the transport could not give the VM.
    pub fn count_inbound_dropped(&mut self, frames: u64) {
        self.engine.count_inbound_dropped(frames);
    }

    /// Counts a descriptor chain refused before it reached the engine.
    pub fn count_rejected_input(&mut self) {
        self.engine.count_rejected_input();
    }

    /// Notes the IPv4 source of an ARP or IPv4 frame the VM sent, for the announcement.
    fn learn_address(&mut self, frame: &Frame) {
        if self.addresses.len() >= MAX_ADDRESSES {
            return;
        }
        let eth = frame.ethernet();
        let ip = match eth.get(12..14) {
            Some([0x08, 0x00]) => eth.get(26..30),
            Some([0x08, 0x06]) => eth.get(28..32),
            _ => None,
        };
        if let Some(Ok(octets)) = ip.map(<[u8; 4]>::try_from) {
            let ip = Ipv4Addr::from(octets);
            if !ip.is_unspecified() && !ip.is_broadcast() && !ip.is_multicast() && !self.addresses.contains(&ip) {
                self.addresses.push(ip);
            }
        }
    }
}
