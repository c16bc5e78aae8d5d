//! Distributions of checkpoints since the VMM started — pause, pages, bytes — in fixed
//! buckets, for the metrics endpoint (`query-colo-status` keeps the last values and
//! percentiles of a recent window; Prometheus needs counts since start).

use std::time::Duration;

use colo_proxy::metrics::Histogram;

/// Pause bounds, seconds: COLO pauses are milliseconds; a large dirty set or a slow link
/// takes longer.
pub static PAUSE_BUCKETS: [f64; 15] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Page-count bounds (4 KiB pages): powers of 4 up to 4 GiB of guest memory.
pub static PAGE_BUCKETS: [f64; 12] =
    [1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0];
/// Byte bounds: the page bounds times a page, from one page (device state alone is smaller).
pub static BYTE_BUCKETS: [f64; 13] = [
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
    17179869184.0,
];

/// The checkpoint histograms.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointHistograms {
    /// Pause (primary: its VM paused; secondary: its VM loading), seconds.
    pub pause_seconds: Histogram,
    /// Pages carried.
    pub pages: Histogram,
    /// Bytes carried (pages and device state).
    pub bytes: Histogram,
}

impl Default for CheckpointHistograms {
    fn default() -> Self {
        CheckpointHistograms {
            pause_seconds: Histogram::new(&PAUSE_BUCKETS),
            pages: Histogram::new(&PAGE_BUCKETS),
            bytes: Histogram::new(&BYTE_BUCKETS),
        }
    }
}

impl CheckpointHistograms {
    /// Counts one checkpoint.
    pub fn record(&mut self, pause: Duration, pages: u64, bytes: u64) {
        self.pause_seconds.observe(pause.as_secs_f64());
        self.pages.observe(pages as f64);
        self.bytes.observe(bytes as f64);
    }
}
