//! QEMU chardev framing from the test's side: a blocking Unix-socket peer that sends and
//! receives framed frames the way filter-mirror, filter-redirector and notify_dev do.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// One chardev-style connection.
pub struct QPeer {
    s: UnixStream,
    vnet: bool,
}

impl QPeer {
    /// Connects to `path` (retrying briefly while the server starts).
    pub fn connect(path: &Path, vnet: bool) -> QPeer {
        for _ in 0..200 {
            if let Ok(s) = UnixStream::connect(path) {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                return QPeer { s, vnet };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("cannot connect to {}", path.display());
    }

    /// Wraps an accepted stream.
    pub fn from_stream(s: UnixStream, vnet: bool) -> QPeer {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        QPeer { s, vnet }
    }

    /// The raw stream.
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.s
    }

    /// Sets how long receives wait.
    pub fn set_timeout(&self, t: Duration) {
        self.s.set_read_timeout(Some(t)).unwrap();
    }

    /// Sends one frame (`vnet_len` bytes of `data` are its virtio-net header, in vnet mode).
    pub fn send(&mut self, data: &[u8], vnet_len: u32) -> io::Result<()> {
        let mut b = Vec::with_capacity(data.len() + 8);
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        if self.vnet {
            b.extend_from_slice(&vnet_len.to_be_bytes());
        }
        b.extend_from_slice(data);
        self.s.write_all(&b)
    }

    /// Sends a frame without vnet field even in vnet mode (notify_dev output direction).
    pub fn send_plain(&mut self, data: &[u8]) -> io::Result<()> {
        let mut b = (data.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(data);
        self.s.write_all(&b)
    }

    /// Receives one frame: (bytes, vnet_hdr_len).
    pub fn recv(&mut self) -> io::Result<(Vec<u8>, u32)> {
        let mut len = [0u8; 4];
        self.s.read_exact(&mut len)?;
        let mut vnet = 0;
        if self.vnet {
            let mut v = [0u8; 4];
            self.s.read_exact(&mut v)?;
            vnet = u32::from_be_bytes(v);
        }
        let mut data = vec![0; u32::from_be_bytes(len) as usize];
        self.s.read_exact(&mut data)?;
        Ok((data, vnet))
    }

    /// Receives a frame without vnet field (what notify_dev sends).
    pub fn recv_plain(&mut self) -> io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        self.s.read_exact(&mut len)?;
        let mut data = vec![0; u32::from_be_bytes(len) as usize];
        self.s.read_exact(&mut data)?;
        Ok(data)
    }

    /// Whether nothing arrives within `t`.
    pub fn silent_for(&mut self, t: Duration) -> bool {
        self.set_timeout(t);
        let mut b = [0u8; 1];
        let r = self.s.read(&mut b);
        self.set_timeout(Duration::from_secs(5));
        matches!(r, Err(ref e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}
