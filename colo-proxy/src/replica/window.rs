//! The secondary's copy of the numbered inbound frames the primary mirrored, so that when its
//! VM loads a checkpoint it can be given exactly the frames the primary VM had not taken at
//! its pause (those numbered from the primary's mark on).
//!
//! Only the frames pending in the primary's queue at a pause are ever needed again, and the
//! primary takes frames within microseconds, so a bounded window of the newest is enough: the
//! oldest give way first (counted), and a frame lost so is at worst a miscompare.

use std::collections::VecDeque;

use crate::frame::Frame;

/// Numbered inbound frames, oldest first.
#[derive(Debug)]
pub struct InboundWindow {
    frames: VecDeque<(u64, Frame)>,
    bytes: usize,
    limit: usize,
    /// Frames dropped to stay within the limit.
    pub dropped: u64,
}

impl InboundWindow {
    /// A window of at most `limit` bytes.
    pub fn new(limit: usize) -> InboundWindow {
        InboundWindow { frames: VecDeque::new(), bytes: 0, limit, dropped: 0 }
    }

    /// Keeps `frame` numbered `seq`.
    ///
    /// Numbers only go up on a link. One that does not means the numbering started again (or
    /// the peer is broken): the frames kept so far can never be asked for, and keeping them would
    /// put frames from before the mark into a resync, out of order, so they are let go.
    pub fn keep(&mut self, seq: u64, frame: Frame) {
        if self.frames.back().is_some_and(|(newest, _)| seq <= *newest) {
            self.dropped += self.frames.len() as u64;
            self.clear();
        }
        self.bytes += frame.data.len();
        self.frames.push_back((seq, frame));
        while self.bytes > self.limit {
            let Some((_, old)) = self.frames.pop_front() else { break };
            self.bytes -= old.data.len();
            self.dropped += 1;
        }
    }

    /// Forgets the frames numbered below `mark`; returns the rest, oldest first.
    pub fn from_mark(&mut self, mark: u64) -> impl Iterator<Item = &(u64, Frame)> {
        while self.frames.front().is_some_and(|(seq, _)| *seq < mark) {
            let (_, f) = self.frames.pop_front().expect("front exists");
            self.bytes -= f.data.len();
        }
        self.frames.iter()
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.frames.clear();
        self.bytes = 0;
    }

    /// Frames kept.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether none are kept.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers(w: &mut InboundWindow, mark: u64) -> Vec<u64> {
        w.from_mark(mark).map(|(seq, _)| *seq).collect()
    }

    #[test]
    fn keeps_the_newest_within_its_bytes() {
        let mut w = InboundWindow::new(30);
        for seq in 0..5 {
            w.keep(seq, Frame::new(vec![0; 10]));
        }
        assert_eq!(w.dropped, 2);
        assert_eq!(numbers(&mut w, 0), [2, 3, 4]);
        assert_eq!(numbers(&mut w, 4), [4]);
    }

    #[test]
    fn a_number_that_does_not_go_up_starts_the_window_again() {
        // Found by fuzzing: frames 5, 6, 7 then 2 made a resync from mark 3 return 5, 6, 7 and
        // 2 — a frame from before the mark, out of order.
        let mut w = InboundWindow::new(1 << 20);
        for seq in [5, 6, 7, 2] {
            w.keep(seq, Frame::new(vec![seq as u8; 4]));
        }
        assert_eq!(numbers(&mut w, 3), Vec::<u64>::new());
        assert_eq!(w.dropped, 3);
        w.keep(3, Frame::new(vec![3; 4]));
        w.keep(3, Frame::new(vec![3; 4]));
        assert_eq!(numbers(&mut w, 0), [3], "a repeated number replaces the window too");
    }
}
