//! Carrying out controllers' commands (docs/control.md) and running the compare engine's
//! timers.
//!
//! The socket is served by colo-proxy's threaded [`ControlServer`], whose thread also carries
//! out the commands (a checkpoint's flush is answered without waking another thread); events
//! leave through its [`ControlHandle`]. That thread wakes at least once per
//! `expired_scan_cycle` to check held frames against `compare_timeout`, so timeouts fire even
//! when no traffic and no command arrives. Without a control socket, a thread of its own runs
//! the timers.

use std::io;
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use colo_proxy::control::{Command, ControlHandle, ControlServer, Event, Executor, HelloReplica, Request};

use crate::hub::SharedMode;
use crate::replica::SharedRole;
use crate::router::Router;

/// The name in every `hello`.
pub const COMPONENT: &str = "vhost-net-compare";

/// Binds the control socket at `path` (mode 0600) and serves it on its own thread. `hello`
/// reads the mode from `mode` (and a one-VM backend's role from `replica`), never from the
/// router, so the server thread holds nothing that keeps it alive.
pub fn listen(
    path: &Path,
    nic: String,
    mode: Arc<SharedMode>,
    replica: Option<(Arc<SharedRole>, Option<String>)>,
) -> io::Result<(ControlHandle, Receiver<Request>)> {
    ControlServer::spawn(path, move || Event::Hello {
        component: COMPONENT.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        nic: nic.clone(),
        mode: mode.get(),
        replica: replica.as_ref().map(|(role, listen)| HelloReplica { role: role.get(), peer_listen: listen.clone() }),
    })
}

/// Has the control server's thread carry out `requests` (if there is a control socket) and
/// run the timers (if there is an engine) every `scan` at least; without a control socket, a
/// thread of its own runs the timers. Returns that thread, or `None`.
pub fn spawn(
    hub: Arc<dyn Router>,
    control: Option<(ControlHandle, Receiver<Request>)>,
    scan: Duration,
) -> io::Result<Option<JoinHandle<()>>> {
    let timers = hub.has_timers();
    let mut executor = HubExecutor { hub, scan, next_timers: Instant::now() + scan };
    match control {
        Some((handle, requests)) => {
            handle.execute_here(requests, executor);
            Ok(None)
        }
        None if timers => {
            let thread = std::thread::Builder::new().name("timers".into()).spawn(move || loop {
                let next = executor.run_due();
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            })?;
            Ok(Some(thread))
        }
        None => Ok(None),
    }
}

/// The router's side of the control server's thread.
struct HubExecutor {
    hub: Arc<dyn Router>,
    scan: Duration,
    next_timers: Instant,
}

impl Executor for HubExecutor {
    fn execute(&mut self, command: Command, reply: &mut dyn FnMut(Event)) {
        self.hub.execute(command, reply);
    }

    fn run_due(&mut self) -> Instant {
        let now = Instant::now();
        if !self.hub.has_timers() {
            // Nothing is ever due: the thread sleeps until a request or an event.
            return now + Duration::from_secs(3600);
        }
        if now >= self.next_timers {
            self.next_timers = self.hub.poll_timers().map_or(now + self.scan, |due| due.min(now + self.scan));
        }
        self.next_timers
    }
}
