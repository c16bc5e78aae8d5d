//! A reference-guest VM on a network the test owns:
//!
//! ```text
//!  client ns: tap (10.0.0.1) ── vhost-net-compare (passthrough) ══ vhost-user ══ colo-vmm ── guest 10.0.0.2
//! ```
//! The backend runs inside the client namespace so its tap is created there; the VMM runs in
//! the test's namespace (it only needs the backend's socket). Everything is removed on drop.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::{bin, unique, wait_for_path, Proc, TempDir};

/// The guest's address.
pub const GUEST_IP: &str = "10.0.0.2";
/// The guest's MAC address.
pub const GUEST_MAC: &str = "52:54:00:12:34:56";

/// Whether this machine can run these tests, else why not.
pub fn prerequisites() -> Result<(), String> {
    crate::netns::prerequisites(&["ip"])?;
    if !Path::new("/dev/kvm").exists() {
        return Err("needs /dev/kvm".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err("needs /dev/net/tun".into());
    }
    Ok(())
}

/// The backend, the VMM and their network.
pub struct VmNet {
    /// The VMM (None once stopped or handed over).
    pub vmm: Option<Proc>,
    /// The backend.
    pub backend: Proc,
    /// The client's namespace (holds the tap at 10.0.0.1).
    pub client: Netns,
    /// Files of this run.
    pub dir: TempDir,
    /// The backend's vhost-user socket.
    pub vhost_socket: PathBuf,
    /// The backend's control socket.
    pub control: PathBuf,
    /// The VMM's API socket.
    pub api: PathBuf,
    /// The guest's console log.
    pub serial: PathBuf,
}

impl VmNet {
    /// Starts the backend and a VM with `cmdline` (the guest's `ip=` is added), waits until the
    /// guest says it is ready.
    pub fn start(cmdline: &str) -> VmNet {
        Self::start_with(cmdline, &[])
    }

    /// As [`VmNet::start`], with extra `colo-vmm run` arguments.
    pub fn start_with(cmdline: &str, vmm_args: &[&str]) -> VmNet {
        let dir = TempDir::new("vm");
        let client = Netns::new("vc");
        let vhost_socket = dir.path("vhost.sock");
        let control = dir.path("backend-ctl.sock");
        let tap = unique("vt");
        let backend = {
            let mut c = client.command(bin("vhost-net-compare").to_str().expect("utf-8"));
            c.arg("--primary-socket").arg(&vhost_socket).args(["--tap", &tap, "--mac", GUEST_MAC]);
            c.arg("--control-socket").arg(&control);
            Proc::spawn("vhost-net-compare", c)
        };
        assert!(wait_for_path(&vhost_socket, Duration::from_secs(10)), "the backend's socket did not appear");
        client.exec(&["ip", "addr", "add", "10.0.0.1/24", "dev", &tap]);
        client.exec(&["ip", "link", "set", "dev", &tap, "up"]);
        let mut net = VmNet {
            vmm: None,
            backend,
            client,
            api: dir.path("api.sock"),
            serial: dir.path("serial.log"),
            vhost_socket,
            control,
            dir,
        };
        let full = format!("ip={GUEST_IP}/24 gw=10.0.0.1 {cmdline}");
        let mut args = vec!["run".to_string(), "--cmdline".into(), full];
        args.extend(vmm_args.iter().map(|s| s.to_string()));
        net.launch_vmm(&args);
        net.wait_serial("colo-guest: ready", Duration::from_secs(20));
        net
    }

    /// Starts `colo-vmm` with `args` plus this network's --net, --api and --serial.
    pub fn launch_vmm(&mut self, args: &[String]) {
        let mut c = Command::new(bin("colo-vmm"));
        c.args(args)
            .arg("--net")
            .arg(format!("vhost-user={},mac={GUEST_MAC}", self.vhost_socket.display()))
            .arg("--api")
            .arg(&self.api)
            .arg("--serial")
            .arg(format!("file:{}", self.serial.display()));
        let _ = std::fs::remove_file(&self.api);
        self.vmm = Some(Proc::spawn("colo-vmm", c));
        assert!(
            wait_for_path(&self.api, Duration::from_secs(20)),
            "colo-vmm's API did not appear:\n{}",
            self.vmm_stderr()
        );
    }

    /// The VMM's stderr so far.
    pub fn vmm_stderr(&self) -> String {
        self.vmm.as_ref().map(Proc::stderr).unwrap_or_default()
    }

    /// The console log so far.
    pub fn serial_log(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits for a console line containing `needle`.
    pub fn wait_serial(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.serial_log().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the guest never printed '{needle}'; console:\n{}\nVMM:\n{}", self.serial_log(), self.vmm_stderr());
    }

    /// Runs `colo-vmm ctl` against the VMM; returns (success, output).
    pub fn ctl(&self, command: &str, args: &[&str]) -> (bool, String) {
        let (st, out) =
            crate::run(Command::new(bin("colo-vmm")).arg("ctl").arg("--api").arg(&self.api).arg(command).args(args));
        (st.success(), out)
    }

    /// Runs `f` in the client namespace.
    pub fn client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.client.enter(f)
    }

    /// A TCP connection from the client to the guest (created in the client namespace).
    pub fn connect(&self, port: u16) -> TcpStream {
        self.client(move || {
            let s = TcpStream::connect_timeout(&format!("{GUEST_IP}:{port}").parse().unwrap(), Duration::from_secs(5))
                .expect("connect to the guest");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.set_nodelay(true).unwrap();
            s
        })
    }

    /// A UDP socket in the client namespace.
    pub fn udp(&self) -> UdpSocket {
        self.client(|| {
            let s = UdpSocket::bind("10.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s
        })
    }

    /// The guest's `/stats` page (the `http` service) as key → value.
    pub fn stats(&self) -> std::collections::BTreeMap<String, u64> {
        guest_stats(self.connect(80))
    }

    /// Whether the guest answers a ping within about a second.
    pub fn pings(&self) -> bool {
        self.client.try_exec(&["ping", "-c", "1", "-W", "1", GUEST_IP]).0
    }
}

impl Drop for VmNet {
    fn drop(&mut self) {
        if let Some(mut v) = self.vmm.take() {
            v.signal(libc::SIGTERM);
            v.wait_timeout(Duration::from_secs(3));
        }
    }
}

/// A line-oriented TCP client.
pub struct LineClient {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl LineClient {
    /// Wraps a connection.
    pub fn new(s: TcpStream) -> LineClient {
        LineClient { w: s.try_clone().unwrap(), r: BufReader::new(s) }
    }

    /// Sends a line and reads one back.
    pub fn ask(&mut self, line: &str) -> std::io::Result<String> {
        writeln!(self.w, "{line}")?;
        self.read_line()
    }

    /// Reads one line (without the newline).
    pub fn read_line(&mut self) -> std::io::Result<String> {
        let mut s = String::new();
        if self.r.read_line(&mut s)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(s.trim_end().to_string())
    }

    /// Sets the read timeout.
    pub fn set_timeout(&self, t: Duration) {
        self.w.set_read_timeout(Some(t)).unwrap();
    }
}

/// Reads `GET /stats` over `conn` (a connection to the guest's port 80): key → value.
pub fn guest_stats(mut conn: TcpStream) -> std::collections::BTreeMap<String, u64> {
    use std::io::Read;
    write!(conn, "GET /stats HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n").expect("GET /stats");
    let mut r = String::new();
    conn.read_to_string(&mut r).expect("the /stats response");
    let (_, body) = r.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP body in {r:?}"));
    body.lines().filter_map(|l| l.split_once('=')).filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?))).collect()
}

