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
//! [`MAX_MSG_SIZE`], a message cut short, or more than [`MAX_ATTACHED_FD_ENTRIES`] descriptors
//! ends the relay: both connections are shut down, so the daemon ends (and the accept thread
//! serves the next frontend) and the frontend sees a disconnect. Nothing a frontend sends can
//! make the relay panic or allocate more than one maximal message (and the ring states of at most
//! [`MAX_DEFERRED_RINGS`] rings).

use std::fmt;
use std::io;
use std::mem::size_of;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserVirtioFeatures, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};

/// Length of the vhost-user message header: request, flags, payload size (`u32` each, host
/// byte order).
pub const HEADER_LEN: usize = 12;

/// The header flags of a version 1 message (bits 0..=1).
const VERSION_1: u32 = 0x1;

/// Rings whose early `SET_VRING_ENABLE` the relay remembers: QEMU's most virtqueues per device
/// (`VIRTIO_QUEUE_MAX`), far beyond this backend's two. A request for a higher index goes to the
/// daemon, which refuses it as it would without the relay, so what the relay keeps is bounded
/// whatever the frontend sends.
pub const MAX_DEFERRED_RINGS: u32 = 1024;

/// Control buffer for received descriptors, in `u64`s so that it is aligned for `cmsghdr`:
/// room for more than [`MAX_ATTACHED_FD_ENTRIES`], so that a sender attaching too many is
/// detected (and refused) rather than silently truncated.
const CMSG_WORDS: usize = 48;

fn request_code(r: FrontendReq) -> u32 {
    r.into()
}

/// One vhost-user message as it travels: header and payload bytes, and the file descriptors
/// that came with them (closed when the message is dropped).
#[derive(Debug)]
pub struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    /// A message with `request`, `flags` and `payload` (no descriptors).
    pub fn new(request: u32, flags: u32, payload: &[u8]) -> Message {
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(&request.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        // Payloads built here are at most a few bytes; received ones are bounded by MAX_MSG_SIZE.
        bytes.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
        bytes.extend_from_slice(payload);
        Message { bytes, fds: Vec::new() }
    }

    /// The same message with `fds` attached.
    pub fn with_fds(mut self, fds: Vec<OwnedFd>) -> Message {
        self.fds = fds;
        self
    }

    fn header_field(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[at..at + 4]);
        u32::from_ne_bytes(b)
    }

    /// The request code.
    pub fn request(&self) -> u32 {
        self.header_field(0)
    }

    /// The header flags (version, REPLY, NEED_REPLY).
    pub fn flags(&self) -> u32 {
        self.header_field(4)
    }

    /// The payload (after the header).
    pub fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// Header and payload, as on the wire.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The attached file descriptors.
    pub fn fds(&self) -> &[OwnedFd] {
        &self.fds
    }

    fn is(&self, request: FrontendReq) -> bool {
        self.request() == request_code(request)
    }

    fn has_flag(&self, flag: VhostUserHeaderFlag) -> bool {
        self.flags() & flag.bits() != 0
    }

    /// The payload as one `u64` (`VhostUserU64`), if it is exactly that.
    fn payload_u64(&self) -> Option<u64> {
        let p: [u8; 8] = self.payload().try_into().ok()?;
        Some(u64::from_ne_bytes(p))
    }

    /// The payload as a `VhostUserVringState` (index, num), if it is exactly that.
    fn payload_vring_state(&self) -> Option<(u32, u32)> {
        let p: [u8; 8] = self.payload().try_into().ok()?;
        let (index, num) = p.split_at(4);
        Some((u32::from_ne_bytes(index.try_into().ok()?), u32::from_ne_bytes(num.try_into().ok()?)))
    }
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = FrontendReq::try_from(self.request()).map(|r| format!("{r:?}")).unwrap_or_else(|_| "?".into());
        write!(
            f,
            "{name} ({}) flags {:#x}, {} payload bytes, {} fds",
            self.request(),
            self.flags(),
            self.payload().len(),
            self.fds.len()
        )
    }
}

/// A `SET_VRING_ENABLE` request as the relay sends it (no reply wanted).
pub fn set_vring_enable(index: u32, num: u32) -> Message {
    let mut payload = [0u8; 8];
    payload[..4].copy_from_slice(&index.to_ne_bytes());
    payload[4..].copy_from_slice(&num.to_ne_bytes());
    Message::new(request_code(FrontendReq::SET_VRING_ENABLE), VERSION_1, &payload)
}

/// The `REPLY_ACK` reply "success" to `request`.
pub fn ack(request: u32) -> Message {
    Message::new(request, VERSION_1 | VhostUserHeaderFlag::REPLY.bits(), &0u64.to_ne_bytes())
}

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

