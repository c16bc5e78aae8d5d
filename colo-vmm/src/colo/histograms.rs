//! Distributions of checkpoints since the VMM started — pause, pages, disk blocks, bytes — in
//! fixed buckets, for the metrics endpoint (`query-colo-status` keeps the last values and
//! percentiles of a recent window; Prometheus needs counts since start). The `prometheus`
//! crate's histograms: a copy of the status shares them, and the metrics thread reads them
//! without the status lock.

use std::time::Duration;

use colo_proxy::metrics::histogram;

/// Pause bounds, seconds: COLO pauses are milliseconds; a large dirty set or a slow link
/// takes longer.
pub const PAUSE_BUCKETS: [f64; 15] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Count bounds for 4 KiB pages and 4 KiB disk blocks: 0 (none), then powers of 4 up to
/// 16 GiB.
pub const COUNT_BUCKETS: [f64; 14] =
    [0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0];
/// Byte bounds: powers of 4 from 1 KiB (device state alone) to 16 GiB.
pub const BYTE_BUCKETS: [f64; 13] = [
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
#[derive(Debug, Clone)]
pub struct CheckpointHistograms {
    /// Pause (primary: its VM paused; secondary: its VM loading), seconds.
    pub pause_seconds: prometheus::Histogram,
    /// Pages carried.
    pub pages: prometheus::Histogram,
    /// Disk blocks carried (primary: sent; secondary: written into the image).
    pub blocks: prometheus::Histogram,
    /// Bytes carried (pages, blocks and device state).
    pub bytes: prometheus::Histogram,
}

impl Default for CheckpointHistograms {
    fn default() -> Self {
        CheckpointHistograms {
            pause_seconds: histogram(&PAUSE_BUCKETS),
            pages: histogram(&COUNT_BUCKETS),
            blocks: histogram(&COUNT_BUCKETS),
            bytes: histogram(&BYTE_BUCKETS),
        }
    }
}

impl CheckpointHistograms {
    /// Counts one checkpoint (its blocks come with [`record_blocks`](Self::record_blocks)).
    pub fn record(&self, pause: Duration, pages: u64, bytes: u64) {
        self.pause_seconds.observe(pause.as_secs_f64());
        self.pages.observe(pages as f64);
        self.bytes.observe(bytes as f64);
    }

    /// Counts the disk blocks of the checkpoint just recorded.
    pub fn record_blocks(&self, blocks: u64) {
        self.blocks.observe(blocks as f64);
    }
}