/// Each vCPU's burner iterations from a `/stats` page (`cpuN_burn`), by index.
pub fn burn_per_vcpu(stats: &std::collections::BTreeMap<String, u64>) -> Vec<u64> {
    let cpus = stats.get("cpus").copied().unwrap_or(0);
    (0..cpus).map(|i| stats.get(&format!("cpu{i}_burn")).copied().unwrap_or(0)).collect()
}

/// CPU time of each of a process's threads whose name starts with `prefix` (e.g. `vcpu`), by
/// name, from /proc.
pub fn thread_cpu_times(pid: u32, prefix: &str) -> std::collections::BTreeMap<String, Duration> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for t in tasks.flatten() {
        let tid: u32 = match t.file_name().to_string_lossy().parse() {
            Ok(v) => v,
            Err(_) => continue,
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm.starts_with(prefix) {
            out.insert(comm.to_string(), task_cpu_time(&format!("/proc/{pid}/task/{tid}/stat")));
        }
    }
    out
}

fn task_cpu_time(stat_path: &str) -> Duration {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// CPU time (user + system) a process used so far, from /proc.
pub fn cpu_time(pid: u32) -> Duration {
    // Fields after the command name (which may contain spaces) start after the last ')'.
    task_cpu_time(&format!("/proc/{pid}/stat"))
}
