//! A [`ControlServer`] on its own thread, for processes that have no single mio loop to host it
//! (vhost-net-compare). Requests arrive on a channel; replies and events go back through a
//! [`ControlHandle`], which wakes the thread. Or the thread carries the requests out itself
//! ([`ControlHandle::execute_here`]): a checkpoint's flush is answered without waking a second
//! thread and being woken back, two of the few hops a checkpoint pause is made of.

use std::io;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token, Waker};

use super::message::{Command, Event};
use super::server::{ConnId, ControlServer, Request};

const WAKE: Token = Token(0);
const SERVER: Token = Token(1);

enum Outgoing {
    Reply(ConnId, Event),
    Broadcast(Event),
    /// From now on the thread executes the requests itself; those already on the channel first.
    Execute(Receiver<Request>, Box<dyn Executor>),
    Stop,
}

/// Carries out controllers' commands on the server's own thread (see
/// [`ControlHandle::execute_here`]), and runs what is due between them (timers).
pub trait Executor: Send + 'static {
    /// Carries out `command`; its answer goes to `reply`. Events queued through a
    /// [`ControlHandle`] before the answer reach the controllers before it.
    fn execute(&mut self, command: Command, reply: &mut dyn FnMut(Event));

    /// Runs what is due; returns when to be called again at the latest. It is also called
    /// after every wake-up.
    fn run_due(&mut self) -> Instant;
}

/// Sends replies and events through a server running on its own thread (see
/// [`ControlServer::spawn`]). Cheap to clone; when the last clone is dropped the thread stops,
/// closing every connection and removing the socket file.
#[derive(Clone)]
pub struct ControlHandle {
    shared: Arc<Shared>,
}

struct Shared {
    tx: Sender<Outgoing>,
    waker: Waker,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for ControlHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlHandle").finish_non_exhaustive()
    }
}

impl ControlHandle {
    /// Sends `event` to the connection `conn` (typically the reply to its request).
    pub fn reply(&self, conn: ConnId, event: Event) {
        self.send(Outgoing::Reply(conn, event));
    }

    /// Sends `event` to every connected controller.
    pub fn broadcast(&self, event: Event) {
        self.send(Outgoing::Broadcast(event));
    }

    /// From now on the server's thread carries out the requests with `executor` instead of
    /// handing them to `requests` (the receiver [`ControlServer::spawn`] returned); those
    /// already waiting there are carried out first, in order.
    pub fn execute_here(&self, requests: Receiver<Request>, executor: impl Executor) {
        self.send(Outgoing::Execute(requests, Box::new(executor)));
    }

    fn send(&self, message: Outgoing) {
        // Fails only once the thread has stopped (its poll failed); it logged why.
        if self.shared.tx.send(message).is_ok() {
            if let Err(e) = self.shared.waker.wake() {
                tracing::warn!(error = %e, "cannot wake the control thread");
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = self.tx.send(Outgoing::Stop);
        let _ = self.waker.wake();
        // Join, so that the socket file is gone when the last handle is.
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}

impl ControlServer {
    /// Binds `path` (as [`bind`](Self::bind)) and serves it on a new thread with its own
    /// `mio::Poll`. `hello` makes the `hello` for each new connection (it may read shared state,
    /// such as the current mode) and must not hold a [`ControlHandle`], or the thread would keep
    /// itself alive. Commands arrive on the returned receiver; answer them through the handle.
    pub fn spawn(
        path: &Path,
        hello: impl FnMut() -> Event + Send + 'static,
    ) -> io::Result<(ControlHandle, Receiver<Request>)> {
        let mut server = ControlServer::bind(path)?;
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKE)?;
        server.register(poll.registry(), SERVER)?;
        let (out_tx, out_rx) = mpsc::channel();
        let (req_tx, req_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || run(poll, server, hello, out_rx, req_tx))?;
        let shared = Arc::new(Shared { tx: out_tx, waker, thread: Mutex::new(Some(thread)) });
        Ok((ControlHandle { shared }, req_rx))
    }
}

fn run(
    mut poll: Poll,
    mut server: ControlServer,
    mut hello: impl FnMut() -> Event,
    outgoing: Receiver<Outgoing>,
    requests_tx: Sender<Request>,
) {
    let mut events = Events::with_capacity(64);
    let mut requests = Vec::new();
    let mut executor: Option<Box<dyn Executor>> = None;
    // An executor met while delivering, with the requests that waited for it.
    let mut installing: Option<Installing> = None;
    let mut due: Option<Instant> = None;
    loop {
        // An executor to install does not wait for the next event.
        let timeout = match installing {
            Some(_) => Some(Duration::ZERO),
            None => due.map(|d| d.saturating_duration_since(Instant::now())),
        };
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "control thread cannot poll; stopping");
            return;
        }
        let registry = poll.registry();
        for event in events.iter() {
            if server.owns(event.token()) {
                // Only the listener's events need a hello; build it only for them.
                let made;
                let hello = if event.token() == SERVER {
                    made = hello();
                    &made
                } else {
                    &NO_HELLO
                };
                server.handle_event(registry, event, hello, &mut requests);
            }
        }
        // Replies and events queued before these requests go out before their answers.
        if deliver(&outgoing, &mut server, registry, &mut installing) {
            return;
        }
        if let Some((waiting, x)) = installing.take() {
            // The requests that reached the channel before: first, in order.
            requests.splice(0..0, waiting.try_iter());
            executor = Some(x);
        }
        for request in requests.drain(..) {
            let Some(x) = executor.as_mut() else {
                // The receiver is gone when its owner stopped listening; the commands go unanswered.
                if requests_tx.send(request).is_err() {
                    tracing::debug!("control request dropped: nobody receives requests");
                }
                continue;
            };
            let conn = request.conn;
            let mut stop = false;
            x.execute(request.command, &mut |event| {
                // Whatever the execution queued (events of the engine) precedes its answer.
                stop |= deliver(&outgoing, &mut server, registry, &mut installing);
                server.reply(registry, conn, &event);
            });
            if stop {
                return;
            }
        }
        if deliver(&outgoing, &mut server, registry, &mut installing) {
            return;
        }
        due = executor.as_mut().map(|x| x.run_due());
    }
}

