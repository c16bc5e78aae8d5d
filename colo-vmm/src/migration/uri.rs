//! Where a migration goes: `tcp:HOST:PORT` or `unix:PATH`.

use std::io;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use colo_proxy::link::{self, AuthPolicy, LinkConn, LinkError, LinkKey, LinkReader, LinkSocket, LinkWriter};

/// A migration address, `tcp:HOST:PORT` or `unix:PATH` (as text in API requests): the
/// address type colo-proxy's endpoints use too.
pub use colo_proxy::stream_addr::{AddrError as UriError, StreamAddr as MigrationUri};

/// This process's link key (`--link-key`), set once at start: every link it makes or accepts
/// (migration and COLO) is authenticated and encrypted with it.
static LINK_KEY: OnceLock<LinkKey> = OnceLock::new();

/// Sets the process's link key (once, at start). Without it links are plain.
pub fn set_link_key(key: LinkKey) {
    if LINK_KEY.set(key).is_err() {
        tracing::warn!("the link key was already set; keeping the first");
    }
}

/// The process's link key, if any.
pub fn link_key() -> Option<&'static LinkKey> {
    LINK_KEY.get()
}

/// The purpose every state-stream link names in its handshake (migration and COLO alike).
pub const LINK_PURPOSE: &str = "checkpoint";
/// How long connecting (and the handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One end of a link of socket type `S`: the link layer's reader and writer (authenticated
/// and encrypted with a link key, plain without), each behind a lock so that clones of a
/// [`Channel`] can read on one thread and write on another.
pub struct Ends<S: LinkSocket> {
    reader: Mutex<LinkReader<S>>,
    writer: Mutex<LinkWriter<S>>,
    control: S,
    peer: String,
    secure: bool,
}

impl<S: LinkSocket> Ends<S> {
    fn new(conn: LinkConn<S>) -> Arc<Ends<S>> {
        let LinkConn { reader, writer, control, peer, secure } = conn;
        Arc::new(Ends { reader: Mutex::new(reader), writer: Mutex::new(writer), control, peer, secure })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connected migration channel of either kind. Clones share the connection: one reads, one
/// writes. Writes are buffered: `flush` sends them (as the state stream does after each
/// message and batch).
#[derive(Clone)]
pub enum Channel {
    /// TCP.
    Tcp(Arc<Ends<TcpStream>>),
    /// Unix.
    Unix(Arc<Ends<UnixStream>>),
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, peer, secure) = match self {
            Channel::Tcp(e) => ("tcp", &e.peer, e.secure),
            Channel::Unix(e) => ("unix", &e.peer, e.secure),
        };
        f.debug_struct("Channel").field("kind", &kind).field("peer", peer).field("secure", &secure).finish()
    }
}

impl Channel {
    /// A plain channel over one end of a socket pair made in this process (tests).
    pub fn paired(s: UnixStream) -> io::Result<Channel> {
        Ok(Channel::Unix(Ends::new(link::paired(s)?)))
    }

    /// Another handle on the same connection (one reads, one writes).
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(self.clone())
    }

    /// Limits how long a read may wait.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Channel::Tcp(e) => e.control.set_read_deadline(t),
            Channel::Unix(e) => e.control.set_read_deadline(t),
        }
    }

    /// Closes both directions (unblocks a peer waiting on us, and a reader here).
    pub fn shutdown(&self) {
        match self {
            Channel::Tcp(e) => e.control.shutdown_both(),
            Channel::Unix(e) => e.control.shutdown_both(),
        }
    }

    /// Whether the link is authenticated and encrypted.
    pub fn secure(&self) -> bool {
        match self {
            Channel::Tcp(e) => e.secure,
            Channel::Unix(e) => e.secure,
        }
    }

    /// Whether every byte arrives as written without a checksum of ours: on a Unix socket the
    /// kernel copies them from one process to the other, and a secure link authenticates each
    /// one. A plain TCP link has only TCP's 16-bit sums: the state stream sums its pages there.
    pub fn delivers_bytes_intact(&self) -> bool {
        matches!(self, Channel::Unix(_)) || self.secure()
    }
}

impl io::Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Channel::Tcp(e) => lock(&e.reader).read(buf),
            Channel::Unix(e) => lock(&e.reader).read(buf),
        }
    }
}

impl io::Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Channel::Tcp(e) => lock(&e.writer).write(buf),
            Channel::Unix(e) => lock(&e.writer).write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Channel::Tcp(e) => lock(&e.writer).write_vectored(bufs),
            Channel::Unix(e) => lock(&e.writer).write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Channel::Tcp(e) => lock(&e.writer).flush(),
            Channel::Unix(e) => lock(&e.writer).flush(),
        }
    }
}

/// The send buffer asked for on a Unix link: how much a writer may have in flight.
const UNIX_SEND_BUFFER: libc::c_int = 4 << 20;

/// Asks for a larger send buffer on a Unix link. A Unix stream's sender may have only its send
/// buffer's worth in flight (about 200 KiB by default), so a checkpoint's megabytes would go in
/// hundreds of rounds of the writer sleeping until the reader woke and drained it, and waking
/// the other CPU is expensive in a VM (a pause about a fifth shorter at 20000 dirty pages/s
/// here). As root (`CAP_NET_ADMIN`) the size is set whatever `net.core.wmem_max` says;
/// otherwise the kernel caps it there. A refusal only costs speed. (TCP links tune their buffers themselves.)
fn widen_send_buffer(s: &UnixStream) {
    use std::os::fd::AsRawFd;
    let set = |option: libc::c_int| {
        let v = UNIX_SEND_BUFFER;
        // SAFETY: a valid socket and an int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    if let Err(e) = set(libc::SO_SNDBUFFORCE).or_else(|_| set(libc::SO_SNDBUF)) {
        tracing::debug!(target: "colo", error = %e, "widening a Unix link's send buffer");
    }
}

