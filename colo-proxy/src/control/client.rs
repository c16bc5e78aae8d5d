//! A small blocking client of the control socket, for controllers, tools and tests.
//!
//! Commands are synchronous: each waits for the reply carrying its id. Events that arrive
//! meanwhile (`miscompare`, `peer`, ...) are queued in arrival order and handed out by
//! [`ControlClient::next_event`], so none is lost.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::lines::{Line, LineBuffer};
use super::message::{Command, Event, EVENT_TYPES, MAX_LINE};
use crate::compare::{FlushSummary, Mode, Stats};
use crate::replica::Role;

/// How long [`ControlClient::connect`] waits for the `hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a command waits for its reply unless changed with [`ControlClient::set_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a control exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed.
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    /// No reply (or no `hello`) in time.
    #[error("timed out waiting for the compare process")]
    Timeout,
    /// The compare process closed the connection.
    #[error("the compare process closed the control connection")]
    Closed,
    /// The compare process sent something that is not the protocol.
    #[error("control protocol violation: {0}")]
    Protocol(String),
    /// The compare process answered with an `error`.
    #[error("the compare process refused: {0}")]
    Remote(String),
}

/// A connection to one compare process's control socket.
#[derive(Debug)]
pub struct ControlClient {
    stream: UnixStream,
    lines: LineBuffer,
    /// Events received and not yet handed out, in arrival order.
    queue: VecDeque<Event>,
    hello: Event,
    next_id: u64,
    timeout: Duration,
}

impl ControlClient {
    /// Connects to the socket at `path` and waits up to [`HELLO_TIMEOUT`] for the `hello`.
    pub fn connect(path: &Path) -> Result<ControlClient, ClientError> {
        ControlClient::connect_with_timeout(path, HELLO_TIMEOUT)
    }

    /// Connects and waits up to `hello_timeout` for the `hello`.
    pub fn connect_with_timeout(path: &Path, hello_timeout: Duration) -> Result<ControlClient, ClientError> {
        let stream = UnixStream::connect(path)?;
        let mut client = ControlClient {
            stream,
            lines: LineBuffer::new(MAX_LINE),
            queue: VecDeque::new(),
            // Replaced below; the server sends `hello` before anything else.
            hello: Event::Error { id: None, message: String::new() },
            next_id: 1,
            timeout: DEFAULT_TIMEOUT,
        };
        client.hello = match client.next_event(Some(hello_timeout))? {
            Some(hello @ Event::Hello { .. }) => hello,
            // A server with no room for us says so and closes.
            Some(Event::Error { message, .. }) => return Err(ClientError::Remote(message)),
            Some(other) => return Err(ClientError::Protocol(format!("expected hello, got {}", other.to_line()))),
            None => return Err(ClientError::Timeout),
        };
        Ok(client)
    }

    /// The `hello` the compare process sent on connecting (mode as of then).
    pub fn hello(&self) -> &Event {
        &self.hello
    }

    /// How long commands wait for their reply.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes how long commands wait for their reply.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// `checkpoint`: flushes, and returns what the flush released and dropped once it is done.
    pub fn checkpoint(&mut self) -> Result<FlushSummary, ClientError> {
        match self.call(|id| Command::Checkpoint { id })? {
            Event::Flushed { released, dropped, .. } => Ok(FlushSummary { released, dropped }),
            other => Err(unexpected("flushed", &other)),
        }
    }

    /// `mode`: switches the compare mode; returns the mode the compare process reports.
    pub fn set_mode(&mut self, mode: Mode) -> Result<Mode, ClientError> {
        match self.call(|id| Command::Mode { id, mode })? {
            Event::ModeSet { mode, .. } => Ok(mode),
            other => Err(unexpected("mode-set", &other)),
        }
    }

