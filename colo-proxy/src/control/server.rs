//! The compare process's side of the control socket, living inside the caller's mio event loop.
//!
//! The proxy is single-threaded around one `mio::Poll`; the server only ever does non-blocking
//! I/O on it. Output to a controller is queued per connection and written as the socket takes
//! it; a controller that stops reading is disconnected once its queue passes [`MAX_PENDING`],
//! so a stuck controller can delay nothing but itself.
//!
//! Work per wake-up is bounded too, so a controller that writes without pause (a stream of bad
//! lines, each answered with an `error`) cannot hold the loop that also carries frames: at most
//! [`READ_BUDGET`] bytes are read from one connection per event, after which its (edge-
//! triggered) registration is re-armed and the rest is read at the next poll, after the other
//! sources. A controller with [`MAX_UNANSWERED`] commands not yet answered is not read until
//! answers go out, and no reply is queued past [`MAX_PENDING`]: memory per controller stays
//! below [`MAX_PENDING`] plus one line. A controller that sends more than [`MAX_BAD_LINES`] bad
//! lines in a row is disconnected.

use std::fmt;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::Path;

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

use super::lines::{Line, LineBuffer};
use super::message::{Command, Event, MAX_LINE};
use super::socket::SocketFile;

/// Most controllers connected at once.
pub const MAX_CONNECTIONS: usize = 64;

/// Tokens a [`ControlServer`] uses from the `first_token` given to
/// [`ControlServer::register`]: the listener, then one per connection slot.
pub const TOKEN_SPAN: usize = 1 + MAX_CONNECTIONS;

/// Most bytes queued for one controller; past this it is disconnected.
pub const MAX_PENDING: usize = 4 << 20;

/// Bytes read from a connection per `read` call.
const READ_CHUNK: usize = 4 << 10;

/// Most bytes read from one connection per readiness event (the rest waits for the next poll).
pub const READ_BUDGET: usize = 4 << 10;

/// Most bad lines in a row (no valid command between them) a controller may send; past this it
/// is disconnected. Each is answered with an `error`: a controller that sends them by the
/// thousand is not a controller. A valid command resets the count, so an occasional unknown
/// command (an older compare process) costs nothing.
pub const MAX_BAD_LINES: usize = 1024;

/// Most commands of one controller passed to the caller and not yet answered; past this its
/// input waits in the socket until replies go out.
pub const MAX_UNANSWERED: usize = 64;

/// Identifies one connection for its whole life; never reused, so a late reply to a controller
/// that has gone cannot reach a newer one in the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    slot: usize,
    serial: u64,
}

/// `#serial`, as in the logs.
impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.serial)
    }
}

/// A command received from a controller; answer it with [`ControlServer::reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The connection that sent it.
    pub conn: ConnId,
    /// What it asks for.
    pub command: Command,
}

/// One controller.
struct Conn {
    id: ConnId,
    stream: UnixStream,
    lines: LineBuffer,
    /// Queued output; `out[written..]` is not yet sent.
    out: Vec<u8>,
    written: usize,
    /// Whether WRITABLE interest is registered (only while output is pending).
    writable: bool,
    /// The controller has shut down its sending side.
    read_closed: bool,
    /// Commands passed to the caller and not yet replied to.
    unanswered: usize,
    /// Reading stopped at [`MAX_UNANSWERED`]; resumes when replies bring it below.
    paused: bool,
    /// Bad lines since the last valid command.
    bad_in_a_row: usize,
    /// Most output ever queued.
    peak: usize,
}

/// Why [`Conn::read_some`] stopped.
#[derive(Debug, PartialEq, Eq)]
enum ReadEnd {
    /// The socket has nothing more (or the controller finished sending).
    Drained,
    /// [`READ_BUDGET`] is used up; more may be waiting.
    Budget,
    /// Too many commands unanswered, or too much output queued.
    Paused,
    /// More than [`MAX_BAD_LINES`] bad lines in a row.
    Abusive,
}

impl Conn {
    fn pending(&self) -> usize {
        self.out.len() - self.written
    }

    fn push_line(&mut self, line: &str) {
        push_line(&mut self.out, line);
        self.peak = self.peak.max(self.pending());
    }

