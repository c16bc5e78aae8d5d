//! The metrics endpoint's HTTP server: `GET /metrics` on one thread, for Prometheus.
//!
//! Small and bounded: at most [`MAX_CONNECTIONS`] connections at once (more are closed at
//! accept), a request head of at most [`MAX_REQUEST`] bytes, [`TIMEOUT`] for a whole exchange,
//! one request per connection (`Connection: close`). It only reads the process's state: there
//! is nothing to change through it. It has no authentication; bind it to a management address.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::exposition::CONTENT_TYPE;

/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 8;
/// Largest request head (request line and headers).
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long one connection may take, from accept to the last byte of the response.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Headers a request may have.
const MAX_HEADERS: usize = 32;

const LISTENER: Token = Token(0);
const WAKE: Token = Token(1);
const FIRST_CONN: usize = 2;

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be bound (in use, not local, no permission).
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The event loop or its thread could not be created.
    #[error("cannot start the metrics server: {0}")]
    Start(#[source] io::Error),
}

/// Makes a scrape's text, or says why there is none now.
pub type Render = Box<dyn FnMut() -> Result<String, String> + Send>;

/// The running server; dropping it stops the thread and closes the socket.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Listens on `addr` and serves `GET /metrics` with `render`'s text on a thread of its
    /// own. Port 0 picks a free port (see [`local_addr`](Self::local_addr)).
    pub fn spawn(
        addr: SocketAddr,
        render: impl FnMut() -> Result<String, String> + Send + 'static,
    ) -> Result<MetricsServer, MetricsError> {
        let bind = |source| MetricsError::Bind { addr, source };
        let std_listener = std::net::TcpListener::bind(addr).map_err(bind)?;
        std_listener.set_nonblocking(true).map_err(bind)?;
        let local = std_listener.local_addr().map_err(bind)?;
        let mut listener = TcpListener::from_std(std_listener);
        let poll = Poll::new().map_err(MetricsError::Start)?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE).map_err(MetricsError::Start)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).map_err(MetricsError::Start)?);
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = Server { poll, listener, conns: (0..MAX_CONNECTIONS).map(|_| None).collect(), refused: 0 };
        let (s, mut render) = (stop.clone(), Box::new(render) as Render);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || server.run(&s, &mut render))
            .map_err(MetricsError::Start)?;
        tracing::info!(addr = %local, "serving metrics on http://{local}/metrics (unauthenticated, read-only)");
        Ok(MetricsServer { addr: local, stop, waker, thread: Some(thread) })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Conn {
    stream: TcpStream,
    request: Vec<u8>,
    /// The response and how much of it was written.
    response: Option<(Vec<u8>, usize)>,
    deadline: Instant,
}

struct Server {
    poll: Poll,
    listener: TcpListener,
    conns: Vec<Option<Conn>>,
    refused: u64,
}

/// What to do with a connection after an event.
enum Next {
    Keep,
    Close,
}

