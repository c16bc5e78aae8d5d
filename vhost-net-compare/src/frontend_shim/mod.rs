//! A vhost-user relay between a frontend (QEMU, colo-vmm) and this process's daemon, which puts
//! early `SET_VRING_ENABLE` requests where the vhost crate accepts them.
//!
//! # Why
//!
//! QEMU 7.2 sends `VHOST_USER_SET_VRING_ENABLE(1)` for both rings *before* `SET_FEATURES` (at
//! device realize and reset, and again at the start of `vhost_net_start`, four or five times in
//! all) and never after it. The vhost-user specification only allows the request once
//! `VHOST_USER_F_PROTOCOL_FEATURES` (virtio feature bit 30) has been acknowledged, and the vhost
//! crate's request handler (0.18, `BackendReqHandler::handle_request`) enforces that: it answers
//! `InactiveFeature(PROTOCOL_FEATURES)`, which ends the connection. We cannot ship a patched copy
//! of that crate, so the public socket is served by this relay instead.
//!
//! # What it does
//!
//! For each frontend connection the accept thread ([`crate::server`]) connects to the fresh
//! daemon on a private socket and hands both streams to [`Shim::spawn`]. One thread per
//! connection then relays whole messages both ways — header (request `u32`, flags `u32`, size
//! `u32`) and `size` bytes of payload, with the file descriptors that came with them
//! (`SCM_RIGHTS`) — byte for byte, with exactly one intervention, decided by [`EnableOrder`]:
//!
//! - a well-formed `SET_VRING_ENABLE` from the frontend that arrives while the last
//!   `SET_FEATURES` forwarded did not carry `PROTOCOL_FEATURES` (the same condition under which
//!   the vhost crate would refuse it) is not forwarded. The relay remembers the requested state
//!   per ring (the last request for a ring wins) and, if the frontend set `NEED_REPLY`, answers
//!   it itself with the `REPLY_ACK` reply "success" (a `u64` 0);
//! - right after forwarding a `SET_FEATURES` that carries `PROTOCOL_FEATURES`, the relay sends
//!   the remembered requests to the daemon, in the order the rings were first mentioned. These
//!   relay-originated messages do not ask for a reply (no `NEED_REPLY`), so the daemon sends
//!   none: nothing has to be taken out of the stream the frontend reads, and every reply the
//!   frontend gets is the one it asked for. The daemon handles requests strictly in order, so
//!   the rings are enabled before any later request of the frontend is looked at; if the
//!   daemon refuses one, it ends the connection, which the frontend sees as it would have seen
//!   the refusal without the relay;
//! - a `SET_FEATURES` without `PROTOCOL_FEATURES` discards what was remembered: without the
//!   protocol-features handshake the back end enables every ring itself (vhost-user "ring
//!   states"), and `SET_VRING_ENABLE` is not part of that protocol. Later requests wait again,
//!   by the same rule, for a `SET_FEATURES` with it.
//!
//! The end state is what the frontend asked for: both rings enabled, with features negotiated
//! first. Frontends that follow the specification (the vhost crate's, cloud-hypervisor's,
//! colo-vmm's) send `SET_FEATURES` first and see a pure pass-through.
//!
//! # Cost
//!
//! Only control messages pass through the relay. The data path does not: guest memory is shared
//! (the memory table's file descriptors reach the daemon once, at setup), and kicks and
//! interrupts are eventfds shared directly by the daemon and the frontend (KVM's ioeventfds and
//! irqfds, or QEMU's event loop under TCG). So the relay adds latency to setup,
//! `GET_VRING_BASE`, dirty-log and config requests only — one extra pass through a Unix socket
//! each — and nothing per frame.
//!
//! # Failure handling
//!
//! Either side closing, a read or write error, a message whose payload exceeds the protocol's
//! [`MAX_MSG_SIZE`](vhost::vhost_user::message::MAX_MSG_SIZE), a message cut short, or more than
//! [`MAX_ATTACHED_FD_ENTRIES`](vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES) descriptors
//! ends the relay: both connections are shut down, so the daemon ends (and the accept thread
//! serves the next frontend) and the frontend sees a disconnect. Nothing a frontend sends can
//! make the relay panic or allocate more than one maximal message.
//!
//! # Files
//!
//! [`enable_order`] is the policy above; [`message`] and [`wire`] are the codec (the vhost
//! crate's message types, vmm-sys-util's `ScmSocket` for the descriptors); this file is the
//! relay thread.

