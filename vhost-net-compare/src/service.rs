//! The whole backend: everything the command line asks for, started in an order that reports
//! every unusable option before any VM can connect, and stopped cleanly.
//!
//! Threads once started:
//! - `primary-accept` (and `secondary-accept`): accept a frontend, then run its daemon — a
//!   vhost-user request thread and a `vring_worker` for both rings — until it disconnects;
//! - per connection, `primary-relay` (`secondary-relay`): the frontend's control messages to
//!   the daemon's private socket and back ([`crate::frontend_shim`]);
//! - `uplink`: tap → VMs' pending RX queues;
//! - `control`: the control socket (colo-proxy's [`colo_proxy::control::ControlServer::spawn`]),
//!   which carries out the controllers' commands itself and runs the engine's timers (without a
//!   control socket, `timers` runs them).

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use colo_proxy::capture::Capture;
use colo_proxy::control::SocketFile;
use colo_proxy::link::{AuthPolicy, KeyError, LinkKey, LinkListener};
use colo_proxy::Side;
use vhost::vhost_user::Listener;

use crate::cli::{Options, OptionsError};
use crate::colo::ColoState;
use crate::control;
use crate::device::{NetConfig, DEFAULT_MAC};
use crate::hub::{Hub, SharedMode};
use crate::replica::{ReplicaRouter, ReplicaSetup, SharedRole};
use crate::router::Router;
use crate::server::{PrivateSocket, PrivateSocketError, VmServer};
use crate::tap::{Tap, TapError};
use crate::uplink::Uplink;

