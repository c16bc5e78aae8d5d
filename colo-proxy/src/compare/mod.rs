//! The compare engine of docs/compare.md.
//!
//! Frames from the primary (P) and the secondary (S) are pushed in; the engine decides, per
//! flow, which P frames are released, which S frames are dropped, and when a checkpoint is
//! needed. Decisions leave through a [`Sink`], frames included, so buffers move from input to
//! output without copies. Time comes from an injected [`Clock`].

mod datagram;
mod held;
mod notify;
mod stats;
mod table;
mod tcp;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::classify::{classify, Class, Compared, Uncompared};
use crate::clock::{Clock, MonotonicClock, Timestamp};
use crate::flow::{FlowKey, FlowKind};
use crate::frame::{Frame, Side};

use held::{insert_by_seq, Held, HeldTotals};
use notify::Notifier;
use stats::Counters;
pub use stats::{MiscompareCounts, Stats, HOLD_BUCKETS};
use table::{Flow, FlowTable};

/// Largest `compare_timeout` and `expired_scan_cycle` the command lines accept, in ms (a day):
/// far beyond any useful setting, and far below where nanosecond timestamps overflow.
pub const MAX_TIMER_MS: u64 = 24 * 60 * 60 * 1000;

/// Default of [`Config::max_queue_bytes`]: 64 MiB per VM.
pub const DEFAULT_MAX_QUEUE_BYTES: usize = 64 << 20;

/// Engine limits and timeouts (the names and defaults of QEMU's colo-compare).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// A frame held longer than this causes a checkpoint request (`compare_timeout`, 3000 ms).
    pub compare_timeout: Duration,
    /// How often held frames are checked against `compare_timeout` (`expired_scan_cycle`,
    /// 1000 ms).
    pub expired_scan_cycle: Duration,
    /// Most frames per queue (`max_queue_size`, 1024).
    pub max_queue_size: usize,
    /// Most bytes of frames held for each VM, all flows together (ours: QEMU has no such
    /// bound, and 1024 frames of 64 KiB in each of 16 flows hold 1 GiB). Past it a frame is
    /// refused as by a full queue: a checkpoint request, and backpressure (or a counted drop)
    /// as the transport allows. A frame is always taken when nothing of its VM is held.
    /// Default [`DEFAULT_MAX_QUEUE_BYTES`].
    pub max_queue_bytes: usize,
    /// Most flows in the table (QEMU's 16384).
    pub max_flows: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            compare_timeout: Duration::from_millis(3000),
            expired_scan_cycle: Duration::from_millis(1000),
            max_queue_size: 1024,
            max_queue_bytes: DEFAULT_MAX_QUEUE_BYTES,
            max_flows: 16384,
        }
    }
}

/// What the engine does with frames (set by the controller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Compare P against S.
    Colo,
    /// The SVM is paused: hold every P frame until the next flush; drop S.
    Passive,
    /// The secondary is gone: release P at once, drop S.
    PrimaryOnly,
    /// Failover to the secondary: release S at once, drop P.
    SecondaryOnly,
}

impl Mode {
    /// The name used on the command line and in the control protocol.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Colo => "colo",
            Mode::Passive => "passive",
            Mode::PrimaryOnly => "primary-only",
            Mode::SecondaryOnly => "secondary-only",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "colo" => Ok(Mode::Colo),
            "passive" => Ok(Mode::Passive),
            "primary-only" => Ok(Mode::PrimaryOnly),
            "secondary-only" => Ok(Mode::SecondaryOnly),
            _ => Err(format!("unknown mode '{s}' (expected colo, passive, primary-only or secondary-only)")),
        }
    }
}

/// Why a checkpoint is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Payload bytes differ.
    Payload,
    /// Frame sizes differ.
    Size,
    /// The primary acknowledges data the secondary has not acknowledged.
    Ack,
    /// A frame was held longer than `compare_timeout`.
    Timeout,
    /// A queue is full.
    QueueFull,
}

impl Reason {
    /// The name used in the control protocol.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Payload => "payload",
            Reason::Size => "size",
            Reason::Ack => "ack",
            Reason::Timeout => "timeout",
            Reason::QueueFull => "queue-full",
        }
    }
}

/// A reported inconsistency: a checkpoint request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Miscompare {
    /// What differed.
    pub reason: Reason,
    /// The flow where it happened.
    pub key: FlowKey,
    /// Frames held now (both sides).
    pub held: usize,
    /// Inconsistencies counted but not reported since the previous report.
    pub suppressed: u64,
}

