//! Where frames go: between the tap and the connected VMs, through the compare engine in COLO
//! mode.
//!
//! - Passthrough (one VM socket): TX frames go straight to the tap from the VM's worker (one
//!   `write(2)` per frame, no lock); inbound frames go to the VM's pending RX queue.
//! - COLO (two VM sockets): TX frames go through [`ColoState`] under its mutex, which writes
//!   released frames to the tap; inbound frames are mirrored by the proxy (per mode) to both
//!   VMs' pending RX queues.
//!
//! Lock order, everywhere: a vring lock (held by a worker), then the COLO mutex, then the
//! ports table, then a port's pending queue. Nobody takes a vring lock while holding any of the
//! others, so there is no cycle.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use colo_proxy::compare::{Mode, Stats};
use colo_proxy::control::{Command, ControlHandle, Event, PeerState};
use colo_proxy::{Frame, Side};

use crate::colo::{ColoState, Effects};
use crate::device::VNET_HDR_LEN;
use crate::lock::lock;
use crate::port::Port;
use crate::ratelimit::RateLimit;
use crate::router::{Router, Transmit};
use crate::stats::add;
use crate::tap::Tap;

/// The current mode, readable without the COLO lock (for the `hello` of new controllers,
/// built on the control thread).
#[derive(Debug)]
pub struct SharedMode(AtomicU8);

impl SharedMode {
    /// Starts at `mode`.
    pub fn new(mode: Mode) -> SharedMode {
        SharedMode(AtomicU8::new(Self::code(mode)))
    }

    fn code(mode: Mode) -> u8 {
        match mode {
            Mode::Colo => 0,
            Mode::Passive => 1,
            Mode::PrimaryOnly => 2,
            Mode::SecondaryOnly => 3,
        }
    }

    /// The mode.
    pub fn get(&self) -> Mode {
        match self.0.load(Ordering::SeqCst) {
            0 => Mode::Colo,
            1 => Mode::Passive,
            2 => Mode::PrimaryOnly,
            _ => Mode::SecondaryOnly,
        }
    }

    fn set(&self, mode: Mode) {
        self.0.store(Self::code(mode), Ordering::SeqCst);
    }
}

/// Counters of passthrough mode (COLO mode has the engine's).
#[derive(Debug, Default)]
struct PassthroughCounters {
    frames: AtomicU64,
    rejected: AtomicU64,
    tap_errors: AtomicU64,
}

/// The router between the tap and the VMs.
pub struct Hub {
    tap: Arc<Tap>,
    nic: String,
    colo: Option<Mutex<ColoState>>,
    ports: Mutex<[Option<Arc<Port>>; 2]>,
    control: Option<ControlHandle>,
    mode: Arc<SharedMode>,
    passthrough: PassthroughCounters,
    tap_error_log: Mutex<RateLimit>,
    overflow_log: Mutex<RateLimit>,
    /// Inbound frames for a VM that is not connected.
    unrouted: AtomicU64,
    /// Held while inbound frames are queued on the ports, and while the secondary's queue is
    /// made a copy of the primary's, so a frame lands in both queues or in neither.
    rx_sync: Mutex<()>,
}

impl Hub {
    /// A hub on `tap`; `colo` is `None` for passthrough. `mode` must be the mode `colo` starts
    /// in (`primary-only` for passthrough).
    pub fn new(
        tap: Arc<Tap>,
        nic: String,
        colo: Option<ColoState>,
        control: Option<ControlHandle>,
        mode: Arc<SharedMode>,
    ) -> Hub {
        Hub {
            tap,
            nic,
            colo: colo.map(Mutex::new),
            ports: Mutex::new([None, None]),
            control,
            mode,
            passthrough: PassthroughCounters::default(),
            tap_error_log: Mutex::new(RateLimit::default()),
            overflow_log: Mutex::new(RateLimit::default()),
            unrouted: AtomicU64::new(0),
            rx_sync: Mutex::new(()),
        }
    }

    /// Whether the compare engine runs (two VM sockets).
    pub fn is_colo(&self) -> bool {
        self.colo.is_some()
    }

    /// The NIC name used in control events.
    pub fn nic(&self) -> &str {
        &self.nic
    }

    /// The current mode (`primary-only` in passthrough).
    pub fn mode(&self) -> Mode {
        self.mode.get()
    }

    /// Inbound frames dropped because their VM was not connected.
    pub fn unrouted(&self) -> u64 {
        self.unrouted.load(Ordering::Relaxed)
    }

    /// Makes `port` the connected VM of its role and tells the controllers.
    pub fn attach(&self, port: Arc<Port>) {
        let role = port.role();
        self.secondary_changed(role);
        lock(&self.ports)[role.index()] = Some(port);
        self.broadcast(Event::Peer { role, state: PeerState::Connected });
    }

