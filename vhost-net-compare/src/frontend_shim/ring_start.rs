//! Which ring a frontend's message starts: the relay tells the backend, which must know when a
//! VM's receive ring runs again after a stop (a checkpoint's GET_VRING_BASE) to align its
//! inbound queue. SET_MEM_TABLE cannot be that signal: a frontend need not send it again
//! when it restarts the rings over the same memory (colo-vmm does not, after a checkpoint).

use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag, VhostUserU64};

use super::message::Message;

/// The bit of SET_VRING_KICK's payload that says no descriptor comes with it (polling mode,
/// which does not start the ring).
const NO_FD: u64 = 1 << 8;
/// The ring index bits of SET_VRING_KICK's payload.
const INDEX_MASK: u64 = 0xff;

/// The ring `m` starts: the index of a well-formed SET_VRING_KICK that carries its eventfd (the
/// request after which a vhost-user back end starts the ring). Anything else: `None`.
pub fn started_ring(m: &Message) -> Option<u32> {
    if !m.is(FrontendReq::SET_VRING_KICK) || m.has_flag(VhostUserHeaderFlag::REPLY) || m.fds().len() != 1 {
        return None;
    }
    let value = m.body::<VhostUserU64>()?.value;
    if value & NO_FD != 0 || value & !(INDEX_MASK | NO_FD) != 0 {
        return None;
    }
    Some((value & INDEX_MASK) as u32)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{new_fd, req, u64_msg, REPLY};
    use super::*;

    #[test]
    fn a_kick_with_its_eventfd_starts_its_ring() {
        let kick = |value: u64| u64_msg(FrontendReq::SET_VRING_KICK, 0, value);
        assert_eq!(started_ring(&kick(0).with_fds(vec![new_fd()])), Some(0));
        assert_eq!(started_ring(&kick(1).with_fds(vec![new_fd()])), Some(1));
        assert_eq!(started_ring(&kick(0)), None, "no descriptor");
        assert_eq!(started_ring(&kick(NO_FD).with_fds(vec![new_fd()])), None, "polling mode");
        assert_eq!(started_ring(&kick(1 << 20).with_fds(vec![new_fd()])), None, "stray bits");
        let reply = u64_msg(FrontendReq::SET_VRING_KICK, REPLY, 0).with_fds(vec![new_fd()]);
        assert_eq!(started_ring(&reply), None);
        let other = req(FrontendReq::SET_VRING_CALL, 0, &0u64.to_le_bytes()).with_fds(vec![new_fd()]);
        assert_eq!(started_ring(&other), None);
        let short = req(FrontendReq::SET_VRING_KICK, 0, &[0; 4]).with_fds(vec![new_fd()]);
        assert_eq!(started_ring(&short), None);
    }
}