/// Why a link to the peer could not be made.
fn link_error(e: LinkError) -> io::Error {
    match e {
        LinkError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::PermissionDenied, other.to_string()),
    }
}

/// A migration address's two ends: connecting (the source) and listening (the destination).
pub trait MigrationEnds {
    /// Connects and authenticates (the source side) with the process's link key.
    fn connect(&self) -> io::Result<Channel> {
        self.connect_with(link_key())
    }

    /// Connects and authenticates with `key` (`None`: plain).
    fn connect_with(&self, key: Option<&LinkKey>) -> io::Result<Channel>;

    /// Listens (the destination side).
    fn listen(&self) -> io::Result<Listener>;
}

impl MigrationEnds for MigrationUri {
    fn connect_with(&self, key: Option<&LinkKey>) -> io::Result<Channel> {
        match self {
            MigrationUri::Tcp(a) => {
                let addr = a
                    .to_socket_addrs()?
                    .next()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{a} resolves to nothing")))?;
                let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
                s.set_nodelay(true)?;
                Ok(Channel::Tcp(Ends::new(link::connect(s, key, LINK_PURPOSE, CONNECT_TIMEOUT).map_err(link_error)?)))
            }
            MigrationUri::Unix(p) => {
                let s = UnixStream::connect(p)?;
                widen_send_buffer(&s);
                Ok(Channel::Unix(Ends::new(link::connect(s, key, LINK_PURPOSE, CONNECT_TIMEOUT).map_err(link_error)?)))
            }
        }
    }

    fn listen(&self) -> io::Result<Listener> {
        match self {
            MigrationUri::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a.as_str())?)),
            // Only this user may hand us a VM: 0600 before it can be reached.
            MigrationUri::Unix(p) => Ok(Listener::Unix(crate::unix_socket::bind_private(p)?, p.clone())),
        }
    }
}

/// A listening socket, removed (Unix) on drop.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix, with its path.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Waits for the source: the first connection that authenticates with the process's link
    /// key (or, without one, says a plain hello) within a second of connecting. Silent, garbage and
    /// unauthenticated connections are dropped with a log line, and the wait goes on.
    pub fn accept(&self) -> io::Result<Channel> {
        self.accept_with(link_key())
    }

    /// [`Listener::accept`] with `key` (`None`: plain).
    pub fn accept_with(&self, key: Option<&LinkKey>) -> io::Result<Channel> {
        let policy = AuthPolicy::new(key.cloned(), LINK_PURPOSE);
        Ok(match self {
            Listener::Tcp(l) => Channel::Tcp(Ends::new(link::accept_one(l.try_clone()?, policy, None, None)?)),
            Listener::Unix(l, _) => {
                let conn = link::accept_one(l.try_clone()?, policy, None, None)?;
                widen_send_buffer(&conn.control);
                Channel::Unix(Ends::new(conn))
            }
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The send buffer the kernel reports for `s` (twice what was asked for: its bookkeeping).
    fn send_buffer(s: &UnixStream) -> usize {
        use std::os::fd::AsRawFd;
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket, an int and its size.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "getsockopt: {}", io::Error::last_os_error());
        v as usize
    }

    #[test]
    fn a_unix_link_may_have_megabytes_in_flight() {
        let (a, _b) = UnixStream::pair().unwrap();
        let before = send_buffer(&a);
        widen_send_buffer(&a);
        let after = send_buffer(&a);
        if unsafe { libc::geteuid() } == 0 {
            assert!(after >= UNIX_SEND_BUFFER as usize, "as root the size is forced: {before} -> {after}");
        } else {
            // Capped at net.core.wmem_max: never smaller than before.
            assert!(after >= before, "{before} -> {after}");
            eprintln!("not root: the send buffer is capped by net.core.wmem_max ({before} -> {after})");
        }
    }

    /// Both ends of a link over `uri` with `key`: (connecting, accepted).
    fn ends(uri: &MigrationUri, key: Option<&LinkKey>) -> (Channel, Channel) {
        let l = uri.listen().unwrap();
        let uri = match (uri, &l) {
            (MigrationUri::Tcp(_), Listener::Tcp(t)) => MigrationUri::Tcp(t.local_addr().unwrap().to_string()),
            _ => uri.clone(),
        };
        let key2 = key.cloned();
        let accepted = std::thread::spawn(move || l.accept_with(key2.as_ref()).unwrap());
        let c = uri.connect_with(key).unwrap();
        (c, accepted.join().unwrap())
    }

    #[test]
    fn only_a_plain_tcp_link_leaves_the_state_stream_to_sum_its_pages() {
        let dir = crate::unix_socket::tests::scratch("intact");
        let key = LinkKey::derive(&[5; 32]);
        let unix = MigrationUri::Unix(dir.join("l.sock"));
        let tcp = MigrationUri::Tcp("127.0.0.1:0".into());
        for (uri, key, intact) in [(&unix, None, true), (&tcp, None, false), (&tcp, Some(&key), true)] {
            let (c, a) = ends(uri, key);
            assert_eq!((c.delivers_bytes_intact(), a.delivers_bytes_intact()), (intact, intact), "{uri:?} {c:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_incoming_unix_socket_is_0600_whatever_the_umask() {
        // Issue 12, item 6: it took its mode from the umask (0777 under umask 000).
        use crate::unix_socket::tests::{scratch, with_open_umask};
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("incoming");
        let path = dir.join("in.sock");
        let l = with_open_umask(|| MigrationUri::Unix(path.clone()).listen()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        drop(l);
        assert!(!path.exists(), "removed with the listener");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
