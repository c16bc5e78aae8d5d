//! Where the secondary VM's output stands against the checkpoints, on one host.
//!
//! At a checkpoint the secondary's colo-vmm stops the SVM's rings, and once it holds the whole
//! checkpoint it replies `vmstate-received`, loads it and restarts the rings (its vCPUs wait
//! for the primary's `committed`, sent after the flush). The primary's colo-vmm tells this
//! process to flush only when it has heard that reply, so frames already on the restored TX
//! ring may leave before the flush: the flush would drop those frames with the SVM's
//! output from before the checkpoint, and the SVM's later frames would be compared with the
//! PVM's one step behind (a miscompare). So from the SVM's receive-ring restart until the flush
//! its frames wait on its TX ring (refused like a full queue); the flush lets them go.
//!
//! Only a ring stopped in `colo` or `passive` mode counts, and any mode change ends the wait, so
//! a secondary serving alone after a failover is never held back.

/// The state of the cut (see the module's comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecondaryCut {
    /// The SVM's frames are compared as they come.
    #[default]
    Open,
    /// The SVM's receive ring stopped for a checkpoint that has not been flushed yet.
    Stopped,
    /// The SVM runs again from a checkpoint not flushed yet: its frames wait for the flush.
    WaitsForFlush,
}

impl SecondaryCut {
    /// The SVM's receive ring stopped (it paused); `comparing`: the mode is `colo` or `passive`.
    pub fn rx_stopped(&mut self, comparing: bool) {
        if comparing {
            *self = SecondaryCut::Stopped;
        }
    }

    /// The SVM's receive ring is about to run again.
    pub fn rx_restarting(&mut self) {
        if *self == SecondaryCut::Stopped {
            *self = SecondaryCut::WaitsForFlush;
        }
    }

    /// A checkpoint's flush, a mode change, or the SVM connected or left: compare as frames come.
    pub fn open(&mut self) {
        *self = SecondaryCut::Open;
    }

    /// Whether the SVM's frames must wait for the flush.
    pub fn holds(self) -> bool {
        self == SecondaryCut::WaitsForFlush
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_before_the_flush_holds_until_it_and_one_after_it_does_not() {
        let mut cut = SecondaryCut::default();
        cut.rx_stopped(true);
        assert!(!cut.holds(), "paused: nothing to hold");
        cut.rx_restarting();
        assert!(cut.holds(), "loaded before the flush");
        cut.open();
        assert!(!cut.holds());
        // Flushed first, then the SVM resumes: nothing waits.
        cut.rx_stopped(true);
        cut.open();
        cut.rx_restarting();
        assert!(!cut.holds());
    }

    #[test]
    fn outside_colo_and_passive_nothing_is_held() {
        let mut cut = SecondaryCut::default();
        cut.rx_stopped(false);
        cut.rx_restarting();
        assert!(!cut.holds(), "a first start, or a secondary serving alone");
    }
}
