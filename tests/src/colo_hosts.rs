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

/// With [`HostsOptions::metrics`], where each host's processes serve their metrics, inside the
/// host's namespace (see [`ColoHosts::scrape`]): colo-vmm on this port, the first backend
/// (vhost-net-compare or colo-proxy) on the next, the passthrough vhost-net-compare behind
/// colo-proxy or the backend of NIC k on the ones after.
pub const METRICS_PORT: u16 = 9464;

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
    /// The control sockets of the further NICs' backends.
    pub more_controls: Vec<PathBuf>,
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
    /// NICs of the VM.
    pub nics: usize,
    /// The arbiter: etcd in a witness namespace on the replication network, if any.
    pub arbiter: Option<Witness>,
    /// Every process serves its metrics (see [`METRICS_PORT`]).
    pub metrics: bool,
}

/// etcd on the witness host.
pub struct Witness {
    /// Its process (None while stopped).
    pub etcd: Option<Proc>,
    /// Its namespace.
    pub ns: crate::netns::Netns,
    /// Its data directory.
    pub data: PathBuf,
}

/// The MAC address of the VM's NIC `k` (k ≥ 1; the first is [`GUEST_MAC`]).
fn extra_mac(k: usize) -> String {
    format!("52:54:00:12:35:{:02x}", k)
}

/// The protected VM's name in the arbiter.
pub const VM_NAME: &str = "testvm";

/// How a pair across hosts is set up.
#[derive(Debug, Clone)]
pub struct HostsOptions {
    /// The backend on every host.
    pub backend: HostBackend,
    /// Hosts (at least 2): a boots the guest, b waits for COLO, the rest are standbys.
    pub hosts: usize,
    /// The guest's command line (its `ip=` is added).
    pub cmdline: String,
    /// Every link authenticated with one key.
    pub keyed: bool,
    /// An etcd arbiter on a witness host; hosts beyond b register as standbys.
    pub arbiter: bool,
    /// NICs of the VM (vhost-net-compare only): one backend and frame link each. The
    /// reference guest uses the first; the others' backends still take part in every role
    /// change, checkpoint mark and resync.
    pub nics: usize,
    /// Every process serves `--metrics` on the host's loopback (see [`METRICS_PORT`]).
    pub metrics: bool,
}

impl HostsOptions {
    fn keyed(self, keyed: bool) -> HostsOptions {
        HostsOptions { keyed, ..self }
    }

    /// `hosts` hosts with vhost-net-compare, keyed links, no arbiter.
    pub fn new(hosts: usize, cmdline: &str) -> HostsOptions {
        HostsOptions {
            backend: HostBackend::VhostNetCompare,
            hosts,
            cmdline: cmdline.into(),
            keyed: true,
            arbiter: false,
            nics: 1,
            metrics: false,
        }
    }
}

impl ColoHosts {
    /// Starts `hosts` hosts (at least 2) with their backends; host a boots the guest with
    /// `cmdline` (its `ip=` is added), the others wait for COLO. `keyed`: every link
    /// authenticated with one key.
    pub fn start(backend: HostBackend, hosts: usize, cmdline: &str, keyed: bool) -> ColoHosts {
        Self::start_with(HostsOptions { backend, ..HostsOptions::new(hosts, cmdline) }.keyed(keyed))
    }

    /// Starts as `o` says.
    pub fn start_with(o: HostsOptions) -> ColoHosts {
        let dir = TempDir::new("hosts");
        let key = o.keyed.then(|| {
            let path = dir.path("link.key");
            write_key(&path, &[0x5a; 32]);
            path
        });
        let lan = Lan::new(o.hosts);
        let arbiter = o.arbiter.then(|| {
            let ns = lan.add_witness();
            Witness { etcd: None, ns, data: dir.path("etcd") }
        });
        assert!(
            o.nics >= 1 && (o.nics == 1 || o.backend == HostBackend::VhostNetCompare),
            "extra NICs need vhost-net-compare"
        );
        let mut net =
            ColoHosts { on: Vec::new(), lan, dir, key, backend: o.backend, arbiter, nics: o.nics, metrics: o.metrics };
        if net.arbiter.is_some() {
            net.start_etcd();
        }
        for i in 0..o.hosts {
            let on = net.start_backends(i);
            net.on.push(on);
        }
        let full = format!("ip={GUEST_IP}/24 gw={CLIENT_IP} {}", o.cmdline);
        net.on[0].vmm = Some(net.launch_vmm(0, &["--cmdline", &full]));
        net.wait_serial(0, "colo-guest: ready", Duration::from_secs(30));
        for i in 1..o.hosts {
            net.on[i].vmm = Some(net.launch_incoming(i, i >= 2));
        }
        net
    }

