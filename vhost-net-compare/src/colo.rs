//! The state both VMs share in COLO mode, kept behind one mutex by the [`crate::hub::Hub`]: the
//! colo-proxy [`Proxy`] (compare engine, TCP rewriter, inbound mirroring), the tap writer, and
//! the capture file.
//!
//! Released frames are written to the tap from inside the engine's sink, under the same lock
//! that orders every engine operation; so the order of releases is the order on the wire, and
//! when a checkpoint's flush returns, every frame it released has been handed to the kernel —
//! which is what allows the `flushed` reply right after it.

use std::sync::Arc;
use std::time::Instant;

use colo_proxy::capture::Capture;
use colo_proxy::compare::{Config, Disposal, FlushSummary, Miscompare, Mode, Push, Sink, Stats, Verdict};
use colo_proxy::proxy::{Mirrored, Proxy};
use colo_proxy::{Frame, MonotonicClock, Side};

use crate::ratelimit::RateLimit;
use crate::secondary_cut::SecondaryCut;
use crate::tap::Tap;

/// What an engine operation did besides consuming its input, for the caller to act on while it
/// still holds the lock.
#[derive(Debug, Default)]
pub struct Effects {
    /// A frame left a compare queue (or the mode changed): TX rings waiting for room may retry.
    pub made_room: bool,
    /// Checkpoint requests to report on the control socket.
    pub miscompares: Vec<Miscompare>,
}

/// The compare engine with its output.
pub struct ColoState {
    proxy: Proxy<MonotonicClock>,
    tap: Arc<Tap>,
    capture: Option<Capture>,
    captured: u64,
    tap_errors: u64,
    tap_error_log: RateLimit,
    secondary_cut: SecondaryCut,
}

/// The engine's sink: released frames to the tap, every disposal to the capture.
struct Outlet<'a> {
    tap: &'a Tap,
    capture: Option<&'a mut Capture>,
    effects: &'a mut Effects,
    tap_errors: &'a mut u64,
    tap_error_log: &'a mut RateLimit,
}

impl Sink for Outlet<'_> {
    fn frame(&mut self, frame: Frame, d: Disposal) {
        if let Some(c) = self.capture.as_deref_mut() {
            c.record(&frame, &d);
        }
        if d.verdict == Verdict::Released {
            // Frames from the guests keep their (zeroed) 12-byte header, which the tap expects.
            if let Err(e) = self.tap.write(&frame.data) {
                *self.tap_errors += 1;
                if let Some(suppressed) = self.tap_error_log.check() {
                    tracing::warn!(tap = self.tap.name(), error = %e, suppressed, "cannot write a released frame to the tap");
                }
            }
        }
    }

    fn miscompare(&mut self, event: &Miscompare) {
        self.effects.miscompares.push(event.clone());
    }
}

impl ColoState {
    /// An engine with `config`, starting in `mode`, releasing to `tap`.
    pub fn new(config: Config, mode: Mode, tap: Arc<Tap>, capture: Option<Capture>) -> ColoState {
        let mut state = ColoState {
            proxy: Proxy::new(config, MonotonicClock::new()),
            tap,
            capture,
            captured: 0,
            tap_errors: 0,
            tap_error_log: RateLimit::default(),
            secondary_cut: SecondaryCut::default(),
        };
        // The hub aligns the secondary's queue at each passive checkpoint (`Hub::execute`).
        state.proxy.set_passive_mirror(true);
        // Nothing is held yet, so this only sets the mode.
        state.set_mode(mode);
        state
    }

