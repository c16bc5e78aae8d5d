//! A COLO pair across hosts (network namespaces, see [`crate::hosts`]): on each host the VM's
//! colo-vmm and its backend, either vhost-net-compare with `--vm-socket` (the VM's tap bridged
//! onto the LAN) or colo-proxy with `--vm` (a passthrough vhost-net-compare's tap on one side,
//! the host's LAN link on the other). Host a boots the guest; host b waits with `--incoming` on
//! the replication network; [`ColoHosts::start_colo`] runs `colo-start`. Hosts die (kill -9 of
//! everything, links down), freeze (SIGSTOP) and thaw.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::colo_topology::ctl;
use crate::hosts::{Host, Lan, CLIENT_IP};
use crate::vm_topology::{GUEST_IP, GUEST_MAC};
use crate::{bin, wait_for_path, Proc, TempDir};

/// The checkpoint link's port on each host's replication address.
pub const CHECKPOINT_PORT: u16 = 4444;
/// The frame link's port.
pub const FRAME_PORT: u16 = 4445;

/// Which backend each host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostBackend {
    /// vhost-net-compare `--vm-socket`, the VM's tap on the host's LAN bridge.
    VhostNetCompare,
    /// colo-proxy `run --vm` between a passthrough backend's tap and the host's LAN link.
    ColoProxy,
}

/// Whether this machine can run these tests, else why not.
pub fn prerequisites() -> Result<(), String> {
    crate::hosts::prerequisites()?;
    crate::vm_topology::prerequisites()
}

/// What runs on one host.
pub struct OnHost {
    /// The backend(s): vhost-net-compare, and colo-proxy in front of it.
    pub backends: Vec<Proc>,
    /// The VM's colo-vmm.
    pub vmm: Option<Proc>,
    /// The backend's control socket (the VMM's `--compare-socket`).
    pub control: PathBuf,
    /// The VMM's API socket.
    pub api: PathBuf,
    /// The guest console.
    pub serial: PathBuf,
    /// The backend's capture of miscompared frames.
    pub capture: PathBuf,
    /// Whether the host is alive (not killed).
    pub alive: bool,
}

/// The pair across hosts.
pub struct ColoHosts {
    /// What runs on each host (0 = a, the primary at start; 1 = b).
    pub on: Vec<OnHost>,
    /// The network (dropped after the processes).
    pub lan: Lan,
    /// Files of this run.
    pub dir: TempDir,
    /// The link key file, if the links are keyed.
    pub key: Option<PathBuf>,
    /// The backend kind.
    pub backend: HostBackend,
    /// Logs of the processes fenced so far (see [`ColoHosts::take_fenced_logs`]).
    fenced_logs: String,
}

impl ColoHosts {
    /// Starts `hosts` hosts (at least 2) with their backends; host a boots the guest with
    /// `cmdline` (its `ip=` is added), the others wait for COLO. `keyed`: every link
    /// authenticated with one key.
    pub fn start(backend: HostBackend, hosts: usize, cmdline: &str, keyed: bool) -> ColoHosts {
        let dir = TempDir::new("hosts");
        let key = keyed.then(|| {
            let path = dir.path("link.key");
            write_key(&path, &[0x5a; 32]);
            path
        });
        let lan = Lan::new(hosts);
        let mut net = ColoHosts { on: Vec::new(), lan, dir, key, backend, fenced_logs: String::new() };
        for i in 0..hosts {
            let on = net.start_backends(i);
            net.on.push(on);
        }
        let full = format!("ip={GUEST_IP}/24 gw={CLIENT_IP} {cmdline}");
        net.on[0].vmm = Some(net.launch_vmm(0, &["--cmdline", &full]));
        net.wait_serial(0, "colo-guest: ready", Duration::from_secs(30));
        for i in 1..hosts {
            let incoming = net.uri(i);
            net.on[i].vmm = Some(net.launch_vmm(i, &["--incoming", &incoming]));
        }
        net
    }

    fn host(&self, i: usize) -> &Host {
        self.lan.host(i)
    }

    /// Host `i`'s checkpoint-link URI (its `--incoming`).
    pub fn uri(&self, i: usize) -> String {
        format!("tcp:{}:{CHECKPOINT_PORT}", self.host(i).repl_ip)
    }

