//! The uplink tap: `/dev/net/tun` opened as a tap (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR),
//! created if absent, with a 12-byte virtio-net header and no offloads, non-blocking, link up.
//!
//! With the vnet header every frame read from or written to the tap carries the same 12-byte
//! header the guests use; with no offloads (TUNSETOFFLOAD 0) the kernel hands us only complete,
//! checksummed, unsegmented frames, and never expects us to finish a checksum.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::device::VNET_HDR_LEN;

const IFNAMSIZ: usize = 16;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

// _IOW('T', 202, int), _IOW('T', 208, unsigned int), _IOW('T', 216, int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// `struct ifreq` with the members used here (name and flags), padded to the kernel's size.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut req = IfReq { name: [0; IFNAMSIZ], flags: 0, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }
}

/// Why the tap could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Not a usable interface name.
    #[error("'{0}' is not a valid interface name (1 to 15 characters, no '/', ':' or whitespace)")]
    BadName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun: {0} (needs the tun module and CAP_NET_ADMIN)")]
    Open(io::Error),
    /// TUNSETIFF failed.
    #[error("cannot attach to tap '{name}': {error}{hint}")]
    Attach {
        /// The interface.
        name: String,
        /// The ioctl's error.
        error: io::Error,
        /// What the error usually means.
        hint: &'static str,
    },
    /// Another setup step failed.
    #[error("cannot configure tap '{name}' ({step}): {error}")]
    Configure {
        /// The interface.
        name: String,
        /// What was being done.
        step: &'static str,
        /// The error.
        error: io::Error,
    },
}

/// The tap device: an open tun file descriptor attached to the interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    created: bool,
}

impl Tap {
    /// Attaches to tap `name`, creating it if it does not exist, and configures it (12-byte vnet
    /// header, no offloads, non-blocking, link up).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() >= IFNAMSIZ
            || name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(TapError::BadName(name.to_string()));
        }
        let existed = interface_exists(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq::new(name);
        req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: TUNSETIFF reads and writes an ifreq; `req` is one, alive for the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let error = io::Error::last_os_error();
            let hint = match error.raw_os_error() {
                Some(libc::EBUSY) => " (another process has it open)",
                Some(libc::EINVAL) => " (an interface of that name exists and is not a single-queue tap)",
                Some(libc::EPERM) => " (needs CAP_NET_ADMIN, or the tap belongs to another user)",
                _ => "",
            };
            return Err(TapError::Attach { name: name.to_string(), error, hint });
        }
        let configure = |step: &'static str, r: io::Result<()>| {
            r.map_err(|error| TapError::Configure { name: name.to_string(), step, error })
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer.
        configure("TUNSETVNETHDRSZ 12", cvt(unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) }))?;
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        configure("TUNSETOFFLOAD 0", cvt(unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) }))?;
        configure("link up", set_up(name))?;
        Ok(Tap { file, name: name.to_string(), created: !existed })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this process created the interface (it disappears when the process exits).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Reads one frame (vnet header included) into `buf`; `None` when no frame is waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match (&self.file).read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes one frame (vnet header included). The kernel takes the whole frame or refuses it.
    pub fn write(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            match (&self.file).write(frame) {
                Ok(n) if n == frame.len() => return Ok(()),
                Ok(n) => return Err(io::Error::other(format!("short tap write ({n} of {} bytes)", frame.len()))),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn interface_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Sets IFF_UP on the interface (a tap is created down; frames flow only once it is up).
fn set_up(name: &str) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq::new(name);
    // SAFETY: SIOCGIFFLAGS fills the flags of an ifreq.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    if req.flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the flags of an ifreq.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernel_size() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for bad in ["", "sixteen-chars-xx", "a/b", "a b", "a:b"] {
            assert!(matches!(Tap::open(bad), Err(TapError::BadName(_))), "{bad}");
        }
    }
}
