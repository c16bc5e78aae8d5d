//! One VM socket: accept a frontend, serve it with a fresh daemon and backend, and when it
//! disconnects, do it again.
//!
//! A fresh daemon per connection because the vhost-user-backend handler refuses a second
//! SET_OWNER, keeps the vrings, memory table and dirty log of the previous frontend, and its
//! worker threads belong to that connection. A migrated or restarted VM must get a clean
//! device, and its [`Port`] is new too (no frames queued for its predecessor).
//!
//! The frontend does not talk to the daemon directly: the public socket is accepted here and
//! relayed by a [`Shim`] to the daemon, which listens on a private socket in a directory only
//! this user can enter ([`PrivateSocket`]). The relay exists for QEMU 7.2's order of requests (see
//! [`crate::frontend_shim`]); it carries control messages only, never frames.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use colo_proxy::Side;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::NetBackend;
use crate::device::{NetConfig, RX_QUEUE};
use crate::frontend_shim::Shim;
use crate::port::{Port, RX_PENDING_EVENT, TX_RETRY_EVENT};
use crate::router::Router;

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
    /// Connecting the relay to the daemon's private socket failed.
    #[error("cannot connect to the daemon's private socket {path}: {error}")]
    Private {
        /// The private socket.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// The relay thread could not be started.
    #[error("cannot start the frontend relay: {0}")]
    Relay(io::Error),
}

/// Longest path a Unix socket address holds (`sun_path` is 108 bytes with the NUL).
const SUN_PATH_MAX: usize = 107;

/// The daemons' socket in a [`PrivateDir`].
const DAEMON_SOCKET: &str = "daemon.sock";

/// A directory only this user can enter (mode 0700), for a daemon's private socket; removed
/// with everything in it on drop.
#[derive(Debug)]
pub struct PrivateDir(PathBuf);

impl PrivateDir {
    /// The directory of the VM socket `public`: `.NAME.relay` beside it, so that it goes where
    /// the socket goes (a test's temporary directory, /run/...). One left behind by a killed
    /// predecessor is replaced, as a stale socket file is; anything but a directory at that
    /// path is refused.
    pub fn beside(public: &Path) -> io::Result<PrivateDir> {
        let path = Self::path_beside(public)?;
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory; refusing to replace it", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Self::make(&path)?;
        Ok(PrivateDir(path))
    }

    fn path_beside(public: &Path) -> io::Result<PathBuf> {
        let name = public.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{} names no file", public.display()))
        })?;
        let mut dir_name = std::ffi::OsString::from(".");
        dir_name.push(name);
        dir_name.push(".relay");
        Ok(public.with_file_name(dir_name))
    }

    /// A fresh directory `vhost-net-compare.<pid>.<n>` in `parent`.
    pub fn create_in(parent: &Path) -> io::Result<PrivateDir> {
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        for attempt in 0..64u32 {
            let path = parent.join(format!("vhost-net-compare.{}.{:08x}", std::process::id(), seed ^ attempt));
            match Self::make(&path) {
                Ok(()) => return Ok(PrivateDir(path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(io::ErrorKind::AlreadyExists, "no free name for a private directory"))
    }

    fn make(path: &Path) -> io::Result<()> {
        fs::DirBuilder::new().mode(0o700).create(path)?;
        // The umask can only have removed bits; make sure the owner has them all and nobody
        // else has any.
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "cannot remove the private socket directory");
            }
        }
    }
}

/// Why the daemons' private socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PrivateSocketError {
    /// The private directory.
    #[error("cannot create the private directory {path}: {error}")]
    Dir {
        /// The directory (or its parent).
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// The socket in it.
    #[error("cannot listen on {path}: {error}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// The error.
        error: vhost::vhost_user::Error,
    },
}

/// Where a VM's daemons listen: a socket in a [`PrivateDir`], reached only by this process's
/// relay. Removed with its directory on drop (and by [`crate::service::Service::shutdown`],
/// since the accept thread that owns it never ends).
pub struct PrivateSocket {
    // Field order is drop order: the listener (which removes its socket file) first.
    listener: Listener,
    path: PathBuf,
    dir: PrivateDir,
}

