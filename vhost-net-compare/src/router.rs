//! What the VM connections, the uplink and the control thread route frames and commands
//! through: the [`crate::hub::Hub`] when one backend serves both VMs of a pair (or one VM as a
//! passthrough), the [`crate::replica::ReplicaRouter`] when it serves one VM whose role is set
//! at run time (two hosts).

use std::sync::Arc;
use std::time::Instant;

use colo_proxy::compare::{Mode, Stats};
use colo_proxy::control::{Command, Event};
use colo_proxy::link::FrameLinkWatch;
use colo_proxy::replica::Role;
use colo_proxy::Frame;

use crate::port::Port;

/// What became of a TX frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Transmit {
    /// Handed on (to the tap, the engine or the frame link).
    Sent,
    /// No room now (a full compare queue, or no credit on the frame link): leave the descriptor
    /// on the ring; the port was marked blocked and will be signalled when room appears.
    Full,
}

/// The router behind a backend.
pub trait Router: Send + Sync {
    /// Makes `port` the connected VM of its role.
    fn attach(&self, port: Arc<Port>);
    /// Forgets `port` (if it is still the connected VM of its role).
    fn detach(&self, port: &Arc<Port>);
    /// A frame `port`'s guest transmitted (12-byte zeroed vnet header, then Ethernet).
    fn transmit(&self, port: &Port, frame: Frame) -> Transmit;
    /// Counts a descriptor chain refused by a worker.
    fn count_rejected(&self);
    /// `port`'s RX ring is about to (re)start (a frontend sent its memory table).
    fn rx_restarting(&self, port: &Arc<Port>);
    /// `port`'s RX ring stopped (GET_VRING_BASE: its VM paused). Called with the backend
    /// locked, so no worker is delivering meanwhile.
    fn rx_stopped(&self, _port: &Arc<Port>) {}
    /// Frames read from the tap (each with a 12-byte vnet header).
    fn inbound(&self, frames: Vec<Vec<u8>>);
    /// Carries out a controller's command; the reply goes to `reply`.
    fn execute(&self, command: Command, reply: &mut dyn FnMut(Event));
    /// Whether there are timers to run (a compare engine).
    fn has_timers(&self) -> bool;
    /// Runs due timers; returns when they are next due.
    fn poll_timers(&self) -> Option<Instant>;
    /// The compare mode (for logs).
    fn mode(&self) -> Mode;
    /// Writes out what the capture still buffers.
    fn flush_capture(&self);
    /// Counters for the shutdown log.
    fn summary(&self) -> Stats {
        let mut stats = Stats::default();
        self.execute(Command::QueryStats { id: 0 }, &mut |event| {
            if let Event::Stats { stats: s, .. } = event {
                stats = *s;
            }
        });
        stats
    }
    /// Inbound frames dropped because no VM was there to take them.
    fn unrouted(&self) -> u64;
    /// Frames the tap refused.
    fn tap_errors(&self) -> u64;
    /// The connected VMs' ports (for the metrics endpoint).
    fn ports(&self) -> Vec<Arc<Port>>;
    /// A one-VM backend's role and its frame link, if it has one (for the metrics endpoint).
    fn replica_state(&self) -> Option<(Role, Option<FrameLinkWatch>)> {
        None
    }
    /// The compare engine's hold-time histogram, if there is an engine (for the metrics
    /// endpoint: a live handle).
    fn hold_histogram(&self) -> Option<prometheus::Histogram>;
}
