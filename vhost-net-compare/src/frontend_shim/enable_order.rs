//! The relay's only decision: which `SET_VRING_ENABLE` requests wait for `SET_FEATURES`.

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserU64, VhostUserVirtioFeatures, VhostUserVringState,
};

use super::message::{ack, set_vring_enable, Message};

/// What to do with a message from the frontend.
#[derive(Debug)]
pub enum Verdict {
    /// Forward it to the daemon unchanged (then call [`EnableOrder::forwarded`]).
    Forward,
    /// Not forwarded now: a `SET_VRING_ENABLE` that came before the features. Send the reply,
    /// if any, to the frontend.
    Deferred {
        /// The reply the frontend waits for (it set `NEED_REPLY`).
        reply: Option<Message>,
    },
}

/// Holds early `SET_VRING_ENABLE` requests back until features with `PROTOCOL_FEATURES`.
///
/// It mirrors the vhost crate's own condition: a request is refused there unless the last
/// `SET_FEATURES` carried `PROTOCOL_FEATURES`.
#[derive(Debug, Default)]
pub struct EnableOrder {
    /// The last `SET_FEATURES` forwarded carried `PROTOCOL_FEATURES`.
    protocol_acked: bool,
    /// Remembered (ring index, requested state), in the order the rings were first mentioned;
    /// at most [`MAX_RINGS`].
    deferred: Vec<(u32, u32)>,
    /// Requests answered by the relay so far.
    deferred_total: u64,
    /// Requests the relay sent to the daemon on the frontend's behalf.
    injected_total: u64,
}

/// The most rings remembered: a net device has two; the vhost crate allows
/// `VHOST_USER_MAX_VRINGS`. Requests for further rings are forwarded as they are (and refused by
/// the daemon, as they would be without the relay), so a frontend cannot grow the list.
pub const MAX_RINGS: usize = 64;

impl EnableOrder {
    /// Decides about `m`, a message from the frontend.
    pub fn from_frontend(&mut self, m: &Message) -> Verdict {
        // Only a plain, well-formed request is held back; anything odd (descriptors attached, a
        // wrong size, the REPLY flag) goes to the daemon, which judges it as it would without
        // the relay.
        if self.protocol_acked
            || !m.is(FrontendReq::SET_VRING_ENABLE)
            || !m.fds().is_empty()
            || m.has_flag(VhostUserHeaderFlag::REPLY)
        {
            return Verdict::Forward;
        }
        let Some(state) = m.body::<VhostUserVringState>() else {
            return Verdict::Forward;
        };
        let (index, num) = (state.index, state.num);
        if let Some(entry) = self.deferred.iter_mut().find(|(i, _)| *i == index) {
            entry.1 = num;
        } else if self.deferred.len() < MAX_RINGS {
            self.deferred.push((index, num));
        } else {
            return Verdict::Forward;
        }
        self.deferred_total += 1;
        tracing::debug!(
            ring = index,
            num,
            "SET_VRING_ENABLE before SET_FEATURES: answered, applied after the features"
        );
        let reply = m.has_flag(VhostUserHeaderFlag::NEED_REPLY).then(|| ack(m.request()));
        Verdict::Deferred { reply }
    }

    /// `m` was forwarded to the daemon; returns what must follow it at once.
    pub fn forwarded(&mut self, m: &Message) -> Vec<Message> {
        if !m.is(FrontendReq::SET_FEATURES) || m.has_flag(VhostUserHeaderFlag::REPLY) {
            return Vec::new();
        }
        let Some(features) = m.body::<VhostUserU64>() else {
            return Vec::new(); // malformed: the daemon refuses it and ends the connection
        };
        self.protocol_acked = features.value & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let deferred = std::mem::take(&mut self.deferred);
        if !self.protocol_acked {
            if !deferred.is_empty() {
                tracing::debug!(
                    requests = deferred.len(),
                    "SET_FEATURES without PROTOCOL_FEATURES: the back end enables every ring itself; \
                     early SET_VRING_ENABLE requests dropped"
                );
            }
            return Vec::new();
        }
        if !deferred.is_empty() {
            tracing::info!(
                rings = ?deferred,
                answered = self.deferred_total,
                "the frontend sent SET_VRING_ENABLE before SET_FEATURES (QEMU 7.2 does); applied now"
            );
        }
        self.injected_total += deferred.len() as u64;
        deferred.into_iter().map(|(index, num)| set_vring_enable(index, num)).collect()
    }