    fn path(&self, i: usize, what: &str) -> PathBuf {
        self.dir.path(&format!("h{i}-{what}"))
    }

    fn key_args(&self) -> Vec<String> {
        self.key.iter().flat_map(|k| ["--link-key".to_string(), k.display().to_string()]).collect()
    }

    fn start_backends(&self, i: usize) -> OnHost {
        let host = self.host(i);
        let (vu, control, capture) =
            (self.path(i, "vu.sock"), self.path(i, "ctl.sock"), self.path(i, "miscompares.pcapng"));
        let listen = format!("{}:{FRAME_PORT}", host.repl_ip);
        let s = |p: &Path| p.display().to_string();
        let mut backends = vec![];
        match self.backend {
            HostBackend::VhostNetCompare => {
                // A restarted host finds the VM's tap still there (taps are persistent).
                if !host.ns.try_exec(&["ip", "link", "show", "dev", "vm0"]).0 {
                    host.add_vm_tap("vm0");
                }
                let mut args = vec![
                    "--vm-socket".to_string(),
                    s(&vu),
                    "--tap".into(),
                    "vm0".into(),
                    "--mac".into(),
                    GUEST_MAC.into(),
                ];
                args.extend(["--nic".into(), "net0".into(), "--control-socket".into(), s(&control)]);
                args.extend(["--peer-listen".into(), listen, "--capture".into(), s(&capture)]);
                args.extend(self.key_args());
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                backends.push(host.spawn("vhost-net-compare", &bin("vhost-net-compare"), &args));
                assert!(
                    wait_for_path(&vu, Duration::from_secs(10)),
                    "host {}: the backend's socket did not appear",
                    host.name
                );
            }
            HostBackend::ColoProxy => {
                // The proxy, not a bridge, joins the VM's side to the LAN.
                host.ns.exec(&["ip", "link", "set", "dev", "eth0", "nomaster"]);
                let args = ["--primary-socket", &s(&vu), "--tap", "vm0", "--mac", GUEST_MAC];
                backends.push(host.spawn("vhost-net-compare", &bin("vhost-net-compare"), &args));
                assert!(
                    wait_for_path(&vu, Duration::from_secs(10)),
                    "host {}: the backend's socket did not appear",
                    host.name
                );
                let _ =
                    host.ns.try_exec(&["ethtool", "-K", "vm0", "tx", "off", "tso", "off", "gso", "off", "gro", "off"]);
                let mut args = vec!["run".to_string(), "--uplink".into(), "eth0".into(), "--vm".into(), "vm0".into()];
                args.extend(["--mac".into(), GUEST_MAC.into(), "--nic".into(), "net0".into()]);
                args.extend(["--control-socket".into(), s(&control), "--peer-listen".into(), listen]);
                args.extend(["--capture".into(), s(&capture)]);
                args.extend(self.key_args());
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                backends.push(host.spawn("colo-proxy", &bin("colo-proxy"), &args));
            }
        }
        assert!(
            wait_for_path(&control, Duration::from_secs(10)),
            "host {}: the control socket did not appear",
            host.name
        );
        OnHost {
            backends,
            vmm: None,
            control,
            api: self.path(i, "api.sock"),
            serial: self.path(i, "serial.log"),
            capture,
            alive: true,
        }
    }

