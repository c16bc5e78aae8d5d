//! The COLO demo on one machine (the README's main command): a primary and a secondary
//! `colo-vmm` running the embedded reference guest behind vhost-net-compare, a client in a
//! network namespace, and the guest's services driven through four phases:
//!
//! 1. **deterministic** — only counter traffic: COLO with periodic checkpoints (`max-time`);
//! 2. **top** — a client reads the guest's `top` stream, whose lines differ between the two VMs:
//!    every COLO interval ends in a miscompare, hybrid mode goes passive (the secondary stops
//!    burning CPU), tries COLO again after `passive-count` checkpoints and goes passive again;
//! 3. **top stopped** — back to COLO, and it stays there;
//! 4. **failover** — the primary `colo-vmm` is SIGKILLed (with `--hosts 2`: host a dies, every
//!    process killed and its links down); the counter session goes on with the secondary on the
//!    same TCP connection, no value lost or repeated.
//!
//! `--hosts 2` runs each VM on its own host: network namespaces on a LAN switch, a replication
//! network, vhost-net-compare `--vm-socket` and colo-vmm on each host, every link keyed.
//!
//! A counter client increments all along and checks every value. A status line shows the
//! pair live; at the end a summary goes to stdout and a timeline of every checkpoint to an SVG.
//!
//! Run as root: `cargo build --workspace --bins && target/debug/colo-demo`

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use colo_tests::colo_hosts::{ColoHosts, HostBackend};
use colo_tests::colo_topology::{ctl, prerequisites, Backend, ColoNet, CounterClient, Side};
use colo_tests::interrupt::{self, pause};
use colo_tests::vm_topology::{cpu_time, LineClient};
use serde_json::{json, Value};

mod svg;

/// The full COLO demo on one machine with the embedded reference guest (needs root and
/// /dev/kvm).
///
/// Starts a primary and a secondary colo-vmm behind vhost-net-compare, runs a counter client all
/// along, and goes through the phases deterministic (COLO, periodic checkpoints), top (a
/// divergent stream: hybrid mode goes passive, returns to COLO after --passive-count
/// checkpoints and goes passive again), top stopped (back to COLO for good) and failover
/// (SIGKILL of the primary; the counter goes on with the secondary). Prints a summary to stdout,
/// writes a timeline SVG, and exits non-zero if the counter check or a phase failed.
#[derive(Parser, Debug)]
#[command(name = "colo-demo", args_override_self = true)]
struct Args {
    /// Seconds of the deterministic phase (counter traffic only).
    #[arg(long, default_value_t = 8.0, value_name = "SECS")]
    deterministic_secs: f64,
    /// Seconds of the top phase (a client reads the guest's divergent `top` stream).
    #[arg(long, default_value_t = 15.0, value_name = "SECS")]
    top_secs: f64,
    /// Seconds after the top client stopped (extended until COLO has held for 2 s).
    #[arg(long, default_value_t = 6.0, value_name = "SECS")]
    stopped_secs: f64,
    /// Seconds the counter goes on with the secondary after the primary is killed.
    #[arg(long, default_value_t = 4.0, value_name = "SECS")]
    after_failover_secs: f64,
    /// COLO parameter passive-count: passive checkpoints before COLO is tried again.
    #[arg(long, default_value_t = 20)]
    passive_count: u64,
    /// COLO parameter max-time (ms): the longest COLO interval, ended by a periodic checkpoint.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    max_time: u64,
    /// Period of the guest's `top` lines (ms).
    #[arg(long, default_value_t = 200, value_name = "MS")]
    top_ms: u64,
    /// Pause between two counter increments (ms).
    #[arg(long, default_value_t = 50, value_name = "MS")]
    counter_ms: u64,
    /// Where to write the timeline.
    #[arg(long, default_value = "colo-demo.svg", value_name = "PATH")]
    svg: PathBuf,
    /// Also write a machine-readable summary (JSON) here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Write every process's log (both VMMs, the compare process) here at the end.
    #[arg(long, value_name = "PATH")]
    logs: Option<PathBuf>,
    /// 1: both VMs on one host behind one vhost-net-compare, the failover a SIGKILL of the
    /// primary colo-vmm. 2: each VM on its own host (network namespaces on a LAN switch, a
    /// replication network between them, every link keyed), the failover host a's death
    /// (every process killed, its links down).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    hosts: u8,
}

/// The pair the demo runs: on one host, or across two.
enum Pair {
    One(ColoNet),
    Two(ColoHosts),
}

impl Pair {
    fn start(hosts: u8, cmdline: &str) -> Pair {
        match hosts {
            1 => Pair::One(ColoNet::start(Backend::VhostNetCompare, cmdline, &[])),
            _ => Pair::Two(ColoHosts::start(HostBackend::VhostNetCompare, 2, cmdline, true)),
        }
    }

    fn set_params(&self, params: &[(&str, u64)]) {
        match self {
            Pair::One(n) => n.set_params(Side::Primary, params),
            Pair::Two(n) => n.set_params(0, params),
        }
    }

