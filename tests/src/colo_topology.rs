//! A COLO pair of reference-guest VMs on a network the test owns, with either compare backend:
//!
//! ```text
//! vhost-net-compare (the fast path):
//!  client ns: tap 10.0.0.1 ── vhost-net-compare (COLO) ══ primary colo-vmm   (guest 10.0.0.2)
//!                                                     ══ secondary colo-vmm (same guest, same MAC)
//!
//! colo-proxy (the compare backend swapped):
//!  client ns: eth0 10.0.0.1 ── veth ── proxy ns: uplink [colo-proxy run] tp ── vhost-net-compare ══ primary
//!                                                                     ts ── vhost-net-compare ══ secondary
//! ```
//! The primary boots the guest; the secondary waits with `--incoming`; [`ColoNet::start_colo`]
//! runs `colo-start`. Both VMMs get the compare process's control socket. Everything is removed
//! on drop.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::{veth, Netns};
use crate::vm_topology::{GUEST_IP, GUEST_MAC};
use crate::{bin, unique, wait_for_path, Proc, TempDir};

/// Which compare process the VMs' traffic goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One vhost-net-compare serving both VMs (COLO on the vhost-user fast path).
    VhostNetCompare,
    /// Each VM on its own passthrough vhost-net-compare and tap, `colo-proxy run` across the taps.
    ColoProxy,
}

/// Whether this machine can run these tests, else why not.
pub fn prerequisites(backend: Backend) -> Result<(), String> {
    crate::vm_topology::prerequisites()?;
    if backend == Backend::ColoProxy && !crate::have("ethtool") {
        return Err("needs ethtool (apt-get install ethtool)".into());
    }
    Ok(())
}

/// One side of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The primary VMM.
    Primary,
    /// The secondary VMM.
    Secondary,
}

/// The pair, its compare process(es) and its network.
pub struct ColoNet {
    /// The primary VMM (None once killed).
    pub primary: Option<Proc>,
    /// The secondary VMM (None once killed).
    pub secondary: Option<Proc>,
    /// The compare process and, for colo-proxy, the two passthrough backends.
    pub backends: Vec<Proc>,
    /// The client's namespace (10.0.0.1).
    pub client: Netns,
    /// colo-proxy's namespace (colo-proxy backend only).
    pub proxy_ns: Option<Netns>,
    /// Files of this run.
    pub dir: TempDir,
    /// The compare process's control socket.
    pub control: PathBuf,
    /// Its capture of miscompared frames.
    pub capture: PathBuf,
    /// The checkpoint link's URI (the secondary's `--incoming`).
    pub uri: String,
    /// Which backend.
    pub backend: Backend,
}

impl ColoNet {
    /// Starts the compare backend, boots the primary with `cmdline` (the guest's `ip=` is
    /// added) and waits until it is ready, and starts the secondary waiting for COLO.
    /// `env` is set for both VMMs.
    pub fn start(backend: Backend, cmdline: &str, env: &[(&str, &str)]) -> ColoNet {
        Self::start_with(backend, cmdline, env, &[])
    }

    /// As [`ColoNet::start`], with more `colo-vmm run` arguments for the primary (such as
    /// `--cpus 4`; the secondary takes what it needs from the primary's state).
    pub fn start_with(backend: Backend, cmdline: &str, env: &[(&str, &str)], primary_args: &[&str]) -> ColoNet {
        Self::start_sides(backend, cmdline, env, primary_args, &[])
    }

