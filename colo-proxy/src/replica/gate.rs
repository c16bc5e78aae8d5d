//! Frames the primary's backend released while it could not count on its peer (the frame
//! link's lease had lapsed): held back until the lease is renewed or the controller decides
//! (role `alone` sends them, `secondary` drops them). A primary that was frozen and woke up
//! after its secondary took over therefore never sends another frame on its own.

use std::collections::VecDeque;

use crate::frame::Frame;

/// A bounded FIFO of released frames waiting for the lease.
#[derive(Debug)]
pub struct Gate {
    frames: VecDeque<Frame>,
    bytes: usize,
    limit: usize,
    /// Frames dropped because the gate was full.
    pub overflow: u64,
}

impl Gate {
    /// A gate holding at most `limit` bytes.
    pub fn new(limit: usize) -> Gate {
        Gate { frames: VecDeque::new(), bytes: 0, limit, overflow: 0 }
    }

    /// Holds `frame`; beyond the limit the oldest frames give way (TCP resends them).
    pub fn hold(&mut self, frame: Frame) {
        self.bytes += frame.data.len();
        self.frames.push_back(frame);
        while self.bytes > self.limit {
            let Some(old) = self.frames.pop_front() else { break };
            self.bytes -= old.data.len();
            self.overflow += 1;
        }
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Takes every waiting frame, oldest first.
    pub fn take(&mut self) -> VecDeque<Frame> {
        self.bytes = 0;
        std::mem::take(&mut self.frames)
    }
}
