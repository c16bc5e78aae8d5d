//! QEMU guests on vhost-net-compare, in a network the test owns:
//!
//! ```text
//!  client ns: tap (10.0.0.1) ── vhost-net-compare ══ primary.sock ══ QEMU (Linux guest 10.0.0.2)
//!                                                 ══ secondary.sock ══ QEMU (same image, MAC, IP)
//! ```
//!
//! The backend runs inside the client namespace (`ip netns exec`), so the tap it creates is
//! there, next to the client's sockets and tcpdump; the QEMU processes need only the backend's
//! Unix sockets (guest RAM is a shared memfd) and have no other network. One socket is a
//! passthrough; two are the COLO compare path, with the control socket for the test to act as
//! the controller.
//!
//! ARP: the client resolves the guest, and its request, mirrored to both COLO guests, gives
//! both the client's address at the same moment, so neither guest has to ask (a secondary's
//! own request would be dropped as uncompared output and it might never learn the answer).
//! Later reachability probes of the primary are answered to both. Permanent neighbour entries
//! in the guests (`GuestOpts::neighbours`) would be better still, but the guest's busybox `ip`
//! has no `neigh replace` (its `/init` then fails), so they are not used here.
//!
//! Used by `tests/tests/vhost_qemu.rs` and the `vhost-bench` driver. Everything is removed on
//! drop (guests first — declare them after the [`VhostNet`] or drop them explicitly — then the
//! backend, then the namespace).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use colo_proxy::control::ControlClient;

use crate::linux_guest::{linux_guest_available, GuestOpts, HTTP_PORT};
use crate::netns::Netns;
use crate::{bin, pcapread, unique, wait_for_path, Proc, TempDir};

/// The guests' address.
pub const GUEST_IP: &str = "10.0.0.2";
/// The client's address (the tap in the client namespace).
pub const CLIENT_IP: &str = "10.0.0.1";
/// The guests' MAC (both COLO guests have it).
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
/// The client's MAC (set on the tap, so that it is the same in every run).
pub const CLIENT_MAC: &str = "02:00:00:0c:11:01";

/// Whether QEMU guests on vhost-net-compare can run here, else why not.
pub fn prerequisites() -> Result<(), String> {
    linux_guest_available()?;
    crate::netns::prerequisites(&["ip", "ping", "tcpdump"])?;
    if !Path::new("/dev/net/tun").exists() {
        return Err("needs /dev/net/tun".into());
    }
    Ok(())
}

/// The backend, its sockets and the client namespace.
pub struct VhostNet {
    // Field order is drop order: the backend (in the namespace) before the namespace.
    backend: Proc,
    /// The client's namespace (holds the tap at [`CLIENT_IP`]).
    pub client: Netns,
    /// The tap's name.
    pub tap: String,
    /// The primary (or only) VM socket.
    pub primary: PathBuf,
    /// The secondary VM socket (COLO).
    pub secondary: Option<PathBuf>,
    /// The control socket.
    pub control: PathBuf,
    dir: TempDir,
}

impl VhostNet {
    /// Starts `vhost-net-compare` in a new client namespace: passthrough, or COLO with
    /// `colo`; `extra` are more backend options (e.g. `--compare-timeout`). Returns once the
    /// sockets exist and the tap is configured.
    pub fn start(colo: bool, extra: &[&str]) -> VhostNet {
        let dir = TempDir::new("vq");
        let client = Netns::new("vq");
        let tap = unique("vq");
        let primary = dir.path("primary.sock");
        let secondary = colo.then(|| dir.path("secondary.sock"));
        let control = dir.path("control.sock");
        let mut cmd = client.command(bin("vhost-net-compare").to_str().expect("utf-8 path"));
        cmd.arg("--primary-socket").arg(&primary);
        if let Some(s) = &secondary {
            cmd.arg("--secondary-socket").arg(s);
        }
        cmd.arg("--control-socket").arg(&control).args(["--tap", &tap, "--mac", GUEST_MAC]).args(extra);
        cmd.env("RUST_LOG", std::env::var("VNC_LOG").unwrap_or_else(|_| "info".into()));
        let mut backend = Proc::spawn("vhost-net-compare", cmd);
        for p in [Some(&primary), secondary.as_ref(), Some(&control)].into_iter().flatten() {
            if !wait_for_path(p, Duration::from_secs(10)) {
                backend.assert_running();
                panic!("{} did not appear; backend stderr:\n{}", p.display(), backend.stderr());
            }
        }
        client.exec(&["ip", "link", "set", "dev", &tap, "address", CLIENT_MAC]);
        client.exec(&["ip", "addr", "add", &format!("{CLIENT_IP}/24"), "dev", &tap]);
        client.exec(&["ip", "link", "set", "dev", &tap, "up"]);
        VhostNet { backend, client, tap, primary, secondary, control, dir }
    }

