//! The byte streams a link runs over: TCP between hosts, Unix sockets on one host (tests, and
//! the checkpoint link's `unix:` URIs).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A connected stream socket a link can use: one handle reads, a clone writes, either can shut
/// the connection down.
pub trait LinkSocket: Read + Write + Send + Sync + 'static {
    /// Another handle on the same connection.
    fn try_clone_socket(&self) -> io::Result<Self>
    where
        Self: Sized;
    /// Blocking reads give up after `timeout` (`None`: never).
    fn set_read_deadline(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Blocking writes give up after `timeout` (`None`: never).
    fn set_write_deadline(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Ends the connection both ways (wakes a reader blocked on it).
    fn shutdown_both(&self);
    /// The peer's address, for logs.
    fn peer_name(&self) -> String;
}

impl LinkSocket for TcpStream {
    fn try_clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_read_deadline(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
    fn set_write_deadline(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(timeout)
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn peer_name(&self) -> String {
        self.peer_addr().map_or_else(|_| "an unknown peer".into(), |a| a.to_string())
    }
}

impl LinkSocket for UnixStream {
    fn try_clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_read_deadline(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
    fn set_write_deadline(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(timeout)
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn peer_name(&self) -> String {
        "a local peer".into()
    }
}
