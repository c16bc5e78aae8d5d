//! Test helpers: unique socket paths, and a [`ControlServer`] driven by a small mio loop in its
//! own thread, answering commands the way a compare process would.

use std::io::{BufRead, BufReader};
use std::ops::Deref;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use mio::{Events, Poll, Token, Waker};

use super::message::Event;
use super::server::{ControlServer, Request, MAX_PENDING};
use crate::compare::{Mode, Reason, Stats};
use crate::control::message::Command;

/// A socket path unique to this process and call; the file is removed on drop.
pub struct TempPath(PathBuf);

impl TempPath {
    pub fn new() -> TempPath {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        TempPath(std::env::temp_dir().join(format!("colo-control-{}-{n}.sock", std::process::id())))
    }
}

impl Deref for TempPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The hello the harness sends.
pub fn hello() -> Event {
    Event::Hello { component: "test".into(), version: "0".into(), nic: "eth0".into(), mode: Mode::Colo, replica: None }
}

/// A checkpoint with this id is answered with [`FLOOD_BYTES`] of replies.
pub const FLOOD_ID: u64 = 1_000_000;
/// More than the server queues for one controller.
pub const FLOOD_BYTES: usize = MAX_PENDING + (1 << 20);
/// A checkpoint with this id is answered only on [`Harness::release_held`].
pub const HOLD_ID: u64 = 1_000_001;

enum Ctl {
    Broadcast(Box<Event>),
    ReleaseHeld,
    Stop,
}

const WAKE: Token = Token(0);

/// A server in a thread. Answers `checkpoint` with a `miscompare` broadcast followed by
/// `flushed {released: 1, dropped: 2}`, `mode` with `mode-set`, and `query-stats` with `stats`
/// whose `flows` is 7.
pub struct Harness {
    path: TempPath,
    tx: Sender<Ctl>,
    waker: Arc<Waker>,
    connections: Arc<AtomicUsize>,
    held: Arc<AtomicUsize>,
    /// [`ControlServer::peak_pending`] and [`ControlServer::max_read`].
    peak_pending: Arc<AtomicUsize>,
    max_read: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Harness {
    pub fn start() -> Harness {
        let path = TempPath::new();
        let mut server = ControlServer::bind(&path).unwrap();
        let mut poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).unwrap());
        server.register(poll.registry(), Token(1)).unwrap();
        let (tx, rx) = mpsc::channel();
        let connections = Arc::new(AtomicUsize::new(0));
        let held_count = Arc::new(AtomicUsize::new(0));
        let (conns, held_n) = (connections.clone(), held_count.clone());
        let (peak_pending, max_read) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (peak, most_read) = (peak_pending.clone(), max_read.clone());
        let thread = std::thread::spawn(move || {
            let mut events = Events::with_capacity(64);
            let mut requests = Vec::new();
            let mut held: Vec<Request> = Vec::new();
            loop {
                poll.poll(&mut events, None).unwrap();
                let registry = poll.registry();
                for event in events.iter() {
                    if server.owns(event.token()) {
                        server.handle_event(registry, event, &hello(), &mut requests);
                    }
                }
                for r in requests.drain(..) {
                    match r.command {
                        Command::Checkpoint { id: FLOOD_ID } => {
                            let message = "x".repeat(60_000);
                            let line = Event::Error { id: None, message: message.clone() }.to_line().len() + 1;
                            for _ in 0..FLOOD_BYTES.div_ceil(line) {
                                server.reply(registry, r.conn, &Event::Error { id: None, message: message.clone() });
                            }
                        }
                        Command::Checkpoint { id: HOLD_ID } => held.push(r),
                        Command::Checkpoint { id } => {
                            let m = Event::Miscompare {
                                nic: "eth0".into(),
                                reason: Reason::Payload,
                                proto: "tcp".into(),
                                flow: "10.0.0.2:80>10.0.0.1:40000".into(),
                                held: 3,
                                suppressed: 0,
                            };
                            server.broadcast(registry, &m);
                            server.reply(registry, r.conn, &Event::Flushed { id, released: 1, dropped: 2 });
                        }
                        Command::Mode { id, mode } => server.reply(registry, r.conn, &Event::ModeSet { id, mode }),
                        Command::QueryStats { id } => {
                            let stats = Stats { flows: 7, ..Stats::default() };
                            server.reply(registry, r.conn, &Event::Stats { id, stats: Box::new(stats) });
                        }
                        other => {
                            let id = Some(other.id());
                            server.reply(
                                registry,
                                r.conn,
                                &Event::Error { id, message: "not a one-VM backend".into() },
                            );
                        }
                    }
                }
                while let Ok(ctl) = rx.try_recv() {
                    match ctl {
                        Ctl::Broadcast(e) => server.broadcast(registry, &e),
                        Ctl::ReleaseHeld => {
                            for r in held.drain(..) {
                                let id = r.command.id();
                                server.reply(registry, r.conn, &Event::Flushed { id, released: 0, dropped: 0 });
                            }
                        }
                        Ctl::Stop => return,
                    }
                }
                held_n.store(held.len(), Ordering::SeqCst);
                conns.store(server.connections(), Ordering::SeqCst);
                peak.store(server.peak_pending(), Ordering::SeqCst);
                most_read.store(server.max_read(), Ordering::SeqCst);
            }
        });
        Harness { path, tx, waker, connections, held: held_count, peak_pending, max_read, thread: Some(thread) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connections as of the server loop's last iteration.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Requests held back (see [`HOLD_ID`]).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// [`ControlServer::peak_pending`] as of the server loop's last iteration.
    pub fn peak_pending(&self) -> usize {
        self.peak_pending.load(Ordering::SeqCst)
    }

    /// [`ControlServer::max_read`] as of the server loop's last iteration.
    pub fn max_read(&self) -> usize {
        self.max_read.load(Ordering::SeqCst)
    }

    pub fn broadcast(&self, event: Event) {
        self.ctl(Ctl::Broadcast(Box::new(event)));
    }

    pub fn release_held(&self) {
        self.ctl(Ctl::ReleaseHeld);
    }

    fn ctl(&self, ctl: Ctl) {
        self.tx.send(ctl).unwrap();
        self.waker.wake().unwrap();
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.tx.send(Ctl::Stop);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            // Surface a panic of the server thread, unless this test is failing already.
            if t.join().is_err() && !std::thread::panicking() {
                panic!("server thread panicked");
            }
        }
    }
}

/// Reads events line by line from a plain socket.
pub struct RawLines(BufReader<UnixStream>);

impl RawLines {
    pub fn new(stream: UnixStream) -> RawLines {
        RawLines(BufReader::new(stream))
    }

    pub fn next_event(&mut self) -> Event {
        Event::parse(self.next_line().as_bytes()).unwrap()
    }

    /// The next line, without its newline.
    pub fn next_line(&mut self) -> String {
        let mut line = String::new();
        self.0.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "incomplete line {line:?}");
        line.trim_end().to_string()
    }
}
