//! Test harness: the backend as a child process, a tap per test, a packet socket on it, and a
//! vhost-user frontend ("VM") in the test process driving memfd-backed guest memory the way a
//! guest driver and its VMM would.
#![allow(dead_code)]

use std::cell::RefCell;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use colo_proxy::control::ControlClient;
use colo_test_support::can_run;
pub use colo_test_support::TempDir;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

// ---------------------------------------------------------------------------------------------
// Prerequisites and names

/// Whether this test can run (root and /dev/net/tun), by the project's skip rule: a visible
/// SKIPPED line when not, a failure instead with COLO_REQUIRE_ALL=1.
pub fn prerequisites(test: &str) -> bool {
    let missing = if unsafe { libc::geteuid() } != 0 {
        Err("needs root (tap devices, AF_PACKET)".to_string())
    } else if !Path::new("/dev/net/tun").exists() {
        Err("needs /dev/net/tun".to_string())
    } else {
        Ok(())
    };
    can_run(test, missing)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Held while a tun file descriptor is open in this process and while a child is spawned: a
/// child forked from another test thread would otherwise inherit the descriptor until its
/// exec and keep the tap attached (EBUSY for the backend that opens it next).
static FORK_GUARD: Mutex<()> = Mutex::new(());

pub fn fork_guard() -> MutexGuard<'static, ()> {
    FORK_GUARD.lock().unwrap_or_else(|e| e.into_inner())
}

/// A name unique to this process and call: "vnc" + pid + "x" + counter (at most 15 bytes).
pub fn unique_name() -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("vnc{}x{}", std::process::id() % 10_000_000, n % 100)
}

// ---------------------------------------------------------------------------------------------
// The tap

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A persistent tap made by the test (IPv6 off, so the host sends nothing on it by itself),
/// deleted on drop even if the test fails.
pub struct TestTap {
    pub name: String,
}

impl TestTap {
    pub fn new() -> TestTap {
        let name = unique_name();
        let _guard = fork_guard();
        let file = fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").unwrap();
        let mut req = IfReq { name: [0; 16], flags: 0x0002 | 0x1000 | 0x4000, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        assert!(
            unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } >= 0,
            "TUNSETIFF {name}: {}",
            io::Error::last_os_error()
        );
        assert!(unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } >= 0);
        drop(file);
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        TestTap { name }
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        let _guard = fork_guard();
        let _ = Command::new("ip").args(["link", "delete", &self.name]).stderr(Stdio::null()).status();
    }
}

/// An AF_PACKET socket on the tap: frames the backend writes to the tap are received here,
/// frames sent here reach the backend as if from the network.
pub struct Wire {
    fd: OwnedFd,
}

impl Wire {
    pub fn open(tap: &str) -> Wire {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = CString::new(tap).unwrap();
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert!(ifindex > 0, "no interface {tap}");
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert!(r == 0, "bind AF_PACKET: {}", io::Error::last_os_error());
        let one: libc::c_int = 1;
        // PACKET_IGNORE_OUTGOING: do not read back what this socket sends.
        unsafe {
            libc::setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, 23, &one as *const _ as *const libc::c_void, 4);
        }
        let size: libc::c_int = 8 << 20;
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const _ as *const libc::c_void,
                4,
            );
        }
        Wire { fd }
    }

    /// Sends an Ethernet frame into the tap (towards the VMs).
    pub fn send(&self, frame: &[u8]) {
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n as usize, frame.len(), "send on the tap: {}", io::Error::last_os_error());
    }

    /// The next frame the backend wrote to the tap, waiting up to `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if n <= 0 {
            return None;
        }
        let mut buf = vec![0u8; 70000];
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(n >= 0, "recv: {}", io::Error::last_os_error());
        buf.truncate(n as usize);
        Some(buf)
    }

    /// The next frame for which `wanted` holds (others are skipped).
    pub fn recv_matching(&self, timeout: Duration, wanted: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let f = self.recv(left)?;
            if wanted(&f) {
                return Some(f);
            }
        }
    }

    /// Frames received within `timeout` for which `wanted` holds.
    pub fn collect(&self, timeout: Duration, wanted: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut out = vec![];
        while let Some(f) = self.recv(deadline.saturating_duration_since(Instant::now())) {
            if wanted(&f) {
                out.push(f);
            }
        }
        out
    }
}

/// Ethertype used by test frames in passthrough tests (IEEE local experimental).
pub const TEST_ETHERTYPE: u16 = 0x88b5;