    /// Forgets `port` (if it is still the connected VM of its role) and tells the controllers.
    pub fn detach(&self, port: &Arc<Port>) {
        let role = port.role();
        self.secondary_changed(role);
        {
            let mut ports = lock(&self.ports);
            if ports[role.index()].as_ref().is_some_and(|p| Arc::ptr_eq(p, port)) {
                ports[role.index()] = None;
            }
        }
        self.broadcast(Event::Peer { role, state: PeerState::Disconnected });
    }

    /// A VM of `role` connected or left: if it is the secondary, nothing it sends waits for a
    /// flush. (The COLO lock alone: it comes before the ports table.)
    fn secondary_changed(&self, role: Side) {
        if let (Side::Secondary, Some(colo)) = (role, &self.colo) {
            lock(colo).secondary_changed();
        }
    }

    fn broadcast(&self, event: Event) {
        if let Some(c) = &self.control {
            c.broadcast(event);
        }
    }

    /// A frame `port`'s guest transmitted (12-byte zeroed vnet header, then Ethernet).
    pub fn transmit(&self, port: &Port, frame: Frame) -> Transmit {
        let Some(colo) = &self.colo else {
            add(&self.passthrough.frames, 1);
            if let Err(e) = self.tap.write(&frame.data) {
                add(&self.passthrough.tap_errors, 1);
                if let Some(suppressed) = lock(&self.tap_error_log).check() {
                    tracing::warn!(tap = self.tap.name(), error = %e, suppressed, "cannot write a frame to the tap");
                }
            }
            return Transmit::Sent;
        };
        let mut state = lock(colo);
        let (refused, effects) = state.from_vm(port.role(), frame);
        if refused.is_some() {
            // Marked under the lock: any release that makes room comes after and sees the mark.
            port.block_tx();
        }
        self.apply(&effects);
        drop(state);
        if refused.is_some() {
            Transmit::Full
        } else {
            Transmit::Sent
        }
    }

    /// Counts a descriptor chain refused by a worker (the `rejected_input` counter).
    pub fn count_rejected(&self) {
        match &self.colo {
            Some(colo) => lock(colo).count_rejected(),
            None => add(&self.passthrough.rejected, 1),
        }
    }

    /// Acts on an engine operation's effects; called with the COLO lock held, so that events
    /// reach the controllers in the order the engine produced them, before any later reply.
    fn apply(&self, effects: &Effects) {
        for m in &effects.miscompares {
            self.broadcast(Event::miscompare(&self.nic, m));
        }
        if effects.made_room {
            for port in lock(&self.ports).iter().flatten() {
                port.unblock_tx();
            }
        }
    }

    /// Frames read from the tap (each with a 12-byte vnet header): mirrored to the VMs as the
    /// mode says, queued on their ports, and their workers woken once per batch.
    pub fn inbound(&self, frames: Vec<Vec<u8>>) {
        let mut copies: [Vec<Frame>; 2] = [Vec::new(), Vec::new()];
        match &self.colo {
            None => copies[0] = frames.into_iter().map(inbound_frame).collect(),
            Some(colo) => {
                let mut state = lock(colo);
                for data in frames {
                    let m = state.inbound(inbound_frame(data));
                    copies[0].extend(m.primary);
                    copies[1].extend(m.secondary);
                }
            }
        }
        let _sync = lock(&self.rx_sync);
        let ports = lock(&self.ports).clone();
        let mut lost = 0u64;
        // A paused SVM's copy in passive mode matters only to a failover (which would then
        // wait for the client to send again): its queue filling up is no loss to report.
        let passive = self.mode() == Mode::Passive;
        for (side, batch) in [Side::Primary, Side::Secondary].into_iter().zip(copies) {
            if batch.is_empty() {
                continue;
            }
            match &ports[side.index()] {
                Some(port) if passive && side == Side::Secondary => {
                    batch.into_iter().for_each(|f| {
                        port.queue_rx(f);
                    });
                }
                Some(port) => {
                    let dropped = batch.into_iter().map(|f| port.queue_rx(f)).filter(|ok| !ok).count();
                    lost += dropped as u64;
                    port.notify_rx();
                    if dropped > 0 {
                        if let Some(suppressed) = lock(&self.overflow_log).check() {
                            tracing::warn!(
                                vm = side.name(),
                                dropped,
                                suppressed,
                                "inbound frames dropped: the VM's RX queue is full (its ring is stopped or it posts no buffers)"
                            );
                        }
                    }
                }
                None => {
                    self.unrouted.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    lost += batch.len() as u64;
                }
            }
        }
        if let (Some(colo), true) = (&self.colo, lost > 0) {
            lock(colo).count_inbound_dropped(lost);
        }
    }