impl Server {
    fn run(&mut self, stop: &AtomicBool, render: &mut Render) {
        let mut events = Events::with_capacity(MAX_CONNECTIONS + 2);
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let timeout = self.conns.iter().flatten().map(|c| c.deadline.saturating_duration_since(now)).min();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "the metrics server cannot poll; stopping it");
                return;
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKE => {}
                    Token(t) => {
                        let i = t - FIRST_CONN;
                        let next = match self.conns.get_mut(i).and_then(Option::as_mut) {
                            Some(conn) => conn.ready(render),
                            None => Next::Keep,
                        };
                        if let Next::Close = next {
                            self.close(i);
                        }
                    }
                }
            }
            let now = Instant::now();
            for i in 0..self.conns.len() {
                if self.conns[i].as_ref().is_some_and(|c| c.deadline <= now) {
                    tracing::debug!("metrics: a connection timed out");
                    self.close(i);
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let (mut stream, peer) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, say: the listener stays readable; try at the next event.
                    tracing::warn!(error = %e, "metrics: cannot accept a connection");
                    return;
                }
            };
            let Some(i) = self.conns.iter().position(Option::is_none) else {
                self.refused += 1;
                if self.refused.is_power_of_two() {
                    tracing::warn!(%peer, refused = self.refused, "metrics: too many connections; closing new ones");
                }
                continue;
            };
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                Token(FIRST_CONN + i),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!(error = %e, "metrics: cannot watch a connection");
                continue;
            }
            self.conns[i] =
                Some(Conn { stream, request: Vec::new(), response: None, deadline: Instant::now() + TIMEOUT });
        }
    }

    fn close(&mut self, i: usize) {
        if let Some(mut c) = self.conns[i].take() {
            let _ = self.poll.registry().deregister(&mut c.stream);
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A complete request head, as far as this server cares.
enum Request {
    /// `GET /metrics` (`HEAD`: the same response without its body).
    Metrics { head_only: bool },
    /// Anything else: the response that says why not.
    Refused(Vec<u8>),
}

impl Conn {
    fn ready(&mut self, render: &mut Render) -> Next {
        if self.response.is_none() {
            let response = match self.read() {
                Ok(Some(Request::Metrics { head_only })) => match render() {
                    Ok(text) => ok(&text, head_only),
                    Err(why) => {
                        tracing::warn!(error = %why, "metrics: no scrape");
                        status(503, "Service Unavailable", &format!("{why}\n"))
                    }
                },
                Ok(Some(Request::Refused(response))) => response,
                Ok(None) => return Next::Keep,
                Err(()) => return Next::Close,
            };
            self.response = Some((response, 0));
        }
        self.write()
    }

    /// Reads what arrived; the request once its head is complete (or cannot be).
    fn read(&mut self) -> Result<Option<Request>, ()> {
        let mut buf = [0u8; 2048];
        loop {
            match self.stream.read(&mut buf) {
                // The client left (or half-closed before finishing its request).
                Ok(0) => return Err(()),
                Ok(n) => {
                    self.request.extend_from_slice(&buf[..n]);
                    if self.request.len() > MAX_REQUEST {
                        let r = status(431, "Request Header Fields Too Large", "request too large\n");
                        return Ok(Some(Request::Refused(r)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(()),
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let refused = match req.parse(&self.request) {
            Ok(httparse::Status::Partial) => return Ok(None),
            Ok(httparse::Status::Complete(_)) => {
                let path = req.path.unwrap_or("").split('?').next().unwrap_or("");
                match (req.method.unwrap_or(""), path) {
                    ("GET", "/metrics") => return Ok(Some(Request::Metrics { head_only: false })),
                    ("HEAD", "/metrics") => return Ok(Some(Request::Metrics { head_only: true })),
                    (_, "/metrics") => status(405, "Method Not Allowed", "only GET and HEAD\n"),
                    _ => status(404, "Not Found", "the metrics are at /metrics\n"),
                }
            }
            Err(httparse::Error::TooManyHeaders) => {
                status(431, "Request Header Fields Too Large", "too many headers\n")
            }
            Err(_) => status(400, "Bad Request", "not an HTTP request\n"),
        };
        Ok(Some(Request::Refused(refused)))
    }

    /// Writes what the socket takes; closes once all is written.
    fn write(&mut self) -> Next {
        let Some((response, written)) = self.response.as_mut() else { return Next::Keep };
        while *written < response.len() {
            match self.stream.write(&response[*written..]) {
                Ok(0) => return Next::Close,
                Ok(n) => *written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Next::Close,
            }
        }
        Next::Close
    }
}

fn ok(body: &str, head_only: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        r.extend_from_slice(body.as_bytes());
    }
    r
}

fn status(code: u16, reason: &str, body: &str) -> Vec<u8> {
    let allow = if code == 405 { "Allow: GET, HEAD\r\n" } else { "" };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream as StdStream;

    use super::*;

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn connect(addr: SocketAddr) -> StdStream {
        let s = StdStream::connect(addr).unwrap();
        s.set_read_timeout(Some(TIMEOUT * 3)).unwrap();
        s
    }

    /// Whether the server closed `s` (rather than the read timing out).
    fn closed_by_server(s: &mut StdStream) -> bool {
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => true,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    /// Sends `request` and reads until the server closes.
    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = connect(addr);
        s.write_all(request).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn serves_get_and_head_and_refuses_the_rest() {
        let mut n = 0;
        let server = MetricsServer::spawn(local(), move || {
            n += 1;
            if n == 4 {
                Err("not now".into())
            } else {
                Ok(format!("x_scrapes_total {n}\n"))
            }
        })
        .unwrap();
        let addr = server.local_addr();
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")), "{r}");
        assert!(r.contains("Content-Length: 18\r\n") && r.ends_with("\r\n\r\nx_scrapes_total 1\n"), "{r}");
        // A request that arrives in pieces, with a query string.
        let mut s = connect(addr);
        s.write_all(b"GET /metrics?x=1 HTT").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        s.write_all(b"P/1.0\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        assert!(r.ends_with("x_scrapes_total 2\n"), "{r}");
        let r = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("Content-Length: 18\r\nConnection: close\r\n\r\n"),
            "{r}"
        );
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 503 ") && r.ends_with("not now\n"), "{r}");
        let r = exchange(addr, b"GET / HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
        let r = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 405 ") && r.contains("Allow: GET, HEAD\r\n"), "{r}");
        let r = exchange(addr, b"\x16\x03\x01\x02\x00garbage\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let r =
            exchange(addr, format!("GET /metrics HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(MAX_HEADERS + 1)).as_bytes());
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
        // It still serves.
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(r.ends_with("x_scrapes_total 5\n"), "{r}");
    }

    #[test]
    fn requests_connections_and_time_are_bounded() {
        let server = MetricsServer::spawn(local(), || Ok("x 1\n".into())).unwrap();
        let addr = server.local_addr();
        // A request head that never ends is answered once it passes the limit.
        let mut s = connect(addr);
        let chunk = [b'a'; 1024];
        let mut answer = String::new();
        for _ in 0..(MAX_REQUEST / chunk.len() + 2) {
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        // Idle connections up to the limit are kept; the next one is closed at once.
        let idle: Vec<StdStream> = (0..MAX_CONNECTIONS).map(|_| connect(addr)).collect();
        assert!(closed_by_server(&mut connect(addr)), "a connection past the limit is closed");
        // Idle connections are closed after the timeout: the server then serves again.
        for mut s in idle {
            assert!(closed_by_server(&mut s), "an idle connection is closed");
        }
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(r.ends_with("\r\n\r\nx 1\n"), "{r}");
    }

    #[test]
    fn a_taken_address_is_a_clear_error() {
        let server = MetricsServer::spawn(local(), || Ok(String::new())).unwrap();
        let addr = server.local_addr();
        let e = MetricsServer::spawn(addr, || Ok(String::new())).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with(&format!("cannot listen for metrics on {addr}: ")), "{text}");
        assert!(matches!(e, MetricsError::Bind { .. }));
        drop(server);
        // Dropping the server frees the port.
        drop(MetricsServer::spawn(addr, || Ok(String::new())).unwrap());
    }
}
