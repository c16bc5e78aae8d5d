//! Which ring a frontend's message starts: the relay tells the backend, which must know when a
//! VM's receive ring runs again after a stop (a checkpoint's GET_VRING_BASE) to align its
//! inbound queue. SET_MEM_TABLE cannot be that signal: a frontend need not send it again
//! when it restarts the rings over the same memory (colo-vmm does not, after a checkpoint).
//!
//! The relay tells the backend *before* it forwards the request: the daemon starts the ring as
//! soon as it has read it, on its own thread, and its worker may fill the receive ring at once
//! — from a queue not yet aligned, if the relay told the backend only afterwards. And it kicks
//! the ring once ([`kick`]): frames queued for a stopped ring wait for the back end to look at
//! it, and a frontend need not kick a restarted ring whose buffers it posted before the stop.

use std::os::fd::AsRawFd;

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

/// Signals the kick eventfd `m` carries (a request [`started_ring`] accepted), so the back end
/// processes the ring as soon as it has registered the descriptor (an eventfd that is readable
/// when added to epoll reports at once). A kick the ring did not need is harmless: the back
/// end finds nothing new. Never blocks: a descriptor that cannot take the write now (not an
/// eventfd, or one at its limit) is left alone.
pub fn kick(m: &Message) {
    let Some(fd) = m.fds().first() else { return };
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call; timeout 0 never waits.
    if unsafe { libc::poll(&mut pfd, 1, 0) } != 1 || pfd.revents & libc::POLLOUT == 0 {
        return;
    }
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to a descriptor the message owns. A failed or
    // short write only means the ring waits for the frontend's own kick, as without this.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{new_fd, owned, req, u64_msg, REPLY};
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

    #[test]
    fn the_kick_signals_the_eventfd_it_carries_once_and_never_blocks() {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        let m = u64_msg(FrontendReq::SET_VRING_KICK, 0, 0).with_fds(vec![owned(&efd)]);
        kick(&m);
        assert_eq!(efd.read().unwrap(), 1);
        assert!(efd.read().is_err(), "signalled exactly once");
        // A pipe whose buffer is full cannot take the write: left alone, not waited on.
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe(2) returns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors are fresh and owned here from now on.
        let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETFL on a live descriptor; fill the pipe without blocking the test.
        unsafe { libc::fcntl(write_end.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let chunk = [0u8; 4096];
        // SAFETY: writes from a live buffer until the pipe is full.
        while unsafe { libc::write(write_end.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) } > 0 {}
        // SAFETY: back to blocking, as a hostile frontend could leave it.
        unsafe { libc::fcntl(write_end.as_raw_fd(), libc::F_SETFL, 0) };
        kick(&u64_msg(FrontendReq::SET_VRING_KICK, 0, 0).with_fds(vec![write_end]));
        drop(read_end);
    }
}