/// Why a frame was discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropCause {
    /// A secondary frame whose bytes matched the primary's (or were compared already).
    Matched,
    /// A secondary frame still held at a flush.
    Flushed,
    /// The mode discards this side (`passive` or `primary-only`: S; `secondary-only`: P).
    Mode,
    /// A secondary frame that is not compared (ARP, non-IP, ...).
    Uncompared,
    /// A queue was full and the transport could not wait.
    Overflow,
}

/// What happened to a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Sent out.
    Released,
    /// Discarded.
    Dropped(DropCause),
}

/// The verdict on a frame, with where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disposal {
    /// Which VM sent it.
    pub side: Side,
    /// Released or dropped.
    pub verdict: Verdict,
    /// Set if the frame took part in an inconsistency.
    pub miscompare: Option<Reason>,
}

/// Where the engine's decisions go.
pub trait Sink {
    /// A frame leaves the engine: if `disposal.verdict` is `Released`, send it out; otherwise
    /// recycle or free the buffer.
    fn frame(&mut self, frame: Frame, disposal: Disposal);
    /// A checkpoint is requested.
    fn miscompare(&mut self, event: &Miscompare);
}

/// A [`Sink`] that keeps everything, for tests and tools.
#[derive(Debug, Default)]
pub struct Collect {
    /// Frames in the order they left the engine.
    pub frames: Vec<(Frame, Disposal)>,
    /// Reported inconsistencies.
    pub events: Vec<Miscompare>,
}

impl Collect {
    /// Released frames, in release order.
    pub fn released(&self) -> Vec<&Frame> {
        self.frames.iter().filter(|(_, d)| d.verdict == Verdict::Released).map(|(f, _)| f).collect()
    }

    /// Forgets everything collected so far.
    pub fn clear(&mut self) {
        self.frames.clear();
        self.events.clear();
    }
}

impl Sink for Collect {
    fn frame(&mut self, frame: Frame, disposal: Disposal) {
        self.frames.push((frame, disposal));
    }
    fn miscompare(&mut self, event: &Miscompare) {
        self.events.push(event.clone());
    }
}

/// Result of [`Engine::push`].
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// The engine took the frame.
    Accepted,
    /// The frame's queue (or the flow table) is full: the frame is handed back. The transport
    /// should keep it and offer it again after the next flush, mode change or release
    /// (backpressure), or give it up with [`Engine::discard_overflow`].
    Full(Frame),
}

/// Frames released and dropped by a flush.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushSummary {
    /// Primary frames released.
    pub released: u64,
    /// Secondary frames dropped.
    pub dropped: u64,
}

/// The compare engine.
pub struct Engine<C: Clock = MonotonicClock> {
    config: Config,
    clock: C,
    mode: Mode,
    table: FlowTable,
    counters: Counters,
    notifier: Notifier,
    held: HeldTotals,
    /// A `queue-full` for the byte budget was reported since a frame of that side was last
    /// taken.
    bytes_full_reported: [bool; 2],
    next_order: u64,
    next_scan: Timestamp,
}

/// What the compare rules need besides the flow: the time, counters, and the sink.
pub(crate) struct Ctx<'a, S: Sink> {
    now: Timestamp,
    counters: &'a mut Counters,
    notifier: &'a mut Notifier,
    held: &'a mut HeldTotals,
    sink: &'a mut S,
}

impl<S: Sink> Ctx<'_, S> {
    fn release(&mut self, side: Side, h: Held) {
        self.held.remove(side.index(), &h);
        if side == Side::Primary {
            self.counters.record_hold(self.now.since(h.arrived));
        }
        self.counters.stats.released += 1;
        self.sink.frame(h.frame, Disposal { side, verdict: Verdict::Released, miscompare: h.miscompare });
    }

    fn discard(&mut self, side: Side, h: Held, cause: DropCause) {
        self.held.remove(side.index(), &h);
        count_drop(&mut self.counters.stats, side, cause);
        self.sink.frame(h.frame, Disposal { side, verdict: Verdict::Dropped(cause), miscompare: h.miscompare });
    }

    fn inconsistency(&mut self, reason: Reason, key: &FlowKey) {
        self.counters.stats.miscompares.count(reason);
        if let Some(suppressed) = self.notifier.inconsistency(self.now) {
            self.counters.stats.notifies += 1;
            let event = Miscompare { reason, key: *key, held: self.held.all_frames(), suppressed };
            tracing::debug!(reason = reason.name(), flow = %key, held = event.held, suppressed, "miscompare");
            self.sink.miscompare(&event);
        }
    }
}