    /// Feeds received bytes to the line splitter: commands go to `requests`, bad lines get an
    /// `error` reply queued.
    fn receive(&mut self, data: &[u8], requests: &mut Vec<Request>) {
        let Conn { id, lines, out, written, unanswered, bad_in_a_row, .. } = self;
        lines.push(data, |line| {
            if *bad_in_a_row > MAX_BAD_LINES {
                // The controller is being disconnected; the rest of this read is not parsed.
                return;
            }
            let error = match line {
                // Blank lines are harmless (a person typing into socat); no reply.
                Line::Complete(l) if l.trim_ascii().is_empty() => return,
                Line::Complete(l) => match Command::parse(l) {
                    Ok(command) => {
                        *bad_in_a_row = 0;
                        *unanswered += 1;
                        requests.push(Request { conn: *id, command });
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(conn = %id, error = %e, "bad control line");
                        e.to_event()
                    }
                },
                Line::TooLong => {
                    tracing::debug!(conn = %id, "over-long control line");
                    let message = format!("line longer than {MAX_LINE} bytes; skipped to its end");
                    Event::Error { id: None, message }
                }
            };
            *bad_in_a_row += 1;
            // Not queued past the bound: a controller that is not reading is disconnected for it
            // before anything else is queued.
            if out.len() - *written <= MAX_PENDING && *bad_in_a_row <= MAX_BAD_LINES {
                push_line(out, &error.to_line());
            }
        });
        self.peak = self.peak.max(self.pending());
    }