/// Why the backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Inconsistent options.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// The tap.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A path exists and is not a socket (it is never replaced).
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A VM socket could not be bound.
    #[error("cannot listen on {path}: {error}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The error.
        error: vhost::vhost_user::Error,
    },
    /// The daemons' private socket could not be set up.
    #[error(transparent)]
    Private(#[from] PrivateSocketError),
    /// The control socket could not be bound.
    #[error("cannot listen on control socket {path}: {error}")]
    Control {
        /// The socket path.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// The capture file could not be created.
    #[error("cannot create capture file {path}: {error}")]
    Capture {
        /// The file.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(io::Error),
    /// The link key cannot be used.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The metrics endpoint could not be started.
    #[error(transparent)]
    Metrics(#[from] colo_proxy::metrics::MetricsError),
    /// The frame-link address could not be bound.
    #[error("cannot listen for the frame link on {addr}: {error}")]
    PeerListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        error: io::Error,
    },
}

/// The running backend.
pub struct Service {
    hub: Arc<dyn Router>,
    uplink: Option<Uplink>,
    /// The frame-link listener (`--peer-listen`).
    listener: Option<LinkListener>,
    socket_paths: Vec<PathBuf>,
    /// The VM sockets' files (the control socket's is its server's).
    _socket_files: Vec<SocketFile>,
    /// The directories of the daemons' private sockets; removed at shutdown.
    private_dirs: Vec<PathBuf>,
    /// The metrics endpoint (`--metrics`).
    _metrics: Option<colo_proxy::metrics::MetricsServer>,
}

impl Service {
    /// Opens the tap, binds every socket, creates the capture, and starts all threads.
    pub fn start(opts: &Options) -> Result<Service, StartError> {
        opts.validate()?;
        if !opts.colo() && !opts.replica() {
            warn_unused_compare_options(opts);
        }
        // Everything that can be refused is checked before anything listens.
        let key = match &opts.link_key {
            Some(path) => Some(LinkKey::load(path)?),
            None => None,
        };
        let metrics_router = Arc::new(std::sync::OnceLock::new());
        let metrics = opts
            .engine
            .metrics
            .map(|addr| crate::metrics::serve(addr, metrics_router.clone(), opts.nic()))
            .transpose()?;
        let tap = Arc::new(Tap::open(&opts.tap)?);
        let mut socket_paths = Vec::new();
        let mut socket_files = Vec::new();
        let mut private_dirs = Vec::new();
        let mut vm_socket = |path: &PathBuf| -> Result<(Listener, PrivateSocket), StartError> {
            let (l, file) = bind(path)?;
            socket_files.push(file);
            socket_paths.push(path.clone());
            let p = PrivateSocket::bind_for(path)?;
            private_dirs.push(p.dir().to_path_buf());
            Ok((l, p))
        };
        let first_path = opts.vm_socket.as_ref().or(opts.primary_socket.as_ref()).expect("clap requires one");
        let first = vm_socket(first_path)?;
        let secondary = opts.secondary_socket.as_ref().map(&mut vm_socket).transpose()?;
        let peer_listener = match opts.peer_listen {
            Some(addr) => Some(TcpListener::bind(addr).map_err(|error| StartError::PeerListen { addr, error })?),
            None => None,
        };
        let nic = opts.nic();
        let mode = Arc::new(SharedMode::new(opts.initial_mode()));
        let role = opts.replica().then(|| Arc::new(SharedRole::default()));
        let control = match &opts.engine.control_socket {
            Some(path) => {
                refuse_non_socket(path)?;
                let hello_role = role.clone().map(|r| (r, opts.peer_listen.map(|a| a.to_string())));
                let c = control::listen(path, nic.clone(), mode.clone(), hello_role)
                    .map_err(|error| StartError::Control { path: path.clone(), error })?;
                socket_paths.push(path.clone());
                Some(c)
            }
            None => None,
        };
        let capture = match &opts.engine.capture {
            Some(path) if opts.colo() || opts.replica() => {
                Some(Capture::create(path).map_err(|error| StartError::Capture { path: path.clone(), error })?)
            }
            _ => None,
        };
        let handle = control.as_ref().map(|(h, _)| h.clone());
        let mac = opts.mac.unwrap_or(DEFAULT_MAC);
        let mut listener = None;
        let hub: Arc<dyn Router> = match role {
            Some(role) => {
                if key.is_none() {
                    tracing::warn!(
                        "no --link-key: frame links to the peer host are neither authenticated nor encrypted"
                    );
                }
                let router = ReplicaRouter::new(ReplicaSetup {
                    tap: tap.clone(),
                    nic: nic.clone(),
                    mac,
                    config: opts.engine_config(),
                    key: key.clone(),
                    capture,
                    control: handle,
                    role,
                });
                if let Some(l) = peer_listener {
                    let r = Arc::downgrade(&router);
                    let policy = AuthPolicy::new(key, "frames");
                    let on_link = move |conn| {
                        if let Some(router) = r.upgrade() {
                            router.accept_link(conn);
                        }
                    };
                    listener =
                        Some(LinkListener::spawn(l, policy, "peer-listen", on_link).map_err(StartError::Thread)?);
                }
                router
            }
            None => {
                let colo = opts
                    .colo()
                    .then(|| ColoState::new(opts.engine_config(), opts.initial_mode(), tap.clone(), capture));
                Arc::new(Hub::new(tap.clone(), nic, colo, handle, mode))
            }
        };
        let _ = metrics_router.set(hub.clone());
        control::spawn(hub.clone(), control, opts.engine_config().expired_scan_cycle).map_err(StartError::Thread)?;
        let config = NetConfig { mac };
        let (public, private_socket) = first;
        VmServer::new(Side::Primary, public, private_socket, hub.clone(), config)
            .spawn()
            .map_err(StartError::Thread)?;
        if let Some((public, private_socket)) = secondary {
            VmServer::new(Side::Secondary, public, private_socket, hub.clone(), config)
                .spawn()
                .map_err(StartError::Thread)?;
        }
        let uplink = Uplink::spawn(tap.clone(), hub.clone()).map_err(StartError::Thread)?;
        tracing::info!(
            tap = tap.name(),
            tap_created = tap.created(),
            mac = %config.mac,
            vm = %first_path.display(),
            secondary = ?opts.secondary_socket,
            control = ?opts.engine.control_socket,
            peer_listen = ?opts.peer_listen,
            mode = hub.mode().name(),
            "vhost-net-compare: {}",
            if opts.replica() {
                "one VM, its role set by its colo-vmm (none yet: nothing passes)"
            } else if opts.colo() {
                "COLO compare proxy"
            } else {
                "passthrough"
            }
        );
        tracing::debug!(dirs = ?private_dirs, "the daemons' private sockets");
        Ok(Service {
            hub,
            uplink: Some(uplink),
            listener,
            socket_paths,
            _socket_files: socket_files,
            private_dirs,
            _metrics: metrics,
        })
    }

    /// The router (for inspection).
    pub fn hub(&self) -> &Arc<dyn Router> {
        &self.hub
    }

    /// Stops reading the tap, writes out the capture, removes the socket files and the
    /// daemons' private directories, and logs the totals. VM connections and their threads end
    /// with the process.
    pub fn shutdown(mut self) {
        if let Some(u) = self.uplink.take() {
            u.stop();
        }
        if let Some(l) = self.listener.take() {
            l.stop();
        }
        self.hub.flush_capture();
        for path in &self.socket_paths {
            if let Err(e) = fs::remove_file(path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove socket");
                }
            }
        }
        for dir in &self.private_dirs {
            if let Err(e) = fs::remove_dir_all(dir) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %dir.display(), error = %e, "cannot remove the private socket directory");
                }
            }
        }
        let s = self.hub.summary();
        tracing::info!(
            frames_primary = s.frames_primary,
            frames_secondary = s.frames_secondary,
            released = s.released,
            miscompares = s.miscompares.total(),
            dropped_overflow = s.dropped_overflow,
            rejected_input = s.rejected_input,
            flushes = s.flushes,
            inbound_unrouted = self.hub.unrouted(),
            tap_errors = self.hub.tap_errors(),
            "shutting down"
        );
    }
}

