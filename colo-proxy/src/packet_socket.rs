//! An AF_PACKET socket on one network interface, through pnet's datalink layer, whose file
//! descriptor the caller registers with mio.
//!
//! We create the socket ourselves so that (1) it receives nothing before pnet binds it to the
//! interface (protocol 0 until the bind), (2) `PACKET_IGNORE_OUTGOING` keeps our own
//! transmissions out of our receive path, and (3) we keep the descriptor for mio. pnet then binds
//! it, joins promiscuous mode and gives us its send/receive calls; a zero read timeout makes
//! `next()` non-blocking.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use pnet_datalink::{self as datalink, Channel, DataLinkReceiver, DataLinkSender, NetworkInterface};

/// Largest frame we read: a 64 KiB GSO frame plus header, so nothing is truncated silently.
pub const READ_BUFFER: usize = 65536 + 64;

/// `SOL_PACKET` option (Linux ≥ 4.20) not in every libc release.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// An AF_PACKET socket bound to one interface.
pub struct PacketSocket {
    name: String,
    fd: RawFd,
    tx: Box<dyn DataLinkSender>,
    rx: Box<dyn DataLinkReceiver>,
}

impl PacketSocket {
    /// Opens interface `name` (which must exist) in promiscuous mode.
    pub fn open(name: &str) -> io::Result<PacketSocket> {
        let iface = find_interface(name)?;
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("AF_PACKET socket for {name}: {e} (needs CAP_NET_RAW)")));
        }
        let one: libc::c_int = 1;
        // SAFETY: `one` outlives the call and the length matches its type.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                PACKET_IGNORE_OUTGOING,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: fd is ours and not yet handed to anyone.
            unsafe { libc::close(fd) };
            return Err(io::Error::new(e.kind(), format!("PACKET_IGNORE_OUTGOING on {name}: {e}")));
        }
        let config = datalink::Config {
            read_buffer_size: READ_BUFFER,
            write_buffer_size: READ_BUFFER,
            read_timeout: Some(Duration::ZERO),
            write_timeout: Some(Duration::from_millis(100)),
            socket_fd: Some(fd),
            promiscuous: true,
            ..datalink::Config::default()
        };
        // pnet owns (and closes) the descriptor from here on, also on error.
        match datalink::channel(&iface, config) {
            Ok(Channel::Ethernet(tx, rx)) => Ok(PacketSocket { name: name.to_string(), fd, tx, rx }),
            Ok(_) => Err(io::Error::other(format!("{name}: unexpected channel type"))),
            Err(e) => Err(io::Error::new(e.kind(), format!("binding AF_PACKET socket to {name}: {e}"))),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor, for `mio::unix::SourceFd`.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// The next received frame, or `Ok(None)` when none is waiting.
    pub fn recv(&mut self) -> io::Result<Option<&[u8]>> {
        let fd = self.fd;
        match self.rx.next() {
            Ok(f) => Ok(Some(f)),
            Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => Ok(None),
            // pnet's poll saw POLLERR without POLLIN ("Unexpected poll event"): the socket holds
            // a pending error, e.g. ENETDOWN after the interface went down or before it came
            // up. Report that error (reading it clears it), not pnet's placeholder.
            Err(e) if e.kind() == io::ErrorKind::Other => match take_error(fd) {
                Some(pending) => Err(pending),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Sends one frame.
    pub fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.tx.send_to(frame, None) {
            Some(r) => r,
            None => Err(io::Error::other("frame larger than the send buffer")),
        }
    }
}

/// A socket's pending error (`SO_ERROR`), cleared by reading it.
fn take_error(fd: RawFd) -> Option<io::Error> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket; `err` and `len` are valid for the call's writes.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&mut err as *mut libc::c_int).cast(), &mut len)
    };
    (rc == 0 && err != 0).then(|| io::Error::from_raw_os_error(err))
}

/// Looks up an interface by name, with a clear error listing what exists.
pub fn find_interface(name: &str) -> io::Result<NetworkInterface> {
    let all = datalink::interfaces();
    all.iter().find(|i| i.name == name).cloned().ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|i| i.name.as_str()).collect();
        io::Error::new(io::ErrorKind::NotFound, format!("no interface '{name}' (have: {})", names.join(", ")))
    })
}
