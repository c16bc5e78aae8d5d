//! What `query-colo-status` reports: role, mode, hybrid state, checkpoint counters by kind and
//! trigger, pause times (last, p50, p99), pages and bytes per checkpoint, the last failover.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::hybrid::{CheckpointKind, Hybrid};

/// This VMM's part in COLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Not in COLO.
    #[default]
    None,
    /// Runs the PVM and the checkpoint controller.
    Primary,
    /// Runs the SVM and the RAM cache.
    Secondary,
}

/// Where COLO stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Not started.
    #[default]
    Inactive,
    /// The initial migration is running.
    Starting,
    /// Checkpointing: see `mode`.
    Running,
    /// The peer is gone; this side runs alone.
    FailedOver,
    /// COLO ended with an error and this side (a secondary) waits with its VM paused at the last
    /// complete checkpoint for a failover decision (`lost-heartbeat`).
    Stopped,
}

/// Why a checkpoint happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// A compare process reported an inconsistency (its reason).
    Miscompare(String),
    /// `max-time` passed without one.
    Periodic,
    /// A passive-mode interval ended.
    Passive,
    /// A user asked for it.
    User,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Miscompare(r) => write!(f, "miscompare:{r}"),
            Trigger::Periodic => f.write_str("periodic"),
            Trigger::Passive => f.write_str("passive"),
            Trigger::User => f.write_str("user"),
        }
    }
}

impl Trigger {
    /// Reads the form [`Display`](std::fmt::Display) writes; anything else counts as periodic.
    pub fn parse(s: &str) -> Trigger {
        match s {
            "passive" => Trigger::Passive,
            "user" => Trigger::User,
            _ => match s.strip_prefix("miscompare:") {
                Some(r) => Trigger::Miscompare(r.to_string()),
                None => Trigger::Periodic,
            },
        }
    }
}

/// Checkpoint counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Counters {
    /// All checkpoints.
    pub total: u64,
    /// COLO checkpoints (the secondary resumed).
    pub colo: u64,
    /// Passive checkpoints (the secondary stayed paused).
    pub passive: u64,
    /// Triggered by miscompares, by reason.
    pub miscompare: BTreeMap<String, u64>,
    /// Triggered by `max-time`.
    pub periodic: u64,
    /// Triggered by the passive interval.
    pub passive_interval: u64,
    /// Requested by a user.
    pub user: u64,
    /// Switches between COLO and passive.
    pub mode_switches: u64,
}

/// A failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Failover {
    /// When (ms since the Unix epoch).
    pub at_unix_ms: u64,
    /// Which side survived.
    pub survivor: Role,
    /// What was detected.
    pub reason: String,
    /// What the survivor resumed from.
    pub resumed_from: String,
}

/// One checkpoint, as the recent history lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckpointRecord {
    /// Its number (primary) or position (secondary), from 1.
    pub seq: u64,
    /// When it ended (ms since the Unix epoch).
    pub at_unix_ms: u64,
    /// Its kind (the mode until the next one).
    pub kind: CheckpointKind,
    /// What triggered it (`periodic`, `passive`, `user`, `miscompare:REASON`).
    pub trigger: String,
    /// The running interval it ended (primary), ms.
    pub interval_ms: f64,
    /// The pause, ms.
    pub pause_ms: f64,
    /// Pages it carried.
    pub pages: u64,
    /// Disk blocks it carried.
    pub blocks: u64,
}

/// The disk's part of checkpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskCounters {
    /// Blocks in the last checkpoint (primary: sent; secondary: written into the image,
    /// background ones included).
    pub blocks_last: u64,
    /// Mean blocks per checkpoint.
    pub blocks_mean: f64,
    /// Blocks over all checkpoints.
    pub blocks_total: u64,
    /// Blocks streamed to the secondary between checkpoints (primary).
    pub background_blocks: u64,
    /// Blocks of the SVM's own writes discarded by checkpoints (secondary).
    pub svm_blocks_discarded: u64,
}

/// Checkpoints kept in the recent history.
pub const HISTORY: usize = 256;