    /// Starts (or restarts) etcd on the witness.
    pub fn start_etcd(&mut self) {
        let w = self.arbiter.as_mut().expect("an arbiter");
        let url = format!("http://{}:2379", crate::hosts::WITNESS_IP);
        let data = w.data.display().to_string();
        let args = [
            "--name",
            "witness",
            "--data-dir",
            &data,
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "witness=http://127.0.0.1:2380",
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "250",
        ];
        let mut p = w.ns.spawn("etcd", "etcd", &args);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !p.stderr().contains("ready to serve client requests") {
            assert!(p.is_running() && Instant::now() < deadline, "etcd did not start:\n{}", p.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
        w.etcd = Some(p);
    }

    /// Stops etcd (the arbiter becomes unreachable).
    pub fn stop_etcd(&mut self) {
        if let Some(mut p) = self.arbiter.as_mut().and_then(|w| w.etcd.take()) {
            p.signal(libc::SIGKILL);
            p.wait_timeout(Duration::from_secs(5));
        }
    }

    /// The arbiter's options for colo-vmm on host `i`.
    fn arbiter_args(&self, i: usize) -> Vec<String> {
        if self.arbiter.is_none() {
            return vec![];
        }
        let url = format!("etcd=http://{}:2379", crate::hosts::WITNESS_IP);
        let name = format!("host-{}", self.host(i).name);
        vec!["--arbiter".into(), url, "--vm-name".into(), VM_NAME.into(), "--replica-name".into(), name]
    }

    /// Starts host `i`'s colo-vmm waiting for COLO (`--incoming`), as a registered standby if
    /// `standby` (with an arbiter).
    pub fn launch_incoming(&self, i: usize, standby: bool) -> Proc {
        let incoming = self.uri(i);
        let mut args = vec!["--incoming", &incoming];
        if standby && self.arbiter.is_some() {
            args.extend(["--standby-for", VM_NAME]);
        }
        self.launch_vmm(i, &args)
    }

    /// Host `i` comes back after a death (its links up, fresh processes): its backend and a
    /// colo-vmm waiting for COLO, registered as a standby if `standby` (with an arbiter).
    pub fn restart_host(&mut self, i: usize, standby: bool) {
        for link in ["eth0", "rep0"] {
            let _ = self.lan.host(i).ns.try_exec(&["ip", "link", "set", "dev", link, "up"]);
        }
        if self.backend == HostBackend::VhostNetCompare {
            for k in 0..self.nics {
                let _ = self.lan.host(i).ns.try_exec(&["ip", "link", "delete", &format!("vm{k}")]);
            }
        }
        let mut files = vec!["vu.sock".to_string(), "ctl.sock".into(), "api.sock".into()];
        files.extend((1..self.nics).flat_map(|k| [format!("vu{k}.sock"), format!("ctl{k}.sock")]));
        for f in files {
            let _ = std::fs::remove_file(self.path(i, &f));
        }
        self.on[i] = self.start_backends(i);
        let vmm = self.launch_incoming(i, standby);
        self.on[i].vmm = Some(vmm);
    }

    /// Host `i`'s colo-vmm starts again (its service manager's restart after it exited),
    /// waiting for COLO, a registered standby if `standby`; its backend is the one running.
    pub fn restart_vmm(&mut self, i: usize, standby: bool) {
        if let Some(mut old) = self.on[i].vmm.take() {
            old.signal(libc::SIGKILL);
            old.wait_timeout(Duration::from_secs(5));
        }
        let _ = std::fs::remove_file(self.path(i, "api.sock"));
        let vmm = self.launch_incoming(i, standby);
        self.on[i].vmm = Some(vmm);
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

    /// `--metrics 127.0.0.1:PORT` for the process serving on `port`, with metrics on.
    fn metrics_args(&self, port: u16) -> Vec<String> {
        if self.metrics {
            vec!["--metrics".into(), format!("127.0.0.1:{port}")]
        } else {
            vec![]
        }
    }

    /// `GET /metrics` from the process of host `i` serving on `port` (see [`METRICS_PORT`]):
    /// the body, or why not.
    pub fn scrape(&self, i: usize, port: u16) -> Result<String, String> {
        self.host(i).ns.enter(move || crate::scrape::http_get(&format!("127.0.0.1:{port}"), "/metrics"))
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
                host.add_vm_tap("vm0");
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
                args.extend(self.metrics_args(METRICS_PORT + 1));
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
                let mut args: Vec<String> =
                    ["--primary-socket", &s(&vu), "--tap", "vm0", "--mac", GUEST_MAC].map(String::from).to_vec();
                args.extend(self.metrics_args(METRICS_PORT + 2));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
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
                args.extend(self.metrics_args(METRICS_PORT + 1));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                backends.push(host.spawn("colo-proxy", &bin("colo-proxy"), &args));
            }
        }
        assert!(
            wait_for_path(&control, Duration::from_secs(10)),
            "host {}: the control socket did not appear",
            host.name
        );
        let mut more_controls = vec![];
        for k in 1..self.nics {
            let (vu, control) = (self.path(i, &format!("vu{k}.sock")), self.path(i, &format!("ctl{k}.sock")));
            let tap = format!("vm{k}");
            host.add_vm_tap(&tap);
            let listen = format!("{}:{}", host.repl_ip, FRAME_PORT + k as u16);
            let (nic, mac) = (format!("net{k}"), extra_mac(k));
            let mut args: Vec<String> =
                ["--vm-socket", &s(&vu), "--tap", &tap, "--mac", &mac, "--nic", &nic].map(String::from).to_vec();
            args.extend(["--control-socket".into(), s(&control), "--peer-listen".into(), listen]);
            args.extend(self.key_args());
            args.extend(self.metrics_args(METRICS_PORT + 1 + k as u16));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            backends.push(host.spawn(&format!("vhost-net-compare-{nic}"), &bin("vhost-net-compare"), &args));
            assert!(
                wait_for_path(&control, Duration::from_secs(10)),
                "host {}: {nic}'s backend did not start",
                host.name
            );
            more_controls.push(control);
        }
        OnHost {
            backends,
            vmm: None,
            more_controls,
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
        for (k, control) in on.more_controls.iter().enumerate().map(|(k, c)| (k + 1, c)) {
            let vu = self.path(i, &format!("vu{k}.sock"));
            all.extend(["--net".into(), format!("vhost-user={},mac={}", vu.display(), extra_mac(k))]);
            all.extend(["--compare-socket".into(), control.display().to_string()]);
        }
        all.extend(self.key_args());
        all.extend(self.arbiter_args(i));
        all.extend(self.metrics_args(METRICS_PORT));
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

    /// Host `i`'s colo-vmm log so far.
    pub fn log(&self, i: usize) -> String {
        self.on[i].vmm.as_ref().map(|p| p.stderr()).unwrap_or_default()
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

    /// Stops (SIGSTOP) or continues (SIGCONT) every process of host `i`.
    pub fn signal_host(&self, i: usize, sig: i32) {
        let on = &self.on[i];
        for p in on.vmm.iter().chain(on.backends.iter()) {
            p.signal(sig);
        }
    }

    /// The `hello` of host `i`'s backend (its role and mode).
    pub fn backend_hello(&self, i: usize) -> Value {
        self.nic_hello(i, 0)
    }

    /// The `hello` of the backend of NIC `k` on host `i`.
    pub fn nic_hello(&self, i: usize, k: usize) -> Value {
        use std::io::{BufRead, BufReader};
        let control = if k == 0 { &self.on[i].control } else { &self.on[i].more_controls[k - 1] };
        let s = std::os::unix::net::UnixStream::connect(control).expect("backend control socket");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("hello");
        serde_json::from_str(&line).expect("JSON")
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
        self.stop_etcd();
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