impl PrivateSocket {
    /// Binds the daemons' socket for the VM socket `public`: in `.NAME.relay` beside it
    /// ([`PrivateDir::beside`]), or, when that path would not fit a socket address, in a fresh
    /// private directory of the temporary directory (a killed process leaves that one behind).
    pub fn bind_for(public: &Path) -> Result<PrivateSocket, PrivateSocketError> {
        let beside = PrivateDir::path_beside(public)
            .map_err(|error| PrivateSocketError::Dir { path: public.to_path_buf(), error })?;
        let dir = if beside.join(DAEMON_SOCKET).as_os_str().len() <= SUN_PATH_MAX {
            PrivateDir::beside(public).map_err(|error| PrivateSocketError::Dir { path: beside, error })?
        } else {
            let tmp = std::env::temp_dir();
            PrivateDir::create_in(&tmp).map_err(|error| PrivateSocketError::Dir { path: tmp, error })?
        };
        let path = dir.path().join(DAEMON_SOCKET);
        match Listener::new(&path, true) {
            Ok(listener) => Ok(PrivateSocket { listener, path, dir }),
            Err(error) => Err(PrivateSocketError::Bind { path, error }),
        }
    }

    /// The directory holding the socket.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Accepts and closes every connection waiting (from relays of earlier connections that
    /// failed before their daemon accepted), so the next accept is the relay just connected.
    fn drain(&self) {
        if self.listener.set_nonblocking(true).is_err() {
            return;
        }
        while let Ok(Some(stale)) = self.listener.accept() {
            drop(stale);
        }
        if let Err(e) = self.listener.set_nonblocking(false) {
            tracing::warn!(error = %e, "cannot make the private socket blocking again");
        }
    }
}

/// The accept loop of one VM socket.
pub struct VmServer {
    role: Side,
    listener: Listener,
    private: PrivateSocket,
    hub: Arc<dyn Router>,
    config: NetConfig,
}