    fn start_colo(&mut self) {
        match self {
            Pair::One(n) => n.start_colo(),
            Pair::Two(n) => n.start_colo(0, 1),
        }
    }

    fn api(&self, side: Side) -> PathBuf {
        match self {
            Pair::One(n) => n.api(side),
            Pair::Two(n) => n.on[Self::host(side)].api.clone(),
        }
    }

    fn host(side: Side) -> usize {
        match side {
            Side::Primary => 0,
            Side::Secondary => 1,
        }
    }

    fn secondary_pid(&self) -> u32 {
        match self {
            Pair::One(n) => n.proc(Side::Secondary).pid(),
            Pair::Two(n) => n.on[1].vmm.as_ref().expect("running").pid(),
        }
    }

    fn connect(&self, port: u16) -> std::net::TcpStream {
        match self {
            Pair::One(n) => n.connect(port),
            Pair::Two(n) => n.connect(port),
        }
    }

    fn ctl(&self, side: Side, command: &str, args: &[&str]) -> Result<Value, String> {
        ctl(&self.api(side), command, args)
    }

    /// The failure: the primary's VMM killed, or its whole host.
    fn kill_primary(&mut self) {
        match self {
            Pair::One(n) => n.kill(Side::Primary),
            Pair::Two(n) => n.kill_host(0),
        }
    }

    /// What the survivor's compare process does now.
    fn survivor_backend(&self) -> String {
        match self {
            Pair::One(n) => n.compare_stats()["mode"].as_str().unwrap_or("?").to_string(),
            Pair::Two(n) => format!("{} on host b", n.backend_hello(1)["role"].as_str().unwrap_or("?")),
        }
    }

