//! A [`ControlServer`] on its own thread, for processes that have no single mio loop to host it
//! (vhost-net-compare). Requests arrive on a channel; replies and events go back through a
//! [`ControlHandle`], which wakes the thread.

use std::io;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use mio::{Events, Poll, Token, Waker};

use super::message::Event;
use super::server::{ConnId, ControlServer, Request};

const WAKE: Token = Token(0);
const SERVER: Token = Token(1);

enum Outgoing {
    Reply(ConnId, Event),
    Broadcast(Event),
    Stop,
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
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
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
        for request in requests.drain(..) {
            // The receiver is gone when its owner stopped listening; the commands go unanswered.
            if requests_tx.send(request).is_err() {
                tracing::debug!("control request dropped: nobody receives requests");
            }
        }
        loop {
            match outgoing.try_recv() {
                Ok(Outgoing::Reply(conn, event)) => server.reply(registry, conn, &event),
                Ok(Outgoing::Broadcast(event)) => server.broadcast(registry, &event),
                Ok(Outgoing::Stop) | Err(mpsc::TryRecvError::Disconnected) => return,
                Err(mpsc::TryRecvError::Empty) => break,
            }
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

    #[test]
    fn dropping_the_last_handle_stops_the_thread_and_removes_the_socket() {
        let path = TempPath::new();
        let (handle, requests) = ControlServer::spawn(&path, || Event::Hello {
            component: "t".into(),
            version: "0".into(),
            nic: "n".into(),
            mode: Mode::Colo,
            replica: None,
        })
        .unwrap();
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
}