fn count_drop(stats: &mut Stats, side: Side, cause: DropCause) {
    match (cause, side) {
        (DropCause::Overflow, _) => stats.dropped_overflow += 1,
        (_, Side::Primary) => stats.dropped_primary += 1,
        (_, Side::Secondary) => stats.dropped_secondary += 1,
    }
}

/// The flow that holds non-IP primary frames in `passive` mode (strict output commit).
fn link_layer_key() -> FlowKey {
    FlowKey {
        vlan: FlowKey::UNTAGGED,
        protocol: 255,
        kind: FlowKind::Other,
        src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        src_port: 0,
        dst_port: 0,
    }
}

impl Engine<MonotonicClock> {
    /// An engine on the real monotonic clock.
    pub fn with_config(config: Config) -> Self {
        Engine::new(config, MonotonicClock::new())
    }
}

impl<C: Clock> Engine<C> {
    /// An engine in `colo` mode.
    pub fn new(config: Config, clock: C) -> Self {
        let now = clock.now();
        Engine {
            config,
            clock,
            mode: Mode::Colo,
            table: FlowTable::new(config.max_flows),
            counters: Counters::new(),
            notifier: Notifier::new(config.compare_timeout),
            held: HeldTotals::default(),
            bytes_full_reported: [false; 2],
            next_order: 0,
            next_scan: now.plus(config.expired_scan_cycle),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Changes timeouts and limits; held frames stay.
    pub fn set_config(&mut self, config: Config) {
        self.config = config;
        self.notifier.set_reminder(config.compare_timeout);
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Frames held now: `[primary, secondary]`.
    pub fn held(&self) -> [usize; 2] {
        self.held.frames
    }

    /// Bytes of the frames held now (header and frame): `[primary, secondary]`.
    pub fn held_bytes(&self) -> [usize; 2] {
        self.held.bytes
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot(self.table.len(), self.held.frames)
    }

    /// How long released primary frames were held, since start, in seconds (for the metrics
    /// endpoint: a handle that keeps counting, readable from any thread).
    pub fn hold_histogram(&self) -> prometheus::Histogram {
        self.counters.hold_histogram()
    }

    /// Takes a frame from `side`, classifying it first.
    pub fn push<S: Sink>(&mut self, side: Side, frame: Frame, sink: &mut S) -> Push {
        let class = classify(frame.ethernet());
        self.push_classified(side, frame, class, sink)
    }

    /// Takes a frame from `side` whose class the caller already knows (the rewriter classifies
    /// secondary frames before rewriting them).
    pub fn push_classified<S: Sink>(&mut self, side: Side, frame: Frame, class: Class, sink: &mut S) -> Push {
        let now = self.clock.now();
        self.push_classified_at(side, frame, class, now, sink)
    }

    /// Takes a frame from `side` that arrived at `now` (a time of this engine's clock, not
    /// earlier than any given before). A transport that reads many frames at once stamps them
    /// all with the time of the read: one clock read per batch instead of one per frame.
    pub fn push_at<S: Sink>(&mut self, side: Side, frame: Frame, now: Timestamp, sink: &mut S) -> Push {
        let class = classify(frame.ethernet());
        self.push_classified_at(side, frame, class, now, sink)
    }

    /// [`Engine::push_classified`] for a frame that arrived at `now` (see [`Engine::push_at`]).
    pub fn push_classified_at<S: Sink>(
        &mut self,
        side: Side,
        frame: Frame,
        class: Class,
        now: Timestamp,
        sink: &mut S,
    ) -> Push {
        let len = frame.ethernet().len() as u64;
        let pushed = self.take(side, frame, class, now, sink);
        // A refused frame is offered again later: count each frame once, when it is taken.
        if pushed == Push::Accepted {
            let s = &mut self.counters.stats;
            match side {
                Side::Primary => (s.frames_primary += 1, s.bytes_primary += len),
                Side::Secondary => (s.frames_secondary += 1, s.bytes_secondary += len),
            };
        }
        pushed
    }

    fn take<S: Sink>(&mut self, side: Side, frame: Frame, class: Class, now: Timestamp, sink: &mut S) -> Push {
        let compared = match class {
            Class::Uncompared(why) => {
                self.counters.stats.passed_uncompared += 1;
                if let Uncompared::Malformed(e) = why {
                    self.counters.stats.malformed += 1;
                    tracing::trace!(side = side.name(), error = %e, "unparsable frame passed uncompared");
                }
                if self.mode == Mode::Passive && side == Side::Primary {
                    let link =
                        Compared { key: link_layer_key(), compare_from: 0, ip_end: 0, fragment_word: 0, tcp: None };
                    return self.enqueue(side, frame, &link, now, sink);
                }
                self.pass(side, frame, DropCause::Uncompared, sink);
                return Push::Accepted;
            }
            Class::Compared(c) => c,
        };
        match (self.mode, side) {
            (Mode::PrimaryOnly, _) | (Mode::SecondaryOnly, _) | (Mode::Passive, Side::Secondary) => {
                self.pass(side, frame, DropCause::Mode, sink);
                Push::Accepted
            }
            (Mode::Passive, Side::Primary) | (Mode::Colo, _) => self.enqueue(side, frame, &compared, now, sink),
        }
    }

    /// Releases or drops a frame at once, as the mode says for its side.
    fn pass<S: Sink>(&mut self, side: Side, frame: Frame, cause: DropCause, sink: &mut S) {
        let release = match self.mode {
            Mode::SecondaryOnly => side == Side::Secondary,
            _ => side == Side::Primary,
        };
        let verdict = if release {
            self.counters.stats.released += 1;
            Verdict::Released
        } else {
            count_drop(&mut self.counters.stats, side, cause);
            Verdict::Dropped(cause)
        };
        sink.frame(frame, Disposal { side, verdict, miscompare: None });
    }

    fn enqueue<S: Sink>(&mut self, side: Side, frame: Frame, c: &Compared, now: Timestamp, sink: &mut S) -> Push {
        let colo = self.mode == Mode::Colo;
        let s = side.index();
        let mut cx =
            Ctx { now, counters: &mut self.counters, notifier: &mut self.notifier, held: &mut self.held, sink };
        if cx.held.frames[s] > 0 && cx.held.bytes[s] + frame.data.len() > self.config.max_queue_bytes {
            // The byte budget is full: as a full queue, reported once until a frame of this
            // side is taken again.
            if colo && !self.bytes_full_reported[s] {
                self.bytes_full_reported[s] = true;
                cx.inconsistency(Reason::QueueFull, &c.key);
            }
            return Push::Full(frame);
        }
        let idx = match self.table.get_or_insert(&c.key, now, &mut cx.counters.stats.flows_evicted) {
            Ok(i) => i,
            Err(table::TableFull) => {
                if colo {
                    cx.inconsistency(Reason::QueueFull, &c.key);
                }
                return Push::Full(frame);
            }
        };
        let flow = &mut self.table.flows[idx];
        if flow.queues[s].len() >= self.config.max_queue_size {
            if colo && !flow.full_reported[s] {
                flow.full_reported[s] = true;
                cx.inconsistency(Reason::QueueFull, &flow.key);
            }
            return Push::Full(frame);
        }
        flow.full_reported[s] = false;
        self.bytes_full_reported[s] = false;
        flow.last_active = now;
        let held = Held::new(frame, c, now, self.next_order);
        self.next_order += 1;
        cx.held.add(s, &held);
        if let Some(t) = &c.tcp {
            if let Some(ack) = t.ack {
                flow.track_ack(side, ack);
            }
            insert_by_seq(&mut flow.queues[s], held);
        } else {
            flow.queues[s].push_back(held);
        }
        if colo {
            compare_flow(flow, &mut cx);
        }
        Push::Accepted
    }

    /// Counts a frame the transport refused before it reached the engine (bad framing, a
    /// malformed descriptor chain), so `stats` shows it.
    /// Returns the new total.
    pub fn count_rejected_input(&mut self) -> u64 {
        self.counters.stats.rejected_input += 1;
        self.counters.stats.rejected_input
    }

    /// Counts an inbound frame the transport could not deliver to a VM (its queue full, or no
    /// VM connected), so `stats` shows it.
    pub fn count_inbound_dropped(&mut self, frames: u64) {
        self.counters.stats.inbound_dropped += frames;
    }

    /// Discards a frame the engine handed back with [`Push::Full`] and the transport cannot keep
    /// (AF_PACKET, a peer that must not stall); counts it as an overflow drop.
    pub fn discard_overflow<S: Sink>(&mut self, side: Side, frame: Frame, sink: &mut S) {
        self.counters.stats.dropped_overflow += 1;
        sink.frame(frame, Disposal { side, verdict: Verdict::Dropped(DropCause::Overflow), miscompare: None });
    }

    /// The checkpoint's flush: releases every held primary frame (TCP flows in sequence order,
    /// otherwise in arrival order, interleaved across flows by arrival), drops every held
    /// secondary frame, and re-arms the checkpoint request. TCP comparison state is kept, and
    /// flushed primary data counts as compared, since the secondary now holds the state that
    /// produced it.
    pub fn flush<S: Sink>(&mut self, sink: &mut S) -> FlushSummary {
        let released = self.drain(Side::Primary, None, sink);
        let dropped = self.drain(Side::Secondary, Some(DropCause::Flushed), sink);
        for flow in self.table.flows.iter_mut() {
            flow.secondary_credit = 0;
        }
        self.notifier.flushed();
        self.counters.stats.flushes += 1;
        tracing::debug!(released, dropped, "flushed");
        FlushSummary { released, dropped }
    }

    /// Switches mode. Entering `primary-only` releases held primary frames and drops held
    /// secondary ones; entering `secondary-only` releases held secondary frames (they are
    /// already rewritten) and drops held primary ones.
    pub fn set_mode<S: Sink>(&mut self, mode: Mode, sink: &mut S) {
        if mode == self.mode {
            return;
        }
        tracing::info!(from = self.mode.name(), to = mode.name(), "compare mode");
        let new_pair = matches!(self.mode, Mode::PrimaryOnly | Mode::SecondaryOnly);
        self.mode = mode;
        match mode {
            Mode::PrimaryOnly => {
                self.drain(Side::Primary, None, sink);
                self.drain(Side::Secondary, Some(DropCause::Mode), sink);
            }
            Mode::SecondaryOnly => {
                self.drain(Side::Secondary, None, sink);
                self.drain(Side::Primary, Some(DropCause::Mode), sink);
            }
            // A pair formed again after one side served alone (re-protection): the new
            // secondary starts from the primary's state now, and nothing compared before it
            // existed says where its streams stand. Meet every flow afresh, as mid-stream.
            Mode::Colo | Mode::Passive if new_pair => self.table.forget_comparisons(),
            Mode::Colo | Mode::Passive => {}
        }
        self.notifier.flushed();
    }

    /// Empties every queue of `side`: releases (`drop == None`) or drops the frames, in arrival
    /// order across flows and queue order within each flow. Returns how many frames left.
    fn drain<S: Sink>(&mut self, side: Side, drop: Option<DropCause>, sink: &mut S) -> u64 {
        let s = side.index();
        let mut heads: BinaryHeap<Reverse<(u64, usize)>> = self
            .table
            .flows
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.queues[s].front().map(|h| Reverse((h.order, i))))
            .collect();
        let mut cx = Ctx {
            now: self.clock.now(),
            counters: &mut self.counters,
            notifier: &mut self.notifier,
            held: &mut self.held,
            sink,
        };
        let mut n = 0;
        while let Some(Reverse((_, i))) = heads.pop() {
            let flow = &mut self.table.flows[i];
            let h = flow.queues[s].pop_front().expect("heap entries have a head");
            if let (Side::Primary, Some(t)) = (side, &h.tcp) {
                if t.payload_len > 0 {
                    let end = t.seq_end();
                    flow.compare_seq = Some(flow.compare_seq.map_or(end, |c| c.max(end)));
                }
            }
            if let Some(next) = flow.queues[s].front() {
                heads.push(Reverse((next.order, i)));
            }
            match drop {
                None => cx.release(side, h),
                Some(cause) => cx.discard(side, h, cause),
            }
            n += 1;
        }
        n
    }

    /// When [`Engine::poll_timeouts`] next has work: `None` while nothing can time out.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        (self.mode == Mode::Colo && self.held.all_frames() > 0).then_some(self.next_scan)
    }

    /// Checks held frames against `compare_timeout` once every `expired_scan_cycle`; a flow
    /// with a frame held too long is an inconsistency (`timeout`). Frames stay held.
    pub fn poll_timeouts<S: Sink>(&mut self, sink: &mut S) {
        let now = self.clock.now();
        if now < self.next_scan {
            return;
        }
        self.next_scan = now.plus(self.config.expired_scan_cycle);
        if self.mode != Mode::Colo || self.held.all_frames() == 0 {
            return;
        }
        let timeout = self.config.compare_timeout;
        let mut cx =
            Ctx { now, counters: &mut self.counters, notifier: &mut self.notifier, held: &mut self.held, sink };
        for flow in self.table.flows.iter_mut() {
            let mut expired = false;
            for h in flow.queues.iter_mut().flatten() {
                if now.since(h.arrived) >= timeout {
                    h.mark(Reason::Timeout);
                    expired = true;
                }
            }
            if expired {
                cx.inconsistency(Reason::Timeout, &flow.key);
            }
        }
    }
}

fn compare_flow<S: Sink>(flow: &mut Flow, cx: &mut Ctx<'_, S>) {
    match flow.key.kind {
        FlowKind::Tcp => tcp::compare(flow, cx),
        FlowKind::Datagram | FlowKind::Other | FlowKind::Fragment => datagram::compare(flow, cx),
    }
}

#[cfg(test)]
mod tests;