impl VmServer {
    /// A server for the VM in `role` on an already bound public `listener`, whose daemons
    /// listen on `private`.
    pub fn new(
        role: Side,
        listener: Listener,
        private: PrivateSocket,
        hub: Arc<dyn Router>,
        config: NetConfig,
    ) -> VmServer {
        VmServer { role, listener, private, hub, config }
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

    /// Blocks until a frontend connects to the public socket.
    fn accept(&self) -> Result<UnixStream, ServeError> {
        loop {
            match self.listener.accept() {
                Ok(Some(stream)) => return Ok(stream),
                // Would block (cannot happen on a blocking listener) or aborted by the peer.
                Ok(None) => continue,
                Err(e) => return Err(ServeError::Accept(e.to_string())),
            }
        }
    }

    /// Accepts one frontend and serves it until it disconnects.
    fn serve_one(&mut self) -> Result<(), ServeError> {
        let role = self.role;
        // Everything that can fail for local reasons is set up before accepting, so that a
        // frontend is never accepted only to be dropped.
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
        let frontend = self.accept()?;
        // The connect completes from the listen backlog at once; the daemon accepts it next.
        self.private.drain();
        let to_daemon = UnixStream::connect(&self.private.path)
            .map_err(|error| ServeError::Private { path: self.private.path.clone(), error })?;
        daemon.start(&mut self.private.listener).map_err(|e| ServeError::Accept(e.to_string()))?;
        // The VM's receive ring is about to run again (first start, or a restart after a
        // checkpoint stopped it): the hub aligns a secondary's inbound queue while the ring
        // cannot take from it yet, and the port takes frames.
        let (hub, rx_port) = (self.hub.clone(), port.clone());
        let rx_starting = move |ring: u32| {
            if ring as usize == RX_QUEUE {
                hub.rx_restarting(&rx_port);
                rx_port.set_rx_stopped(false);
            }
        };
        let shim = Shim::spawn(format!("{}-relay", role.name()), frontend, to_daemon, rx_starting)
            .map_err(ServeError::Relay)?;
        tracing::info!(vm = role.name(), "VM connected");
        self.hub.attach(port.clone());
        let result = daemon.wait();
        self.hub.detach(&port);
        // The daemon has ended (the relay closed its side, or it refused a request and closed
        // it): close the frontend's side too and collect the relay.
        shim.close();
        let relay = shim.join();
        match result {
            // The frontend left (closing between or inside a message): the normal end.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!(vm = role.name(), stats = %port.stats.snapshot(), "VM disconnected"),
            Err(e) => {
                tracing::warn!(vm = role.name(), error = %e, stats = %port.stats.snapshot(), "VM connection ended with an error")
            }
        }
        if let Some(r) = relay {
            tracing::debug!(
                vm = role.name(),
                end = %r.end,
                to_backend = r.to_backend,
                to_frontend = r.to_frontend,
                deferred_enables = r.deferred,
                "frontend relay ended"
            );
        }
        // Dropping the daemon stops its worker (exit event) and waits for it, so nothing of
        // this connection touches guest memory after this.
        drop(daemon);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn the_private_socket_sits_beside_the_public_one_in_a_private_directory() {
        let parent = PrivateDir::create_in(&std::env::temp_dir()).unwrap();
        let public = parent.path().join("vm.sock");
        let sock = PrivateSocket::bind_for(&public).unwrap();
        assert_eq!(sock.dir(), parent.path().join(".vm.sock.relay"));
        assert_eq!(fs::metadata(sock.dir()).unwrap().mode() & 0o777, 0o700);
        assert!(sock.path.exists());
        let dir = sock.dir().to_path_buf();
        drop(sock);
        assert!(!dir.exists(), "removed with the socket");

        // One left behind by a killed process is replaced; a file in its place is refused.
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("stale"), "x").unwrap();
        let sock = PrivateSocket::bind_for(&public).unwrap();
        assert!(!dir.join("stale").exists());
        drop(sock);
        fs::write(&dir, "not mine").unwrap();
        assert!(matches!(PrivateSocket::bind_for(&public), Err(PrivateSocketError::Dir { .. })));
        assert_eq!(fs::read_to_string(&dir).unwrap(), "not mine");
    }

    #[test]
    fn a_public_path_too_long_for_the_relay_directory_falls_back_to_the_temporary_directory() {
        let parent = PrivateDir::create_in(&std::env::temp_dir()).unwrap();
        let name = "p".repeat(SUN_PATH_MAX - parent.path().as_os_str().len() - 1);
        let public = parent.path().join(name);
        assert!(public.as_os_str().len() <= SUN_PATH_MAX, "the public socket itself fits");
        let sock = PrivateSocket::bind_for(&public).unwrap();
        assert!(sock.dir().starts_with(std::env::temp_dir()));
        assert!(!sock.dir().starts_with(parent.path()));
        assert_eq!(fs::metadata(sock.dir()).unwrap().mode() & 0o777, 0o700);
        let dir = sock.dir().to_path_buf();
        drop(sock);
        assert!(!dir.exists());
    }

    #[test]
    fn stale_connections_are_drained_before_the_next_one() {
        let parent = PrivateDir::create_in(&std::env::temp_dir()).unwrap();
        let sock = PrivateSocket::bind_for(&parent.path().join("p")).unwrap();
        let stale = UnixStream::connect(&sock.path).unwrap();
        sock.drain();
        let fresh = UnixStream::connect(&sock.path).unwrap();
        let accepted = sock.listener.accept().unwrap().unwrap();
        // The accepted stream is the fresh one: its peer is `fresh`'s local end.
        use std::io::{Read, Write};
        (&fresh).write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        (&accepted).read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        let mut rest = vec![];
        (&stale).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the stale connection was closed");
    }
}