    /// Requests answered by the relay (not forwarded when they came).
    pub fn deferred_total(&self) -> u64 {
        self.deferred_total
    }

    /// Requests sent to the daemon after `SET_FEATURES` on the frontend's behalf.
    pub fn injected_total(&self) -> u64 {
        self.injected_total
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{enable, new_fd, req, u64_msg, NEED_REPLY, PROTOCOL, REPLY};
    use super::*;

    #[test]
    fn features_without_protocol_features_drop_the_early_enables() {
        let mut order = EnableOrder::default();
        assert!(matches!(order.from_frontend(&enable(0, 1, 0)), Verdict::Deferred { reply: None }));
        let f = u64_msg(FrontendReq::SET_FEATURES, 0, 1 << 32);
        assert!(matches!(order.from_frontend(&f), Verdict::Forward));
        assert!(order.forwarded(&f).is_empty(), "the back end enables the rings itself");
        // A later SET_FEATURES with PROTOCOL_FEATURES has nothing left to apply.
        let f = u64_msg(FrontendReq::SET_FEATURES, 0, PROTOCOL);
        assert!(order.forwarded(&f).is_empty());
        assert!(matches!(order.from_frontend(&enable(0, 0, 0)), Verdict::Forward));
        // The rule is the vhost crate's: it looks at the last SET_FEATURES. Features without
        // PROTOCOL_FEATURES again make requests wait again, until the next one with it.
        let f = u64_msg(FrontendReq::SET_FEATURES, 0, 0);
        assert!(order.forwarded(&f).is_empty());
        assert!(matches!(order.from_frontend(&enable(1, 1, NEED_REPLY)), Verdict::Deferred { reply: Some(_) }));
        let f = u64_msg(FrontendReq::SET_FEATURES, 0, PROTOCOL);
        let injected = order.forwarded(&f);
        assert_eq!(injected.len(), 1);
        assert_eq!(injected[0].bytes(), set_vring_enable(1, 1).bytes());
        assert_eq!((order.deferred_total(), order.injected_total()), (2, 1));
    }

    #[test]
    fn only_well_formed_plain_enables_are_held_back() {
        let mut order = EnableOrder::default();
        let short = req(FrontendReq::SET_VRING_ENABLE, 0, &[0; 4]);
        assert!(matches!(order.from_frontend(&short), Verdict::Forward));
        let reply = enable(0, 1, REPLY);
        assert!(matches!(order.from_frontend(&reply), Verdict::Forward));
        let with_fd = enable(0, 1, 0).with_fds(vec![new_fd()]);
        assert!(matches!(order.from_frontend(&with_fd), Verdict::Forward));
        let bad_features = req(FrontendReq::SET_FEATURES, 0, &[0; 4]);
        assert!(order.forwarded(&bad_features).is_empty());
        assert_eq!(order.deferred_total(), 0);
    }

    #[test]
    fn the_remembered_rings_are_bounded() {
        let mut order = EnableOrder::default();
        for ring in 0..MAX_RINGS as u32 {
            assert!(matches!(order.from_frontend(&enable(ring, 1, 0)), Verdict::Deferred { .. }));
        }
        // One ring more goes to the daemon; a ring already remembered is still updated.
        assert!(matches!(order.from_frontend(&enable(u32::MAX, 1, 0)), Verdict::Forward));
        assert!(matches!(order.from_frontend(&enable(0, 0, 0)), Verdict::Deferred { .. }));
        let injected = order.forwarded(&u64_msg(FrontendReq::SET_FEATURES, 0, PROTOCOL));
        assert_eq!(injected.len(), MAX_RINGS);
        assert_eq!(injected[0].bytes(), set_vring_enable(0, 0).bytes());
    }
}
