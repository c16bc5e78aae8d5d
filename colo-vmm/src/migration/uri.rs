//! Where a migration goes: `tcp:HOST:PORT` or `unix:PATH`.

use std::io;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A migration address (as text in API requests).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum MigrationUri {
    /// TCP `HOST:PORT`.
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

/// A migration address that is neither `tcp:HOST:PORT` nor `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}': expected tcp:HOST:PORT or unix:PATH")]
pub struct UriError(String);

impl FromStr for MigrationUri {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(a) = s.strip_prefix("tcp:") {
            match a.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(MigrationUri::Tcp(a.to_string())),
                _ => Err(UriError(s.into())),
            }
        } else if let Some(p) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            Ok(MigrationUri::Unix(PathBuf::from(p)))
        } else {
            Err(UriError(s.into()))
        }
    }
}

impl TryFrom<String> for MigrationUri {
    type Error = UriError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MigrationUri> for String {
    fn from(u: MigrationUri) -> String {
        u.to_string()
    }
}

impl std::fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationUri::Tcp(a) => write!(f, "tcp:{a}"),
            MigrationUri::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected migration channel of either kind.
#[derive(Debug)]
pub enum Channel {
    /// TCP.
    Tcp(TcpStream),
    /// Unix.
    Unix(UnixStream),
}

impl Channel {
    /// Another handle on the same connection (one reads, one writes).
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(match self {
            Channel::Tcp(s) => Channel::Tcp(s.try_clone()?),
            Channel::Unix(s) => Channel::Unix(s.try_clone()?),
        })
    }

    /// Limits how long a read may wait.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Channel::Tcp(s) => s.set_read_timeout(t),
            Channel::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Closes both directions (unblocks a peer waiting on us).
    pub fn shutdown(&self) {
        let _ = match self {
            Channel::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Channel::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl io::Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Channel::Tcp(s) => s.read(buf),
            Channel::Unix(s) => s.read(buf),
        }
    }
}

impl io::Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Channel::Tcp(s) => s.write(buf),
            Channel::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl MigrationUri {
    /// Connects (the source side).
    pub fn connect(&self) -> io::Result<Channel> {
        match self {
            MigrationUri::Tcp(a) => {
                let addr = a
                    .to_socket_addrs()?
                    .next()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{a} resolves to nothing")))?;
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                s.set_nodelay(true)?;
                Ok(Channel::Tcp(s))
            }
            MigrationUri::Unix(p) => Ok(Channel::Unix(UnixStream::connect(p)?)),
        }
    }

    /// Listens (the destination side).
    pub fn listen(&self) -> io::Result<Listener> {
        match self {
            MigrationUri::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a.as_str())?)),
            // Only this user may hand us a VM: 0600 before it can be reached.
            MigrationUri::Unix(p) => Ok(Listener::Unix(crate::unix_socket::bind_private(p)?, p.clone())),
        }
    }
}

/// A listening socket, removed (Unix) on drop.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix, with its path.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Waits for the source.
    pub fn accept(&self) -> io::Result<Channel> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Channel::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Channel::Unix(l.accept()?.0)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!("tcp:127.0.0.1:4444".parse::<MigrationUri>().unwrap(), MigrationUri::Tcp("127.0.0.1:4444".into()));
        assert_eq!("unix:/tmp/m.sock".parse::<MigrationUri>().unwrap(), MigrationUri::Unix("/tmp/m.sock".into()));
        for bad in ["tcp:host", "unix:", "udp:1:2", "tcp::1", "/tmp/x"] {
            assert!(bad.parse::<MigrationUri>().is_err(), "{bad}");
        }
        assert_eq!("tcp:[::1]:9".parse::<MigrationUri>().unwrap().to_string(), "tcp:[::1]:9");
    }

    #[test]
    fn an_incoming_unix_socket_is_0600_whatever_the_umask() {
        // Issue 12, item 6: it took its mode from the umask (0777 under umask 000).
        use crate::unix_socket::tests::{scratch, with_open_umask};
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("incoming");
        let path = dir.join("in.sock");
        let l = with_open_umask(|| MigrationUri::Unix(path.clone()).listen()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        drop(l);
        assert!(!path.exists(), "removed with the listener");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
