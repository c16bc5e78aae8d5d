//! Socket endpoints in QEMU's chardev style, and the connection each one keeps.
//!
//! `unix:PATH` connects to a Unix socket, `unix:PATH,server` listens on one, `tcp:HOST:PORT`
//! and `tcp:HOST:PORT,server` likewise for TCP. A server endpoint serves one peer at a time and
//! accepts the next when it leaves; a client endpoint reconnects once a second after its peer
//! goes away. At start, a client endpoint must connect and a server endpoint must bind, so a
//! mistyped endpoint fails at once with a clear message instead of waiting silently.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use mio::event::Source;
use mio::{Interest, Registry, Token};

use crate::control::SocketFile;
use crate::stream_addr::StreamAddr;

/// How long a client endpoint waits between reconnection attempts.
pub const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// Where a port's peer is: an address, and whether to listen there or connect to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The socket's address.
    pub addr: StreamAddr,
    /// Listen (true) or connect (false).
    pub server: bool,
}

impl Endpoint {
    /// Whether this endpoint listens.
    pub fn is_server(&self) -> bool {
        self.server
    }

    fn tcp_addr(addr: &str) -> io::Result<SocketAddr> {
        addr.to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("'{addr}' resolves to no address")))
    }
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (body, server) = match s.rsplit_once(',') {
            Some((body, "server" | "server=on")) => (body, true),
            Some((_, opt)) => return Err(format!("unknown endpoint option '{opt}' in '{s}' (only ',server')")),
            None => (s, false),
        };
        let addr = body.parse().map_err(|_| format!("'{s}': expected unix:PATH[,server] or tcp:HOST:PORT[,server]"))?;
        Ok(Endpoint { addr, server })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.addr, if self.server { ",server" } else { "" })
    }
}

/// A connected stream of either kind.
#[derive(Debug)]
pub enum Stream {
    /// Unix stream socket.
    Unix(mio::net::UnixStream),
    /// TCP socket.
    Tcp(mio::net::TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.register(r, t, i),
            Stream::Tcp(s) => s.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.reregister(r, t, i),
            Stream::Tcp(s) => s.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.deregister(r),
            Stream::Tcp(s) => s.deregister(r),
        }
    }
}

#[derive(Debug)]
enum Listener {
    /// The socket, then its file (mode 0600; removed once the socket is closed, by drop).
    Unix {
        socket: mio::net::UnixListener,
        _file: SocketFile,
    },
    Tcp(mio::net::TcpListener),
}

impl Listener {
    fn bind(endpoint: &Endpoint) -> io::Result<Listener> {
        match &endpoint.addr {
            StreamAddr::Unix(path) => {
                // Frames and notify_dev messages are for the COLO frame only: mode 0600 before
                // anyone can connect, whatever the umask.
                let (file, listener) = SocketFile::bind(path)?;
                Ok(Listener::Unix { socket: mio::net::UnixListener::from_std(listener), _file: file })
            }
            StreamAddr::Tcp(addr) => Ok(Listener::Tcp(mio::net::TcpListener::bind(Endpoint::tcp_addr(addr)?)?)),
        }
    }

    fn accept(&mut self) -> io::Result<Stream> {
        match self {
            Listener::Unix { socket, .. } => socket.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }

    fn source(&mut self) -> &mut dyn Source {
        match self {
            Listener::Unix { socket, .. } => socket,
            Listener::Tcp(l) => l,
        }
    }
}

/// Removes a Unix socket left behind by a process that is gone; refuses to take over a socket
/// someone still listens on, or a path that is not a socket.
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by another process", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

/// What a port's connection is doing.
#[derive(Debug)]
enum State {
    /// A peer is connected.
    Connected(Stream),
    /// A TCP client connection is being established.
    Connecting(mio::net::TcpStream),
    /// No peer: a server waits for one, a client retries at the given time.
    Waiting(Option<Instant>),
}

/// One endpoint and its connection, registered in a mio registry under two tokens: `base` for
/// the listener, `base + 1` for the stream.
#[derive(Debug)]
pub struct Port {
    name: &'static str,
    endpoint: Endpoint,
    listener: Option<Listener>,
    state: State,
    base: Token,
}

impl Port {
    /// Binds (server) or connects (client) `endpoint`. Fails if the endpoint is unusable.
    pub fn open(name: &'static str, endpoint: Endpoint, registry: &Registry, base: Token) -> io::Result<Port> {
        let context = |e: io::Error| io::Error::new(e.kind(), format!("{name} {endpoint}: {e}"));
        let mut port = Port { name, endpoint: endpoint.clone(), listener: None, state: State::Waiting(None), base };
        if endpoint.is_server() {
            let mut l = Listener::bind(&endpoint).map_err(context)?;
            registry.register(l.source(), base, Interest::READABLE).map_err(context)?;
            port.listener = Some(l);
        } else {
            let stream = connect_blocking(&endpoint).map_err(context)?;
            port.attach(registry, stream).map_err(context)?;
        }
        Ok(port)
    }