    /// As [`ColoNet::start`], with more `colo-vmm run` arguments for each side (such as each
    /// one's `--disk`).
    pub fn start_sides(
        backend: Backend,
        cmdline: &str,
        env: &[(&str, &str)],
        primary_args: &[&str],
        secondary_args: &[&str],
    ) -> ColoNet {
        let dir = TempDir::new("colo");
        let client = Netns::new("cc");
        let control = dir.path("compare-ctl.sock");
        let capture = dir.path("miscompares.pcapng");
        let (p_sock, s_sock) = (dir.path("primary-vu.sock"), dir.path("secondary-vu.sock"));
        let mut backends = vec![];
        let mut proxy_ns = None;
        match backend {
            Backend::VhostNetCompare => {
                let tap = unique("ct");
                let mut c = client.command(bin("vhost-net-compare").to_str().expect("utf-8"));
                c.arg("--primary-socket").arg(&p_sock).arg("--secondary-socket").arg(&s_sock);
                c.args(["--tap", &tap, "--mac", GUEST_MAC, "--mode", "primary-only", "--nic", "net0"]);
                c.arg("--control-socket").arg(&control).arg("--capture").arg(&capture);
                backends.push(Proc::spawn("vhost-net-compare", c));
                assert!(wait_for_path(&p_sock, Duration::from_secs(10)), "the backend's socket did not appear");
                client.exec(&["ip", "addr", "add", "10.0.0.1/24", "dev", &tap]);
                client.exec(&["ip", "link", "set", "dev", &tap, "up"]);
            }
            Backend::ColoProxy => {
                let ns = Netns::new("cx");
                ns.exec(&["ip", "link", "set", "dev", "lo", "up"]);
                veth("eth0", &client, "uplink", &ns);
                client.exec(&["ip", "addr", "add", "10.0.0.1/24", "dev", "eth0"]);
                for (name, sock, tap) in [("primary", &p_sock, "tp"), ("secondary", &s_sock, "ts")] {
                    let mut c = ns.command(bin("vhost-net-compare").to_str().expect("utf-8"));
                    c.arg("--primary-socket").arg(sock).args(["--tap", tap, "--mac", GUEST_MAC]);
                    backends.push(Proc::spawn(&format!("vhost-net-compare-{name}"), c));
                    assert!(wait_for_path(sock, Duration::from_secs(10)), "the {name} backend's socket did not appear");
                }
                let mut c = ns.command(bin("colo-proxy").to_str().expect("utf-8"));
                c.args(["run", "--uplink", "uplink", "--primary", "tp", "--secondary", "ts"])
                    .args(["--mode", "primary-only", "--nic", "net0"])
                    .arg("--control-socket")
                    .arg(&control)
                    .arg("--capture")
                    .arg(&capture);
                backends.push(Proc::spawn("colo-proxy", c));
                proxy_ns = Some(ns);
            }
        }
        assert!(wait_for_path(&control, Duration::from_secs(10)), "the compare control socket did not appear");
        let uri = format!("unix:{}", dir.path("colo.sock").display());
        let mut net =
            ColoNet { primary: None, secondary: None, backends, client, proxy_ns, dir, control, capture, uri, backend };
        let full = format!("ip={GUEST_IP}/24 gw=10.0.0.1 {cmdline}");
        let mut args = vec!["--cmdline", &full];
        args.extend_from_slice(primary_args);
        net.primary = Some(net.launch(Side::Primary, &args, env));
        net.wait_serial(Side::Primary, "colo-guest: ready", Duration::from_secs(20));
        let incoming = net.uri.clone();
        let mut args = vec!["--incoming", &incoming];
        args.extend_from_slice(secondary_args);
        net.secondary = Some(net.launch(Side::Secondary, &args, env));
        net
    }