/// A test frame: broadcast destination, the given source MAC, TEST_ETHERTYPE, a tag and
/// padding to `len` bytes.
pub fn test_frame(tag: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0x00, 0x00, 0xc0, 0x10, 0x01]);
    f.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&tag.to_be_bytes());
    while f.len() < len {
        f.push((f.len() % 251) as u8);
    }
    f
}

/// Whether `f` is a test frame (and which tag).
pub fn test_tag(f: &[u8]) -> Option<u32> {
    (f.len() >= 18 && f[12..14] == TEST_ETHERTYPE.to_be_bytes())
        .then(|| u32::from_be_bytes(f[14..18].try_into().unwrap()))
}

// ---------------------------------------------------------------------------------------------
// The backend process

pub struct Backend {
    child: RefCell<Option<Child>>,
    pub log: PathBuf,
    pub primary: PathBuf,
    pub secondary: Option<PathBuf>,
    pub control: Option<PathBuf>,
}

pub struct BackendOpts<'a> {
    /// `--vm-socket` (one VM, its role set at run time) instead of `--primary-socket`.
    pub one_vm: bool,
    pub tap: &'a str,
    pub secondary: bool,
    pub control: bool,
    pub extra: Vec<String>,
}

impl Backend {
    pub fn spawn(dir: &TempDir, o: BackendOpts<'_>) -> Backend {
        let name = unique_name();
        let primary = dir.path(&format!("{name}-p.sock"));
        let secondary = o.secondary.then(|| dir.path(&format!("{name}-s.sock")));
        let control = o.control.then(|| dir.path(&format!("{name}-c.sock")));
        let log = dir.path(&format!("{name}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-net-compare"));
        cmd.arg(if o.one_vm { "--vm-socket" } else { "--primary-socket" }).arg(&primary).arg("--tap").arg(o.tap);
        if let Some(s) = &secondary {
            cmd.arg("--secondary-socket").arg(s);
        }
        if let Some(c) = &control {
            cmd.arg("--control-socket").arg(c);
        }
        cmd.args(&o.extra);
        cmd.env("RUST_LOG", std::env::var("VNC_LOG").unwrap_or_else(|_| "info".into()));
        cmd.stdout(Stdio::null()).stderr(File::create(&log).unwrap());
        let child = {
            let _guard = fork_guard();
            cmd.spawn().expect("spawn vhost-net-compare")
        };
        let b = Backend { child: RefCell::new(Some(child)), log, primary, secondary, control };
        b.wait_ready();
        b
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let paths: Vec<&PathBuf> =
            [Some(&self.primary), self.secondary.as_ref(), self.control.as_ref()].into_iter().flatten().collect();
        while !paths.iter().all(|p| p.exists()) {
            assert!(Instant::now() < deadline, "backend did not start:\n{}", self.log_text());
            assert!(self.alive(), "backend exited:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&self) -> bool {
        matches!(self.child.borrow_mut().as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn pid(&self) -> u32 {
        self.child.borrow().as_ref().unwrap().id()
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(self) -> (ExitStatus, String) {
        let mut child = self.child.borrow_mut().take().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return (st, self.log_text());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("backend ignored SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn control(&self) -> ControlClient {
        ControlClient::connect(self.control.as_ref().expect("control socket")).expect("connect control socket")
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.borrow_mut().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- backend log ----\n{}---- end ----", self.log_text());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The VM (a vhost-user frontend with memfd guest memory)

pub const QSIZE: u16 = 256;
pub const MEM_SIZE: usize = 8 << 20;
pub const RX_DESC: u64 = 0x0000;
pub const RX_AVAIL: u64 = 0x1000;
pub const RX_USED: u64 = 0x2000;
pub const TX_DESC: u64 = 0x3000;
pub const TX_AVAIL: u64 = 0x4000;
pub const TX_USED: u64 = 0x5000;
pub const RX_BUFS: u64 = 0x10_0000;
pub const TX_BUFS: u64 = 0x20_0000;
/// Free memory for hand-made chains.
pub const SCRATCH: u64 = 0x40_0000;
pub const BUF_SIZE: u64 = 4096;
pub const PAGE: u64 = 4096;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// One split ring as the driver sees it.
pub struct Vq {
    pub index: usize,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    pub avail_idx: u16,
    pub used_seen: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

impl Vq {
    fn new(index: usize, desc: u64, avail: u64, used: u64) -> Vq {
        Vq {
            index,
            desc,
            avail,
            used,
            size: QSIZE,
            avail_idx: 0,
            used_seen: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }
}

/// A received frame.
#[derive(Debug)]
pub struct RxFrame {
    pub heads: Vec<(u32, u32)>,
    pub hdr: [u8; 12],
    pub eth: Vec<u8>,
}

pub struct Vm {
    pub frontend: Frontend,
    pub mem: GuestMemoryMmap<()>,
    pub rx: Vq,
    pub tx: Vq,
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    /// RX descriptor of each head, for reading buffers back: (addr, len).
    rx_bufs: Vec<(u64, u32)>,
    /// RX used entries read but not yet returned as frames.
    rx_used: Vec<(u32, u32)>,
}

pub fn memfd(name: &str, size: u64) -> File {
    let cname = CString::new(name).unwrap();
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

impl Vm {
    /// Connects to `path` (waiting up to 10 s for the backend to accept).
    pub fn connect(path: &Path) -> Vm {
        Self::connect_with(path, |_| {})
    }

    /// Connects to `path`, lets `prelude` write raw requests on the socket, then hands it to
    /// the vhost crate's frontend.
    pub fn connect_with(path: &Path, prelude: impl FnOnce(&mut UnixStream)) -> Vm {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot connect to {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut stream = stream;
        prelude(&mut stream);
        let frontend = Frontend::from_stream(stream, 2);
        let file = memfd("guest-ram", MEM_SIZE as u64);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        Vm {
            frontend,
            mem,
            rx: Vq::new(0, RX_DESC, RX_AVAIL, RX_USED),
            tx: Vq::new(1, TX_DESC, TX_AVAIL, TX_USED),
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            rx_bufs: vec![(0, 0); QSIZE as usize],
            rx_used: vec![],
        }
    }

    /// SET_OWNER, features, protocol features (REPLY_ACK, LOG_SHMFD, CONFIG wanted), and acked
    /// features = everything offered but LOG_ALL.
    pub fn negotiate(&mut self) {
        let f = &mut self.frontend;
        f.set_owner().unwrap();
        let offered = f.get_features().unwrap();
        let proto = f.get_protocol_features().unwrap();
        let wanted = VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::CONFIG;
        assert!(proto.contains(wanted), "protocol features offered: {proto:?}");
        assert!(!proto.contains(VhostUserProtocolFeatures::MQ));
        f.set_protocol_features(wanted).unwrap();
        f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        self.protocol = wanted;
        self.features = offered & !VhostUserVirtioFeatures::LOG_ALL.bits();
        f.set_features(self.features).unwrap();
    }

    pub fn set_mem_table(&mut self) {
        let region = self.mem.find_region(GuestAddress(0)).unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        self.frontend.set_mem_table(&[info]).unwrap();
    }

    fn host(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    /// Configures and starts ring `q` with `base` as next avail index.
    pub fn start_ring(&mut self, q: usize, base: u16) {
        self.configure_ring(q, base);
        self.frontend.set_vring_enable(q, true).unwrap();
    }

    /// Configures ring `q` (size, addresses, `base` as next avail index, call and kick) without
    /// enabling it: [`Vm::start_ring`] enables it next; QEMU 7.2 sent SET_VRING_ENABLE before
    /// the features instead (see [`qemu_7_2_prelude`]).
    pub fn configure_ring(&mut self, q: usize, base: u16) {
        let (desc, avail, used) = {
            let vq = if q == 0 { &self.rx } else { &self.tx };
            (vq.desc, vq.avail, vq.used)
        };
        let cfg = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: self.host(desc),
            used_ring_addr: self.host(used),
            avail_ring_addr: self.host(avail),
            log_addr: None,
        };
        let vq = if q == 0 { &self.rx } else { &self.tx };
        let f = &mut self.frontend;
        f.set_vring_num(q, QSIZE).unwrap();
        f.set_vring_addr(q, &cfg).unwrap();
        f.set_vring_base(q, base).unwrap();
        f.set_vring_call(q, &vq.call).unwrap();
        f.set_vring_kick(q, &vq.kick).unwrap();
    }

    /// The whole setup of a VMM at DRIVER_OK.
    pub fn setup(&mut self) {
        self.negotiate();
        self.set_mem_table();
        self.start_ring(0, 0);
        self.start_ring(1, 0);
    }

    /// MAC from the config space.
    pub fn config_mac(&mut self) -> ([u8; 6], u16) {
        let (_, data) = self.frontend.get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8]).unwrap();
        (data[..6].try_into().unwrap(), u16::from_le_bytes([data[6], data[7]]))
    }

    // -- ring access ---------------------------------------------------------------------------

    pub fn write_desc(&self, vq: &Vq, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = vq.desc + u64::from(i) * 16;
        self.mem.write_obj(addr, GuestAddress(a)).unwrap();
        self.mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(a + 14)).unwrap();
    }

    fn offer_on(mem: &GuestMemoryMmap<()>, vq: &mut Vq, head: u16) {
        let slot = vq.avail + 4 + 2 * u64::from(vq.avail_idx % vq.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        vq.avail_idx = vq.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        mem.store(vq.avail_idx, GuestAddress(vq.avail + 2), Ordering::Release).unwrap();
    }

    /// Makes the chain at `head` available on RX (`q` = 0) or TX (1), without kicking.
    pub fn offer(&mut self, q: usize, head: u16) {
        let vq = if q == 0 { &mut self.rx } else { &mut self.tx };
        Self::offer_on(&self.mem, vq, head);
    }

    pub fn kick(&self, q: usize) {
        let vq = if q == 0 { &self.rx } else { &self.tx };
        vq.kick.write(1).unwrap();
    }

    /// Used entries added since the last call.
    pub fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let vq = if q == 0 { &mut self.rx } else { &mut self.tx };
        let idx: u16 = self.mem.load(GuestAddress(vq.used + 2), Ordering::Acquire).unwrap();
        let mut out = vec![];
        while vq.used_seen != idx {
            let e = vq.used + 4 + 8 * u64::from(vq.used_seen % vq.size);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id, len));
            vq.used_seen = vq.used_seen.wrapping_add(1);
        }
        out
    }

    /// Waits until at least `n` new used entries arrived on queue `q`.
    pub fn wait_used(&mut self, q: usize, n: usize, timeout: Duration) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        let mut got = vec![];
        while got.len() < n {
            got.extend(self.used(q));
            if got.len() >= n {
                break;
            }
            assert!(Instant::now() < deadline, "queue {q}: {} of {n} used entries within {timeout:?}", got.len());
            std::thread::sleep(Duration::from_micros(200));
        }
        got
    }

    /// The used index the backend published on queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        let vq = if q == 0 { &self.rx } else { &self.tx };
        self.mem.load(GuestAddress(vq.used + 2), Ordering::Acquire).unwrap()
    }

    // -- TX --------------------------------------------------------------------------------------

    /// Queues `eth` (with a zero 12-byte header) on TX in slot avail_idx % size, kicks.
    pub fn send(&mut self, eth: &[u8]) -> u16 {
        let head = self.queue_tx(eth);
        self.kick(1);
        head
    }

    /// Like [`Vm::send`] without the kick.
    pub fn queue_tx(&mut self, eth: &[u8]) -> u16 {
        let slot = self.tx.avail_idx % self.tx.size;
        let addr = TX_BUFS + u64::from(slot) * BUF_SIZE;
        let mut data = vec![0u8; 12];
        data.extend_from_slice(eth);
        assert!(data.len() as u64 <= BUF_SIZE);
        self.mem.write_slice(&data, GuestAddress(addr)).unwrap();
        self.write_desc(&self.tx, slot, addr, data.len() as u32, 0, 0);
        self.offer(1, slot);
        slot
    }

    // -- RX --------------------------------------------------------------------------------------

    /// Posts `n` RX buffers of BUF_SIZE (one page each), kicks.
    pub fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let slot = self.rx.avail_idx % self.rx.size;
            self.post_rx_buffer(slot, RX_BUFS + u64::from(slot) * BUF_SIZE, BUF_SIZE as u32);
        }
        self.kick(0);
    }

    /// Posts one RX buffer as descriptor `head` (no kick).
    pub fn post_rx_buffer(&mut self, head: u16, addr: u64, len: u32) {
        self.write_desc(&self.rx, head, addr, len, F_WRITE, 0);
        self.rx_bufs[head as usize] = (addr, len);
        self.offer(0, head);
    }

    /// The next received frame (gathering all its buffers), waiting up to `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<RxFrame> {
        let deadline = Instant::now() + timeout;
        let mut pending = std::mem::take(&mut self.rx_used);
        loop {
            pending.extend(self.used(0));
            if let Some(&(id, len)) = pending.first() {
                let (addr, _) = self.rx_bufs[id as usize];
                let mut hdr = [0u8; 12];
                self.mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
                let n = usize::from(u16::from_le_bytes([hdr[10], hdr[11]]).max(1));
                if pending.len() >= n {
                    let heads: Vec<(u32, u32)> = pending.drain(..n).collect();
                    self.rx_used = pending;
                    let mut data = vec![0u8; len as usize];
                    self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
                    for &(id, len) in &heads[1..] {
                        let (addr, _) = self.rx_bufs[id as usize];
                        let mut more = vec![0u8; len as usize];
                        self.mem.read_slice(&mut more, GuestAddress(addr)).unwrap();
                        data.extend(more);
                    }
                    return Some(RxFrame { heads, hdr, eth: data[12..].to_vec() });
                }
            }
            if Instant::now() >= deadline {
                self.rx_used = pending;
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The next received frame for which `wanted` holds.
    pub fn recv_matching(&mut self, timeout: Duration, wanted: impl Fn(&[u8]) -> bool) -> Option<RxFrame> {
        let deadline = Instant::now() + timeout;
        loop {
            let f = self.recv(deadline.saturating_duration_since(Instant::now()))?;
            if wanted(&f.eth) {
                return Some(f);
            }
        }
    }

    // -- dirty log -------------------------------------------------------------------------------

    /// Hands the backend a fresh memfd log (SET_LOG_BASE with LOG_SHMFD) and sets LOG_ALL.
    pub fn start_dirty_log(&mut self) -> DirtyLog {
        let pages = MEM_SIZE as u64 / PAGE;
        let size = (pages / 8 + 1).next_multiple_of(PAGE);
        let file = memfd("dirty-log", size);
        let region = VhostUserDirtyLogRegion { mmap_size: size, mmap_offset: 0, mmap_handle: file.as_raw_fd() };
        self.frontend.set_log_base(0, Some(region)).unwrap();
        self.frontend.set_features(self.features | VhostUserVirtioFeatures::LOG_ALL.bits()).unwrap();
        DirtyLog { file, size }
    }
}

/// A dirty log the backend writes.
pub struct DirtyLog {
    file: File,
    size: u64,
}

impl DirtyLog {
    /// Pages whose bit is set.
    pub fn pages(&self) -> Vec<u64> {
        let mut buf = vec![0u8; self.size as usize];
        self.file.read_exact_at(&mut buf, 0).unwrap();
        let mut out = vec![];
        for (i, b) in buf.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    out.push(i as u64 * 8 + bit);
                }
            }
        }
        out
    }

    /// Clears every bit.
    pub fn clear(&self) {
        self.file.write_all_at(&vec![0u8; self.size as usize], 0).unwrap();
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Reads a whole file (for logs).
pub fn read_all(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// A raw vhost-user request: header (request, flags = version 1 | `flags`, size) and payload.
pub fn raw_request(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(12 + payload.len());
    m.extend_from_slice(&request.to_ne_bytes());
    m.extend_from_slice(&(1 | flags).to_ne_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
    m.extend_from_slice(payload);
    m
}

/// What QEMU 7.2 sends before SET_FEATURES: SET_OWNER, then SET_VRING_ENABLE(1) for both rings,
/// several times (here once with NEED_REPLY, whose reply is read). The vhost crate's backend
/// alone would refuse the first SET_VRING_ENABLE and drop the connection.
pub fn qemu_7_2_prelude(s: &mut UnixStream) {
    use std::io::Write;
    const SET_OWNER: u32 = 3;
    const SET_VRING_ENABLE: u32 = 18;
    const NEED_REPLY: u32 = 0x8;
    let enable = |index: u32| [index.to_ne_bytes(), 1u32.to_ne_bytes()].concat();
    s.write_all(&raw_request(SET_OWNER, 0, &[])).unwrap();
    for _ in 0..2 {
        s.write_all(&raw_request(SET_VRING_ENABLE, 0, &enable(0))).unwrap();
        s.write_all(&raw_request(SET_VRING_ENABLE, 0, &enable(1))).unwrap();
    }
    s.write_all(&raw_request(SET_VRING_ENABLE, NEED_REPLY, &enable(0))).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).expect("a reply to SET_VRING_ENABLE with NEED_REPLY");
    assert_eq!(reply[..4], SET_VRING_ENABLE.to_ne_bytes());
    assert_eq!(reply[4..8], 0x5u32.to_ne_bytes(), "version 1 | REPLY");
    assert_eq!(reply[8..12], 8u32.to_ne_bytes());
    assert_eq!(reply[12..], 0u64.to_ne_bytes(), "success");
}