    /// Reads until the socket has nothing more, [`READ_BUDGET`] bytes have been read, or the
    /// controller must wait for answers. Returns why it stopped and the bytes read.
    fn read_some(&mut self, requests: &mut Vec<Request>) -> io::Result<(ReadEnd, usize)> {
        let mut chunk = [0u8; READ_CHUNK];
        let mut read = 0;
        loop {
            if self.bad_in_a_row > MAX_BAD_LINES {
                return Ok((ReadEnd::Abusive, read));
            }
            if self.unanswered >= MAX_UNANSWERED || self.pending() > MAX_PENDING {
                self.paused = self.unanswered >= MAX_UNANSWERED;
                return Ok((ReadEnd::Paused, read));
            }
            if read >= READ_BUDGET {
                return Ok((ReadEnd::Budget, read));
            }
            match (&self.stream).read(&mut chunk) {
                Ok(0) => {
                    self.read_closed = true;
                    return Ok((ReadEnd::Drained, read));
                }
                Ok(n) => {
                    read += n;
                    self.receive(&chunk[..n], requests);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((ReadEnd::Drained, read)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The interest this connection is registered with.
    fn interest(&self) -> Interest {
        if self.writable {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        }
    }

    /// Writes queued output until done or the socket is full.
    fn write_pending(&mut self) -> io::Result<()> {
        while self.written < self.out.len() {
            match send(&self.stream, &self.out[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Compact only when the sent part dominates, so a slow reader costs
                    // amortised O(1) copying per byte.
                    if self.written * 2 >= self.out.len() {
                        self.out.drain(..self.written);
                        self.written = 0;
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.written = 0;
        Ok(())
    }
}

/// `send(2)` with `MSG_NOSIGNAL`: a controller that disappears must produce `EPIPE`, never a
/// `SIGPIPE` that kills the compare process (whatever its signal disposition).
fn send(stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a valid buffer of `data.len()` bytes; the descriptor is open while
    // `stream` is borrowed.
    let n = unsafe { libc::send(stream.as_raw_fd(), data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn push_line(out: &mut Vec<u8>, line: &str) {
    out.extend_from_slice(line.as_bytes());
    out.push(b'\n');
}

/// The control socket server of one compare process, driven by the caller's `mio::Poll`.
///
/// Use: [`bind`](Self::bind), [`register`](Self::register) with a free token range of
/// [`TOKEN_SPAN`] tokens, pass every event whose token it [`owns`](Self::owns) to
/// [`handle_event`](Self::handle_event), answer the [`Request`]s it returns with
/// [`reply`](Self::reply), and send unsolicited events with [`broadcast`](Self::broadcast).
/// Dropping the server closes every connection and removes the socket file.
pub struct ControlServer {
    listener: UnixListener,
    first: Option<Token>,
    conns: Vec<Option<Conn>>,
    next_serial: u64,
    /// Most output queued for a controller that has gone.
    peak_closed: usize,
    /// Most bytes read from one controller in one event.
    max_read: usize,
    // Declared after the listener: the file is removed once the socket is closed.
    file: SocketFile,
}

impl fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.file.path())
            .field("first_token", &self.first)
            .field("connections", &self.connections())
            .finish()
    }
}

impl ControlServer {
    /// Creates the socket at `path` with mode 0600 and listens. A stale socket file (nobody
    /// listening) is replaced; a live socket or a file that is not a socket is an error.
    pub fn bind(path: &Path) -> io::Result<ControlServer> {
        let (file, listener) = SocketFile::bind(path)?;
        tracing::info!(path = %path.display(), "control socket listening");
        Ok(ControlServer {
            listener: UnixListener::from_std(listener),
            first: None,
            conns: (0..MAX_CONNECTIONS).map(|_| None).collect(),
            next_serial: 1,
            peak_closed: 0,
            max_read: 0,
            file,
        })
    }

    /// The socket file's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Registers the listener with `registry`. The server owns tokens `first_token ..
    /// first_token + TOKEN_SPAN`: the listener's, then one per connection.
    pub fn register(&mut self, registry: &Registry, first_token: Token) -> io::Result<()> {
        if first_token.0.checked_add(TOKEN_SPAN).is_none() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "control token range overflows"));
        }
        registry.register(&mut self.listener, first_token, Interest::READABLE)?;
        self.first = Some(first_token);
        Ok(())
    }

    /// Whether `token` belongs to this server (after [`register`](Self::register)).
    pub fn owns(&self, token: Token) -> bool {
        self.first.is_some_and(|first| token.0 >= first.0 && token.0 - first.0 < TOKEN_SPAN)
    }

    /// Controllers connected now.
    pub fn connections(&self) -> usize {
        self.conns.iter().filter(|c| c.is_some()).count()
    }

    /// The most output ever queued for one controller, in bytes: at most [`MAX_PENDING`] plus
    /// one line.
    pub fn peak_pending(&self) -> usize {
        self.conns.iter().flatten().map(|c| c.peak).fold(self.peak_closed, usize::max)
    }

    /// The most bytes read from one controller in one event: at most [`READ_BUDGET`] plus one
    /// read.
    pub fn max_read(&self) -> usize {
        self.max_read
    }

    /// Handles a readiness event for one of the server's tokens: accepts a new controller
    /// (sending it `hello` at once), reads commands into `requests` (bad lines are answered
    /// with `error` here), and writes queued output.
    pub fn handle_event(
        &mut self,
        registry: &Registry,
        event: &mio::event::Event,
        hello: &Event,
        requests: &mut Vec<Request>,
    ) {
        let Some(first) = self.first else { return };
        if !self.owns(event.token()) {
            return;
        }
        if event.token() == first {
            self.accept(registry, first, hello);
            return;
        }
        let slot = event.token().0 - first.0 - 1;
        let Some(conn) = self.conns[slot].as_mut() else { return };
        let mut more = false;
        if (event.is_readable() || event.is_read_closed()) && !conn.paused {
            match conn.read_some(requests) {
                Ok((ReadEnd::Abusive, read)) => {
                    self.max_read = self.max_read.max(read);
                    tracing::warn!(conn = %conn.id, max = MAX_BAD_LINES, "controller sends nothing but bad lines; disconnecting it");
                    let message = format!("more than {MAX_BAD_LINES} bad lines in a row; disconnecting");
                    conn.push_line(&Event::Error { id: None, message }.to_line());
                    // Best effort: it may not be reading.
                    let _ = conn.write_pending();
                    self.close(registry, slot, "too many bad lines");
                    return;
                }
                Ok((end, read)) => {
                    self.max_read = self.max_read.max(read);
                    // Input left unread gets no new edge: read it at the next poll (a
                    // connection paused for answers is re-armed when they go out instead).
                    more = end == ReadEnd::Budget || (end == ReadEnd::Paused && !conn.paused);
                }
                Err(e) => {
                    self.close(registry, slot, &format!("read failed: {e}"));
                    return;
                }
            }
        }
        if event.is_write_closed() || event.is_error() {
            // The controller is gone; commands it sent just before still reach the caller.
            self.close(registry, slot, "connection closed");
            return;
        }
        self.flush(registry, slot);
        if more {
            self.rearm(registry, slot);
        }
    }

    /// Queues `event` for the connection `conn` (typically the reply to its request). Does
    /// nothing if that controller has disconnected.
    pub fn reply(&mut self, registry: &Registry, conn: ConnId, event: &Event) {
        match self.conns.get_mut(conn.slot) {
            Some(Some(c)) if c.id == conn => {
                c.unanswered = c.unanswered.saturating_sub(1);
                c.push_line(&event.to_line());
                let resume = c.paused && c.unanswered < MAX_UNANSWERED;
                c.paused &= !resume;
                self.flush(registry, conn.slot);
                if resume {
                    // Commands it sent meanwhile wait in the socket; no new edge will come.
                    self.rearm(registry, conn.slot);
                }
            }
            _ => tracing::debug!(conn = %conn, "reply to a controller that has gone"),
        }
    }

    /// Queues `event` for every connected controller.
    pub fn broadcast(&mut self, registry: &Registry, event: &Event) {
        let line = event.to_line();
        for slot in 0..self.conns.len() {
            if let Some(c) = self.conns[slot].as_mut() {
                c.push_line(&line);
                self.flush(registry, slot);
            }
        }
    }

    fn accept(&mut self, registry: &Registry, first: Token, hello: &Event) {
        let hello = hello.to_line();
        loop {
            let mut stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: leave the connection in the backlog and try again
                    // on the next event.
                    tracing::warn!(error = %e, "cannot accept control connection");
                    return;
                }
            };
            let Some(slot) = self.conns.iter().position(Option::is_none) else {
                // Accept and close rather than leave it in the backlog, so the controller learns
                // why at once. Best effort: a fresh socket always takes one short line.
                let message = format!("too many control connections (at most {MAX_CONNECTIONS})");
                let mut line = Vec::new();
                push_line(&mut line, &Event::Error { id: None, message }.to_line());
                let _ = send(&stream, &line);
                tracing::warn!(max = MAX_CONNECTIONS, "control connection refused: too many");
                continue;
            };
            if let Err(e) = registry.register(&mut stream, Token(first.0 + 1 + slot), Interest::READABLE) {
                tracing::warn!(error = %e, "cannot register control connection");
                continue;
            }
            let id = ConnId { slot, serial: self.next_serial };
            self.next_serial += 1;
            tracing::info!(conn = %id, "controller connected");
            let mut conn = Conn {
                id,
                stream,
                lines: LineBuffer::new(MAX_LINE),
                out: Vec::new(),
                written: 0,
                writable: false,
                read_closed: false,
                unanswered: 0,
                paused: false,
                bad_in_a_row: 0,
                peak: 0,
            };
            conn.push_line(&hello);
            self.conns[slot] = Some(conn);
            self.flush(registry, slot);
            // One controller per event, so that each gets a hello made for it (the mode may
            // change in between); the listener is re-armed for the next.
            if let Err(e) = registry.reregister(&mut self.listener, first, Interest::READABLE) {
                tracing::warn!(error = %e, "cannot re-arm the control listener");
            }
            return;
        }
    }

    /// Writes what the socket takes, keeps WRITABLE interest while output remains, and closes
    /// the connection on error, when a slow controller exceeds [`MAX_PENDING`], or when a
    /// controller that has finished sending has all its answers.
    fn flush(&mut self, registry: &Registry, slot: usize) {
        let Some(first) = self.first else { return };
        let Some(conn) = self.conns[slot].as_mut() else { return };
        if let Err(e) = conn.write_pending() {
            self.close(registry, slot, &format!("write failed: {e}"));
            return;
        }
        let pending = conn.pending();
        if pending > MAX_PENDING {
            tracing::warn!(conn = %conn.id, pending, "controller is not reading its control socket; disconnecting it");
            self.close(registry, slot, "too much unread output");
            return;
        }
        if conn.read_closed && conn.unanswered == 0 && pending == 0 {
            self.close(registry, slot, "controller finished");
            return;
        }
        let want = pending > 0;
        if want != conn.writable {
            let interest = if want { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            if let Err(e) = registry.reregister(&mut conn.stream, Token(first.0 + 1 + slot), interest) {
                self.close(registry, slot, &format!("cannot reregister: {e}"));
                return;
            }
            conn.writable = want;
        }
    }

    /// Re-registers the connection with the interest it has: epoll reports an edge-triggered
    /// source that is still readable again at the next poll, so input left unread (budget,
    /// pause) is read then.
    fn rearm(&mut self, registry: &Registry, slot: usize) {
        let Some(first) = self.first else { return };
        let Some(conn) = self.conns[slot].as_mut() else { return };
        let interest = conn.interest();
        if let Err(e) = registry.reregister(&mut conn.stream, Token(first.0 + 1 + slot), interest) {
            self.close(registry, slot, &format!("cannot reregister: {e}"));
        }
    }

    fn close(&mut self, registry: &Registry, slot: usize, why: &str) {
        if let Some(mut conn) = self.conns[slot].take() {
            self.peak_closed = self.peak_closed.max(conn.peak);
            let _ = registry.deregister(&mut conn.stream);
            tracing::info!(conn = %conn.id, why, "controller disconnected");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream as StdStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::compare::Mode;
    use crate::control::client::ControlClient;
    use crate::control::testutil::{self, Harness, TempPath};

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn two_controllers_get_hello_broadcasts_and_only_their_own_replies() {
        let h = Harness::start();
        let mut a = ControlClient::connect(h.path()).unwrap();
        let mut b = ControlClient::connect(h.path()).unwrap();
        assert_eq!(a.hello(), &testutil::hello());
        assert_eq!(b.hello(), &testutil::hello());
        wait_for("two connections", || h.connections() == 2);

        let peer = Event::Peer { role: crate::Side::Secondary, state: crate::control::PeerState::Connected };
        h.broadcast(peer.clone());
        let t = Some(Duration::from_secs(5));
        assert_eq!(a.next_event(t).unwrap(), Some(peer.clone()));
        assert_eq!(b.next_event(t).unwrap(), Some(peer));

        assert_eq!(a.set_mode(Mode::Passive).unwrap(), Mode::Passive);
        // b saw nothing of a's exchange.
        assert_eq!(b.next_event(Some(Duration::from_millis(200))).unwrap(), None);
        assert_eq!(b.stats().unwrap().flows, 7);
        assert_eq!(a.next_event(Some(Duration::from_millis(200))).unwrap(), None);
    }

    #[test]
    fn bad_lines_get_error_replies_and_the_connection_stays_usable() {
        let h = Harness::start();
        let mut c = ControlClient::connect(h.path()).unwrap();
        let t = Some(Duration::from_secs(5));
        let cases: [(&str, Option<u64>, &str); 5] = [
            (r#"{"type":"checkpoint","id":"#, None, "malformed JSON"),
            (r#"{"type":"reboot","id":77}"#, Some(77), "unknown command type 'reboot'"),
            (r#"{"type":"mode","id":78}"#, Some(78), "missing field `mode`"),
            (r#"{"id":79,"type":"mode","mode":"fast"}"#, Some(79), "unknown variant `fast`"),
            (r#"{"type":"mode","id":80,"mode":"colo","type":"checkpoint"}"#, Some(80), "duplicate key `type`"),
        ];
        for (line, id, message) in cases {
            c.send_raw_line(line).unwrap();
            match c.next_event(t).unwrap() {
                Some(Event::Error { id: got, message: m }) => {
                    assert_eq!(got, id, "{line}");
                    assert!(m.contains(message), "{line}: {m}");
                }
                other => panic!("{line}: {other:?}"),
            }
        }
        let long = format!(r#"{{"type":"checkpoint","id":1,"pad":"{}"}}"#, "x".repeat(MAX_LINE));
        c.send_raw_line(&long).unwrap();
        match c.next_event(t).unwrap() {
            Some(Event::Error { id: None, message }) => assert!(message.contains("longer than 65536"), "{message}"),
            other => panic!("{other:?}"),
        }
        // Blank lines are ignored.
        c.send_raw_line("").unwrap();
        c.send_raw_line("  ").unwrap();
        assert_eq!(c.checkpoint().unwrap().released, 1);
        assert_eq!(c.set_mode(Mode::Colo).unwrap(), Mode::Colo);
        // Only the miscompare broadcast before the flushed reply is left.
        assert!(matches!(c.next_event(t).unwrap(), Some(Event::Miscompare { .. })));
        assert_eq!(c.next_event(Some(Duration::from_millis(100))).unwrap(), None);
    }

    #[test]
    fn commands_split_across_writes_and_batched_in_one_write() {
        let h = Harness::start();
        let mut raw = StdStream::connect(h.path()).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut lines = testutil::RawLines::new(raw.try_clone().unwrap());
        assert_eq!(lines.next_event(), testutil::hello());
        raw.write_all(br#"{"type":"query-st"#).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        raw.write_all(b"ats\",\"id\":1}\n{\"type\":\"mode\",\"id\":2,\"mode\":\"passive\"}\n").unwrap();
        assert!(matches!(lines.next_event(), Event::Stats { id: 1, .. }));
        assert_eq!(lines.next_event(), Event::ModeSet { id: 2, mode: Mode::Passive });
    }

    #[test]
    fn a_controller_that_stops_reading_is_disconnected_and_others_keep_working() {
        let h = Harness::start();
        let mut slow = StdStream::connect(h.path()).unwrap();
        let mut good = ControlClient::connect(h.path()).unwrap();
        // The harness answers this id with more than MAX_PENDING bytes of replies.
        slow.write_all(format!("{{\"type\":\"checkpoint\",\"id\":{}}}\n", testutil::FLOOD_ID).as_bytes()).unwrap();
        wait_for("the slow controller to be dropped", || h.connections() == 1);
        assert_eq!(good.stats().unwrap().flows, 7);
        // The slow controller got part of the flood, then end of file.
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match slow.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(got > 0 && got < testutil::FLOOD_BYTES, "{got}");
        h.broadcast(Event::Error { id: None, message: "still here".into() });
        assert_eq!(
            good.next_event(Some(Duration::from_secs(5))).unwrap(),
            Some(Event::Error { id: None, message: "still here".into() })
        );
    }

    /// 64 KiB of `x\n` lines (each answered with an `error` about 35 times its size), with a
    /// valid command after every 1000 so that the controller is not dropped for bad lines
    /// alone.
    fn flood_chunk() -> Vec<u8> {
        let cycle = [b"x\n".repeat(1000), b"{\"type\":\"query-stats\",\"id\":1}\n".to_vec()].concat();
        cycle.repeat((64 << 10) / cycle.len() + 1)
    }

    /// Writes [`flood_chunk`]s until `stop`, `limit` bytes or a write error; returns (bytes
    /// written, whether a write failed).
    fn flood(mut s: StdStream, limit: usize, stop: &AtomicBool) -> (usize, bool) {
        let chunk = flood_chunk();
        let mut sent = 0;
        while sent < limit && !stop.load(Ordering::SeqCst) {
            if s.write_all(&chunk).is_err() {
                return (sent, true);
            }
            sent += chunk.len();
        }
        (sent, false)
    }

    /// Stops a flood when the test ends, failing or not (the server thread is joined then).
    struct StopOnDrop(Arc<AtomicBool>);

    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_controller_flooding_without_reading_is_dropped_with_little_queued() {
        let h = Harness::start();
        let mut good = ControlClient::connect(h.path()).unwrap();
        let flooder = StdStream::connect(h.path()).unwrap();
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let writer = {
            let stop = stop.0.clone();
            std::thread::spawn(move || flood(flooder, 4 << 20, &stop))
        };
        // The other controller is served all along.
        for _ in 0..20 {
            assert_eq!(good.stats().unwrap().flows, 7);
        }
        let (sent, cut) = writer.join().unwrap();
        assert!(cut, "a controller that never reads is disconnected ({sent} bytes sent)");
        wait_for("the flooder to be dropped", || h.connections() == 1);
        // Replies stop at the bound: nothing near the ~35x of what it sent.
        let peak = h.peak_pending();
        assert!(peak <= MAX_PENDING + MAX_LINE + 256, "{peak} bytes queued for one controller");
        let most = h.max_read();
        assert!(most <= READ_BUDGET + READ_CHUNK, "{most} bytes read in one event");
        assert_eq!(good.stats().unwrap().flows, 7);
    }

    #[test]
    fn a_controller_sending_nothing_but_bad_lines_is_disconnected() {
        let h = Harness::start();
        let mut raw = StdStream::connect(h.path()).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut lines = testutil::RawLines::new(raw.try_clone().unwrap());
        assert_eq!(lines.next_event(), testutil::hello());
        // A valid command resets the count: an occasional bad line costs nothing.
        let bad = |n: usize| "x\n".repeat(n);
        raw.write_all((bad(MAX_BAD_LINES) + "{\"type\":\"query-stats\",\"id\":1}\n").as_bytes()).unwrap();
        for _ in 0..MAX_BAD_LINES {
            assert!(matches!(lines.next_event(), Event::Error { .. }));
        }
        assert!(matches!(lines.next_event(), Event::Stats { id: 1, .. }));
        // Then one too many in a row.
        raw.write_all(bad(MAX_BAD_LINES + 10).as_bytes()).unwrap();
        for _ in 0..MAX_BAD_LINES {
            assert!(matches!(lines.next_event(), Event::Error { .. }));
        }
        match lines.next_event() {
            Event::Error { id: None, message } => assert!(message.contains("bad lines in a row"), "{message}"),
            other => panic!("{other:?}"),
        }
        let mut rest = String::new();
        match raw.read_to_string(&mut rest) {
            Ok(_) => assert_eq!(rest, "", "disconnected after the reason"),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{e}"),
        }
        wait_for("the connection to close", || h.connections() == 0);
    }

    #[test]
    fn a_controller_that_floods_holds_up_no_one() {
        let h = Harness::start();
        let mut good = ControlClient::connect(h.path()).unwrap();
        // A flooder that reads every reply; when it is dropped anyway (the replies outgrow what
        // it reads), it comes back: the flood lasts until the other controller is done.
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let flooder = {
            let (path, stop) = (h.path().to_path_buf(), stop.0.clone());
            std::thread::spawn(move || {
                let (mut bytes, mut connections) = (0, 0);
                while !stop.load(Ordering::SeqCst) {
                    let s = StdStream::connect(&path).unwrap();
                    connections += 1;
                    let mut replies = s.try_clone().unwrap();
                    let reader = std::thread::spawn(move || io::copy(&mut replies, &mut io::sink()));
                    bytes += flood(s.try_clone().unwrap(), usize::MAX, &stop).0;
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    let _ = reader.join();
                }
                (bytes, connections)
            })
        };
        wait_for("the flood to be read", || h.max_read() > 0);
        for _ in 0..20 {
            // ControlClient's own timeout (10 s) is the generous bound on the delay.
            assert_eq!(good.stats().unwrap().flows, 7);
            assert_eq!(good.set_mode(Mode::Passive).unwrap(), Mode::Passive);
        }
        drop(stop);
        let (bytes, connections) = flooder.join().unwrap();
        assert!(bytes > 0, "{bytes} bytes in {connections} connections");
        let most = h.max_read();
        assert!(most <= READ_BUDGET + READ_CHUNK, "{most} bytes read in one event");
        assert!(h.peak_pending() <= MAX_PENDING + MAX_LINE + 256, "{}", h.peak_pending());
    }

    #[test]
    fn a_controller_with_many_commands_unanswered_is_read_again_once_they_are_answered() {
        let h = Harness::start();
        let mut raw = StdStream::connect(h.path()).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut lines = testutil::RawLines::new(raw.try_clone().unwrap());
        assert_eq!(lines.next_event(), testutil::hello());
        // Commands the harness holds, up to the bound (one read may carry a few more).
        let held = |n: usize| format!("{{\"type\":\"checkpoint\",\"id\":{}}}\n", testutil::HOLD_ID).repeat(n);
        raw.write_all(held(MAX_UNANSWERED).as_bytes()).unwrap();
        wait_for("the first commands", || h.held() == MAX_UNANSWERED);
        // More wait in the socket until answers go out.
        raw.write_all((held(10) + "{\"type\":\"query-stats\",\"id\":5}\n").as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(h.held(), MAX_UNANSWERED, "commands read while {MAX_UNANSWERED} were unanswered");
        h.release_held();
        for _ in 0..MAX_UNANSWERED {
            assert!(matches!(lines.next_event(), Event::Flushed { .. }));
        }
        // Reading resumed without any new input.
        assert!(matches!(lines.next_event(), Event::Stats { id: 5, .. }));
        wait_for("the rest", || h.held() == 10);
        h.release_held();
        for _ in 0..10 {
            assert!(matches!(lines.next_event(), Event::Flushed { .. }));
        }
    }

    #[test]
    fn a_half_closed_controller_still_gets_its_replies() {
        let h = Harness::start();
        let mut raw = StdStream::connect(h.path()).unwrap();
        raw.write_all(b"{\"type\":\"query-stats\",\"id\":5}\n").unwrap();
        raw.shutdown(std::net::Shutdown::Write).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut all = String::new();
        raw.read_to_string(&mut all).unwrap();
        let events: Vec<Event> = all.lines().map(|l| Event::parse(l.as_bytes()).unwrap()).collect();
        assert_eq!(events.len(), 2, "{all}");
        assert_eq!(events[0], testutil::hello());
        assert_eq!(events[1].reply_to(), Some(5));
        wait_for("the connection to close", || h.connections() == 0);
    }

    #[test]
    fn connections_beyond_the_limit_are_refused_with_an_error() {
        let h = Harness::start();
        let clients: Vec<ControlClient> =
            (0..MAX_CONNECTIONS).map(|_| ControlClient::connect(h.path()).unwrap()).collect();
        wait_for("all connections", || h.connections() == MAX_CONNECTIONS);
        let mut extra = StdStream::connect(h.path()).unwrap();
        extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut all = String::new();
        extra.read_to_string(&mut all).unwrap();
        assert!(all.contains("too many control connections"), "{all}");
        drop(clients);
        wait_for("the connections to close", || h.connections() == 0);
        ControlClient::connect(h.path()).unwrap();
    }

    #[test]
    fn replies_to_a_departed_controller_are_dropped() {
        let h = Harness::start();
        let mut raw = StdStream::connect(h.path()).unwrap();
        // The harness holds replies to this id until told to send them.
        raw.write_all(format!("{{\"type\":\"checkpoint\",\"id\":{}}}\n", testutil::HOLD_ID).as_bytes()).unwrap();
        wait_for("the held request", || h.held() == 1);
        drop(raw);
        wait_for("the connection to close", || h.connections() == 0);
        let mut c = ControlClient::connect(h.path()).unwrap();
        h.release_held();
        assert_eq!(c.next_event(Some(Duration::from_millis(200))).unwrap(), None);
    }

    #[test]
    fn the_socket_is_private_and_removed_with_the_server() {
        let path = TempPath::new();
        let server = ControlServer::bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&*path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(server.path(), &*path);
        assert_eq!(server.connections(), 0);
        assert!(!server.owns(Token(0)), "owns nothing before register");
        drop(server);
        assert!(!path.exists());
    }

    #[test]
    fn token_range() {
        let path = TempPath::new();
        let mut server = ControlServer::bind(&path).unwrap();
        let poll = mio::Poll::new().unwrap();
        server.register(poll.registry(), Token(100)).unwrap();
        assert!(!server.owns(Token(99)));
        assert!(server.owns(Token(100)));
        assert!(server.owns(Token(100 + TOKEN_SPAN - 1)));
        assert!(!server.owns(Token(100 + TOKEN_SPAN)));
        let other_path = TempPath::new();
        let mut other = ControlServer::bind(&other_path).unwrap();
        assert!(other.register(poll.registry(), Token(usize::MAX - 3)).is_err());
    }
}
