//! Accepting links: every connection is authenticated on its own short-lived thread within
//! [`AUTH_TIMEOUT`], so a silent, garbage or unauthenticated connection never takes the place
//! of the real peer: it is dropped with a log line, and the listener goes on waiting.
//!
//! At most [`MAX_AUTHENTICATING`] connections are authenticated at once; more are closed at
//! once (a flood costs a bounded number of threads and descriptors).

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::key::LinkKey;
use super::secure::{accept, LinkConn};
use super::socket::LinkSocket;

/// How long a new connection has to prove it holds the key (or say a plain hello).
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections authenticated at the same time, at most.
pub const MAX_AUTHENTICATING: usize = 8;
/// How often a waiting accept loop checks whether it should stop.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// Refusals logged per second at most (a flood would otherwise fill the log).
const LOG_PER_SECOND: u32 = 10;

/// A listening socket links arrive on.
pub trait LinkAcceptor: AsRawFd + Send + 'static {
    /// The connected socket type.
    type Socket: LinkSocket;
    /// Accepts one connection (the listener is non-blocking: `WouldBlock` when none waits).
    fn accept_socket(&self) -> io::Result<Self::Socket>;
    /// Makes `accept_socket` non-blocking.
    fn make_nonblocking(&self) -> io::Result<()>;
}

impl LinkAcceptor for TcpListener {
    type Socket = TcpStream;
    fn accept_socket(&self) -> io::Result<TcpStream> {
        let (s, _) = self.accept()?;
        s.set_nonblocking(false)?;
        // Frames and checkpoint records are latency-sensitive and written in whole batches.
        s.set_nodelay(true)?;
        Ok(s)
    }
    fn make_nonblocking(&self) -> io::Result<()> {
        self.set_nonblocking(true)
    }
}

impl LinkAcceptor for UnixListener {
    type Socket = UnixStream;
    fn accept_socket(&self) -> io::Result<UnixStream> {
        let (s, _) = self.accept()?;
        s.set_nonblocking(false)?;
        Ok(s)
    }
    fn make_nonblocking(&self) -> io::Result<()> {
        self.set_nonblocking(true)
    }
}

/// What a listener authenticates against.
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    /// The link key (`None`: plain links).
    pub key: Option<LinkKey>,
    /// The purpose a peer must name (`checkpoint`, `frames`).
    pub purpose: &'static str,
    /// How long a connection has to authenticate.
    pub timeout: Duration,
}

impl AuthPolicy {
    /// `key` and `purpose`, with [`AUTH_TIMEOUT`].
    pub fn new(key: Option<LinkKey>, purpose: &'static str) -> AuthPolicy {
        AuthPolicy { key, purpose, timeout: AUTH_TIMEOUT }
    }
}

/// An accept loop on its own thread, handing authenticated links to a callback.
pub struct LinkListener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LinkListener {
    /// Accepts on `listener` until stopped, calling `on_link` (on the accept thread) with each
    /// authenticated link, in the order they authenticated.
    pub fn spawn<A: LinkAcceptor>(
        listener: A,
        policy: AuthPolicy,
        name: &str,
        mut on_link: impl FnMut(LinkConn<A::Socket>) + Send + 'static,
    ) -> io::Result<LinkListener> {
        listener.make_nonblocking()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            let mut accepting = Accepting::new(listener, policy);
            while !s.load(Ordering::Relaxed) {
                if let Some(link) = accepting.next(STOP_CHECK) {
                    on_link(link);
                }
            }
        })?;
        Ok(LinkListener { stop, thread: Some(thread) })
    }

    /// Stops accepting (links handed out stay up).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LinkListener {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Waits on `listener` for the first connection that authenticates, dropping the others,
/// until `patience` runs out (`None`: for ever) or `cancel` is set.
pub fn accept_one<A: LinkAcceptor>(
    listener: A,
    policy: AuthPolicy,
    patience: Option<Duration>,
    cancel: Option<&AtomicBool>,
) -> io::Result<LinkConn<A::Socket>> {
    listener.make_nonblocking()?;
    let deadline = patience.map(|p| Instant::now() + p);
    let mut accepting = Accepting::new(listener, policy);
    loop {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "stopped while waiting for the peer"));
        }
        let wait = match deadline {
            Some(d) if Instant::now() >= d => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no peer authenticated in time"))
            }
            Some(d) => d.saturating_duration_since(Instant::now()).min(STOP_CHECK),
            None => STOP_CHECK,
        };
        if let Some(link) = accepting.next(wait) {
            return Ok(link);
        }
    }
}

/// The accept loop's state: the listener, the authenticating threads' results.
struct Accepting<A: LinkAcceptor> {
    listener: A,
    policy: Arc<AuthPolicy>,
    done_tx: SyncSender<LinkConn<A::Socket>>,
    done: Receiver<LinkConn<A::Socket>>,
    busy: Arc<AtomicUsize>,
    log: LogBudget,
}

impl<A: LinkAcceptor> Accepting<A> {
    fn new(listener: A, policy: AuthPolicy) -> Self {
        let (done_tx, done) = sync_channel(MAX_AUTHENTICATING);
        Accepting { listener, policy: Arc::new(policy), done_tx, done, busy: Arc::default(), log: LogBudget::default() }
    }

