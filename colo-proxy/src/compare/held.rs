//! A frame held in a flow's queue, with what comparing it needs.

use std::collections::VecDeque;

use crate::classify::{Compared, TcpInfo};
use crate::clock::Timestamp;
use crate::frame::Frame;
use crate::wire::tcp::SeqNumber;

use super::Reason;

/// A frame waiting in a flow queue.
#[derive(Debug)]
pub(crate) struct Held {
    /// The frame itself.
    pub frame: Frame,
    /// When it arrived.
    pub arrived: Timestamp,
    /// Arrival number across all flows and both sides, for release in arrival order.
    pub order: u64,
    /// Set once the frame took part in an inconsistency (for captures).
    pub miscompare: Option<Reason>,
    /// Offset in the Ethernet frame where compared bytes begin.
    pub compare_from: u32,
    /// Fragment offset and MF flag, fragments only.
    pub fragment_word: u32,
    /// TCP fields (TCP flows only).
    pub tcp: Option<TcpInfo>,
    /// TCP: payload bytes already matched against the other side.
    pub matched: u32,
}

impl Held {
    pub fn new(frame: Frame, c: &Compared, arrived: Timestamp, order: u64) -> Held {
        Held {
            frame,
            arrived,
            order,
            miscompare: None,
            compare_from: c.compare_from as u32,
            fragment_word: c.fragment_word,
            tcp: c.tcp,
            matched: 0,
        }
    }

    /// The TCP fields; only called on frames of TCP flows.
    pub fn tcp(&self) -> &TcpInfo {
        self.tcp.as_ref().expect("TCP flow holds TCP frames")
    }

    /// The bytes a datagram-style comparison looks at.
    pub fn compared_bytes(&self) -> &[u8] {
        &self.frame.ethernet()[self.compare_from as usize..]
    }

    /// Datagram rule: equal frame length, equal fragment word, equal compared bytes.
    pub fn same_datagram(&self, other: &Held) -> bool {
        self.frame.ethernet().len() == other.frame.ethernet().len()
            && self.fragment_word == other.fragment_word
            && self.compared_bytes() == other.compared_bytes()
    }

    /// Marks the frame as part of an inconsistency (the first reason sticks).
    pub fn mark(&mut self, reason: Reason) {
        self.miscompare.get_or_insert(reason);
    }
}

/// Frames held and their bytes (header and frame), per side ([`crate::Side::index`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeldTotals {
    pub frames: [usize; 2],
    pub bytes: [usize; 2],
}

impl HeldTotals {
    /// `h` joined a queue of side `s`.
    pub fn add(&mut self, s: usize, h: &Held) {
        self.frames[s] += 1;
        self.bytes[s] += h.frame.data.len();
    }

    /// `h` left a queue of side `s`.
    pub fn remove(&mut self, s: usize, h: &Held) {
        self.frames[s] -= 1;
        self.bytes[s] -= h.frame.data.len();
    }

    /// Frames held on both sides.
    pub fn all_frames(&self) -> usize {
        self.frames[0] + self.frames[1]
    }
}

/// Inserts a TCP frame keeping the queue sorted by sequence number (wrap-aware), after any frame
/// with the same sequence number. Frames almost always arrive in order, so search from the back.
pub(crate) fn insert_by_seq(q: &mut VecDeque<Held>, h: Held) {
    let seq: SeqNumber = h.tcp().seq;
    let mut at = q.len();
    while at > 0 && seq.before(q[at - 1].tcp().seq) {
        at -= 1;
    }
    q.insert(at, h);
}