    fn launch_vmm(&self, i: usize, args: &[&str]) -> Proc {
        let host = self.host(i);
        let on = &self.on[i];
        let net = format!("vhost-user={},mac={GUEST_MAC}", self.path(i, "vu.sock").display());
        let mut all: Vec<String> = vec!["run".into()];
        all.extend(args.iter().map(|a| a.to_string()));
        all.extend(["--net".into(), net, "--api".into(), on.api.display().to_string()]);
        all.extend(["--serial".into(), format!("file:{}", on.serial.display())]);
        all.extend(["--compare-socket".into(), on.control.display().to_string()]);
        all.extend(self.key_args());
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let _ = std::fs::remove_file(&on.api);
        let mut p = host.spawn("colo-vmm", &bin("colo-vmm"), &all);
        let deadline = Instant::now() + Duration::from_secs(30);
        let ready = |p: &Proc| {
            if args.contains(&"--incoming") {
                p.stderr().contains("waiting for an incoming migration")
            } else {
                on.api.exists()
            }
        };
        while !ready(&p) {
            assert!(
                p.is_running() && Instant::now() < deadline,
                "host {}: colo-vmm did not start:\n{}",
                host.name,
                p.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// Every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (i, on) in self.on.iter().enumerate() {
            let name = &self.host(i).name;
            if let Some(v) = &on.vmm {
                s.push_str(&format!("--- host {name}: colo-vmm ---\n{}\n", v.stderr()));
            }
            for b in &on.backends {
                s.push_str(&format!("--- host {name}: backend ---\n{}\n", b.stderr()));
            }
        }
        s
    }

    /// Waits for a console line containing `needle` on host `i`'s guest.
    pub fn wait_serial(&self, i: usize, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if std::fs::read_to_string(&self.on[i].serial).unwrap_or_default().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the guest never printed '{needle}'\n{}", self.logs());
    }

    /// `colo-vmm ctl` against host `i`'s VMM.
    pub fn ctl(&self, i: usize, command: &str, args: &[&str]) -> Result<Value, String> {
        ctl(&self.on[i].api, command, args)
    }

    /// `query-colo-status` of host `i`.
    pub fn status(&self, i: usize) -> Value {
        self.ctl(i, "query-colo-status", &[])
            .unwrap_or_else(|e| panic!("query-colo-status on host {i}: {e}\n{}", self.logs()))
    }

    /// Waits until host `i`'s status satisfies `pred`; returns it.
    pub fn wait_status(&self, i: usize, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(s) = self.ctl(i, "query-colo-status", &[]) {
                if pred(&s) {
                    return s;
                }
                if Instant::now() > deadline {
                    panic!("host {i} never reached '{what}' within {timeout:?}; status:\n{s:#}\n{}", self.logs());
                }
            } else if Instant::now() > deadline {
                panic!("host {i} never answered while waiting for '{what}'\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `set-parameters` on host `i`.
    pub fn set_params(&self, i: usize, params: &[(&str, u64)]) {
        let args: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ctl(i, "set-parameters", &args).unwrap_or_else(|e| panic!("set-parameters: {e}"));
    }

    /// `colo-start` from host `p` to host `s` and waits until both run COLO.
    pub fn start_colo(&self, p: usize, s: usize) {
        let uri = format!("uri={}", self.uri(s));
        self.ctl(p, "colo-start", &[&uri]).unwrap_or_else(|e| panic!("colo-start: {e}\n{}", self.logs()));
        self.wait_status(p, "running", Duration::from_secs(30), |st| st["state"] == "running");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.on[s].api.exists() {
            assert!(Instant::now() < deadline, "the secondary's API did not appear\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
        self.wait_status(s, "running", Duration::from_secs(10), |st| st["state"] == "running");
    }

    /// Host `i` dies: every process of it killed (SIGKILL), its links down, so no reset
    /// ever reaches a peer.
    pub fn kill_host(&mut self, i: usize) {
        self.lan.host(i).cut_links();
        let on = &mut self.on[i];
        for mut p in on.vmm.take().into_iter().chain(on.backends.drain(..)) {
            p.signal(libc::SIGKILL);
            p.wait_timeout(Duration::from_secs(5));
        }
        on.alive = false;
    }

    /// Kills (SIGKILL) whatever still runs on host `i` (stopped processes included), as a
    /// cluster manager fences a host before another takes over; its links stay as they are.
    pub fn fence_host(&mut self, i: usize) {
        let name = self.lan.host(i).name.clone();
        let on = &mut self.on[i];
        for mut p in on.vmm.take().into_iter().chain(on.backends.drain(..)) {
            p.signal(libc::SIGCONT);
            p.signal(libc::SIGKILL);
            p.wait_timeout(Duration::from_secs(5));
            self.fenced_logs.push_str(&format!("--- host {name}: fenced process ---\n{}\n", p.stderr()));
        }
        on.alive = false;
    }

    /// The logs of the processes fenced since the last call.
    pub fn take_fenced_logs(&mut self) -> String {
        std::mem::take(&mut self.fenced_logs)
    }

    /// Brings host `i` back as a new secondary: whatever still runs there is fenced, its links
    /// come up, its backends start afresh and its colo-vmm waits with `--incoming` (as at the
    /// start). [`ColoHosts::start_colo`] from the survivor then protects the VM again.
    pub fn restart_host(&mut self, i: usize) {
        self.fence_host(i);
        self.lan.host(i).restore_links();
        // Sockets of the killed processes: the waits below must see the new ones.
        for what in ["vu.sock", "ctl.sock", "api.sock"] {
            let _ = std::fs::remove_file(self.path(i, what));
        }
        let on = self.start_backends(i);
        self.on[i] = on;
        let incoming = self.uri(i);
        self.on[i].vmm = Some(self.launch_vmm(i, &["--incoming", &incoming]));
    }

    /// Every process of host `i` with what it is (`colo-vmm`, or the backend's program name).
    pub fn processes(&self, i: usize) -> Vec<(&'static str, &Proc)> {
        let on = &self.on[i];
        let backends: &[&'static str] = match self.backend {
            HostBackend::VhostNetCompare => &["vhost-net-compare"],
            HostBackend::ColoProxy => &["vhost-net-compare", "colo-proxy"],
        };
        let mut all: Vec<(&'static str, &Proc)> = backends.iter().copied().zip(on.backends.iter()).collect();
        all.extend(on.vmm.iter().map(|p| ("colo-vmm", p)));
        all
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) every process of host `i`.
    pub fn signal_host(&self, i: usize, sig: i32) {
        let on = &self.on[i];
        for p in on.vmm.iter().chain(on.backends.iter()) {
            p.signal(sig);
        }
    }

    /// The `hello` of host `i`'s backend (its role and mode).
    pub fn backend_hello(&self, i: usize) -> Value {
        use std::io::{BufRead, BufReader};
        let s = std::os::unix::net::UnixStream::connect(&self.on[i].control).expect("backend control socket");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("hello");
        serde_json::from_str(&line).expect("JSON")
    }

    /// Something that opens TCP connections from the client to the guest's `port`, from any
    /// thread (for clients that reconnect): it retries for up to 30 s.
    pub fn connector(&self, port: u16) -> impl Fn() -> TcpStream + Send + 'static {
        let ns = format!("/var/run/netns/{}", self.lan.client.name());
        move || {
            let ns = ns.clone();
            std::thread::spawn(move || {
                use std::os::fd::AsRawFd;
                let file = std::fs::File::open(&ns).expect("the client's namespace");
                // SAFETY: setns on a valid namespace fd affects only this thread.
                let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                let addr = format!("{GUEST_IP}:{port}").parse().unwrap();
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                        Ok(s) => {
                            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                            s.set_nodelay(true).unwrap();
                            return s;
                        }
                        Err(e) if Instant::now() > deadline => panic!("connect to the guest's port {port}: {e}"),
                        Err(_) => std::thread::sleep(Duration::from_millis(200)),
                    }
                }
            })
            .join()
            .expect("connecting from the client")
        }
    }

    /// A TCP connection from the client to the guest.
    pub fn connect(&self, port: u16) -> TcpStream {
        self.lan.client.enter(move || {
            let s = TcpStream::connect_timeout(&format!("{GUEST_IP}:{port}").parse().unwrap(), Duration::from_secs(5))
                .expect("connect to the guest");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_nodelay(true).unwrap();
            s
        })
    }
}

impl Drop for ColoHosts {
    fn drop(&mut self) {
        for on in &mut self.on {
            for p in on.vmm.take().into_iter().chain(on.backends.drain(..)) {
                // A stopped process ignores SIGTERM until continued.
                p.signal(libc::SIGCONT);
                p.signal(libc::SIGKILL);
                let mut p = p;
                p.wait_timeout(Duration::from_secs(3));
            }
        }
    }
}

/// Writes a link key file (mode 0600).
pub fn write_key(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f =
        std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path).expect("key file");
    f.write_all(bytes).expect("writing the key");
}