    /// Accepts what waits, starts authenticating it, and returns the next authenticated link
    /// within `wait`.
    fn next(&mut self, wait: Duration) -> Option<LinkConn<A::Socket>> {
        self.accept_waiting();
        let until = Instant::now() + wait;
        loop {
            match self.done.try_recv() {
                Ok(link) => return Some(link),
                Err(_) if Instant::now() >= until => return None,
                Err(_) => {}
            }
            // Wake for a new connection or, a little later, for a finished authentication.
            if poll_readable(self.listener.as_raw_fd(), Duration::from_millis(10).min(until - Instant::now())) {
                self.accept_waiting();
            }
            match self.done.recv_timeout(Duration::ZERO) {
                Ok(link) => return Some(link),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn accept_waiting(&mut self) {
        loop {
            let sock = match self.listener.accept_socket() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, for instance: let it pass rather than spin.
                    if self.log.allow() {
                        tracing::warn!(target: "link", purpose = self.policy.purpose, error = %e, "cannot accept a link connection");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    return;
                }
            };
            let peer = sock.peer_name();
            if self.busy.load(Ordering::SeqCst) >= MAX_AUTHENTICATING {
                if self.log.allow() {
                    tracing::warn!(target: "link", purpose = self.policy.purpose, %peer, "refused a link connection: {MAX_AUTHENTICATING} others are still authenticating");
                }
                sock.shutdown_both();
                continue;
            }
            self.busy.fetch_add(1, Ordering::SeqCst);
            let (policy, busy, done) = (self.policy.clone(), self.busy.clone(), self.done_tx.clone());
            let started = std::thread::Builder::new().name("link-auth".into()).spawn(move || {
                match accept(sock, policy.key.as_ref(), policy.purpose, policy.timeout) {
                    Ok(link) => {
                        tracing::info!(target: "link", purpose = policy.purpose, peer = %link.peer, encrypted = link.secure, "link authenticated");
                        // The receiver may be gone (the listener stopped): the link is dropped.
                        let _ = done.send(link);
                    }
                    Err(e) => {
                        tracing::warn!(target: "link", purpose = policy.purpose, %peer, error = %e, "refused a link connection")
                    }
                }
                busy.fetch_sub(1, Ordering::SeqCst);
            });
            if let Err(e) = started {
                self.busy.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(target: "link", error = %e, "cannot start a thread to authenticate a link connection");
            }
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes; true if readable.
fn poll_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0
}

/// At most [`LOG_PER_SECOND`] log lines a second.
#[derive(Debug)]
struct LogBudget {
    window: Instant,
    used: u32,
}

impl Default for LogBudget {
    fn default() -> Self {
        LogBudget { window: Instant::now(), used: 0 }
    }
}

impl LogBudget {
    fn allow(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.used = 0;
        }
        self.used += 1;
        self.used <= LOG_PER_SECOND
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::secure::connect;
    use std::io::{Read, Write};

    fn key(b: u8) -> LinkKey {
        LinkKey::derive(&[b; 32])
    }

    #[test]
    fn silent_garbage_and_wrong_key_connections_do_not_keep_the_real_peer_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let policy = AuthPolicy::new(Some(key(9)), "checkpoint");
        let waiter = std::thread::spawn(move || accept_one(l, policy, Some(Duration::from_secs(10)), None));
        // A silent connection, one that sends garbage, one with another key.
        let _silent = TcpStream::connect(addr).unwrap();
        let mut garbage = TcpStream::connect(addr).unwrap();
        garbage.write_all(&[0xff; 64]).unwrap();
        let wrong = TcpStream::connect(addr).unwrap();
        assert!(connect(wrong, Some(&key(8)), "checkpoint", Duration::from_secs(2)).is_err());
        // The real peer gets through while the silent one still waits for its timeout.
        let started = Instant::now();
        let mut real =
            connect(TcpStream::connect(addr).unwrap(), Some(&key(9)), "checkpoint", Duration::from_secs(2)).unwrap();
        let mut got = waiter.join().unwrap().unwrap();
        assert!(started.elapsed() < AUTH_TIMEOUT, "not held up by the silent connection");
        real.writer.write_all(b"ok").unwrap();
        real.writer.flush().unwrap();
        let mut b = [0u8; 2];
        got.reader.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ok");
    }

    #[test]
    fn a_flood_of_silent_connections_is_bounded_and_the_listener_keeps_serving() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let listener = LinkListener::spawn(l, AuthPolicy::new(None, "frames"), "test-listener", move |link| {
            let _ = tx.send(link.peer);
        })
        .unwrap();
        let silent: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // Refused ones are closed at once (read sees EOF or a reset), the rest after the timeout.
        std::thread::sleep(AUTH_TIMEOUT + Duration::from_millis(500));
        let mut closed = 0;
        for mut s in silent {
            s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            let mut b = [0u8; 1];
            match s.read(&mut b) {
                Ok(0) => closed += 1,
                Err(e) if !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => closed += 1,
                _ => {}
            }
        }
        assert_eq!(closed, 40, "every silent connection was dropped");
        connect(TcpStream::connect(addr).unwrap(), None, "frames", Duration::from_secs(2)).unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(3)).is_ok(), "the real peer was handed over");
        listener.stop();
    }
}