/// The status.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ColoStatus {
    /// Role.
    pub role: Role,
    /// State.
    pub state: State,
    /// When COLO started (ms since the Unix epoch).
    pub started_unix_ms: u64,
    /// COLO or passive (while running).
    pub mode: Option<CheckpointKind>,
    /// The hybrid controller's state (primary).
    pub hybrid: Option<Hybrid>,
    /// Checkpoints.
    pub checkpoints: Counters,
    /// Pause of the last checkpoint, ms (primary: PVM paused; secondary: SVM loading).
    pub pause_last_ms: f64,
    /// Median pause over every checkpoint since COLO started, ms (within 1%).
    pub pause_p50_ms: f64,
    /// 99th percentile pause over every checkpoint since COLO started, ms (within 1%).
    pub pause_p99_ms: f64,
    /// Pages in the last checkpoint.
    pub pages_last: u64,
    /// The disk's part: blocks per checkpoint, in the background, discarded.
    pub disk: DiskCounters,
    /// Mean pages per checkpoint.
    pub pages_mean: f64,
    /// Bytes of the last checkpoint (pages and device state).
    pub bytes_last: u64,
    /// Bytes over all checkpoints.
    pub bytes_total: u64,
    /// Pages streamed to the secondary between checkpoints (ram-background-limit).
    pub background_pages: u64,
    /// Frames the compare processes released at checkpoints (primary).
    pub frames_released: u64,
    /// Frames they dropped at checkpoints (secondary copies nobody matched).
    pub frames_dropped: u64,
    /// The last failover.
    pub last_failover: Option<Failover>,
    /// Failovers since this VMM started.
    pub failovers: u64,
    /// Why COLO ended, if it ended with an error.
    pub error: Option<String>,
    /// With an arbiter: the key's holder, this replica's lease, the last renewal.
    pub arbiter: Option<crate::arbiter::claim::ArbiterStatus>,
    /// What this replica waits for before it may serve (e.g. a failover waiting for the
    /// arbiter's key).
    pub waiting: Option<String>,
    /// Why this replica fenced itself (nothing released, its VM paused) until it holds the
    /// arbiter's key again.
    pub fenced: Option<String>,
    /// Re-protection: the last attempt to start COLO with a registered standby.
    pub reprotect: Option<String>,
    /// The last checkpoints, oldest first (at most [`HISTORY`]); a tool polling the status
    /// can follow every checkpoint by `seq`.
    pub recent: VecDeque<CheckpointRecord>,
    #[serde(skip)]
    pauses: Pauses,
    /// Pause, pages, blocks and bytes of every checkpoint since start (the metrics endpoint's).
    #[serde(skip)]
    pub histograms: super::histograms::CheckpointHistograms,
}

/// The longest pause told apart from longer ones: an hour, in µs.
const MAX_PAUSE_US: u64 = 3_600_000_000;

/// Every checkpoint's pause, in µs, as a histogram (two significant digits: a few thousand
/// counters, constant time to record, no window of samples to sort for each percentile).
#[derive(Debug, Clone)]
struct Pauses(Histogram<u64>);

impl Default for Pauses {
    fn default() -> Self {
        Pauses(Histogram::new_with_bounds(1, MAX_PAUSE_US, 2).expect("valid histogram bounds"))
    }
}

impl Pauses {
    fn record(&mut self, pause: Duration) {
        self.0.saturating_record(u64::try_from(pause.as_micros()).unwrap_or(u64::MAX));
    }

