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
    pub fn keep(&mut self, seq: u64, frame: Frame) {
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