pub mod enable_order;
pub mod message;
pub mod ring_start;
pub mod wire;

#[cfg(test)]
mod testutil;

use std::fmt;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

pub use enable_order::{EnableOrder, Verdict};
pub use message::{ack, set_vring_enable, Message, HEADER_LEN};
pub use ring_start::started_ring;
pub use wire::{recv_message, send_message, WireError};

/// Which side ended a relay, and how.
#[derive(Debug)]
pub enum End {
    /// The frontend closed its connection.
    FrontendClosed,
    /// The daemon closed its connection (it refused a request, or was shut down).
    BackendClosed,
    /// Reading from or writing to the frontend failed, or it sent something unreadable.
    Frontend(WireError),
    /// Reading from or writing to the daemon failed, or it sent something unreadable.
    Backend(WireError),
    /// poll(2) failed.
    Poll(io::Error),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::FrontendClosed => write!(f, "the frontend closed the connection"),
            End::BackendClosed => write!(f, "the back end closed the connection"),
            End::Frontend(e) => write!(f, "frontend connection: {e}"),
            End::Backend(e) => write!(f, "back-end connection: {e}"),
            End::Poll(e) => write!(f, "poll: {e}"),
        }
    }
}

/// What one relay did.
#[derive(Debug)]
pub struct Summary {
    /// Why it ended.
    pub end: End,
    /// Messages from the frontend forwarded to the daemon.
    pub to_backend: u64,
    /// Messages from the daemon forwarded to the frontend.
    pub to_frontend: u64,
    /// `SET_VRING_ENABLE` requests answered by the relay before `SET_FEATURES`.
    pub deferred: u64,
    /// `SET_VRING_ENABLE` requests the relay sent after `SET_FEATURES`.
    pub injected: u64,
}

/// The relay of one connection, running on its own thread; shut down and joined on drop.
pub struct Shim {
    frontend: UnixStream,
    backend: UnixStream,
    thread: Option<JoinHandle<Summary>>,
}

impl Shim {
    /// Relays between `frontend` (the accepted connection) and `backend` (connected to the
    /// daemon) on a new thread named `name`.
    /// `ring_starting(index)` is called just before a request that starts ring `index` is
    /// forwarded (see [`started_ring`]): the ring does not run yet.
    pub fn spawn(
        name: String,
        frontend: UnixStream,
        backend: UnixStream,
        mut ring_starting: impl FnMut(u32) + Send + 'static,
    ) -> io::Result<Shim> {
        frontend.set_nonblocking(false)?;
        backend.set_nonblocking(false)?;
        let handles = (frontend.try_clone()?, backend.try_clone()?);
        let thread =
            std::thread::Builder::new().name(name).spawn(move || relay(frontend, backend, &mut ring_starting))?;
        Ok(Shim { frontend: handles.0, backend: handles.1, thread: Some(thread) })
    }

    /// Shuts both connections down: the relay thread ends, the daemon sees a disconnect, the
    /// frontend sees the connection closed.
    pub fn close(&self) {
        let _ = self.frontend.shutdown(Shutdown::Both);
        let _ = self.backend.shutdown(Shutdown::Both);
    }

    /// Waits for the relay to end (it ends by itself when either side closes; see
    /// [`Shim::close`]). `None` if the thread panicked.
    pub fn join(mut self) -> Option<Summary> {
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.close();
            let _ = t.join();
        }
    }
}