    /// Runs `op` on the proxy with a fresh sink; returns its result and effects.
    fn with_sink<R>(&mut self, op: impl FnOnce(&mut Proxy<MonotonicClock>, &mut Outlet<'_>) -> R) -> (R, Effects) {
        let mut effects = Effects::default();
        let result = {
            let mut outlet = Outlet {
                tap: &self.tap,
                capture: self.capture.as_mut(),
                effects: &mut effects,
                tap_errors: &mut self.tap_errors,
                tap_error_log: &mut self.tap_error_log,
            };
            op(&mut self.proxy, &mut outlet)
        };
        self.flush_capture();
        (result, effects)
    }

    /// A frame `side`'s guest transmitted. `Some(frame)` gives it back when its compare queue is
    /// full (backpressure: the caller leaves the descriptor on the ring).
    pub fn from_vm(&mut self, side: Side, frame: Frame) -> (Option<Frame>, Effects) {
        if side == Side::Secondary && self.secondary_cut.holds() {
            // Loaded from a checkpoint not flushed yet: after the flush (which makes room).
            return (Some(frame), Effects::default());
        }
        let before = self.proxy.engine().held();
        let (pushed, mut effects) = self.with_sink(|proxy, outlet| match side {
            Side::Primary => proxy.from_primary(frame, outlet),
            Side::Secondary => proxy.from_secondary(frame, outlet),
        });
        // Room appears only where a queue got shorter; a frame that was queued and matched at
        // once leaves the counts as they were.
        let after = self.proxy.engine().held();
        effects.made_room = after[0] < before[0] || after[1] < before[1];
        match pushed {
            Push::Accepted => (None, effects),
            Push::Full(frame) => (Some(frame), effects),
        }
    }

    /// Counts inbound frames a VM could not take (its RX queue full, or it is not connected).
    pub fn count_inbound_dropped(&mut self, frames: u64) {
        self.proxy.count_inbound_dropped(frames);
    }

    /// An inbound frame from the tap: the copies each VM gets in the current mode (the
    /// secondary's rewritten).
    pub fn inbound(&mut self, frame: Frame) -> Mirrored {
        self.proxy.inbound(frame)
    }

    /// The checkpoint's flush (and rewriter reset). Every released frame has been written to
    /// the tap when this returns.
    pub fn checkpoint(&mut self) -> (FlushSummary, Effects) {
        let (summary, mut effects) = self.with_sink(|proxy, outlet| proxy.checkpoint(outlet));
        self.secondary_cut.open();
        effects.made_room = true;
        (summary, effects)
    }

    /// Switches mode (releasing or dropping held frames as the mode says).
    pub fn set_mode(&mut self, mode: Mode) -> Effects {
        let ((), mut effects) = self.with_sink(|proxy, outlet| proxy.set_mode(mode, outlet));
        self.secondary_cut.open();
        // A blocked side may now pass without queueing at all.
        effects.made_room = true;
        effects
    }

    /// The SVM's receive ring stopped (it paused, for a checkpoint in `colo` or `passive`).
    pub fn secondary_rx_stopped(&mut self) {
        let comparing = matches!(self.mode(), Mode::Colo | Mode::Passive);
        self.secondary_cut.rx_stopped(comparing);
    }

    /// The SVM's receive ring is about to run again: if the checkpoint it loaded has not been
    /// flushed yet, its frames wait for the flush ([`SecondaryCut`]).
    pub fn secondary_rx_restarting(&mut self) {
        self.secondary_cut.rx_restarting();
    }

    /// The SVM connected or left: nothing it sends waits for a flush.
    pub fn secondary_changed(&mut self) {
        self.secondary_cut.open();
    }

    /// Runs due timers (held-frame timeouts).
    pub fn poll_timers(&mut self) -> Effects {
        self.with_sink(|proxy, outlet| proxy.poll_timers(outlet)).1
    }

    /// When [`ColoState::poll_timers`] next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.proxy.next_deadline().map(|t| self.proxy.engine().clock().instant(t))
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.proxy.mode()
    }

    /// Engine counters.
    pub fn stats(&self) -> Stats {
        self.proxy.stats()
    }

    /// The engine's hold-time histogram (a live handle, for the metrics endpoint).
    pub fn hold_histogram(&self) -> prometheus::Histogram {
        self.proxy.engine().hold_histogram()
    }

    /// Counts a descriptor chain refused before it reached the engine (`rejected_input`).
    pub fn count_rejected(&mut self) {
        self.proxy.engine_mut().count_rejected_input();
    }

    /// Released frames the tap refused.
    pub fn tap_errors(&self) -> u64 {
        self.tap_errors
    }

    /// Makes recorded frames readable in the capture file (only when something was recorded,
    /// so an idle capture costs no system call).
    pub fn flush_capture(&mut self) {
        if let Some(c) = self.capture.as_mut() {
            if c.frames() != self.captured {
                self.captured = c.frames();
                c.flush();
            }
        }
    }
}