    /// The port's name (for logs).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The stream's token.
    pub fn stream_token(&self) -> Token {
        Token(self.base.0 + 1)
    }

    /// Whether `token` belongs to this port.
    pub fn owns(&self, token: Token) -> bool {
        token == self.base || token == self.stream_token()
    }

    /// The connected stream, if any.
    pub fn stream(&mut self) -> Option<&mut Stream> {
        match &mut self.state {
            State::Connected(s) => Some(s),
            _ => None,
        }
    }

    /// Whether a peer is connected.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Connected(_))
    }

    /// Handles a readiness event for `token`. Returns true if a peer just connected (the caller
    /// then reads and writes as for any readiness on the stream).
    pub fn handle_event(&mut self, registry: &Registry, token: Token) -> bool {
        if token == self.base {
            return self.accept(registry);
        }
        if let State::Connecting(s) = &self.state {
            match (s.take_error(), s.peer_addr()) {
                (Ok(None), Ok(_)) => {
                    let State::Connecting(s) = std::mem::replace(&mut self.state, State::Waiting(None)) else {
                        unreachable!()
                    };
                    let _ = s.set_nodelay(true);
                    tracing::info!(port = self.name, endpoint = %self.endpoint, "reconnected");
                    self.state = State::Connected(Stream::Tcp(s));
                    return true;
                }
                (Ok(None), Err(e)) if e.kind() == io::ErrorKind::NotConnected => {}
                (Ok(Some(e)), _) | (Err(e), _) | (_, Err(e)) => {
                    tracing::debug!(port = self.name, error = %e, "connect failed");
                    self.disconnect(registry);
                }
            }
        }
        false
    }

    fn accept(&mut self, registry: &Registry) -> bool {
        if self.is_connected() {
            // One peer at a time; further peers wait in the backlog until this one leaves.
            return false;
        }
        let Some(l) = self.listener.as_mut() else { return false };
        match l.accept() {
            Ok(stream) => match self.attach(registry, stream) {
                Ok(()) => {
                    tracing::info!(port = self.name, endpoint = %self.endpoint, "peer connected");
                    true
                }
                Err(e) => {
                    tracing::warn!(port = self.name, error = %e, "cannot register accepted peer");
                    false
                }
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                tracing::warn!(port = self.name, error = %e, "accept failed");
                false
            }
        }
    }

    fn attach(&mut self, registry: &Registry, mut stream: Stream) -> io::Result<()> {
        registry.register(&mut stream, self.stream_token(), Interest::READABLE | Interest::WRITABLE)?;
        self.state = State::Connected(stream);
        Ok(())
    }

    /// The peer went away (EOF or error): drop the stream; a server accepts the next peer, a
    /// client schedules a reconnection. Returns true if a new peer is already connected.
    pub fn disconnect(&mut self, registry: &Registry) -> bool {
        match std::mem::replace(&mut self.state, State::Waiting(None)) {
            State::Connected(mut s) => {
                let _ = registry.deregister(&mut s);
                tracing::info!(port = self.name, endpoint = %self.endpoint, "peer disconnected");
            }
            State::Connecting(mut s) => {
                let _ = registry.deregister(&mut s);
            }
            State::Waiting(_) => {}
        }
        if self.endpoint.is_server() {
            // A peer may be waiting in the backlog already; its readiness was reported while
            // we were busy with the previous one.
            self.accept(registry)
        } else {
            self.state = State::Waiting(Some(Instant::now() + RECONNECT_INTERVAL));
            false
        }
    }

    /// When this port wants [`Port::poll_reconnect`] to run.
    pub fn next_retry(&self) -> Option<Instant> {
        match self.state {
            State::Waiting(at) => at,
            _ => None,
        }
    }

    /// Retries a client connection if it is due. Returns true if a peer just connected.
    pub fn poll_reconnect(&mut self, registry: &Registry, now: Instant) -> bool {
        let State::Waiting(Some(at)) = self.state else { return false };
        if now < at {
            return false;
        }
        let result = match &self.endpoint.addr {
            StreamAddr::Unix(path) => mio::net::UnixStream::connect(path).map(Stream::Unix).map(Ok),
            StreamAddr::Tcp(addr) => Endpoint::tcp_addr(addr).and_then(mio::net::TcpStream::connect).map(Err),
        };
        match result {
            Ok(Ok(stream)) => match self.attach(registry, stream) {
                Ok(()) => {
                    tracing::info!(port = self.name, endpoint = %self.endpoint, "reconnected");
                    return true;
                }
                Err(e) => tracing::warn!(port = self.name, error = %e, "cannot register stream"),
            },
            Ok(Err(mut tcp)) => match registry.register(&mut tcp, self.stream_token(), Interest::WRITABLE) {
                Ok(()) => {
                    self.state = State::Connecting(tcp);
                    return false;
                }
                Err(e) => tracing::warn!(port = self.name, error = %e, "cannot register stream"),
            },
            Err(e) => tracing::debug!(port = self.name, error = %e, "reconnect failed"),
        }
        self.state = State::Waiting(Some(now + RECONNECT_INTERVAL));
        false
    }
}