/// Relays until one side closes or fails, then shuts both down; `ring_starting` hears of each
/// ring start before it is forwarded, and the ring is kicked once (see [`ring_start`]).
pub fn relay(frontend: UnixStream, backend: UnixStream, ring_starting: &mut dyn FnMut(u32)) -> Summary {
    let mut order = EnableOrder::default();
    let (mut to_backend, mut to_frontend) = (0u64, 0u64);
    let end = loop {
        let mut fds = [
            libc::pollfd { fd: frontend.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: backend.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break End::Poll(e);
        }
        // Readable, hung up or failed: the read tells which.
        if fds[0].revents != 0 {
            let m = match recv_message(&frontend) {
                Ok(Some(m)) => m,
                Ok(None) => break End::FrontendClosed,
                Err(e) => break End::Frontend(e),
            };
            tracing::trace!(message = %m, "frontend -> back end");
            match order.from_frontend(&m) {
                Verdict::Deferred { reply } => {
                    if let Some(r) = reply {
                        if let Err(e) = send_message(&frontend, &r) {
                            break End::Frontend(e.into());
                        }
                    }
                }
                Verdict::Forward => {
                    if let Some(ring) = started_ring(&m) {
                        ring_starting(ring);
                        ring_start::kick(&m);
                    }
                    if let Err(e) = send_message(&backend, &m) {
                        break End::Backend(e.into());
                    }
                    to_backend += 1;
                    let mut failed = None;
                    for extra in order.forwarded(&m) {
                        tracing::trace!(message = %extra, "relay -> back end");
                        if let Err(e) = send_message(&backend, &extra) {
                            failed = Some(e);
                            break;
                        }
                    }
                    if let Some(e) = failed {
                        break End::Backend(e.into());
                    }
                }
            }
        }
        if fds[1].revents != 0 {
            let m = match recv_message(&backend) {
                Ok(Some(m)) => m,
                Ok(None) => break End::BackendClosed,
                Err(e) => break End::Backend(e),
            };
            tracing::trace!(message = %m, "back end -> frontend");
            if let Err(e) = send_message(&frontend, &m) {
                break End::Frontend(e.into());
            }
            to_frontend += 1;
        }
    };
    let _ = frontend.shutdown(Shutdown::Both);
    let _ = backend.shutdown(Shutdown::Both);
    Summary { end, to_backend, to_frontend, deferred: order.deferred_total(), injected: order.injected_total() }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::time::Duration;

    use vhost::vhost_user::message::{FrontendReq, MAX_MSG_SIZE};
    use vmm_sys_util::eventfd::EventFd;

    use super::message::VERSION_1;
    use super::testutil::{code, enable, new_fd, owned, req, u64_msg, NEED_REPLY, PROTOCOL, REPLY};
    use super::*;

    /// A relay between two socket pairs: (frontend's end, daemon's end, the relay).
    fn harness() -> (UnixStream, UnixStream, Shim) {
        let (front, front_relay) = UnixStream::pair().unwrap();
        let (back_relay, back) = UnixStream::pair().unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let shim = Shim::spawn("test-shim".into(), front_relay, back_relay, |_| {}).unwrap();
        (front, back, shim)
    }

    fn recv(s: &UnixStream) -> Message {
        recv_message(s).expect("read").expect("a message, not EOF")
    }

    /// Nothing arrives on `s` within a short while.
    fn quiet(s: &UnixStream) {
        s.set_nonblocking(true).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut b = [0u8; 1];
        let r = (&*s).read(&mut b);
        assert!(matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock), "unexpected data: {r:?}");
        s.set_nonblocking(false).unwrap();
    }

    #[test]
    fn enables_before_the_features_are_applied_right_after_them() {
        let (front, back, shim) = harness();
        send_message(&front, &req(FrontendReq::SET_OWNER, 0, &[])).unwrap();
        send_message(&front, &enable(0, 1, 0)).unwrap();
        send_message(&front, &enable(1, 1, 0)).unwrap();
        send_message(&front, &enable(0, 1, 0)).unwrap();
        send_message(&front, &enable(1, 0, 0)).unwrap();
        send_message(&front, &enable(1, 1, 0)).unwrap();
        send_message(&front, &req(FrontendReq::GET_FEATURES, 0, &[])).unwrap();
        assert_eq!(recv(&back).bytes(), req(FrontendReq::SET_OWNER, 0, &[]).bytes());
        assert_eq!(recv(&back).bytes(), req(FrontendReq::GET_FEATURES, 0, &[]).bytes(), "enables held back");
        send_message(&back, &u64_msg(FrontendReq::GET_FEATURES, REPLY, PROTOCOL | 1 << 32)).unwrap();
        assert_eq!(recv(&front).payload(), (PROTOCOL | 1 << 32).to_ne_bytes());

        let features = u64_msg(FrontendReq::SET_FEATURES, 0, PROTOCOL | 1 << 32);
        send_message(&front, &features).unwrap();
        assert_eq!(recv(&back).bytes(), features.bytes());
        // One request per ring, first-mentioned order, the last state asked for.
        assert_eq!(recv(&back).bytes(), set_vring_enable(0, 1).bytes());
        assert_eq!(recv(&back).bytes(), set_vring_enable(1, 1).bytes());
        assert_eq!(set_vring_enable(0, 1).flags() & NEED_REPLY, 0, "no reply asked for");

        // From now on SET_VRING_ENABLE passes straight through, NEED_REPLY and reply included.
        send_message(&front, &enable(1, 0, NEED_REPLY)).unwrap();
        assert_eq!(recv(&back).bytes(), enable(1, 0, NEED_REPLY).bytes());
        send_message(&back, &ack(code(FrontendReq::SET_VRING_ENABLE))).unwrap();
        assert_eq!(recv(&front).bytes(), ack(code(FrontendReq::SET_VRING_ENABLE)).bytes());
        quiet(&front);
        quiet(&back);
        drop(front);
        let s = shim.join().unwrap();
        assert!(matches!(s.end, End::FrontendClosed), "{}", s.end);
        assert_eq!((s.deferred, s.injected, s.to_backend, s.to_frontend), (5, 2, 4, 2));
    }

    #[test]
    fn an_early_enable_with_need_reply_is_answered_by_the_relay() {
        let (front, back, _shim) = harness();
        send_message(&front, &enable(0, 1, NEED_REPLY)).unwrap();
        let r = recv(&front);
        assert_eq!(r.request(), code(FrontendReq::SET_VRING_ENABLE));
        assert_eq!(r.flags(), VERSION_1 | REPLY);
        assert_eq!(r.payload(), 0u64.to_ne_bytes(), "success");
        quiet(&back);
        // Without NEED_REPLY there is no answer.
        send_message(&front, &enable(1, 1, 0)).unwrap();
        quiet(&front);
        // SET_FEATURES with NEED_REPLY: its reply (from the daemon) reaches the frontend; the
        // relay's requests ask for none, so nothing else does.
        send_message(&front, &u64_msg(FrontendReq::SET_FEATURES, NEED_REPLY, PROTOCOL)).unwrap();
        assert_eq!(recv(&back).request(), code(FrontendReq::SET_FEATURES));
        assert_eq!(recv(&back).bytes(), set_vring_enable(0, 1).bytes());
        assert_eq!(recv(&back).bytes(), set_vring_enable(1, 1).bytes());
        send_message(&back, &ack(code(FrontendReq::SET_FEATURES))).unwrap();
        assert_eq!(recv(&front).bytes(), ack(code(FrontendReq::SET_FEATURES)).bytes());
        quiet(&front);
    }

    #[test]
    fn file_descriptors_pass_through_both_ways() {
        let (front, back, _shim) = harness();
        let kick = EventFd::new(0).unwrap();
        let dup = owned(&kick);
        let m = u64_msg(FrontendReq::SET_VRING_KICK, 0, 1).with_fds(vec![dup]);
        send_message(&front, &m).unwrap();
        let got = recv(&back);
        assert_eq!(got.bytes(), m.bytes());
        assert_eq!(got.fds().len(), 1);
        // The daemon's copy is the same eventfd.
        // SAFETY: the descriptor is a valid eventfd owned by `got` for the rest of the test.
        let theirs = unsafe { EventFd::from_raw_fd(libc::dup(got.fds()[0].as_raw_fd())) };
        theirs.write(7).unwrap();
        // 1 from the relay, which kicks a ring it sees start (see `ring_start::kick`).
        assert_eq!(kick.read().unwrap(), 1 + 7);

        // Several descriptors (a memory table), and one back to the frontend in a reply.
        let files: Vec<OwnedFd> = (0..3).map(|_| new_fd()).collect();
        let table = req(FrontendReq::SET_MEM_TABLE, 0, &[0x5a; 8 + 3 * 32]).with_fds(files);
        send_message(&front, &table).unwrap();
        let got = recv(&back);
        assert_eq!((got.bytes(), got.fds().len()), (table.bytes(), 3));
        let inflight = EventFd::new(0).unwrap();
        let reply = req(FrontendReq::GET_INFLIGHT_FD, REPLY, &[1; 24]).with_fds(vec![owned(&inflight)]);
        send_message(&back, &reply).unwrap();
        let got = recv(&front);
        assert_eq!((got.bytes(), got.fds().len()), (reply.bytes(), 1));
        // SAFETY: as above.
        let theirs = unsafe { EventFd::from_raw_fd(libc::dup(got.fds()[0].as_raw_fd())) };
        theirs.write(3).unwrap();
        assert_eq!(inflight.read().unwrap(), 3);
    }

    #[test]
    fn everything_else_passes_through_byte_for_byte_and_in_order() {
        let (front, back, shim) = harness();
        let to_back: Vec<Message> = vec![
            req(FrontendReq::SET_OWNER, 0, &[]),
            req(FrontendReq::GET_FEATURES, 0, &[]),
            u64_msg(FrontendReq::SET_PROTOCOL_FEATURES, 0, 0x3f),
            u64_msg(FrontendReq::SET_FEATURES, NEED_REPLY, PROTOCOL | 1 << 32),
            enable(0, 1, 0),
            req(FrontendReq::GET_CONFIG, 0, &[7; 12 + 10]),
            Message::new(0xdead, 0x1, &[1, 2, 3]), // an unknown request: the daemon's business
            req(FrontendReq::GET_VRING_BASE, NEED_REPLY, &[0; 8]),
            req(FrontendReq::SET_LOG_BASE, 0, &vec![9; MAX_MSG_SIZE]),
        ];
        for m in &to_back {
            send_message(&front, m).unwrap();
        }
        for m in &to_back {
            assert_eq!(recv(&back).bytes(), m.bytes(), "{m}");
        }
        let to_front = [
            u64_msg(FrontendReq::GET_FEATURES, REPLY, 1),
            ack(code(FrontendReq::SET_FEATURES)),
            req(FrontendReq::GET_CONFIG, REPLY, &[3; 12 + 10]),
            req(FrontendReq::GET_VRING_BASE, REPLY, &[0, 0, 0, 0, 5, 0, 0, 0]),
        ];
        for m in &to_front {
            send_message(&back, m).unwrap();
        }
        for m in &to_front {
            assert_eq!(recv(&front).bytes(), m.bytes(), "{m}");
        }
        drop(back);
        assert!(recv_message(&front).unwrap().is_none(), "the frontend sees the daemon leave");
        let s = shim.join().unwrap();
        assert!(matches!(s.end, End::BackendClosed), "{}", s.end);
        assert_eq!((s.to_backend, s.to_frontend, s.deferred, s.injected), (9, 4, 0, 0));
    }

    #[test]
    fn a_message_written_in_pieces_is_relayed_whole() {
        let (mut front, back, _shim) = harness();
        let m = u64_msg(FrontendReq::SET_FEATURES, 0, 1 << 32);
        for piece in [&m.bytes()[..3], &m.bytes()[3..14], &m.bytes()[14..]] {
            front.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(recv(&back).bytes(), m.bytes());
    }

    #[test]
    fn garbage_or_a_cut_message_closes_both_sides() {
        for bytes in [vec![0xde; 100], req(FrontendReq::SET_FEATURES, 0, &[1; 8]).bytes()[..15].to_vec(), vec![1; 5]] {
            let (mut front, back, shim) = harness();
            front.write_all(&bytes).unwrap();
            front.shutdown(Shutdown::Write).unwrap();
            let s = shim.join().unwrap();
            assert!(matches!(s.end, End::Frontend(WireError::TooLarge(_) | WireError::Truncated { .. })), "{}", s.end);
            assert!(recv_message(&back).unwrap().is_none(), "the daemon sees a disconnect");
            // Closed: EOF, or a reset because the relay left the rest of the garbage unread.
            let mut rest = vec![];
            match front.read_to_end(&mut rest) {
                Ok(_) => assert!(rest.is_empty()),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            }
        }
    }

    #[test]
    fn closing_the_relay_disconnects_both_sides() {
        let (front, back, shim) = harness();
        shim.close();
        assert!(recv_message(&front).unwrap().is_none());
        assert!(recv_message(&back).unwrap().is_none());
        assert!(shim.join().is_some());
        // Dropping a running relay does the same.
        let (front, back, shim) = harness();
        drop(shim);
        assert!(recv_message(&front).unwrap().is_none());
        assert!(recv_message(&back).unwrap().is_none());
    }
}