    fn tag(side: Side) -> &'static str {
        match side {
            Side::Primary => "primary",
            Side::Secondary => "secondary",
        }
    }

    /// A side's API socket.
    pub fn api(&self, side: Side) -> PathBuf {
        self.dir.path(&format!("{}-api.sock", Self::tag(side)))
    }

    /// A side's console log.
    pub fn serial(&self, side: Side) -> PathBuf {
        self.dir.path(&format!("{}-serial.log", Self::tag(side)))
    }

    fn launch(&self, side: Side, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let tag = Self::tag(side);
        let sock = self.dir.path(&format!("{tag}-vu.sock"));
        let api = self.api(side);
        let mut c = Command::new(bin("colo-vmm"));
        c.arg("run")
            .args(args)
            .arg("--net")
            .arg(format!("vhost-user={},mac={GUEST_MAC}", sock.display()))
            .arg("--api")
            .arg(&api)
            .arg("--serial")
            .arg(format!("file:{}", self.serial(side).display()))
            .arg("--compare-socket")
            .arg(&self.control)
            .env("RUST_LOG", "info");
        for (k, v) in env {
            c.env(k, v);
        }
        let _ = std::fs::remove_file(&api);
        let mut p = Proc::spawn(&format!("colo-vmm-{tag}"), c);
        // A secondary serves its API once COLO has started (see start_colo); before that, it
        // must be listening for the primary, or colo-start would find nobody there.
        match side {
            Side::Primary => Self::wait_api(&mut p, &api),
            Side::Secondary => Self::wait_log(&mut p, "waiting for an incoming migration"),
        }
        p
    }

    fn wait_log(p: &mut Proc, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !p.stderr().contains(line) {
            assert!(p.is_running() && Instant::now() < deadline, "the VMM did not log {line:?}:\n{}", p.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_api(p: &mut Proc, api: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !api.exists() {
            assert!(p.is_running() && Instant::now() < deadline, "the VMM's API did not appear:\n{}", p.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The VMM process of a side.
    pub fn proc(&self, side: Side) -> &Proc {
        match side {
            Side::Primary => self.primary.as_ref(),
            Side::Secondary => self.secondary.as_ref(),
        }
        .expect("that VMM is running")
    }

    /// A VMM's stderr (its log) so far.
    pub fn log(&self, side: Side) -> String {
        match side {
            Side::Primary => self.primary.as_ref(),
            Side::Secondary => self.secondary.as_ref(),
        }
        .map(Proc::stderr)
        .unwrap_or_default()
    }

    /// Every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s =
            format!("--- primary ---\n{}\n--- secondary ---\n{}\n", self.log(Side::Primary), self.log(Side::Secondary));
        for b in &self.backends {
            s.push_str(&format!("--- backend ---\n{}\n", b.stderr()));
        }
        s
    }

    /// Waits for a console line containing `needle` on a side.
    pub fn wait_serial(&self, side: Side, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if std::fs::read_to_string(self.serial(side)).unwrap_or_default().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the guest never printed '{needle}'\n{}", self.logs());
    }

    /// Runs `colo-vmm ctl` against a side: the reply's `return` value, or the error text.
    pub fn ctl(&self, side: Side, command: &str, args: &[&str]) -> Result<Value, String> {
        ctl(&self.api(side), command, args)
    }

    /// `query-colo-status` of a side (panics if the VMM does not answer).
    pub fn status(&self, side: Side) -> Value {
        self.ctl(side, "query-colo-status", &[])
            .unwrap_or_else(|e| panic!("query-colo-status on the {side:?}: {e}\n{}", self.logs()))
    }

    /// Waits until a side's status satisfies `pred`; returns it.
    pub fn wait_status(&self, side: Side, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(side);
            if pred(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!("{side:?} never reached '{what}' within {timeout:?}; status:\n{s:#}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `set-parameters` on the primary (COLO parameters).
    pub fn set_params(&self, side: Side, params: &[(&str, u64)]) {
        let args: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ctl(side, "set-parameters", &args).unwrap_or_else(|e| panic!("set-parameters: {e}"));
    }

    /// `colo-start` and waits until both sides run COLO.
    pub fn start_colo(&mut self) {
        self.start_colo_with(&[]);
    }

    /// `colo-start` with more arguments (such as the test-only `verify=true` and
    /// `test-checkpoint-delay=MS`) and waits until both sides run COLO.
    pub fn start_colo_with(&mut self, more: &[&str]) {
        let uri = format!("uri={}", self.uri);
        let mut args = vec![uri.as_str()];
        args.extend_from_slice(more);
        self.ctl(Side::Primary, "colo-start", &args).unwrap_or_else(|e| panic!("colo-start: {e}\n{}", self.logs()));
        self.wait_colo_running();
    }

    /// Waits until both sides run COLO (after `colo-start`).
    pub fn wait_colo_running(&mut self) {
        self.wait_status(Side::Primary, "running", Duration::from_secs(30), |s| s["state"] == "running");
        let api = self.api(Side::Secondary);
        Self::wait_api(self.secondary.as_mut().expect("secondary running"), &api);
        self.wait_status(Side::Secondary, "running", Duration::from_secs(5), |s| s["state"] == "running");
    }

    /// Kills a side's VMM with SIGKILL (no chance to say goodbye).
    pub fn kill(&mut self, side: Side) {
        let p = match side {
            Side::Primary => self.primary.take(),
            Side::Secondary => self.secondary.take(),
        };
        if let Some(mut p) = p {
            p.signal(libc::SIGKILL);
            p.wait_timeout(Duration::from_secs(5));
        }
    }

    /// Sends a signal (SIGSTOP, SIGCONT) to a side's VMM.
    pub fn signal(&self, side: Side, sig: i32) {
        self.proc(side).signal(sig);
    }

    /// A TCP connection from the client to the guest.
    pub fn connect(&self, port: u16) -> TcpStream {
        self.client.enter(move || {
            let addr = format!("{GUEST_IP}:{port}").parse().unwrap();
            // "No route to host" is the client's ARP giving up after 3 s, which a guest on a
            // loaded machine (or one that just took over and announced itself) can miss once.
            let mut attempts = 0;
            let s = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Err(e) if e.kind() == std::io::ErrorKind::HostUnreachable && attempts < 2 => attempts += 1,
                    other => break other.expect("connect to the guest"),
                }
            };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_nodelay(true).unwrap();
            s
        })
    }

    /// The compare process's counters (`query-stats` on its control socket), with the mode its
    /// `hello` reported as `mode`.
    pub fn compare_stats(&self) -> Value {
        use std::io::{BufRead, BufReader, Write};
        let s = std::os::unix::net::UnixStream::connect(&self.control).expect("compare control socket");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        w.write_all(b"{\"type\":\"query-stats\",\"id\":1}\n").unwrap();
        let mut line = String::new();
        let mut mode = Value::Null;
        loop {
            line.clear();
            r.read_line(&mut line).expect("reading the compare process's reply");
            let mut v: Value = serde_json::from_str(&line).expect("JSON");
            if v["type"] == "hello" {
                mode = v["mode"].clone();
            }
            if v["type"] == "stats" {
                v["mode"] = mode;
                return v;
            }
        }
    }
}

impl Drop for ColoNet {
    fn drop(&mut self) {
        for p in [self.primary.take(), self.secondary.take()].into_iter().flatten() {
            // A stopped process ignores SIGTERM until continued.
            p.signal(libc::SIGCONT);
            p.signal(libc::SIGTERM);
            let mut p = p;
            p.wait_timeout(Duration::from_secs(3));
        }
    }
}

/// Runs `colo-vmm ctl --api API COMMAND ARGS`: the reply's `return` value, or the error text.
pub fn ctl(api: &Path, command: &str, args: &[&str]) -> Result<Value, String> {
    let (st, out) = crate::run(Command::new(bin("colo-vmm")).arg("ctl").arg("--api").arg(api).arg(command).args(args));
    let v: Value = serde_json::from_str(&out).map_err(|e| format!("colo-vmm ctl {command}: {e}: {out}"))?;
    match (st.success(), v.get("return")) {
        (true, Some(r)) => Ok(r.clone()),
        _ => Err(v.get("error").map(|e| e.to_string()).unwrap_or(out)),
    }
}

/// A client of the guest's counter service that checks every value: each `inc` must answer
/// exactly one more than the last, across checkpoints and failovers.
pub struct CounterClient {
    line: crate::vm_topology::LineClient,
    /// The last value seen.
    pub last: u64,
    /// Increments made.
    pub count: u64,
}

impl CounterClient {
    /// Connects and reads the current value.
    pub fn connect(net: &ColoNet) -> CounterClient {
        Self::over(net.connect(9000))
    }

    /// A client on a connection to the counter service (port 9000); reads the current value.
    pub fn over(stream: TcpStream) -> CounterClient {
        let mut line = crate::vm_topology::LineClient::new(stream);
        let last = line.ask("get").expect("counter get").parse().expect("a number");
        CounterClient { line, last, count: 0 }
    }

    /// How long one reply may take (a failover that waits for an arbiter takes seconds).
    pub fn set_timeout(&self, t: Duration) {
        self.line.set_timeout(t);
    }

    /// One increment; checks it follows the last value.
    pub fn inc(&mut self) -> Result<u64, String> {
        let reply =
            self.line.ask("inc").map_err(|e| format!("after {} increments (last {}): {e}", self.count, self.last))?;
        let v: u64 = reply.parse().map_err(|_| format!("counter replied '{reply}'"))?;
        if v != self.last + 1 {
            return Err(format!(
                "counter went from {} to {v}: {}",
                self.last,
                if v <= self.last { "repeated" } else { "lost" }
            ));
        }
        self.last = v;
        self.count += 1;
        Ok(v)
    }
}
