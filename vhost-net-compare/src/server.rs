//! One VM socket: accept a frontend, serve it with a fresh daemon and backend, and when it
//! disconnects, do it again.
//!
//! A fresh daemon per connection because the vhost-user-backend handler refuses a second
//! SET_OWNER, keeps the vrings, memory table and dirty log of the previous frontend, and its
//! worker threads belong to that connection. A migrated or restarted VM must get a clean
//! device, and its [`Port`] is new too (no frames queued for its predecessor).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use colo_proxy::Side;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::NetBackend;
use crate::device::NetConfig;
use crate::hub::Hub;
use crate::port::{Port, RX_PENDING_EVENT, TX_RETRY_EVENT};

/// Pause before retrying after a failure to set up a connection (e.g. out of file
/// descriptors), so a persistent failure does not spin.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Why one connection could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The port's eventfds could not be created.
    #[error("cannot create the VM's eventfds: {0}")]
    Port(io::Error),
    /// The daemon (its worker thread) could not be created.
    #[error("cannot create the vhost-user daemon: {0}")]
    Daemon(String),
    /// The port's eventfds could not be added to the worker's epoll.
    #[error("cannot register the VM's eventfds with its worker: {0}")]
    Register(io::Error),
    /// Accepting the frontend's connection failed.
    #[error("cannot accept a frontend: {0}")]
    Accept(String),
}

/// The accept loop of one VM socket.
pub struct VmServer {
    role: Side,
    listener: Listener,
    hub: Arc<Hub>,
    config: NetConfig,
}

impl VmServer {
    /// A server for the VM in `role` on an already bound `listener`.
    pub fn new(role: Side, listener: Listener, hub: Arc<Hub>, config: NetConfig) -> VmServer {
        VmServer { role, listener, hub, config }
    }

    /// Serves connections on a new thread, one after the other, until the process ends.
    pub fn spawn(mut self) -> io::Result<JoinHandle<()>> {
        std::thread::Builder::new().name(format!("{}-accept", self.role.name())).spawn(move || loop {
            if let Err(e) = self.serve_one() {
                tracing::error!(vm = self.role.name(), error = %e, "connection failed");
                std::thread::sleep(RETRY_PAUSE);
            }
        })
    }

    /// Accepts one frontend and serves it until it disconnects.
    fn serve_one(&mut self) -> Result<(), ServeError> {
        let role = self.role;
        let port = Arc::new(Port::new(role).map_err(ServeError::Port)?);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(RwLock::new(NetBackend::new(self.hub.clone(), port.clone(), mem.clone(), self.config)));
        let mut daemon = VhostUserDaemon::new(format!("vhost-{}", role.name()), backend, mem)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        {
            let handlers = daemon.get_epoll_handlers();
            let worker = handlers.first().ok_or_else(|| ServeError::Daemon("no worker thread".into()))?;
            worker
                .register_listener(port.rx_event.as_raw_fd(), EventSet::IN, RX_PENDING_EVENT)
                .map_err(ServeError::Register)?;
            worker
                .register_listener(port.tx_retry.as_raw_fd(), EventSet::IN, TX_RETRY_EVENT)
                .map_err(ServeError::Register)?;
        }
        daemon.start(&mut self.listener).map_err(|e| ServeError::Accept(e.to_string()))?;
        tracing::info!(vm = role.name(), "VM connected");
        self.hub.attach(port.clone());
        let result = daemon.wait();
        self.hub.detach(&port);
        match result {
            Ok(()) => tracing::info!(vm = role.name(), stats = %port.stats.snapshot(), "VM disconnected"),
            Err(e) => {
                tracing::warn!(vm = role.name(), error = %e, stats = %port.stats.snapshot(), "VM connection ended with an error")
            }
        }
        // Dropping the daemon stops its worker (exit event) and waits for it, so nothing of
        // this connection touches guest memory after this.
        drop(daemon);
        Ok(())
    }
}