/// Connects a client endpoint at start, waiting at most two seconds.
fn connect_blocking(endpoint: &Endpoint) -> io::Result<Stream> {
    match &endpoint.addr {
        StreamAddr::Unix(path) => {
            let s = std::os::unix::net::UnixStream::connect(path)?;
            s.set_nonblocking(true)?;
            Ok(Stream::Unix(mio::net::UnixStream::from_std(s)))
        }
        StreamAddr::Tcp(addr) => {
            let s = std::net::TcpStream::connect_timeout(&Endpoint::tcp_addr(addr)?, Duration::from_secs(2))?;
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
            Ok(Stream::Tcp(mio::net::TcpStream::from_std(s)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_style_endpoints() {
        assert_eq!(
            "unix:/tmp/a.sock".parse::<Endpoint>().unwrap(),
            Endpoint { addr: StreamAddr::Unix("/tmp/a.sock".into()), server: false }
        );
        assert_eq!(
            "unix:/tmp/a.sock,server".parse::<Endpoint>().unwrap(),
            Endpoint { addr: StreamAddr::Unix("/tmp/a.sock".into()), server: true }
        );
        assert_eq!(
            "tcp:127.0.0.1:9000,server=on".parse::<Endpoint>().unwrap(),
            Endpoint { addr: StreamAddr::Tcp("127.0.0.1:9000".into()), server: true }
        );
        assert_eq!("tcp:[::1]:9".parse::<Endpoint>().unwrap().to_string(), "tcp:[::1]:9");
        for bad in ["", "unix:", "tcp:host", "tcp::9", "tcp:h:99999", "udp:x:1", "unix:/a,wait=off", "/tmp/x"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad} should be refused");
        }
    }

    fn temp_path(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("colo-endpoint-{tag}-{}.sock", std::process::id()))
    }

    #[test]
    fn server_reaccepts_after_peer_leaves_and_client_must_connect_at_start() {
        let path = temp_path("reaccept");
        let poll = mio::Poll::new().unwrap();
        let ep = Endpoint { addr: StreamAddr::Unix(path.clone()), server: true };
        let mut port = Port::open("test", ep, poll.registry(), Token(10)).unwrap();
        let c1 = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(port.handle_event(poll.registry(), Token(10)));
        let c2 = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(!port.handle_event(poll.registry(), Token(10)), "one peer at a time");
        drop(c1);
        assert!(port.disconnect(poll.registry()), "the waiting peer is accepted at once");
        drop(c2);
        // A client endpoint to a path nobody listens on fails at start.
        let missing = Endpoint { addr: StreamAddr::Unix(temp_path("missing")), server: false };
        let err = Port::open("test", missing, poll.registry(), Token(20)).unwrap_err();
        assert!(err.to_string().contains("test unix:"), "{err}");
        drop(port);
        assert!(!path.exists(), "socket file removed");
    }

    #[test]
    fn stale_sockets_are_replaced_but_live_ones_and_files_are_not() {
        let path = temp_path("stale-fn");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(remove_stale_socket(&path).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        drop(l); // the path stays, nobody listens
        remove_stale_socket(&path).unwrap();
        assert!(!path.exists());
        std::fs::write(&path, b"not a socket").unwrap();
        assert_eq!(remove_stale_socket(&path).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_server_socket_is_private_and_replaces_a_stale_socket_but_not_a_live_one_or_a_file() {
        use std::os::unix::fs::PermissionsExt;
        let path = temp_path("stale");
        let poll = mio::Poll::new().unwrap();
        let ep = Endpoint { addr: StreamAddr::Unix(path.clone()), server: true };
        let open = || Port::open("test", ep.clone(), poll.registry(), Token(10));
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(open().unwrap_err().kind(), io::ErrorKind::AddrInUse);
        drop(live); // the path stays, nobody listens
        let port = open().unwrap();
        // Only the owner may connect, whatever the umask (it was 0755 under the usual 022).
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        drop(port);
        assert!(!path.exists(), "removed with the port");
        std::fs::write(&path, b"not a socket").unwrap();
        assert_eq!(open().unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
        std::fs::remove_file(&path).unwrap();
    }
}