    /// The secondary's RX ring is about to restart. When that happens while the primary's is
    /// stopped, the secondary has just loaded a checkpoint of the paused primary: whatever it
    /// received before is overwritten, and from now on it must receive exactly what the
    /// primary has not consumed yet. So its inbound queue becomes a copy of the primary's
    /// (frames arriving later go to both, as always). Without this, a frame that reached the
    /// secondary's ring during the checkpoint would be lost to it (the primary's reply held
    /// until the next checkpoint), and one that reached the primary's ring before its pause
    /// but waited in the secondary's queue would reach the secondary twice.
    pub fn secondary_rx_restarting(&self, secondary: &Arc<Port>) {
        if let Some(colo) = &self.colo {
            lock(colo).secondary_rx_restarting();
        }
        if !matches!(self.mode(), Mode::Colo | Mode::Passive) {
            return;
        }
        self.secondary_queue_from_primary(secondary, false);
    }

    /// At a checkpoint's output commit (both VMs paused): a secondary whose RX has not
    /// restarted yet gets the primary's inbound queue now. The primary resumes as soon as its
    /// output is committed, while the secondary still loads, so by the time the secondary's
    /// ring restarts the primary may be consuming again and the copy there would be skipped.
    /// One whose RX restarted already was aligned then (the primary was still paused).
    fn checkpoint_aligns_secondary(&self) {
        if !matches!(self.mode(), Mode::Colo | Mode::Passive) {
            return;
        }
        let Some(secondary) = lock(&self.ports)[Side::Secondary.index()].clone() else { return };
        self.secondary_queue_from_primary(&secondary, true);
    }

    /// In passive mode the SVM stays paused after loading each checkpoint (its rings do not
    /// restart), so the same alignment happens at the checkpoint itself, while the PVM is
    /// paused: the SVM's queue then holds exactly what a failover would resume it with — the
    /// frames the PVM had not taken at the checkpoint, and (mirrored in passive mode too)
    /// every frame since. The client needs no retransmission after such a failover.
    fn passive_checkpoint(&self) {
        if self.mode() != Mode::Passive {
            return;
        }
        let Some(secondary) = lock(&self.ports)[Side::Secondary.index()].clone() else { return };
        self.secondary_queue_from_primary(&secondary, true);
    }

    /// With the primary's RX stopped (it is paused for a checkpoint): the secondary's inbound
    /// queue becomes a copy of the primary's (`if_stopped`: only while the secondary's RX is
    /// stopped too, checked under the same lock as the copy, so a ring that restarts
    /// meanwhile is never handed frames it may have taken already).
    fn secondary_queue_from_primary(&self, secondary: &Arc<Port>, if_stopped: bool) {
        let _sync = lock(&self.rx_sync);
        let Some(primary) = lock(&self.ports)[Side::Primary.index()].clone() else { return };
        if !primary.rx_stopped() || (if_stopped && !secondary.rx_stopped()) {
            return;
        }
        let frames = primary.pending_copy();
        let copied = frames.len();
        let replaced = secondary.replace_pending(frames);
        if copied > 0 {
            secondary.notify_rx();
        }
        tracing::debug!(copied, replaced, "checkpoint: the secondary's inbound queue now mirrors the primary's");
    }

    /// Carries out a controller's command and hands the reply to `reply`. In COLO mode the reply
    /// is sent while the engine is still locked, so no event caused by later traffic can reach
    /// a controller ahead of it (a `miscompare` raised after a flush must follow its
    /// `flushed`).
    pub fn execute(&self, command: Command, reply: &mut dyn FnMut(Event)) {
        let Some(colo) = &self.colo else {
            reply(self.execute_passthrough(command));
            return;
        };
        if matches!(command, Command::Checkpoint { .. }) {
            // Before the COLO lock (queueing inbound frames takes the RX lock before it).
            self.checkpoint_aligns_secondary();
        }
        let mut state = lock(colo);
        let checkpoint = matches!(command, Command::Checkpoint { .. } | Command::Mode { mode: Mode::Passive, .. });
        let event = match command {
            Command::Checkpoint { id } => {
                // Released frames are on the tap when this returns (written by the sink).
                let (summary, effects) = state.checkpoint();
                self.apply(&effects);
                Event::Flushed { id, released: summary.released, dropped: summary.dropped }
            }
            Command::Mode { id, mode } => {
                let effects = state.set_mode(mode);
                self.mode.set(mode);
                self.apply(&effects);
                Event::ModeSet { id, mode }
            }
            Command::QueryStats { id } => Event::Stats { id, stats: Box::new(state.stats()) },
            other => other.refused_by_pair(),
        };
        reply(event);
        // Not under the COLO lock: queueing inbound frames takes the RX lock before it.
        drop(state);
        if checkpoint {
            self.passive_checkpoint();
        }
    }

