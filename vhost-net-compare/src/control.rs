//! The control thread: carries out controllers' commands (docs/control.md) and runs the compare
//! engine's timers.
//!
//! The socket itself is served by colo-proxy's threaded [`ControlServer`]; requests arrive here
//! on a channel, and replies and events leave through its [`ControlHandle`]. The same thread
//! wakes at least once per `expired_scan_cycle` to check held frames against
//! `compare_timeout`, so timeouts fire even when no traffic and no command arrives.

use std::io;
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use colo_proxy::control::{ControlHandle, ControlServer, Event, HelloReplica, Request};

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

/// Starts the thread that executes `requests` (if there is a control socket) and runs the
/// timers (if there is an engine) every `scan` at least. Returns `None` when there is nothing
/// to do (passthrough without control socket). The thread ends when the control server stops.
pub fn spawn(
    hub: Arc<dyn Router>,
    control: Option<(ControlHandle, Receiver<Request>)>,
    scan: Duration,
) -> io::Result<Option<JoinHandle<()>>> {
    if control.is_none() && !hub.has_timers() {
        return Ok(None);
    }
    let thread = std::thread::Builder::new().name("control".into()).spawn(move || run(hub.as_ref(), control, scan))?;
    Ok(Some(thread))
}

fn run(hub: &dyn Router, control: Option<(ControlHandle, Receiver<Request>)>, scan: Duration) {
    let mut next_timers = Instant::now() + scan;
    loop {
        let wait = next_timers.saturating_duration_since(Instant::now()).min(scan);
        match &control {
            Some((handle, requests)) => match requests.recv_timeout(wait) {
                Ok(Request { conn, command }) => hub.execute(command, &mut |reply| handle.reply(conn, reply)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    tracing::warn!("the control socket thread stopped; no more commands");
                    return;
                }
            },
            None => std::thread::sleep(wait),
        }
        if Instant::now() >= next_timers {
            next_timers = hub.poll_timers().map_or(Instant::now() + scan, |due| due.min(Instant::now() + scan));
        }
    }
}
