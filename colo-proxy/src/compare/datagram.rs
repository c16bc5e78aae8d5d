//! The rule for UDP, ICMP, ICMPv6, other IP protocols and fragments: whole-frame matches, FIFO.

use crate::frame::Side;

use super::table::Flow;
use super::{Ctx, DropCause, Reason, Sink};

/// Compares the queued frames of a non-TCP flow: the oldest primary frame against the secondary
/// queue, oldest first, while both sides have frames.
pub(super) fn compare<S: Sink>(flow: &mut Flow, cx: &mut Ctx<'_, S>) {
    while let (Some(p), false) = (flow.queues[0].front(), flow.queues[1].is_empty()) {
        match flow.queues[1].iter().position(|s| p.same_datagram(s)) {
            Some(i) => {
                let s = flow.queues[1].remove(i).expect("position is in range");
                let p = flow.queues[0].pop_front().expect("front exists");
                cx.release(Side::Primary, p);
                cx.discard(Side::Secondary, s, DropCause::Matched);
            }
            None => {
                let s_head = flow.queues[1].front().expect("not empty");
                let reason = if s_head.frame.ethernet().len() != p.frame.ethernet().len() {
                    Reason::Size
                } else {
                    Reason::Payload
                };
                flow.queues[0].front_mut().expect("front exists").mark(reason);
                for s in flow.queues[1].iter_mut() {
                    s.mark(reason);
                }
                cx.inconsistency(reason, &flow.key);
                return;
            }
        }
    }
}
