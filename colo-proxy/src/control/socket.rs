//! A listening Unix socket's file: created with mode 0600 before anyone can connect, replacing a
//! stale socket but never a live one, and removed again when its owner goes away.
//!
//! Used for every socket a compare process listens on: the control socket, colo-proxy's
//! `unix:PATH,server` endpoints, vhost-net-compare's VM sockets. Whatever the umask (0755
//! under the usual 022, 0777 under 000), only the owner may connect.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Mode of the socket file: only the owner may connect (connecting needs write permission).
pub(crate) const SOCKET_MODE: u32 = 0o600;

/// Pending connections the kernel queues before the server accepts them.
const BACKLOG: libc::c_int = 16;

/// The socket file of a listening socket. Removes the file on drop, unless another process has
/// replaced it meanwhile.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Binds `path` and listens (non-blocking, close-on-exec). A socket file nobody listens on
    /// (left by a process that died) is replaced; a live socket or any other kind of file makes
    /// this fail.
    pub fn bind(path: &Path) -> io::Result<(SocketFile, UnixListener)> {
        remove_if_stale(path)?;
        let listener = listen_private(path)?;
        let meta = fs::metadata(path).map_err(|e| context(path, e))?;
        Ok((SocketFile { path: path.to_path_buf(), dev: meta.dev(), ino: meta.ino() }, listener))
    }

    /// The socket file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove socket");
                }
            }
            Ok(_) => tracing::debug!(path = %self.path.display(), "socket replaced; not removing it"),
            Err(_) => {}
        }
    }
}

fn remove_if_stale(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(context(path, e)),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{}: exists and is not a socket; not replacing it", path.display()),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: another process is listening on this socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing stale socket");
            fs::remove_file(path).map_err(|e| context(path, e))
        }
        Err(e) => Err(context(path, e)),
    }
}

/// bind, chmod, listen: the mode is set before the socket accepts connections, so no other user
/// can connect during a window in which the umask's mode applies (std's `bind` listens at once).
/// Until `listen`, a connect to the bound path is refused (`ECONNREFUSED`) whatever its mode.
fn listen_private(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: `sockaddr_un` is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    // One byte stays zero: the path must be NUL-terminated.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: not usable as a socket path (empty, NUL, or longer than {} bytes)",
                path.display(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;

    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid `sockaddr_un` and `len` does not exceed its size.
    let rc =
        unsafe { libc::bind(socket.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len as libc::socklen_t) };
    if rc < 0 {
        return Err(context(path, io::Error::last_os_error()));
    }
    let listen = || -> io::Result<()> {
        fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE))?;
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::listen(socket.as_raw_fd(), BACKLOG) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    if let Err(e) = listen() {
        let _ = fs::remove_file(path);
        return Err(context(path, e));
    }
    Ok(UnixListener::from(socket))
}

fn context(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::testutil::TempPath;

    #[test]
    fn socket_file_has_mode_0600_and_is_removed_on_drop() {
        let path = TempPath::new();
        let bound = SocketFile::bind(&path).unwrap();
        let meta = fs::symlink_metadata(&*path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(bound.0.path(), &*path);
        drop(bound);
        assert!(!path.exists());
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let path = TempPath::new();
        drop(UnixListener::bind(&*path).unwrap());
        assert!(path.exists(), "std leaves the socket file behind");
        let bound = SocketFile::bind(&path).unwrap();
        UnixStream::connect(&*path).unwrap();
        drop(bound);
    }

    #[test]
    fn a_live_socket_is_not_replaced() {
        let path = TempPath::new();
        let live = UnixListener::bind(&*path).unwrap();
        let e = SocketFile::bind(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("another process is listening"), "{e}");
        assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
        // The live listener still works.
        let _c = UnixStream::connect(&*path).unwrap();
        live.accept().unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_not_replaced() {
        let path = TempPath::new();
        fs::write(&*path, b"keep me").unwrap();
        let e = SocketFile::bind(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(fs::read(&*path).unwrap(), b"keep me");
    }

    #[test]
    fn a_replaced_socket_file_is_left_alone() {
        let path = TempPath::new();
        let bound = SocketFile::bind(&path).unwrap();
        fs::remove_file(&*path).unwrap();
        fs::write(&*path, b"someone else's").unwrap();
        drop(bound);
        assert_eq!(fs::read(&*path).unwrap(), b"someone else's");
    }

    #[test]
    fn an_over_long_path_is_rejected() {
        let path = std::env::temp_dir().join("x".repeat(200));
        let e = SocketFile::bind(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
