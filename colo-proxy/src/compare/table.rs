//! The flow table: per-flow queues and TCP state, bounded by evicting idle flows.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::clock::Timestamp;
use crate::flow::FlowKey;
use crate::frame::Side;
use crate::wire::tcp::SeqNumber;

use super::held::Held;

/// One flow: a queue per side and, for TCP, the comparison state.
#[derive(Debug)]
pub(crate) struct Flow {
    pub key: FlowKey,
    /// Held frames: index 0 primary, 1 secondary. TCP queues are sorted by sequence number,
    /// others are in arrival order.
    pub queues: [VecDeque<Held>; 2],
    /// TCP: end of the last compared (or flushed) payload; `None` until the first comparison.
    pub compare_seq: Option<SeqNumber>,
    /// TCP: largest ACK seen on each side (wrap-aware).
    pub max_ack: [Option<SeqNumber>; 2],
    /// TCP: secondary frames without new payload that were dropped and not yet matched by a
    /// primary frame without new payload (see the TCP rule).
    pub secondary_credit: u32,
    /// A full queue was reported for this side and has not drained since.
    pub full_reported: [bool; 2],
    /// Last time a frame of this flow arrived.
    pub last_active: Timestamp,
}

impl Flow {
    fn new(key: FlowKey, now: Timestamp) -> Flow {
        Flow {
            key,
            queues: [VecDeque::new(), VecDeque::new()],
            compare_seq: None,
            max_ack: [None, None],
            secondary_credit: 0,
            full_reported: [false; 2],
            last_active: now,
        }
    }

    pub fn is_idle(&self) -> bool {
        self.queues[0].is_empty() && self.queues[1].is_empty()
    }

    /// Forgets what was compared (a new pair): the flow is met again as if mid-stream.
    fn forget_comparison(&mut self) {
        self.compare_seq = None;
        self.max_ack = [None, None];
        self.secondary_credit = 0;
    }

    /// TCP: whether everything up to `seq_end` was already compared.
    pub fn covered(&self, seq_end: SeqNumber) -> bool {
        self.compare_seq.is_some_and(|c| !seq_end.after(c))
    }

    /// TCP: records the ACK of a frame from `side`.
    pub fn track_ack(&mut self, side: Side, ack: SeqNumber) {
        let slot = &mut self.max_ack[side.index()];
        *slot = Some(slot.map_or(ack, |m| m.max(ack)));
    }

    /// TCP: the smaller of the largest ACKs of both sides, if both sent one.
    pub fn ack_limit(&self) -> Option<SeqNumber> {
        match self.max_ack {
            [Some(p), Some(s)] => Some(if p.before(s) { p } else { s }),
            _ => None,
        }
    }
}

/// Flows by key, stored densely so flushes can walk them.
#[derive(Debug)]
pub(crate) struct FlowTable {
    index: FxHashMap<FlowKey, u32>,
    pub flows: Vec<Flow>,
    max_flows: usize,
}

/// The table is full and every flow holds frames.
#[derive(Debug)]
pub(crate) struct TableFull;

impl FlowTable {
    pub fn new(max_flows: usize) -> FlowTable {
        FlowTable { index: FxHashMap::default(), flows: Vec::new(), max_flows: max_flows.max(1) }
    }

    /// Forgets every flow's comparison state (see [`Flow::forget_comparison`]).
    pub fn forget_comparisons(&mut self) {
        self.flows.iter_mut().for_each(Flow::forget_comparison);
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Index of the flow for `key`, created if needed. When the table is full, idle flows are
    /// evicted first (least recently active, down to 7/8 of the limit); `evicted` counts them.
    pub fn get_or_insert(&mut self, key: &FlowKey, now: Timestamp, evicted: &mut u64) -> Result<usize, TableFull> {
        if let Some(&i) = self.index.get(key) {
            return Ok(i as usize);
        }
        if self.flows.len() >= self.max_flows {
            let target = (self.max_flows - self.max_flows / 8).min(self.max_flows - 1);
            let n = self.evict_idle(target);
            *evicted += n as u64;
            if self.flows.len() >= self.max_flows {
                return Err(TableFull);
            }
        }
        let i = self.flows.len();
        self.flows.push(Flow::new(*key, now));
        self.index.insert(*key, i as u32);
        Ok(i)
    }

    /// Removes idle flows, least recently active first, until at most `target` remain or no idle
    /// flow is left. Flows that hold frames are never removed.
    fn evict_idle(&mut self, target: usize) -> usize {
        let mut idle: Vec<(Timestamp, FlowKey)> =
            self.flows.iter().filter(|f| f.is_idle()).map(|f| (f.last_active, f.key)).collect();
        idle.sort_unstable_by_key(|(t, _)| *t);
        let excess = self.flows.len().saturating_sub(target);
        let mut removed = 0;
        for (_, key) in idle.into_iter().take(excess) {
            self.remove(&key);
            removed += 1;
        }
        removed
    }

    fn remove(&mut self, key: &FlowKey) {
        let Some(i) = self.index.remove(key) else { return };
        let i = i as usize;
        self.flows.swap_remove(i);
        if let Some(moved) = self.flows.get(i) {
            self.index.insert(moved.key, i as u32);
        }
    }
}