    fn what_dies(&self) -> &'static str {
        match self {
            Pair::One(_) => "SIGKILL to the primary colo-vmm",
            Pair::Two(_) => "host a dies: every process killed, its links down",
        }
    }

    fn logs(&self) -> String {
        match self {
            Pair::One(n) => n.logs(),
            Pair::Two(n) => n.logs(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The terminal and the clock. (Ctrl-C: colo_tests::interrupt stops the phases; the demo cleans
// up its namespaces and processes, and exits 130.)

/// Columns of the terminal on stderr (80 if unknown).
fn terminal_width() -> usize {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ on stderr fills a winsize we own.
    let r = unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) };
    if r == 0 && ws.ws_col > 0 {
        usize::from(ws.ws_col)
    } else {
        80
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------
// What the demo's threads share.

/// One checkpoint of the primary, from `query-colo-status`'s `recent`.
#[derive(Debug, Clone)]
struct Ckpt {
    seq: u64,
    /// Seconds since the demo started.
    t: f64,
    passive: bool,
    trigger: String,
    interval_ms: f64,
    pause_ms: f64,
    pages: u64,
}

impl Ckpt {
    fn miscompare(&self) -> bool {
        self.trigger.starts_with("miscompare")
    }
}

/// A phase of the demo, in seconds since the start.
#[derive(Debug, Clone)]
struct Phase {
    name: &'static str,
    start: f64,
    end: f64,
}

#[derive(Default)]
struct CpuTrack {
    /// (t, cumulative CPU seconds) of the secondary colo-vmm.
    samples: Vec<(f64, f64)>,
    /// (t, CPU share over the last second).
    share: Vec<(f64, f64)>,
    /// Mode → (CPU seconds, wall seconds) before the failover.
    by_mode: BTreeMap<String, (f64, f64)>,
}

impl CpuTrack {
    /// CPU share over the `window` seconds before the last sample.
    fn recent(&self, window: f64) -> Option<f64> {
        let &(t1, c1) = self.samples.last()?;
        let &(t0, c0) = self.samples.iter().rev().find(|(t, _)| *t <= t1 - window).or(self.samples.first())?;
        (t1 > t0).then(|| (c1 - c0) / (t1 - t0))
    }

    /// Mean CPU share between t0 and t1.
    fn between(&self, t0: f64, t1: f64) -> Option<f64> {
        let a = self.samples.iter().find(|(t, _)| *t >= t0)?;
        let b = self.samples.iter().rev().find(|(t, _)| *t <= t1)?;
        (b.0 > a.0 + 0.3).then(|| (b.1 - a.1) / (b.0 - a.0))
    }
}

struct Shared {
    t0: Instant,
    t0_unix_ms: u64,
    tty: bool,
    phase: Mutex<&'static str>,
    ckpts: Mutex<BTreeMap<u64, Ckpt>>,
    last_primary: Mutex<Option<Value>>,
    last_secondary: Mutex<Option<Value>>,
    poll_error: Mutex<Option<String>>,
    cpu: Mutex<CpuTrack>,
    /// (t, value) of every counter reply.
    replies: Mutex<Vec<(f64, u64)>>,
    counter_last: AtomicU64,
    top_lines: AtomicU64,
    primary_alive: AtomicBool,
    stop: AtomicBool,
    out: Mutex<()>,
}

impl Shared {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn t_of_unix_ms(&self, ms: u64) -> f64 {
        (ms as f64 - self.t0_unix_ms as f64) / 1000.0
    }

    /// Prints a line on stderr (above the live status line on a terminal).
    fn say(&self, msg: &str) {
        let _g = self.out.lock().unwrap();
        if self.tty {
            eprint!("\r\x1b[K");
        }
        eprintln!("[{:5.1}s] {msg}", self.now());
    }

    fn set_phase(&self, name: &'static str) {
        *self.phase.lock().unwrap() = name;
    }

    /// The live status line.
    fn status_line(&self) -> String {
        let phase = *self.phase.lock().unwrap();
        let p = self.last_primary.lock().unwrap().clone().unwrap_or(Value::Null);
        let mode = if self.primary_alive.load(Ordering::SeqCst) {
            p["mode"].as_str().unwrap_or(p["state"].as_str().unwrap_or("-")).to_string()
        } else {
            let s = self.last_secondary.lock().unwrap().clone().unwrap_or(Value::Null);
            s["state"].as_str().unwrap_or("?").to_string()
        };
        let c = &p["checkpoints"];
        let mis: u64 = c["miscompare"].as_object().map(|m| m.values().map(n).sum()).unwrap_or(0);
        let cpu = self.cpu.lock().unwrap().recent(1.0).map(|s| format!("{:3.0}%", s * 100.0)).unwrap_or("  -".into());
        format!(
            "[{:5.1}s] {phase:<13} {mode:<11} ckpts {} ({} colo, {} passive)  miscompare {}  pause {:.1} ms  \
             counter {}  secondary CPU {cpu}",
            self.now(),
            n(&c["total"]),
            n(&c["colo"]),
            n(&c["passive"]),
            mis,
            f(&p["pause-last-ms"]),
            self.counter_last.load(Ordering::Relaxed),
        )
    }

    /// Takes in a status of the primary: its recent checkpoints join the timeline.
    fn primary_status(&self, v: Value) {
        let mut map = self.ckpts.lock().unwrap();
        for r in v["recent"].as_array().into_iter().flatten() {
            let seq = n(&r["seq"]);
            map.entry(seq).or_insert_with(|| Ckpt {
                seq,
                t: self.t_of_unix_ms(n(&r["at-unix-ms"])),
                passive: r["kind"] == "passive",
                trigger: r["trigger"].as_str().unwrap_or("?").to_string(),
                interval_ms: f(&r["interval-ms"]),
                pause_ms: f(&r["pause-ms"]),
                pages: n(&r["pages"]),
            });
        }
        drop(map);
        *self.last_primary.lock().unwrap() = Some(v);
    }

    fn ckpts(&self) -> Vec<Ckpt> {
        self.ckpts.lock().unwrap().values().cloned().collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The poller: query-colo-status every 200 ms, every checkpoint by seq, the secondary's CPU.

fn poller(sh: Arc<Shared>, primary_api: PathBuf, secondary_api: PathBuf, secondary_pid: u32) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut mode = String::from("colo");
        let mut last_plain = 0.0;
        while !sh.stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            let alive = sh.primary_alive.load(Ordering::SeqCst);
            let api = if alive { &primary_api } else { &secondary_api };
            match ctl(api, "query-colo-status", &[]) {
                Ok(v) if alive => {
                    if let Some(m) = v["mode"].as_str() {
                        mode = m.to_string();
                    }
                    sh.primary_status(v);
                }
                Ok(v) => *sh.last_secondary.lock().unwrap() = Some(v),
                Err(e) if alive => *sh.poll_error.lock().unwrap() = Some(e),
                Err(_) => {}
            }
            // The secondary's CPU, charged to the mode the pair was in.
            let t = sh.now();
            let c = cpu_time(secondary_pid).as_secs_f64();
            {
                let mut cpu = sh.cpu.lock().unwrap();
                if let Some(&(pt, pc)) = cpu.samples.last() {
                    if alive {
                        let e = cpu.by_mode.entry(mode.clone()).or_default();
                        e.0 += c - pc;
                        e.1 += t - pt;
                    }
                }
                cpu.samples.push((t, c));
                if let Some(s) = cpu.recent(1.0) {
                    cpu.share.push((t, s));
                }
            }
            let line = sh.status_line();
            {
                let _g = sh.out.lock().unwrap();
                if sh.tty {
                    // One terminal line, or the next refresh cannot overwrite it.
                    let line: String = line.chars().take(terminal_width().saturating_sub(1)).collect();
                    eprint!("\r\x1b[K{line}");
                } else if t - last_plain >= 1.0 {
                    eprintln!("{line}");
                    last_plain = t;
                }
            }
            std::thread::sleep(Duration::from_millis(200).saturating_sub(started.elapsed()));
        }
        if sh.tty {
            let _g = sh.out.lock().unwrap();
            eprint!("\r\x1b[K");
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// Increments the counter every `period` until told to stop; every value checked.
fn counter_thread(
    sh: Arc<Shared>,
    mut c: CounterClient,
    period: Duration,
) -> JoinHandle<(CounterClient, Option<String>)> {
    std::thread::spawn(move || {
        sh.counter_last.store(c.last, Ordering::Relaxed);
        sh.replies.lock().unwrap().push((sh.now(), c.last));
        while !sh.stop.load(Ordering::SeqCst) {
            match c.inc() {
                Ok(v) => {
                    sh.replies.lock().unwrap().push((sh.now(), v));
                    sh.counter_last.store(v, Ordering::Relaxed);
                }
                Err(e) => return (c, Some(e)),
            }
            std::thread::sleep(period);
        }
        (c, None)
    })
}

/// Reads the `top` stream until `stop`; returns an error if the stream broke.
fn top_thread(sh: Arc<Shared>, mut r: LineClient, stop: Arc<AtomicBool>) -> JoinHandle<Option<String>> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match r.read_line() {
                Ok(line) if line.starts_with("top seq=") => {
                    sh.top_lines.fetch_add(1, Ordering::Relaxed);
                }
                Ok(line) => return Some(format!("bad top line '{line}'")),
                Err(e) => return Some(format!("top stream: {e}")),
            }
        }
        None
    })
}

// ---------------------------------------------------------------------------------------------
// The run.

struct FailoverResult {
    kill_t: f64,
    detected_t: Option<f64>,
    secondary: Value,
    compare_mode: String,
    fresh_get: Result<u64, String>,
}

struct Outcome {
    phases: Vec<Phase>,
    colo_start_t: f64,
    end_t: f64,
    ckpts: Vec<Ckpt>,
    primary: Value,
    cpu: CpuTrack,
    replies: Vec<(f64, u64)>,
    counter_first: u64,
    counter_last: u64,
    counter_incs: u64,
    counter_error: Option<String>,
    top_lines: u64,
    top_error: Option<String>,
    failover: FailoverResult,
    logs: String,
}

fn run(args: &Args, sh: &Arc<Shared>) -> anyhow::Result<Outcome> {
    let cmdline = format!("app=echo,counter,http,top,burn top_ms={}", args.top_ms);
    if args.hosts == 1 {
        sh.say(&format!("starting vhost-net-compare and the primary colo-vmm (guest: {cmdline})"));
    } else {
        sh.say(&format!(
            "starting hosts a and b (namespaces on a LAN switch and a replication network), each with \
             vhost-net-compare --vm-socket and colo-vmm, links keyed; host a boots the guest ({cmdline})"
        ));
    }
    let mut net = Pair::start(args.hosts, &cmdline);
    let mut phases: Vec<Phase> = vec![];
    sh.say(&format!(
        "primary booted, secondary waiting; set-parameters max-time={} passive-count={}; colo-start",
        args.max_time, args.passive_count
    ));
    net.set_params(&[("max-time", args.max_time), ("passive-count", args.passive_count)]);
    let colo_start_t = sh.now();
    phases.push(Phase { name: "colo-start", start: colo_start_t, end: f64::NAN });
    sh.set_phase("colo-start");
    net.start_colo();
    sh.say("COLO running: the secondary is a live replica");
    let poll = poller(sh.clone(), net.api(Side::Primary), net.api(Side::Secondary), net.secondary_pid());

    let counter = CounterClient::over(net.connect(9000));
    let counter_first = counter.last;
    let counter = counter_thread(sh.clone(), counter, Duration::from_millis(args.counter_ms));

    let mut phase = |sh: &Shared, name: &'static str, what: &str| {
        if let Some(p) = phases.last_mut() {
            p.end = sh.now();
        }
        phases.push(Phase { name, start: sh.now(), end: f64::NAN });
        sh.set_phase(name);
        sh.say(&format!("phase {name}: {what}"));
    };

    // The phases run inside a closure so that an interruption still stops the threads.
    let result = (|| -> anyhow::Result<(FailoverResult, Option<String>, u64)> {
        phase(sh, "deterministic", "counter traffic only: COLO, periodic checkpoints");
        pause(Duration::from_secs_f64(args.deterministic_secs))?;

        phase(sh, "top", "a client reads the top stream: every COLO interval miscompares");
        let top_stop = Arc::new(AtomicBool::new(false));
        let top = top_thread(sh.clone(), LineClient::new(net.connect(9100)), top_stop.clone());
        pause(Duration::from_secs_f64(args.top_secs))?;
        top_stop.store(true, Ordering::SeqCst);
        let top_error = top.join().expect("top reader");
        let top_lines = sh.top_lines.load(Ordering::Relaxed);

        phase(sh, "top stopped", "no divergent output: back to COLO, and it stays");
        let stopped_at = Instant::now();
        pause(Duration::from_secs_f64(args.stopped_secs))?;
        // The pair may still be passive (passive-count checkpoints after the last switch): wait
        // for COLO, then watch it hold for 2 s.
        let wait_colo = Duration::from_secs_f64(args.stopped_secs)
            + Duration::from_millis(args.passive_count * 300)
            + Duration::from_secs(5);
        loop {
            let colo_since = colo_since(&sh.ckpts());
            let now = sh.now();
            if colo_since.is_some_and(|t| now - t >= 2.0) || stopped_at.elapsed() > wait_colo {
                break;
            }
            pause(Duration::from_millis(200))?;
        }

        phase(sh, "failover", net.what_dies());
        // The poller turns to the secondary; the primary's last word on its checkpoints first.
        sh.primary_alive.store(false, Ordering::SeqCst);
        if let Ok(v) = net.ctl(Side::Primary, "query-colo-status", &[]) {
            sh.primary_status(v);
        }
        let kill_t = sh.now();
        net.kill_primary();
        sh.say("primary gone; waiting for the secondary to take over");
        let mut detected_t = None;
        let mut secondary = Value::Null;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(s) = net.ctl(Side::Secondary, "query-colo-status", &[]) {
                let done = s["state"] == "failed-over";
                secondary = s;
                if done {
                    detected_t = Some(sh.now());
                    break;
                }
            }
            pause(Duration::from_millis(20))?;
        }
        // When the survivor says it took over (its clock is ours: same machine).
        if let (Some(_), Some(at)) = (detected_t, secondary["last-failover"]["at-unix-ms"].as_u64()) {
            detected_t = Some(sh.t_of_unix_ms(at));
        }
        match detected_t {
            Some(t) => sh.say(&format!(
                "the secondary took over {:.0} ms after the kill: {}",
                (t - kill_t) * 1000.0,
                secondary["last-failover"]["reason"].as_str().unwrap_or("?")
            )),
            None => sh.say("the secondary did not report a failover within 10 s"),
        }
        pause(Duration::from_secs_f64(args.after_failover_secs))?;
        Ok((
            FailoverResult {
                kill_t,
                detected_t,
                secondary,
                compare_mode: String::new(),
                fresh_get: Err("not checked".into()),
            },
            top_error,
            top_lines,
        ))
    })();

    if let Some(p) = phases.last_mut() {
        p.end = sh.now();
    }
    sh.stop.store(true, Ordering::SeqCst);
    let (counter, counter_error) = counter.join().expect("counter thread");
    poll.join().expect("poller");
    let end_t = sh.now();
    let (mut failover, top_error, top_lines) = result?;

    // A new session sees the counter the client saw; the compare process serves the secondary.
    failover.fresh_get =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| CounterClient::over(net.connect(9000)).last))
            .map_err(|_| "could not open a new counter session".to_string());
    if let Ok(s) = net.ctl(Side::Secondary, "query-colo-status", &[]) {
        failover.secondary = s;
    }
    failover.compare_mode = net.survivor_backend();

    let cpu = std::mem::take(&mut *sh.cpu.lock().unwrap());
    Ok(Outcome {
        phases,
        colo_start_t,
        end_t,
        ckpts: sh.ckpts(),
        primary: sh.last_primary.lock().unwrap().clone().unwrap_or(Value::Null),
        cpu,
        replies: std::mem::take(&mut *sh.replies.lock().unwrap()),
        counter_first,
        counter_last: counter.last,
        counter_incs: counter.count,
        counter_error,
        top_lines,
        top_error,
        failover,
        logs: net.logs(),
    })
}