/// An executor to install, and the receiver of the requests that reached the channel before it.
type Installing = (Receiver<Request>, Box<dyn Executor>);

/// Sends the queued replies and events; keeps an executor to install in `installing`. Whether
/// the thread is to stop.
fn deliver(
    outgoing: &Receiver<Outgoing>,
    server: &mut ControlServer,
    registry: &mio::Registry,
    installing: &mut Option<Installing>,
) -> bool {
    loop {
        match outgoing.try_recv() {
            Ok(Outgoing::Reply(conn, event)) => server.reply(registry, conn, &event),
            Ok(Outgoing::Broadcast(event)) => server.broadcast(registry, &event),
            Ok(Outgoing::Execute(waiting, x)) => *installing = Some((waiting, x)),
            Ok(Outgoing::Stop) | Err(mpsc::TryRecvError::Disconnected) => return true,
            Err(mpsc::TryRecvError::Empty) => return false,
        }
    }
}

/// Stands in for the hello on events that cannot accept connections.
static NO_HELLO: Event = Event::Error { id: None, message: String::new() };

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::compare::Mode;
    use crate::control::client::ControlClient;
    use crate::control::message::Command;
    use crate::control::testutil::TempPath;

    #[test]
    fn serves_requests_on_its_own_thread() {
        let path = TempPath::new();
        let hellos = Arc::new(AtomicU64::new(0));
        let counter = hellos.clone();
        let (handle, requests) = ControlServer::spawn(&path, move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            Event::Hello {
                component: "t".into(),
                version: n.to_string(),
                nic: "n".into(),
                mode: Mode::Passive,
                replica: None,
            }
        })
        .unwrap();
        // Answers `mode`; stops (dropping its handle) at the first `query-stats`.
        let responder = {
            let handle = handle.clone();
            std::thread::spawn(move || {
                for r in requests {
                    match r.command {
                        Command::Mode { id, mode } => handle.reply(r.conn, Event::ModeSet { id, mode }),
                        Command::QueryStats { .. } => break,
                        _ => {}
                    }
                }
            })
        };
        let mut a = ControlClient::connect(&path).unwrap();
        let mut b = ControlClient::connect(&path).unwrap();
        // Each connection gets a hello made when the listener woke for it: b's may come from the
        // same wake-up as a's (if it connected while a was being accepted), never an older one.
        let version = |c: &ControlClient| match c.hello() {
            Event::Hello { version, .. } => version.parse::<u64>().unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(version(&a), 0);
        assert!(version(&b) >= version(&a));
        assert_eq!(a.set_mode(Mode::Colo).unwrap(), Mode::Colo);
        handle.broadcast(Event::Error { id: None, message: "hi".into() });
        for c in [&mut a, &mut b] {
            assert_eq!(
                c.next_event(Some(Duration::from_secs(5))).unwrap(),
                Some(Event::Error { id: None, message: "hi".into() })
            );
        }
        drop(handle);
        // The responder still holds a clone: the server lives on.
        assert!(path.exists());
        assert_eq!(b.set_mode(Mode::Passive).unwrap(), Mode::Passive);
        b.send_raw_line(r#"{"type":"query-stats","id":99}"#).unwrap();
        responder.join().unwrap();
        assert!(!path.exists());
        assert!(matches!(a.next_event(Some(Duration::from_secs(5))), Err(crate::control::ClientError::Closed)));
    }

    /// A fixed `hello` in `mode`.
    fn hello(mode: Mode) -> Event {
        Event::Hello { component: "t".into(), version: "0".into(), nic: "n".into(), mode, replica: None }
    }

    #[test]
    fn dropping_the_last_handle_stops_the_thread_and_removes_the_socket() {
        let path = TempPath::new();
        let (handle, requests) = ControlServer::spawn(&path, || hello(Mode::Colo)).unwrap();
        let mut c = ControlClient::connect(&path).unwrap();
        let other = handle.clone();
        drop(handle);
        assert!(path.exists());
        drop(other);
        assert!(!path.exists());
        assert!(matches!(c.next_event(Some(Duration::from_secs(5))), Err(crate::control::ClientError::Closed)));
        // The request channel is closed with the thread.
        assert!(requests.recv().is_err());
    }

    /// Answers `mode` after broadcasting "before <mode>" through its handle; drops the handle at
    /// `query-stats` (so the test's is the last); counts its timer runs.
    struct Broadcasting {
        handle: Option<ControlHandle>,
        runs: Arc<AtomicU64>,
    }

    impl Executor for Broadcasting {
        fn execute(&mut self, command: Command, reply: &mut dyn FnMut(Event)) {
            match command {
                Command::Mode { id, mode } => {
                    if let Some(h) = &self.handle {
                        h.broadcast(Event::Error { id: None, message: format!("before {}", mode.name()) });
                    }
                    reply(Event::ModeSet { id, mode });
                }
                Command::QueryStats { id } => {
                    self.handle = None;
                    reply(Event::Error { id: Some(id), message: "dropped".into() });
                }
                _ => {}
            }
        }

        fn run_due(&mut self) -> Instant {
            self.runs.fetch_add(1, Ordering::SeqCst);
            Instant::now() + Duration::from_millis(10)
        }
    }

    #[test]
    fn an_executor_on_the_thread_answers_waiting_requests_first_and_events_before_answers() {
        let path = TempPath::new();
        let (handle, requests) = ControlServer::spawn(&path, || hello(Mode::Passive)).unwrap();
        let mut c = ControlClient::connect(&path).unwrap();
        // Sent before the executor exists: it waits on the channel.
        c.send_raw_line(r#"{"type":"mode","id":7,"mode":"colo"}"#).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let runs = Arc::new(AtomicU64::new(0));
        handle.execute_here(requests, Broadcasting { handle: Some(handle.clone()), runs: runs.clone() });
        let mut next = || c.next_event(Some(Duration::from_secs(5))).unwrap().expect("an event");
        assert_eq!(next(), Event::Error { id: None, message: "before colo".into() });
        assert_eq!(next(), Event::ModeSet { id: 7, mode: Mode::Colo });
        c.send_raw_line(r#"{"type":"mode","id":9,"mode":"passive"}"#).unwrap();
        let mut next = || c.next_event(Some(Duration::from_secs(5))).unwrap().expect("an event");
        assert_eq!(next(), Event::Error { id: None, message: "before passive".into() });
        assert_eq!(next(), Event::ModeSet { id: 9, mode: Mode::Passive });
        // Timers run without requests.
        let before = runs.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        assert!(runs.load(Ordering::SeqCst) >= before + 3, "run_due is called while idle");
        c.send_raw_line(r#"{"type":"query-stats","id":8}"#).unwrap();
        assert_eq!(
            c.next_event(Some(Duration::from_secs(5))).unwrap(),
            Some(Event::Error { id: Some(8), message: "dropped".into() })
        );
        drop(handle);
        assert!(!path.exists(), "the last handle stops the thread and removes the socket");
    }
}