/// A stale socket file (from a previous run) is replaced; anything else at the path is not.
fn refuse_non_socket(path: &Path) -> Result<(), StartError> {
    match fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => Err(StartError::NotASocket(path.to_path_buf())),
        _ => Ok(()),
    }
}

/// Binds a VM socket with mode 0600 before any frontend can connect, whatever the umask: a
/// frontend gets the guest's network and its memory is mapped here. A stale socket is
/// replaced; one another process listens on is not.
fn bind(path: &Path) -> Result<(Listener, SocketFile), StartError> {
    refuse_non_socket(path)?;
    let socket_error =
        |error| StartError::Socket { path: path.to_path_buf(), error: vhost::vhost_user::Error::SocketError(error) };
    let (file, listener) = SocketFile::bind(path).map_err(socket_error)?;
    // The accept thread blocks in accept.
    listener.set_nonblocking(false).map_err(socket_error)?;
    Ok((Listener::from(listener), file))
}

fn warn_unused_compare_options(opts: &Options) {
    if opts.engine.capture.is_some() {
        tracing::warn!("--capture has no effect without --secondary-socket (nothing is compared)");
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::server::PrivateDir;

    #[test]
    fn a_vm_socket_is_private_and_a_live_one_is_not_taken_over() {
        let dir = PrivateDir::create_in(&std::env::temp_dir()).unwrap();
        let path = dir.path().join("vm.sock");
        let (listener, file) = bind(&path).unwrap();
        // Only the owner may connect, whatever the umask (it was 0755 under the usual 022).
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // Blocking, as the accept thread expects.
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(listener.accept().unwrap().is_some());
        assert!(matches!(bind(&path), Err(StartError::Socket { .. })), "another process's live socket stays");
        drop((listener, file));
        assert!(!path.exists());
        // A stale socket (nobody listening) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let _ = bind(&path).unwrap();
    }
}