/// When the pair last entered COLO, if it is in COLO now (by the checkpoint history).
fn colo_since(ckpts: &[Ckpt]) -> Option<f64> {
    let last = ckpts.last()?;
    if last.passive {
        return None;
    }
    let start = ckpts.iter().rposition(|c| c.passive).map(|i| i + 1).unwrap_or(0);
    Some(ckpts[start].t)
}

// ---------------------------------------------------------------------------------------------
// Analysis.

#[derive(Default, Debug, Clone)]
struct PhaseStats {
    total: u64,
    colo: u64,
    passive: u64,
    periodic: u64,
    miscompare: u64,
    passive_interval: u64,
    /// Switches into passive mode / back to COLO.
    to_passive: u64,
    to_colo: u64,
    last_passive: Option<bool>,
    cpu: Option<f64>,
}

fn phase_stats(ckpts: &[Ckpt], cpu: &CpuTrack, p: &Phase) -> PhaseStats {
    let mut s = PhaseStats { cpu: cpu.between(p.start, p.end), ..Default::default() };
    let mut prev = ckpts.iter().rev().find(|c| c.t < p.start).map(|c| c.passive).unwrap_or(false);
    for c in ckpts.iter().filter(|c| c.t >= p.start && c.t < p.end) {
        s.total += 1;
        if c.passive {
            s.passive += 1;
        } else {
            s.colo += 1;
        }
        match c.trigger.as_str() {
            "periodic" => s.periodic += 1,
            "passive" => s.passive_interval += 1,
            t if t.starts_with("miscompare") => s.miscompare += 1,
            _ => {}
        }
        if c.passive && !prev {
            s.to_passive += 1;
        }
        if !c.passive && prev {
            s.to_colo += 1;
        }
        prev = c.passive;
        s.last_passive = Some(c.passive);
    }
    s
}

