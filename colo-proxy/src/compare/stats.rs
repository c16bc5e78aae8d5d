//! Counters of what the engine did, and the hold-time distribution of released primary frames.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Reason;

/// Upper bounds of the hold-time histogram, seconds: a matched frame waits for its twin
/// (tens of microseconds to milliseconds); in passive mode frames wait for the next checkpoint
/// (up to the passive interval); the compare timeout defaults to 3 s.
pub static HOLD_BUCKETS: [f64; 17] =
    [50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Inconsistencies by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct MiscompareCounts {
    /// Payload bytes differ.
    pub payload: u64,
    /// Frame sizes differ.
    pub size: u64,
    /// The primary acknowledged data the secondary has not acknowledged.
    pub ack: u64,
    /// A frame was held longer than `compare_timeout`.
    pub timeout: u64,
    /// A queue reached `max_queue_size` (or the flow table was full).
    pub queue_full: u64,
}

impl MiscompareCounts {
    /// Adds one for `reason`.
    pub fn count(&mut self, reason: Reason) {
        match reason {
            Reason::Payload => self.payload += 1,
            Reason::Size => self.size += 1,
            Reason::Ack => self.ack += 1,
            Reason::Timeout => self.timeout += 1,
            Reason::QueueFull => self.queue_full += 1,
        }
    }

    /// The sum over all reasons.
    pub fn total(&self) -> u64 {
        self.payload + self.size + self.ack + self.timeout + self.queue_full
    }
}

/// A snapshot of the engine's counters (the `stats` reply of docs/control.md). Missing
/// counters read as 0, so controllers and compare processes of different versions interoperate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// Frames received from the primary.
    pub frames_primary: u64,
    /// Frames received from the secondary.
    pub frames_secondary: u64,
    /// Ethernet bytes of the frames received from the primary.
    pub bytes_primary: u64,
    /// Ethernet bytes of the frames received from the secondary.
    pub bytes_secondary: u64,
    /// Frames sent out (primary frames; secondary frames in `secondary-only` mode).
    pub released: u64,
    /// Primary frames discarded (in `secondary-only` mode).
    pub dropped_primary: u64,
    /// Secondary frames discarded (matched, flushed, uncompared, or by mode).
    pub dropped_secondary: u64,
    /// Frames discarded because a queue was full and the transport could not wait.
    pub dropped_overflow: u64,
    /// Frames that are not compared (ARP, non-IP, unparsable, neighbour discovery).
    pub passed_uncompared: u64,
    /// Uncompared frames that were unparsable IP or Ethernet.
    pub malformed: u64,
    /// Inbound frames the transport could not deliver to a VM (its queue full, none connected).
    pub inbound_dropped: u64,
    /// Frames the transport refused before the engine saw them (bad framing, zero or
    /// unsupported length, garbage descriptors).
    pub rejected_input: u64,
    /// Inconsistencies by reason.
    pub miscompares: MiscompareCounts,
    /// Inconsistencies reported as events (the rest were rate-limited).
    pub notifies: u64,
    /// Flushes (checkpoints).
    pub flushes: u64,
    /// Flows in the table.
    pub flows: u64,
    /// Idle flows evicted to keep the table bounded.
    pub flows_evicted: u64,
    /// Primary frames held now.
    pub held_primary: u64,
    /// Secondary frames held now.
    pub held_secondary: u64,
    /// Longest time a primary frame was held before release, in microseconds.
    pub max_hold_us: u64,
    /// Median hold time of released primary frames, in microseconds.
    pub hold_p50_us: u64,
    /// 99th percentile hold time of released primary frames, in microseconds.
    pub hold_p99_us: u64,
    /// The routing of a one-VM backend (two-host COLO), nested as `replica`; absent for
    /// backends that serve both VMs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<crate::replica::ReplicaCounters>,
}

/// Running counters; [`Counters::snapshot`] turns them into [`Stats`].
#[derive(Debug)]
pub(crate) struct Counters {
    pub stats: Stats,
    hold_us: hdrhistogram::Histogram<u64>,
    /// The same hold times since start, in seconds, in [`HOLD_BUCKETS`] (the metrics
    /// endpoint's: lock-free, read by its thread while the engine runs).
    hold_seconds: prometheus::Histogram,
}

impl Counters {
    pub fn new() -> Counters {
        Counters {
            stats: Stats::default(),
            // 1 µs .. 1 h at 2 significant digits: a few kB, constant-time recording.
            hold_us: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds"),
            hold_seconds: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new("hold_seconds", "hold times").buckets(HOLD_BUCKETS.to_vec()),
            )
            .expect("valid histogram options"),
        }
    }

    /// Records how long a released primary frame was held.
    pub fn record_hold(&mut self, held: Duration) {
        let us = (held.as_micros() as u64).max(1);
        self.hold_us.saturating_record(us);
        self.hold_seconds.observe(held.as_secs_f64());
        self.stats.max_hold_us = self.stats.max_hold_us.max(us);
    }

    pub fn snapshot(&self, flows: usize, held: [usize; 2]) -> Stats {
        let mut s = self.stats.clone();
        s.flows = flows as u64;
        s.held_primary = held[0] as u64;
        s.held_secondary = held[1] as u64;
        if !self.hold_us.is_empty() {
            s.hold_p50_us = self.hold_us.value_at_quantile(0.5);
            s.hold_p99_us = self.hold_us.value_at_quantile(0.99);
        }
        s
    }

    /// The hold-time histogram (a handle: it keeps counting).
    pub fn hold_histogram(&self) -> prometheus::Histogram {
        self.hold_seconds.clone()
    }
}