    /// The pause at quantile `q` (0..=1), ms.
    fn quantile_ms(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Now, in ms since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl ColoStatus {
    /// A copy without the recent history and the pause histogram (the metrics endpoint's: it
    /// needs neither, and the copy is made under the status lock).
    pub fn summary(&mut self) -> ColoStatus {
        let recent = std::mem::take(&mut self.recent);
        let pauses = std::mem::take(&mut self.pauses);
        let copy = self.clone();
        (self.recent, self.pauses) = (recent, pauses);
        copy
    }

    /// Records a finished checkpoint that ended a running interval of `interval`.
    pub fn checkpoint(
        &mut self,
        kind: CheckpointKind,
        trigger: &Trigger,
        interval: Duration,
        pause: Duration,
        pages: u64,
        bytes: u64,
    ) {
        self.histograms.record(pause, pages, bytes);
        let c = &mut self.checkpoints;
        c.total += 1;
        if self.recent.len() == HISTORY {
            self.recent.pop_front();
        }
        self.recent.push_back(CheckpointRecord {
            seq: c.total,
            at_unix_ms: unix_ms(),
            kind,
            trigger: trigger.to_string(),
            interval_ms: interval.as_secs_f64() * 1000.0,
            pause_ms: pause.as_secs_f64() * 1000.0,
            pages,
            blocks: 0,
        });
        match kind {
            CheckpointKind::Colo => c.colo += 1,
            CheckpointKind::Passive => c.passive += 1,
        }
        match trigger {
            Trigger::Miscompare(r) => *c.miscompare.entry(r.clone()).or_default() += 1,
            Trigger::Periodic => c.periodic += 1,
            Trigger::Passive => c.passive_interval += 1,
            Trigger::User => c.user += 1,
        }
        self.pause_last_ms = pause.as_secs_f64() * 1000.0;
        self.pauses.record(pause);
        self.pause_p50_ms = self.pauses.quantile_ms(0.5);
        self.pause_p99_ms = self.pauses.quantile_ms(0.99);
        self.pages_last = pages;
        self.pages_mean += (pages as f64 - self.pages_mean) / c.total as f64;
        self.bytes_last = bytes;
        self.bytes_total += bytes;
    }

    /// Adds the disk blocks of the checkpoint just recorded by [`ColoStatus::checkpoint`].
    pub fn checkpoint_blocks(&mut self, blocks: u64) {
        self.histograms.record_blocks(blocks);
        let d = &mut self.disk;
        d.blocks_last = blocks;
        d.blocks_total += blocks;
        d.blocks_mean += (blocks as f64 - d.blocks_mean) / self.checkpoints.total.max(1) as f64;
        if let Some(r) = self.recent.back_mut() {
            r.blocks = blocks;
        }
    }

    /// Records a failover.
    pub fn failed_over(&mut self, survivor: Role, reason: &str, resumed_from: &str) {
        let at_unix_ms = unix_ms();
        self.state = State::FailedOver;
        self.mode = None;
        self.failovers += 1;
        self.last_failover =
            Some(Failover { at_unix_ms, survivor, reason: reason.to_string(), resumed_from: resumed_from.to_string() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percentiles() {
        let mut s = ColoStatus::default();
        for i in 1..=100u64 {
            let t = if i % 2 == 0 { Trigger::Periodic } else { Trigger::Miscompare("payload".into()) };
            s.checkpoint(
                CheckpointKind::Colo,
                &t,
                Duration::from_millis(100),
                Duration::from_millis(i),
                10 * i,
                4096 * i,
            );
        }
        s.checkpoint(
            CheckpointKind::Passive,
            &Trigger::Passive,
            Duration::from_millis(250),
            Duration::from_millis(5),
            0,
            0,
        );
        assert_eq!(s.checkpoints.total, 101);
        assert_eq!((s.checkpoints.colo, s.checkpoints.passive), (100, 1));
        assert_eq!(s.checkpoints.miscompare["payload"], 50);
        assert_eq!(s.checkpoints.periodic, 50);
        assert_eq!(s.pause_last_ms, 5.0);
        assert!((s.pause_p50_ms - 50.0).abs() <= 0.5, "{}", s.pause_p50_ms);
        assert!((s.pause_p99_ms - 99.0).abs() <= 1.0, "{}", s.pause_p99_ms);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["checkpoints"]["miscompare"]["payload"], 50);
        assert!(v.get("pauses").is_none());
        assert_eq!(s.recent.len(), 101);
        assert_eq!(v["recent"][100]["trigger"], "passive");
        assert_eq!(v["recent"][100]["seq"], 101);
        for _ in 0..HISTORY {
            s.checkpoint(CheckpointKind::Colo, &Trigger::User, Duration::ZERO, Duration::ZERO, 0, 0);
        }
        assert_eq!(s.recent.len(), HISTORY, "the history is bounded");
        // A pause beyond the histogram's range counts as its largest value.
        s.checkpoint(CheckpointKind::Colo, &Trigger::User, Duration::ZERO, Duration::from_secs(7200), 0, 0);
        assert_eq!(s.pause_last_ms, 7_200_000.0);
        assert!(s.pauses.quantile_ms(1.0) >= 3_600_000.0 * 0.99);
    }

    #[test]
    fn triggers_cross_the_link_as_text() {
        for t in [Trigger::Periodic, Trigger::Passive, Trigger::User, Trigger::Miscompare("ack".into())] {
            assert_eq!(Trigger::parse(&t.to_string()), t);
        }
        assert_eq!(Trigger::parse(""), Trigger::Periodic);
    }
}