fn percent(v: Option<f64>) -> String {
    v.map(|v| format!("{:.0}%", v * 100.0)).unwrap_or_else(|| "-".into())
}

struct Gap {
    secs: f64,
    from: f64,
    baseline: f64,
}

/// The longest silence between two counter replies around the failover (from the kill to a
/// second after the takeover), and the median interval between replies in COLO before it.
fn failover_gap(replies: &[(f64, u64)], fo: &FailoverResult, before: &Phase) -> Option<Gap> {
    let until = fo.detected_t.unwrap_or(fo.kill_t + 1.0) + 1.0;
    let (secs, from) = replies
        .windows(2)
        .filter(|w| w[1].0 >= fo.kill_t && w[0].0 <= until)
        .map(|w| (w[1].0 - w[0].0, w[0].0))
        .max_by(|a, b| a.0.total_cmp(&b.0))?;
    let mut d: Vec<f64> = replies
        .windows(2)
        .filter(|w| w[0].0 >= before.start && w[1].0 <= before.end)
        .map(|w| w[1].0 - w[0].0)
        .collect();
    d.sort_by(f64::total_cmp);
    let baseline = d.get(d.len() / 2).copied().unwrap_or(f64::NAN);
    Some(Gap { secs, from, baseline })
}

struct Verdict {
    failures: Vec<String>,
    counter_ok: bool,
}