    /// Commands in passthrough: nothing is ever held (a checkpoint flushes nothing), there is
    /// no secondary (only `primary-only`, which is what passthrough does, is accepted), and the
    /// counters are the frames passed to the tap.
    fn execute_passthrough(&self, command: Command) -> Event {
        match command {
            Command::Checkpoint { id } => Event::Flushed { id, released: 0, dropped: 0 },
            Command::Mode { id, mode: Mode::PrimaryOnly } => Event::ModeSet { id, mode: Mode::PrimaryOnly },
            Command::Mode { id, mode } => Event::Error {
                id: Some(id),
                message: format!(
                    "mode '{}' needs a secondary VM: this backend runs in passthrough (no --secondary-socket)",
                    mode.name()
                ),
            },
            Command::QueryStats { id } => {
                let frames = self.passthrough.frames.load(Ordering::Relaxed);
                let stats = Stats {
                    frames_primary: frames,
                    released: frames,
                    rejected_input: self.passthrough.rejected.load(Ordering::Relaxed),
                    ..Stats::default()
                };
                Event::Stats { id, stats: Box::new(stats) }
            }
            other => other.refused_by_pair(),
        }
    }

    /// Runs the engine's due timers; returns when they are next due (`None`: nothing held).
    pub fn poll_timers(&self) -> Option<Instant> {
        let colo = self.colo.as_ref()?;
        let mut state = lock(colo);
        let effects = state.poll_timers();
        self.apply(&effects);
        state.next_deadline()
    }

    /// Released frames the tap refused.
    pub fn tap_errors(&self) -> u64 {
        match &self.colo {
            Some(colo) => lock(colo).tap_errors(),
            None => self.passthrough.tap_errors.load(Ordering::Relaxed),
        }
    }

    /// Writes out whatever the capture still buffers (at shutdown).
    pub fn flush_capture(&self) {
        if let Some(colo) = &self.colo {
            lock(colo).flush_capture();
        }
    }
}

impl Router for Hub {
    fn attach(&self, port: Arc<Port>) {
        Hub::attach(self, port)
    }
    fn detach(&self, port: &Arc<Port>) {
        Hub::detach(self, port)
    }
    fn transmit(&self, port: &Port, frame: Frame) -> Transmit {
        Hub::transmit(self, port, frame)
    }
    fn count_rejected(&self) {
        Hub::count_rejected(self)
    }
    fn rx_restarting(&self, port: &Arc<Port>) {
        if port.role() == Side::Secondary {
            self.secondary_rx_restarting(port);
        }
    }
    fn rx_stopped(&self, port: &Arc<Port>) {
        if let (Side::Secondary, Some(colo)) = (port.role(), &self.colo) {
            lock(colo).secondary_rx_stopped();
        }
    }
    fn inbound(&self, frames: Vec<Vec<u8>>) {
        Hub::inbound(self, frames)
    }
    fn execute(&self, command: Command, reply: &mut dyn FnMut(Event)) {
        Hub::execute(self, command, reply)
    }
    fn has_timers(&self) -> bool {
        self.is_colo()
    }
    fn poll_timers(&self) -> Option<Instant> {
        Hub::poll_timers(self)
    }
    fn mode(&self) -> Mode {
        Hub::mode(self)
    }
    fn flush_capture(&self) {
        Hub::flush_capture(self)
    }
    fn unrouted(&self) -> u64 {
        Hub::unrouted(self)
    }
    fn tap_errors(&self) -> u64 {
        Hub::tap_errors(self)
    }
    fn ports(&self) -> Vec<Arc<Port>> {
        lock(&self.ports).iter().flatten().cloned().collect()
    }
    fn hold_histogram(&self) -> Option<prometheus::Histogram> {
        self.colo.as_ref().map(|c| lock(c).hold_histogram())
    }
}

/// An inbound frame as the VMs get it: the kernel's vnet header replaced by zeros. With no
/// offloads on the tap it can only say "checksum already valid", which guests that did not
/// negotiate GUEST_CSUM must not be told — and both VMs must get identical bytes.
pub(crate) fn inbound_frame(mut data: Vec<u8>) -> Frame {
    let hdr = VNET_HDR_LEN.min(data.len());
    data[..hdr].fill(0);
    Frame::with_vnet_hdr(data, VNET_HDR_LEN)
}