    /// Sets a one-VM backend's role (`peer` and `lease_ms` as primary); returns the role in
    /// force.
    pub fn set_role(&mut self, role: Role, peer: Option<&str>, lease_ms: Option<u64>) -> Result<Role, ClientError> {
        let peer = peer.map(str::to_string);
        match self.call(|id| Command::Role { id, role, peer: peer.clone(), lease_ms })? {
            Event::RoleSet { role, .. } => Ok(role),
            other => Err(unexpected("role-set", &other)),
        }
    }

    /// A primary one-VM backend's mark: the first inbound frame its VM has not taken.
    pub fn rx_mark(&mut self) -> Result<u64, ClientError> {
        match self.call(|id| Command::QueryRxMark { id })? {
            Event::RxMark { mark, .. } => Ok(mark),
            other => Err(unexpected("rx-mark", &other)),
        }
    }

    /// Tells a secondary one-VM backend its VM loaded a checkpoint taken at `mark`; returns the
    /// inbound frames now waiting for the VM.
    pub fn resync(&mut self, mark: u64) -> Result<u64, ClientError> {
        match self.call(|id| Command::Resync { id, mark })? {
            Event::Resynced { frames, .. } => Ok(frames),
            other => Err(unexpected("resynced", &other)),
        }
    }

    /// `query-stats`: the compare process's counters.
    pub fn stats(&mut self) -> Result<Stats, ClientError> {
        match self.call(|id| Command::QueryStats { id })? {
            Event::Stats { stats, .. } => Ok(*stats),
            other => Err(unexpected("stats", &other)),
        }
    }