fn judge(o: &Outcome, args: &Args) -> Verdict {
    let mut failures = vec![];
    let find = |name| o.phases.iter().find(|p| p.name == name);
    let stats = |name| find(name).map(|p| phase_stats(&o.ckpts, &o.cpu, p));
    if let Some(e) = &o.counter_error {
        failures.push(format!("counter: the session broke or a value was lost/repeated: {e}"));
    }
    // Every recorded reply exactly one more than the one before (CounterClient checks it too).
    let consecutive = o.replies.windows(2).all(|w| w[1].1 == w[0].1 + 1);
    if !consecutive {
        failures.push("counter: replies were not consecutive".into());
    }
    if let Some(s) = stats("deterministic") {
        if s.miscompare > 0 {
            failures.push(format!("deterministic: {} miscompare checkpoints (expected none)", s.miscompare));
        }
        if s.passive > 0 {
            failures.push("deterministic: went passive".into());
        }
        if s.periodic == 0 && args.deterministic_secs * 1000.0 > args.max_time as f64 {
            failures.push("deterministic: no periodic checkpoint".into());
        }
    }
    if let Some(s) = stats("top") {
        if s.to_passive == 0 {
            failures.push("top: hybrid mode never went passive".into());
        } else if s.to_colo == 0 || s.to_passive < 2 {
            failures.push(format!(
                "top: did not return to COLO after passive-count ({}) and go passive again ({} to passive, {} to COLO)",
                args.passive_count, s.to_passive, s.to_colo
            ));
        }
        if s.miscompare == 0 {
            failures.push("top: no miscompare checkpoints".into());
        }
    }
    if o.top_lines == 0 {
        failures.push("top: the client got no top lines".into());
    }
    if let Some(e) = &o.top_error {
        failures.push(format!("top: {e}"));
    }
    let colo_cpu = o.cpu.by_mode.get("colo").filter(|m| m.1 > 0.5).map(|m| m.0 / m.1);
    let passive_cpu = o.cpu.by_mode.get("passive").filter(|m| m.1 > 0.5).map(|m| m.0 / m.1);
    if let (Some(c), Some(p)) = (colo_cpu, passive_cpu) {
        if p >= c / 2.0 {
            failures.push(format!(
                "secondary CPU did not drop in passive mode ({} vs {} in COLO)",
                percent(Some(p)),
                percent(Some(c))
            ));
        }
    }
    if let Some(s) = stats("top stopped") {
        if s.last_passive == Some(true) {
            failures.push("top stopped: still passive at the end".into());
        }
        let ck: Vec<&Ckpt> =
            o.ckpts.iter().filter(|c| find("top stopped").is_some_and(|p| c.t >= p.start && c.t < p.end)).collect();
        if let Some(first_colo) = ck.iter().position(|c| !c.passive) {
            if ck[first_colo..].iter().any(|c| c.passive) {
                failures.push("top stopped: went passive again without the top client".into());
            }
        } else if !ck.is_empty() {
            failures.push("top stopped: never returned to COLO".into());
        }
    }
    let fo = &o.failover;
    if fo.detected_t.is_none() {
        failures.push("failover: the secondary never reported failed-over".into());
    }
    if fo.secondary["last-failover"]["survivor"] != "secondary" {
        failures.push(format!("failover: survivor is {}", fo.secondary["last-failover"]["survivor"]));
    }
    let after = o.replies.iter().filter(|r| r.0 > fo.kill_t).count();
    if o.counter_error.is_none() && after < 5 {
        failures.push(format!("failover: only {after} counter replies after the kill"));
    }
    match &fo.fresh_get {
        Ok(v) if *v == o.counter_last => {}
        Ok(v) => failures.push(format!("failover: a new session reads {v}, the client saw {}", o.counter_last)),
        Err(e) => failures.push(format!("failover: {e}")),
    }
    let counter_ok = o.counter_error.is_none() && consecutive && fo.fresh_get.as_ref().ok() == Some(&o.counter_last);
    Verdict { failures, counter_ok }
}

// ---------------------------------------------------------------------------------------------
// Summary (stdout) and JSON.

