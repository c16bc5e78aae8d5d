//! The TCP rule of docs/compare.md: payload byte streams aligned by sequence number.

use crate::frame::Side;

use super::table::Flow;
use super::{Ctx, DropCause, Reason, Sink};

/// Compares the queued frames of a TCP flow as far as both sides allow.
pub(super) fn compare<S: Sink>(flow: &mut Flow, cx: &mut Ctx<'_, S>) {
    loop {
        // 3. A secondary frame without payload, or with only compared payload, is dropped at
        // once (QEMU keeps it until the next primary frame, which can hold it long enough to
        // time out). It still counts as the secondary's sign of progress that step 1 asks for.
        if let Some(s) = flow.queues[1].front() {
            let st = s.tcp();
            if st.payload_len == 0 || flow.covered(st.seq_end()) {
                let s = flow.queues[1].pop_front().expect("front exists");
                flow.secondary_credit = (flow.secondary_credit + 1).min(MAX_CREDIT);
                cx.discard(Side::Secondary, s, DropCause::Matched);
                continue;
            }
        }
        let Some(p) = flow.queues[0].front() else { return };
        let pt = *p.tcp();
        // 2. A pure ACK/SYN/FIN/RST, or a retransmission of compared data, is released, but
        // (1.) only once the secondary has sent something on this flow.
        if pt.payload_len == 0 || flow.covered(pt.seq_end()) {
            if flow.queues[1].is_empty() {
                if flow.secondary_credit == 0 {
                    return;
                }
                flow.secondary_credit -= 1;
            }
            let p = flow.queues[0].pop_front().expect("front exists");
            cx.release(Side::Primary, p);
            continue;
        }
        // 1. Data waits for the secondary.
        let Some(s) = flow.queues[1].front() else { return };
        let st = *s.tcp();
        // 4. Compare the unmatched parts from the same sequence number. Bytes before
        // `compare_seq` (a partial retransmission) were compared already and are skipped.
        let p_start = unmatched_start(flow, pt.seq + p.matched);
        let s_start = unmatched_start(flow, st.seq + s.matched);
        if p_start != s_start {
            if flow.compare_seq.is_none() && p_start.after(s_start) && p_start.diff(s_start) <= REORDER_WINDOW as i32 {
                // Nothing compared yet on a flow the engine met mid-stream (COLO started during
                // a connection), and the secondary shows bytes before the primary's first: both
                // VMs sent them in their common past, so the SVM is retransmitting (typically a
                // reply whose ACK reached it later than the PVM). Nothing of the primary will
                // match them — or only a retransmission of its own, released as such once
                // compared data covers it — so compare from the primary's head.
                flow.compare_seq = Some(p_start);
                continue;
            }
            if p_start.diff(s_start).unsigned_abs() <= REORDER_WINDOW {
                // One side shows bytes the other has not sent yet: a segment arrived out of
                // order. Wait for it (the timeout catches it if it never comes).
                return;
            }
            // The streams are far apart: a wrong rewriter offset, or diverged guests.
            return mismatch(flow, cx, Reason::Payload);
        }
        let p_skip = p_start.diff(pt.seq) as u32;
        let s_skip = s_start.diff(st.seq) as u32;
        let p_rest = pt.payload_len - p_skip;
        let s_rest = st.payload_len - s_skip;
        let n = p_rest.min(s_rest) as usize;
        let p_bytes = &p.frame.ethernet()[pt.payload_at + p_skip as usize..][..n];
        let s_bytes = &s.frame.ethernet()[st.payload_at + s_skip as usize..][..n];
        if p_bytes != s_bytes {
            return mismatch(flow, cx, Reason::Payload);
        }
        if p_rest <= s_rest {
            // The primary ends first (or both together). It may only go out if it does not
            // acknowledge data the secondary has not acknowledged yet.
            if let Some(ack) = pt.ack {
                if flow.ack_limit().is_none_or(|limit| ack.after(limit)) {
                    return mismatch(flow, cx, Reason::Ack);
                }
            }
            flow.compare_seq = Some(pt.seq_end());
            let p = flow.queues[0].pop_front().expect("front exists");
            cx.release(Side::Primary, p);
            // The secondary frame is now fully consumed (step 3 drops it) or partly matched.
            flow.queues[1].front_mut().expect("front exists").matched = s_skip + n as u32;
        } else {
            flow.compare_seq = Some(st.seq_end());
            flow.queues[0].front_mut().expect("front exists").matched = p_skip + n as u32;
            let s = flow.queues[1].pop_front().expect("front exists");
            cx.discard(Side::Secondary, s, DropCause::Matched);
        }
    }
}

/// Sequence distance under which two unaligned stream heads are taken for reordering rather
/// than divergence (a maximal unscaled window). Unrelated initial sequence numbers are almost
/// never this close.
const REORDER_WINDOW: u32 = 65_535;

/// Most unused secondary "signs of progress" a flow keeps.
const MAX_CREDIT: u32 = 1024;

/// Where unmatched data of a frame starts: `start`, or `compare_seq` if that is later.
fn unmatched_start(flow: &Flow, start: crate::wire::tcp::SeqNumber) -> crate::wire::tcp::SeqNumber {
    match flow.compare_seq {
        Some(c) if c.after(start) => c,
        _ => start,
    }
}

/// Holds both heads, marks them, and reports the inconsistency.
fn mismatch<S: Sink>(flow: &mut Flow, cx: &mut Ctx<'_, S>, reason: Reason) {
    for q in flow.queues.iter_mut() {
        if let Some(h) = q.front_mut() {
            h.mark(reason);
        }
    }
    cx.inconsistency(reason, &flow.key);
}