/// The relay's only decision: which `SET_VRING_ENABLE` requests wait for `SET_FEATURES`.
///
/// It mirrors the vhost crate's own condition: a request is refused there unless the last
/// `SET_FEATURES` carried `PROTOCOL_FEATURES`.
#[derive(Debug, Default)]
pub struct EnableOrder {
    /// The last `SET_FEATURES` forwarded carried `PROTOCOL_FEATURES`.
    protocol_acked: bool,
    /// Remembered (ring index, requested state), in the order the rings were first mentioned.
    deferred: Vec<(u32, u32)>,
    /// Requests answered by the relay so far.
    deferred_total: u64,
    /// Requests the relay sent to the daemon on the frontend's behalf.
    injected_total: u64,
}

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
        let Some((index, num)) = m.payload_vring_state().filter(|&(index, _)| index < MAX_DEFERRED_RINGS) else {
            return Verdict::Forward;
        };
        match self.deferred.iter_mut().find(|(i, _)| *i == index) {
            Some(entry) => entry.1 = num,
            None => self.deferred.push((index, num)),
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
        let Some(features) = m.payload_u64() else {
            return Vec::new(); // malformed: the daemon refuses it and ends the connection
        };
        self.protocol_acked = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
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

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed in the middle of a message ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes the message needed.
        want: usize,
    },
    /// The header announces more payload than any vhost-user message has.
    #[error("message announces {0} payload bytes, more than the protocol's {MAX_MSG_SIZE}")]
    TooLarge(u32),
    /// More descriptors than the protocol allows in one message (or the kernel truncated them).
    #[error("more than {MAX_ATTACHED_FD_ENTRIES} file descriptors attached to one message")]
    TooManyFds,
}

/// Reads one whole message from `sock` (blocking). `Ok(None)`: the peer closed the connection
/// between messages.
pub fn recv_message(sock: &UnixStream) -> Result<Option<Message>, WireError> {
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER_LEN];
    let got = recv_exact(sock, &mut header, &mut fds)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(WireError::Truncated { got, want: HEADER_LEN });
    }
    let size = u32::from_ne_bytes([header[8], header[9], header[10], header[11]]);
    if size as usize > MAX_MSG_SIZE {
        return Err(WireError::TooLarge(size));
    }
    let mut bytes = vec![0u8; HEADER_LEN + size as usize];
    bytes[..HEADER_LEN].copy_from_slice(&header);
    let got = recv_exact(sock, &mut bytes[HEADER_LEN..], &mut fds)?;
    if got < size as usize {
        return Err(WireError::Truncated { got: HEADER_LEN + got, want: bytes.len() });
    }
    if fds.len() > MAX_ATTACHED_FD_ENTRIES {
        return Err(WireError::TooManyFds);
    }
    Ok(Some(Message { bytes, fds }))
}

/// Fills `buf` unless the peer closes first; returns the bytes read. Descriptors received on
/// the way are appended to `fds` (the kernel delivers them with the first bytes of the
/// `sendmsg` that carried them, normally the header).
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize, WireError> {
    let mut got = 0;
    while got < buf.len() {
        match recv_with_fds(sock.as_raw_fd(), &mut buf[got..], fds) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(RecvError::Io(e)) => return Err(WireError::Io(e)),
            Err(RecvError::Truncated) => return Err(WireError::TooManyFds),
        }
    }
    Ok(got)
}

enum RecvError {
    Io(io::Error),
    /// MSG_CTRUNC: descriptors did not fit the control buffer (and were closed by the kernel).
    Truncated,
}

/// One `recvmsg(2)` into `buf`, taking ownership of every descriptor received (close-on-exec).
fn recv_with_fds(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize, RecvError> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = [0u64; CMSG_WORDS];
    // SAFETY: an all-zero msghdr is a valid "no name, no iov, no control" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` (covering `buf`) and `control`, which outlive the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(RecvError::Io(io::Error::last_os_error()));
    }
    // Take ownership of every descriptor before anything else, so that none leaks on an error.
    // SAFETY: the kernel filled `control` up to msg_controllen with well-formed cmsghdrs; the
    // CMSG_* helpers only walk within it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header = data as usize - cmsg as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(RecvError::Truncated);
    }
    Ok(n as usize)
}

/// Writes `m` to `sock` (blocking): descriptors go with the first `sendmsg(2)`, so they arrive
/// with the header as vhost-user requires.
pub fn send_message(sock: &UnixStream, m: &Message) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    let mut sent = loop {
        match send_with_fds(fd, m.bytes(), m.fds()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other?,
        }
    };
    while sent < m.bytes().len() {
        let rest = &m.bytes()[sent..];
        // SAFETY: `rest` is a valid buffer of rest.len() bytes for the duration of the call.
        let n = unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        sent += n as usize;
    }
    Ok(())
}