    /// Options for a guest on `socket` with every service and the guest's MAC and IP.
    ///
    /// `-smp 1,maxcpus=2` (still one vCPU): QEMU 7.2's TCG leaves out the guest's memory
    /// barriers when the machine can only ever have one CPU (no `CF_PARALLEL`; QEMU 8.1 emits
    /// them always in system mode). Then the guest's store of a ring's avail index and its load
    /// of the device's avail event can pass each other, and so can the device's pair in the
    /// other process: both conclude that no notification is needed, and the guest's TX ring
    /// stalls for good (seen here about once in 15 16-MiB downloads after UDP floods). With
    /// room for a second CPU the barriers are emitted.
    pub fn guest_opts(&self, name: &str, socket: &Path) -> GuestOpts {
        let mut o = GuestOpts::vhost_user(name, socket, &format!("{GUEST_IP}/24"));
        o.mac = GUEST_MAC.into();
        o.qemu_args.extend(["-smp".to_string(), "1,maxcpus=2".to_string()]);
        o
    }

    /// The backend's process id.
    pub fn backend_pid(&self) -> u32 {
        self.backend.pid()
    }

    /// A controller connection to the backend.
    pub fn control(&self) -> ControlClient {
        ControlClient::connect(&self.control).expect("connect to the backend's control socket")
    }

    /// The backend process.
    pub fn backend(&mut self) -> &mut Proc {
        &mut self.backend
    }

    /// A file in this run's temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.client.enter(f)
    }

    /// Starts tcpdump on the tap, writing to `name` in the temporary directory.
    pub fn capture(&self, name: &str) -> Capture {
        let path = self.dir.path(name);
        let arg = path.to_str().expect("utf-8 path").to_string();
        let mut proc = self.client.spawn(
            "tcpdump",
            "tcpdump",
            &["-i", &self.tap, "-n", "-U", "--immediate-mode", "-B", "8192", "-s", "0", "-w", &arg],
        );
        let t0 = Instant::now();
        // tcpdump writes the file header once it has opened the interface.
        while std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) == 0 {
            proc.assert_running();
            assert!(t0.elapsed() < Duration::from_secs(10), "tcpdump did not start: {}", proc.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
        Capture { proc, path }
    }
}

/// A running tcpdump.
pub struct Capture {
    proc: Proc,
    path: PathBuf,
}

impl Capture {
    /// The frames captured so far.
    pub fn frames(&self) -> Vec<Vec<u8>> {
        let bytes = std::fs::read(&self.path).unwrap_or_default();
        if bytes.len() < 24 {
            return vec![];
        }
        pcapread::frames(&bytes)
    }

    /// Waits (up to `timeout`) until `done` holds for the frames captured, then stops tcpdump
    /// and returns them. tcpdump discards what is still in its kernel buffer when stopped, so
    /// the caller says what it expects to have seen.
    pub fn stop_when(mut self, timeout: Duration, done: impl Fn(&[Vec<u8>]) -> bool) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut frames = self.frames();
        while !done(&frames) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            frames = self.frames();
        }
        self.proc.signal(libc::SIGINT);
        self.proc.wait_timeout(Duration::from_secs(5));
        self.frames()
    }
}

/// What the client sees of a frame from the guest, as far as these tests care.
#[derive(Debug, PartialEq, Eq, Hash, Clone)]
pub enum Seen {
    /// An ICMP echo reply.
    IcmpReply {
        /// Its identifier.
        id: u16,
        /// Its sequence number.
        seq: u16,
    },
    /// A UDP datagram.
    Udp {
        /// Source port.
        sport: u16,
        /// Payload.
        payload: Vec<u8>,
    },
    /// A TCP segment with data.
    Tcp {
        /// Source port.
        sport: u16,
        /// Sequence number.
        seq: u32,
        /// Payload.
        payload: Vec<u8>,
    },
}