fn summary(o: &Outcome, v: &Verdict, args: &Args) -> (String, Value) {
    let mut s = String::new();
    let p = &o.primary;
    let fo = &o.failover;
    let layout = if args.hosts == 1 {
        "one host: vhost-net-compare, primary + secondary colo-vmm"
    } else {
        "two hosts: vhost-net-compare --vm-socket and colo-vmm on each, frame and checkpoint links keyed"
    };
    let _ = writeln!(s, "\nCOLO demo summary (reference guest; {layout})\n");
    let _ = writeln!(
        s,
        "{:<13} {:>5} {:>6} {:>5} {:>7} {:>8} {:>10} {:>11} {:>8} {:>8}",
        "phase", "secs", "ckpts", "colo", "passive", "periodic", "miscompare", "passive-int", "switches", "sec CPU"
    );
    let mut phases_json = vec![];
    for ph in &o.phases {
        let st = phase_stats(&o.ckpts, &o.cpu, ph);
        let _ = writeln!(
            s,
            "{:<13} {:>5.1} {:>6} {:>5} {:>7} {:>8} {:>10} {:>11} {:>8} {:>8}",
            ph.name,
            ph.end - ph.start,
            st.total,
            st.colo,
            st.passive,
            st.periodic,
            st.miscompare,
            st.passive_interval,
            st.to_passive + st.to_colo,
            percent(st.cpu)
        );
        phases_json.push(json!({
            "name": ph.name, "start-s": ph.start, "end-s": ph.end, "checkpoints": st.total, "colo": st.colo,
            "passive": st.passive, "periodic": st.periodic, "miscompare": st.miscompare,
            "passive-interval": st.passive_interval, "to-passive": st.to_passive, "to-colo": st.to_colo,
            "secondary-cpu": st.cpu,
        }));
    }
    let c = &p["checkpoints"];
    let mut by_trigger: BTreeMap<String, u64> = BTreeMap::new();
    for ck in &o.ckpts {
        *by_trigger.entry(ck.trigger.clone()).or_default() += 1;
    }
    let triggers: Vec<String> = by_trigger.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(
        s,
        "\ncheckpoints: {} ({} COLO, {} passive); by trigger: {}",
        n(&c["total"]),
        n(&c["colo"]),
        n(&c["passive"]),
        triggers.join(", ")
    );
    let _ = writeln!(
        s,
        "mode switches: {}; pause p50 {:.1} ms, p99 {:.1} ms; {:.0} pages per checkpoint on average, {:.1} MiB sent",
        n(&c["mode-switches"]),
        f(&p["pause-p50-ms"]),
        f(&p["pause-p99-ms"]),
        f(&p["pages-mean"]),
        f(&p["bytes-total"]) / (1 << 20) as f64
    );
    let cpu_mode = |m: &str| o.cpu.by_mode.get(m).filter(|x| x.1 > 0.5).map(|x| x.0 / x.1);
    let _ = writeln!(
        s,
        "secondary colo-vmm CPU: {} in COLO (it runs the guest's burner too), {} in passive (paused between checkpoints)",
        percent(cpu_mode("colo")),
        percent(cpu_mode("passive"))
    );
    let after_kill = o.replies.iter().filter(|r| r.0 > fo.kill_t).count();
    let _ = writeln!(
        s,
        "counter: {} -> {}, {} increments on one TCP connection ({} after the failover), each reply exactly +1: {}",
        o.counter_first,
        o.counter_last,
        o.counter_incs,
        after_kill,
        if v.counter_ok { "PASS" } else { "FAIL" }
    );
    // The longest wait for a reply before the failover (passive mode holds every reply until the
    // next checkpoint; in COLO a reply waits for the secondary's copy or a checkpoint).
    if let Some((wait, at)) = o
        .replies
        .windows(2)
        .filter(|w| w[1].0 < fo.kill_t)
        .map(|w| (w[1].0 - w[0].0, w[0].0))
        .max_by(|a, b| a.0.total_cmp(&b.0))
    {
        let mode = if o.ckpts.iter().rev().find(|c| c.t <= at).is_some_and(|c| c.passive) { "passive" } else { "COLO" };
        let _ = writeln!(
            s,
            "counter: longest wait between two replies before the failover {:.0} ms (at {at:.1} s, in {mode} mode)",
            wait * 1000.0
        );
    }
    let stopped = o.phases.iter().find(|p| p.name == "top stopped").cloned();
    let gap = stopped.and_then(|ph| failover_gap(&o.replies, fo, &ph));
    let lf = &fo.secondary["last-failover"];
    let _ = writeln!(
        s,
        "failover: {} at {:.1} s; the secondary took over after {}; longest client-visible gap {} \
         (median {} between replies before)",
        if args.hosts == 1 { "primary SIGKILLed" } else { "host a died" },
        fo.kill_t,
        fo.detected_t.map(|t| format!("{:.0} ms", (t - fo.kill_t) * 1000.0)).unwrap_or("-".into()),
        gap.as_ref().map(|g| format!("{:.0} ms", g.secs * 1000.0)).unwrap_or("-".into()),
        gap.as_ref().map(|g| format!("{:.0} ms", g.baseline * 1000.0)).unwrap_or("-".into()),
    );
    let _ = writeln!(
        s,
        "survivor: {} ({}), reason \"{}\", resumed from \"{}\"; compare process now {}",
        lf["survivor"].as_str().unwrap_or("?"),
        fo.secondary["state"].as_str().unwrap_or("?"),
        lf["reason"].as_str().unwrap_or("?"),
        lf["resumed-from"].as_str().unwrap_or("?"),
        fo.compare_mode
    );
    let _ = writeln!(s, "top client: {} lines", o.top_lines);
    let _ = writeln!(s, "timeline: {}", args.svg.display());
    if v.failures.is_empty() {
        let _ = writeln!(s, "\nRESULT: PASS");
    } else {
        let _ = writeln!(s, "\nRESULT: FAIL");
        for e in &v.failures {
            let _ = writeln!(s, "  - {e}");
        }
    }
    let j = json!({
        "result": if v.failures.is_empty() { "pass" } else { "fail" },
        "failures": v.failures,
        "parameters": {
            "max-time": args.max_time, "passive-count": args.passive_count, "top-ms": args.top_ms,
            "counter-ms": args.counter_ms,
        },
        "phases": phases_json,
        "checkpoints": {
            "total": n(&c["total"]), "colo": n(&c["colo"]), "passive": n(&c["passive"]),
            "by-trigger": by_trigger, "mode-switches": n(&c["mode-switches"]),
            "pause-p50-ms": f(&p["pause-p50-ms"]), "pause-p99-ms": f(&p["pause-p99-ms"]),
            "bytes-total": n(&p["bytes-total"]),
        },
        "secondary-cpu": { "colo": cpu_mode("colo"), "passive": cpu_mode("passive") },
        "counter": {
            "first": o.counter_first, "last": o.counter_last, "increments": o.counter_incs,
            "after-failover": after_kill, "error": o.counter_error, "pass": v.counter_ok,
        },
        "failover": {
            "kill-s": fo.kill_t,
            "detected-ms": fo.detected_t.map(|t| (t - fo.kill_t) * 1000.0),
            "gap-ms": gap.as_ref().map(|g| g.secs * 1000.0),
            "baseline-reply-interval-ms": gap.as_ref().map(|g| g.baseline * 1000.0),
            "last-failover": lf,
            "compare-mode": fo.compare_mode,
        },
        "top-lines": o.top_lines,
        "counter-replies": o.replies.iter().map(|(t, v)| json!([(t * 1000.0).round() / 1000.0, v])).collect::<Vec<_>>(),
        "timeline": o.ckpts.iter().map(|c| json!({
            "seq": c.seq, "t-s": c.t, "kind": if c.passive { "passive" } else { "colo" }, "trigger": c.trigger,
            "interval-ms": c.interval_ms, "pause-ms": c.pause_ms, "pages": c.pages,
        })).collect::<Vec<_>>(),
    });
    (s, j)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !colo_tests::is_root() {
        eprintln!("colo-demo: needs root (network namespaces, taps, KVM); run it with sudo");
        return ExitCode::from(2);
    }
    if let Err(why) = prerequisites(Backend::VhostNetCompare) {
        eprintln!("colo-demo: this machine cannot run the demo: it {why}");
        return ExitCode::from(2);
    }
    interrupt::install();
    let sh = Arc::new(Shared {
        t0: Instant::now(),
        t0_unix_ms: unix_ms(),
        tty: std::io::stderr().is_terminal(),
        phase: Mutex::new("start"),
        ckpts: Mutex::default(),
        last_primary: Mutex::default(),
        last_secondary: Mutex::default(),
        poll_error: Mutex::default(),
        cpu: Mutex::default(),
        replies: Mutex::default(),
        counter_last: AtomicU64::new(0),
        top_lines: AtomicU64::new(0),
        primary_alive: AtomicBool::new(true),
        stop: AtomicBool::new(false),
        out: Mutex::new(()),
    });
    let outcome = match run(&args, &sh) {
        Ok(o) => o,
        Err(e) => {
            sh.say(&format!("colo-demo: {e:#}"));
            return ExitCode::from(if interrupt::interrupted() { 130 } else { 1 });
        }
    };
    let verdict = judge(&outcome, &args);
    let (text, json) = summary(&outcome, &verdict, &args);
    print!("{text}");
    let mut outputs = vec![(args.svg.as_path(), "timeline", svg::timeline(&outcome, &args).context("drawing it"))];
    if let Some(p) = &args.json {
        outputs.push((p, "JSON summary", Ok(format!("{json:#}\n"))));
    }
    if let Some(p) = &args.logs {
        outputs.push((p, "logs", Ok(outcome.logs.clone())));
    }
    let written = colo_tests::write_outputs("colo-demo", outputs);
    if let Some(e) = sh.poll_error.lock().unwrap().as_ref() {
        eprintln!("colo-demo: note: a status poll of the primary failed: {e}");
    }
    if !verdict.failures.is_empty() {
        if args.logs.is_none() {
            eprintln!("colo-demo: rerun with --logs FILE to keep every process's log");
        }
        return ExitCode::from(1);
    }
    if !written {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
