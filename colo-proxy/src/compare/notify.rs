//! Rate limiting of checkpoint requests.
//!
//! QEMU sends a request for every inconsistency it sees, thousands per checkpoint under load.
//! Ours: the first inconsistency after a flush is reported at once; later ones are counted and
//! reported with the next event. If no flush follows within the reminder period (the controller
//! may have missed the event, or connected later), the next inconsistency is reported again.

use std::time::Duration;

use crate::clock::Timestamp;

/// Decides which inconsistencies become events.
#[derive(Debug)]
pub(crate) struct Notifier {
    reported_at: Option<Timestamp>,
    suppressed: u64,
    reminder: Duration,
}

impl Notifier {
    pub fn new(reminder: Duration) -> Notifier {
        Notifier { reported_at: None, suppressed: 0, reminder }
    }

    /// An inconsistency happened at `now`. Returns `Some(suppressed)` when it must be reported,
    /// with the number of inconsistencies counted but not reported since the last report.
    pub fn inconsistency(&mut self, now: Timestamp) -> Option<u64> {
        let due = match self.reported_at {
            None => true,
            Some(at) => now.since(at) >= self.reminder,
        };
        if due {
            self.reported_at = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// A flush happened: the next inconsistency is reported at once.
    pub fn flushed(&mut self) {
        self.reported_at = None;
    }

    pub fn set_reminder(&mut self, reminder: Duration) {
        self.reminder = reminder;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn first_after_flush_is_reported_and_later_ones_counted() {
        let mut n = Notifier::new(Duration::from_secs(3));
        assert_eq!(n.inconsistency(Timestamp(0)), Some(0));
        assert_eq!(n.inconsistency(Timestamp(MS)), None);
        assert_eq!(n.inconsistency(Timestamp(2 * MS)), None);
        n.flushed();
        assert_eq!(n.inconsistency(Timestamp(3 * MS)), Some(2));
        assert_eq!(n.inconsistency(Timestamp(4 * MS)), None);
    }

    #[test]
    fn reminder_after_period_without_flush() {
        let mut n = Notifier::new(Duration::from_millis(100));
        assert_eq!(n.inconsistency(Timestamp(0)), Some(0));
        assert_eq!(n.inconsistency(Timestamp(99 * MS)), None);
        assert_eq!(n.inconsistency(Timestamp(100 * MS)), Some(1));
    }
}