/// Parses an IPv4 frame from the guest (source [`GUEST_IP`]); `None` for anything else.
pub fn parse_from_guest(f: &[u8]) -> Option<Seen> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[26..30] != [10, 0, 0, 2] {
        return None;
    }
    let ihl = usize::from(f[14] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let l4 = f.get(14 + ihl..14 + total)?;
    match f[23] {
        1 if l4.len() >= 8 && l4[0] == 0 => {
            Some(Seen::IcmpReply { id: u16::from_be_bytes([l4[4], l4[5]]), seq: u16::from_be_bytes([l4[6], l4[7]]) })
        }
        17 if l4.len() >= 8 => Some(Seen::Udp { sport: u16::from_be_bytes([l4[0], l4[1]]), payload: l4[8..].to_vec() }),
        6 if l4.len() >= 20 => {
            let hl = usize::from(l4[12] >> 4) * 4;
            let payload = l4.get(hl..)?.to_vec();
            (!payload.is_empty()).then(|| Seen::Tcp {
                sport: u16::from_be_bytes([l4[0], l4[1]]),
                seq: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
                payload,
            })
        }
        _ => None,
    }
}

/// The guest's `port` as a socket address.
pub fn guest(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 2], port))
}

/// A UDP socket bound to the client's address (create it inside the client namespace).
pub fn client_udp(timeout: Duration) -> UdpSocket {
    let s = UdpSocket::bind((CLIENT_IP, 0)).expect("bind a UDP socket on the client");
    s.set_read_timeout(Some(timeout)).expect("timeout");
    s
}

/// Sends `msg` to the guest's `port` until an answer comes (up to `tries` times, a second
/// each); returns it. Must run inside the client namespace.
pub fn udp_request(port: u16, msg: &[u8], tries: usize) -> Option<Vec<u8>> {
    let s = client_udp(Duration::from_secs(1));
    let mut buf = [0u8; 2048];
    for _ in 0..tries {
        s.send_to(msg, guest(port)).expect("udp send");
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            assert_eq!(from, guest(port), "answer from the guest's port");
            return Some(buf[..n].to_vec());
        }
    }
    None
}

/// A TCP connection to the guest's `port`, with `timeout` on reads and writes. Must run inside
/// the client namespace.
pub fn tcp_connect(port: u16, timeout: Duration) -> TcpStream {
    let s = TcpStream::connect_timeout(&guest(port), timeout)
        .unwrap_or_else(|e| panic!("TCP connect {GUEST_IP}:{port}: {e}"));
    s.set_read_timeout(Some(timeout)).expect("timeout");
    s.set_write_timeout(Some(timeout)).expect("timeout");
    s
}

/// Writes `msg` (from another thread, so a long echo cannot fill both directions' buffers and
/// stall) and reads until `want` bytes came back.
pub fn tcp_exchange(s: &mut TcpStream, msg: &[u8], want: usize) -> Vec<u8> {
    let mut w = s.try_clone().expect("clone stream");
    let msg = msg.to_vec();
    let writer = std::thread::spawn(move || w.write_all(&msg));
    let mut got = vec![];
    let mut buf = [0u8; 65536];
    while got.len() < want {
        let n = s.read(&mut buf).expect("tcp read");
        assert!(n > 0, "connection closed after {} of {want} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    writer.join().expect("writer thread").expect("tcp write");
    got
}

/// `GET path` over HTTP/1.0 from busybox httpd; returns (status line, body). Must run inside
/// the client namespace.
pub fn http_get(path: &str, timeout: Duration) -> (String, Vec<u8>) {
    let mut s = tcp_connect(HTTP_PORT, timeout);
    write!(s, "GET {path} HTTP/1.0\r\nHost: {GUEST_IP}\r\n\r\n").expect("http request");
    let mut resp = vec![];
    s.read_to_end(&mut resp).expect("http response");
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").expect("end of HTTP headers");
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, resp[split + 4..].to_vec())
}