/// One `sendmsg(2)` of `bytes` with `fds` attached (none: a plain send).
fn send_with_fds(fd: RawFd, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<usize> {
    if fds.len() > MAX_ATTACHED_FD_ENTRIES {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many file descriptors for one message"));
    }
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    let mut control = [0u64; CMSG_WORDS];
    // SAFETY: an all-zero msghdr is a valid "no name, no iov, no control" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = (fds.len() * size_of::<RawFd>()) as u32;
        // SAFETY: CMSG_SPACE and CMSG_LEN are arithmetic only.
        let (space, len) = unsafe { (libc::CMSG_SPACE(data_len) as usize, libc::CMSG_LEN(data_len) as usize) };
        // At most MAX_ATTACHED_FD_ENTRIES (32) descriptors: 144 bytes, within the 384 of `control`.
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `control` is aligned for cmsghdr and at least `space` bytes long; the first
        // header and its data lie within it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = len as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, f) in fds.iter().enumerate() {
                std::ptr::write_unaligned(data.add(i), f.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points at `iov` (covering `bytes`, only read) and `control`, which outlive
    // the call; MSG_NOSIGNAL: a closed peer is an error, not SIGPIPE.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

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
    pub fn spawn(name: String, frontend: UnixStream, backend: UnixStream) -> io::Result<Shim> {
        frontend.set_nonblocking(false)?;
        backend.set_nonblocking(false)?;
        let handles = (frontend.try_clone()?, backend.try_clone()?);
        let thread = std::thread::Builder::new().name(name).spawn(move || relay(frontend, backend))?;
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

/// Relays until one side closes or fails, then shuts both down.
pub fn relay(frontend: UnixStream, backend: UnixStream) -> Summary {
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
    use std::time::Duration;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    const PROTOCOL: u64 = 1 << 30;
    const NEED_REPLY: u32 = 0x8;
    const REPLY: u32 = 0x4;

    fn code(r: FrontendReq) -> u32 {
        request_code(r)
    }

    /// A descriptor of its own for `e` (a dup).
    fn owned(e: &EventFd) -> OwnedFd {
        // SAFETY: dup of a valid descriptor; the result is owned by nothing else.
        unsafe { OwnedFd::from_raw_fd(libc::dup(e.as_raw_fd())) }
    }

    fn new_fd() -> OwnedFd {
        owned(&EventFd::new(0).unwrap())
    }

    fn req(r: FrontendReq, flags: u32, payload: &[u8]) -> Message {
        Message::new(code(r), VERSION_1 | flags, payload)
    }

    fn u64_msg(r: FrontendReq, flags: u32, v: u64) -> Message {
        req(r, flags, &v.to_ne_bytes())
    }

    fn enable(index: u32, num: u32, flags: u32) -> Message {
        let m = set_vring_enable(index, num);
        Message::new(m.request(), m.flags() | flags, m.payload())
    }

    /// A relay between two socket pairs: (frontend's end, daemon's end, the relay).
    fn harness() -> (UnixStream, UnixStream, Shim) {
        let (front, front_relay) = UnixStream::pair().unwrap();
        let (back_relay, back) = UnixStream::pair().unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let shim = Shim::spawn("test-shim".into(), front_relay, back_relay).unwrap();
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
    fn early_enables_are_remembered_for_a_bounded_number_of_rings() {
        // A frontend naming a new ring in every early request made the relay remember each one.
        let mut order = EnableOrder::default();
        for index in 0..MAX_DEFERRED_RINGS + 1000 {
            let verdict = order.from_frontend(&enable(index, 1, 0));
            if index < MAX_DEFERRED_RINGS {
                assert!(matches!(verdict, Verdict::Deferred { .. }), "ring {index}");
            } else {
                assert!(matches!(verdict, Verdict::Forward), "ring {index} goes to the daemon, which refuses it");
            }
        }
        let injected = order.forwarded(&u64_msg(FrontendReq::SET_FEATURES, 0, PROTOCOL));
        assert_eq!(injected.len(), MAX_DEFERRED_RINGS as usize);
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
        assert_eq!(kick.read().unwrap(), 7);

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

    #[test]
    fn too_many_descriptors_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let fds: Vec<OwnedFd> = (0..MAX_ATTACHED_FD_ENTRIES + 1).map(|_| new_fd()).collect();
        let m = req(FrontendReq::SET_MEM_TABLE, 0, &[0; 8]);
        // Sent by hand: send_message itself refuses this many.
        assert!(send_message(&a, &Message::new(m.request(), m.flags(), m.payload()).with_fds(fds)).is_err());
        let raw: Vec<OwnedFd> = (0..MAX_ATTACHED_FD_ENTRIES + 1).map(|_| new_fd()).collect();
        let (first, second) = raw.split_at(MAX_ATTACHED_FD_ENTRIES);
        // Two sendmsg calls each within the limit, one message over it in total.
        send_with_fds(a.as_raw_fd(), &m.bytes()[..HEADER_LEN], first).unwrap();
        send_with_fds(a.as_raw_fd(), &m.bytes()[HEADER_LEN..], second).unwrap();
        assert!(matches!(recv_message(&b), Err(WireError::TooManyFds)));
    }
}