    /// The next event: a queued one first, else one read from the socket, waiting up to
    /// `timeout` (`None`: without limit). `Ok(None)` when the time ran out.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Result<Option<Event>, ClientError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        self.wait_for(deadline, |_| true)
    }

    /// Sends `line` as is (a `\n` is added), for testing how bad input is handled. Replies are
    /// read with [`next_event`](Self::next_event).
    pub fn send_raw_line(&mut self, line: &str) -> Result<(), ClientError> {
        let mut data = Vec::with_capacity(line.len() + 1);
        data.extend_from_slice(line.as_bytes());
        data.push(b'\n');
        self.write(&data)
    }

    /// Sends a command with a fresh id and waits for the reply with that id; an `error` reply
    /// becomes [`ClientError::Remote`].
    fn call(&mut self, command: impl FnOnce(u64) -> Command) -> Result<Event, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = command(id).to_line().into_bytes();
        line.push(b'\n');
        self.write(&line)?;
        match self.wait_for(Some(Instant::now() + self.timeout), |e| e.reply_to() == Some(id))? {
            Some(Event::Error { message, .. }) => Err(ClientError::Remote(message)),
            Some(reply) => Ok(reply),
            None => Err(ClientError::Timeout),
        }
    }

    fn write(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.stream.set_write_timeout(Some(self.timeout))?;
        self.stream.write_all(data).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout,
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ClientError::Closed,
            _ => ClientError::Io(e),
        })
    }

    /// Removes and returns the first queued event that `wanted` accepts, reading from the socket
    /// until one arrives or `deadline` passes (`Ok(None)`).
    fn wait_for(
        &mut self,
        deadline: Option<Instant>,
        wanted: impl Fn(&Event) -> bool,
    ) -> Result<Option<Event>, ClientError> {
        loop {
            if let Some(i) = self.queue.iter().position(&wanted) {
                return Ok(self.queue.remove(i));
            }
            if !self.receive(deadline)? {
                return Ok(None);
            }
        }
    }

    /// Reads once, queueing every complete event. `Ok(false)` once `deadline` has passed with
    /// nothing read; at least one read is tried even when it has passed already.
    fn receive(&mut self, deadline: Option<Instant>) -> Result<bool, ClientError> {
        let mut chunk = [0u8; 8192];
        loop {
            // A zero timeout means "block forever" to the socket, so wait at least 1 ms.
            let wait = deadline.map(|d| d.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
            self.stream.set_read_timeout(wait)?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => {
                    self.take(&chunk[..n])?;
                    return Ok(true);
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(ClientError::Closed),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Parses received bytes into the queue. Every complete line is consumed; the first bad one
    /// is reported.
    fn take(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let ControlClient { lines, queue, .. } = self;
        let mut error = None;
        lines.push(data, |line| {
            let result = match line {
                Line::Complete(l) if l.trim_ascii().is_empty() => Ok(()),
                Line::Complete(l) => parse_event(l).map(|e| queue.extend(e)),
                Line::TooLong => Err(ClientError::Protocol(format!("line longer than {MAX_LINE} bytes"))),
            };
            if let Err(e) = result {
                error.get_or_insert(e);
            }
        });
        error.map_or(Ok(()), Err)
    }
}

/// Parses one line. Lines of an event type this version does not know are skipped (`None`), so
/// a newer compare process can add events without breaking older controllers.
fn parse_event(line: &[u8]) -> Result<Option<Event>, ClientError> {
    let bad = |e: &dyn std::fmt::Display| {
        ClientError::Protocol(format!("{e} in {:?}", String::from_utf8_lossy(&line[..line.len().min(200)])))
    };
    let value: Value = serde_json::from_slice(line).map_err(|e| bad(&e))?;
    match value.get("type").and_then(Value::as_str) {
        Some(kind) if !EVENT_TYPES.contains(&kind) => {
            tracing::debug!(kind, "skipping unknown control event");
            Ok(None)
        }
        _ => serde_json::from_value(value).map(Some).map_err(|e| bad(&e)),
    }
}

fn unexpected(wanted: &str, got: &Event) -> ClientError {
    ClientError::Protocol(format!("expected {wanted}, got {}", got.to_line()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;
    use crate::compare::Reason;
    use crate::control::testutil::{self, Harness, TempPath};

    /// A fake compare process that accepts one connection and runs `script` on it.
    fn fake_server(script: impl FnOnce(UnixStream) + Send + 'static) -> (TempPath, std::thread::JoinHandle<()>) {
        let path = TempPath::new();
        let listener = UnixListener::bind(&*path).unwrap();
        let t = std::thread::spawn(move || script(listener.accept().unwrap().0));
        (path, t)
    }

    fn hello_line() -> String {
        testutil::hello().to_line() + "\n"
    }

    #[test]
    fn commands_get_their_replies() {
        let h = Harness::start();
        let mut c = ControlClient::connect(h.path()).unwrap();
        assert_eq!(c.hello(), &testutil::hello());
        assert_eq!(c.timeout(), DEFAULT_TIMEOUT);
        assert_eq!(c.checkpoint().unwrap(), FlushSummary { released: 1, dropped: 2 });
        assert_eq!(c.set_mode(Mode::SecondaryOnly).unwrap(), Mode::SecondaryOnly);
        assert_eq!(c.stats().unwrap(), Stats { flows: 7, ..Stats::default() });
    }

    #[test]
    fn events_arriving_while_waiting_for_a_reply_are_queued() {
        let h = Harness::start();
        let mut c = ControlClient::connect(h.path()).unwrap();
        // The harness broadcasts a miscompare before each flushed reply.
        c.checkpoint().unwrap();
        c.checkpoint().unwrap();
        let t = Some(Duration::from_secs(1));
        for _ in 0..2 {
            match c.next_event(t).unwrap() {
                Some(Event::Miscompare { reason: Reason::Payload, held: 3, .. }) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(c.next_event(Some(Duration::ZERO)).unwrap(), None);
    }

    #[test]
    fn an_error_reply_becomes_remote_and_unknown_events_are_skipped() {
        let (path, t) = fake_server(|mut s| {
            let mut lines = testutil::RawLines::new(s.try_clone().unwrap());
            s.write_all(hello_line().as_bytes()).unwrap();
            let Event::Error { .. } = lines.next_event() else { unreachable!() };
            // Answer only once the command is in: closing before the client wrote it would
            // make its write fail (EPIPE) and the test flaky.
            let command = lines.next_line();
            assert!(command.contains("stats"), "{command}");
            let line = concat!(
                r#"{"type":"from-the-future","id":1}"#,
                "\n",
                r#"{"type":"peer","role":"primary","state":"connected"}"#,
                "\n",
                r#"{"type":"error","id":1,"message":"engine busy"}"#,
                "\n"
            );
            s.write_all(line.as_bytes()).unwrap();
        });
        let mut c = ControlClient::connect(&path).unwrap();
        // The fake reads lines as events; any valid JSON line will do.
        c.send_raw_line(&Event::Error { id: None, message: String::new() }.to_line()).unwrap();
        match c.stats() {
            Err(ClientError::Remote(m)) => assert_eq!(m, "engine busy"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.next_event(None).unwrap(),
            Some(Event::Peer { role: crate::Side::Primary, state: crate::control::PeerState::Connected })
        );
        t.join().unwrap();
        assert!(matches!(c.next_event(None), Err(ClientError::Closed)));
    }

    #[test]
    fn no_reply_is_a_timeout_and_a_closed_socket_is_closed() {
        let (path, t) = fake_server(|mut s| {
            s.write_all(hello_line().as_bytes()).unwrap();
            let mut buf = [0u8; 256];
            // Read the command, do not answer, then hang up after the second.
            let _ = s.read(&mut buf).unwrap();
            let _ = s.read(&mut buf).unwrap();
        });
        let mut c = ControlClient::connect(&path).unwrap();
        c.set_timeout(Duration::from_millis(100));
        let started = Instant::now();
        assert!(matches!(c.checkpoint(), Err(ClientError::Timeout)));
        assert!(started.elapsed() >= Duration::from_millis(100));
        c.set_timeout(Duration::from_secs(5));
        assert!(matches!(c.checkpoint(), Err(ClientError::Closed)));
        t.join().unwrap();
    }

    #[test]
    fn connect_needs_a_hello() {
        let (path, t) = fake_server(|s| {
            std::thread::sleep(Duration::from_millis(300));
            drop(s);
        });
        let r = ControlClient::connect_with_timeout(&path, Duration::from_millis(50));
        assert!(matches!(r, Err(ClientError::Timeout)), "{r:?}");
        t.join().unwrap();

        let (path, t) = fake_server(|mut s| {
            s.write_all(b"{\"type\":\"flushed\",\"id\":1,\"released\":0,\"dropped\":0}\n").unwrap()
        });
        let r = ControlClient::connect(&path);
        assert!(matches!(&r, Err(ClientError::Protocol(m)) if m.contains("expected hello")), "{r:?}");
        t.join().unwrap();

        let (path, t) = fake_server(|mut s| s.write_all(b"not json\n").unwrap());
        let r = ControlClient::connect(&path);
        assert!(matches!(&r, Err(ClientError::Protocol(m)) if m.contains("not json")), "{r:?}");
        t.join().unwrap();

        let (path, t) = fake_server(drop);
        assert!(matches!(ControlClient::connect(&path), Err(ClientError::Closed)));
        t.join().unwrap();

        let missing = TempPath::new();
        assert!(matches!(ControlClient::connect(&missing), Err(ClientError::Io(_))));
    }

    #[test]
    fn a_line_split_across_reads_is_reassembled() {
        let (path, t) = fake_server(|mut s| {
            let line = hello_line();
            let (a, b) = line.as_bytes().split_at(10);
            s.write_all(a).unwrap();
            s.flush().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            s.write_all(b).unwrap();
        });
        let c = ControlClient::connect(&path).unwrap();
        assert_eq!(c.hello(), &testutil::hello());
        t.join().unwrap();
    }
}
