//! Hybrid mode (docs/colo.md, after David Gilbert's patches): when checkpoints come too often,
//! stop comparing and checkpoint periodically (passive, Remus-style), then try COLO again.
//!
//! Pure decision logic, driven by the controller with measured intervals, so it can be tested
//! against the algorithm with made-up times.

use std::time::Duration;

use serde::Serialize;

use super::params::{ms, ColoParams};

/// Which kind of checkpoint, and the mode until the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointKind {
    /// COLO: the secondary runs and outputs are compared.
    Colo,
    /// Passive: the secondary stays paused, all primary output waits for the next checkpoint.
    Passive,
}

/// The controller's hybrid state.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Hybrid {
    /// Passive checkpoints still to do (0 = COLO).
    pub passive_left: u32,
    /// Weighted mean COLO interval, ms.
    pub mean_ms: f64,
    /// COLO cycles counted into the mean since it was last reset.
    pub count: u32,
}

/// What one cycle decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// This checkpoint's kind.
    pub kind: CheckpointKind,
    /// The mode changed with it (tell the compare processes before resuming).
    pub switched: bool,
}

/// Cycles before the mean is trusted.
const WARM_UP: u32 = 5;

impl Default for Hybrid {
    fn default() -> Self {
        Hybrid { passive_left: 0, mean_ms: 0.0, count: 0 }
    }
}

impl Hybrid {
    /// The current mode.
    pub fn mode(&self) -> CheckpointKind {
        if self.passive_left > 0 {
            CheckpointKind::Passive
        } else {
            CheckpointKind::Colo
        }
    }

    /// How long this cycle may run before a checkpoint is due.
    pub fn limit(&self, p: &ColoParams) -> Duration {
        match self.mode() {
            CheckpointKind::Passive => ms(p.passive_time),
            CheckpointKind::Colo => ms(p.max_time),
        }
    }

    /// A cycle ended after `interval` of running time: update the mean and decide the
    /// checkpoint's kind.
    pub fn cycle(&mut self, interval: Duration, p: &ColoParams) -> Decision {
        let before = self.mode();
        self.mean_ms = 0.7 * self.mean_ms + 0.3 * interval.as_secs_f64() * 1000.0;
        self.count += 1;
        let kind = if self.passive_left > 0 {
            self.passive_left -= 1;
            if self.passive_left > 0 {
                CheckpointKind::Passive
            } else {
                // Back to COLO, judging it afresh.
                self.mean_ms = 0.0;
                self.count = 0;
                CheckpointKind::Colo
            }
        } else if self.count < WARM_UP {
            CheckpointKind::Colo
        } else if self.mean_ms < p.passive_limit as f64 {
            self.passive_left = p.passive_count;
            CheckpointKind::Passive
        } else {
            CheckpointKind::Colo
        };
        Decision { kind, switched: kind != before }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(h: &mut Hybrid, p: &ColoParams, intervals: &[u64]) -> Vec<CheckpointKind> {
        intervals.iter().map(|&i| h.cycle(ms(i), p).kind).collect()
    }

    use CheckpointKind::{Colo, Passive};

    #[test]
    fn five_short_intervals_go_passive() {
        let p = ColoParams::default();
        let mut h = Hybrid::default();
        assert_eq!(run(&mut h, &p, &[100; 5]), vec![Colo, Colo, Colo, Colo, Passive]);
        assert_eq!(h.passive_left, 100);
        assert!((h.mean_ms - 83.193).abs() < 0.01, "mean {}", h.mean_ms);
        assert_eq!(h.limit(&p), ms(250), "passive cycles last passive-time");
    }

    #[test]
    fn five_long_intervals_stay_colo() {
        let p = ColoParams::default();
        let mut h = Hybrid::default();
        assert_eq!(run(&mut h, &p, &[500; 5]), vec![Colo; 5]);
        assert!((h.mean_ms - 415.965).abs() < 0.01, "five equal intervals L give about 0.832 L");
        assert_eq!(h.limit(&p), ms(10_000));
    }

    #[test]
    fn warm_up_ignores_the_first_four_cycles() {
        let p = ColoParams::default();
        let mut h = Hybrid::default();
        assert_eq!(run(&mut h, &p, &[1, 1, 1, 1]), vec![Colo; 4], "too few cycles to judge");
        assert_eq!(h.cycle(ms(1), &p).kind, Passive);
    }

    #[test]
    fn threshold_is_about_481_ms_for_equal_intervals() {
        let p = ColoParams::default();
        let mut h = Hybrid::default();
        assert_eq!(run(&mut h, &p, &[480; 5])[4], Passive);
        let mut h = Hybrid::default();
        assert_eq!(run(&mut h, &p, &[482; 5])[4], Colo);
    }

    #[test]
    fn passive_counts_down_then_returns_to_colo_with_a_fresh_mean() {
        let p = ColoParams { passive_count: 3, ..ColoParams::default() };
        let mut h = Hybrid::default();
        run(&mut h, &p, &[100; 5]);
        assert_eq!(h.passive_left, 3);
        let d = h.cycle(ms(250), &p);
        assert_eq!((d.kind, d.switched), (Passive, false));
        assert_eq!(h.cycle(ms(250), &p).kind, Passive);
        let back = h.cycle(ms(250), &p);
        assert_eq!((back.kind, back.switched), (Colo, true), "the passive count ran out");
        assert_eq!((h.mean_ms, h.count), (0.0, 0), "the mean starts again");
        // Still divergent: after a new warm-up it goes passive again.
        assert_eq!(run(&mut h, &p, &[100; 5]), vec![Colo, Colo, Colo, Colo, Passive]);
    }

    #[test]
    fn switching_is_reported_once() {
        let p = ColoParams::default();
        let mut h = Hybrid::default();
        let d: Vec<bool> = (0..7).map(|_| h.cycle(ms(50), &p).switched).collect();
        assert_eq!(d, vec![false, false, false, false, true, false, false]);
    }
}
