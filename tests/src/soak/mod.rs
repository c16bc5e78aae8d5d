//! The chaos soak: a protected pair across two hosts ([`ColoHosts`]) under counter, echo and
//! `top` traffic, with a random fault every few seconds — `kill -9` or SIGSTOP/SIGCONT of any
//! process, a host's death, a cut checkpoint link, loss and delay on the replication link, floods
//! of bad control lines. After each fault it waits until the pair is protected again or one
//! host serves alone; then it fences the other host, brings it back as a new secondary and
//! starts COLO from the survivor (re-protection by hand, as an operator would).
//!
//! Checked all along, each break a violation:
//! - the counter's values are consecutive (nothing lost or repeated) and no session breaks
//!   (COLO keeps every connection across failovers);
//! - only one host releases the VM's output: the VM's MAC is seen on the LAN switch from the
//!   serving host only, and after a takeover the old host never sends again;
//! - every process's resident memory and open descriptors stay bounded;
//! - after each fault the pair settles (protected, or one host serving) and the service goes on.
//!
//! `colo-soak` (tests/src/bin/colo-soak.rs) runs it from the command line; the test
//! `tests/tests/soak.rs` runs it for a minute.

pub mod faults;
pub mod watch;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::colo_hosts::{ColoHosts, HostBackend};
use faults::{host_name, Fault};
use watch::{CounterLoad, LanWatch, LineLoad, LineService, Resources, Violations};

/// COLO parameters of every primary: a periodic checkpoint at least every 2 s, so that each
/// round sees one soon after its fault.
const PARAMS: &[(&str, u64)] = &[("max-time", 2000)];

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Faults to inject at most.
    pub rounds: usize,
    /// How long to run at most (the round under way finishes).
    pub duration: Duration,
    /// Quiet time between the end of one round and the next fault, drawn in this range.
    pub pause: (Duration, Duration),
    /// Seed of the fault choices.
    pub seed: u64,
    /// The backend on each host.
    pub backend: HostBackend,
    /// Let checkpoint-link cuts outlast the heartbeat timeout: a partition between hosts that
    /// both live, which only the arbiter (issue 7) can decide. Off by default.
    pub partitions: bool,
    /// Only faults of these kinds ([`Fault::short`]); all when empty.
    pub only: Vec<String>,
    /// Longest SIGSTOP of a process, ms.
    pub max_freeze_ms: u64,
    /// Where to keep every process's log at each failover (`round-N.log`), if anywhere.
    pub logs: Option<std::path::PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rounds: usize::MAX,
            duration: Duration::from_secs(60),
            pause: (Duration::from_secs(2), Duration::from_secs(5)),
            seed: 1,
            backend: HostBackend::VhostNetCompare,
            partitions: false,
            only: Vec::new(),
            max_freeze_ms: 3000,
            logs: None,
        }
    }
}

/// What happened.
#[derive(Debug, Default)]
pub struct Report {
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Rounds run.
    pub rounds: usize,
    /// Failovers (one host left serving alone).
    pub failovers: u64,
    /// Of those, where the soak had to decide (`lost-heartbeat`), as a cluster manager would.
    pub decided: u64,
    /// New secondaries brought up.
    pub reprotections: u64,
    /// The longest silence the counter client saw, and the round's fault.
    pub worst_gap: (Duration, String),
    /// Counter increments, echo round trips, `top` lines.
    pub traffic: (u64, u64, u64),
    /// Frames from the VM's MAC seen on the LAN.
    pub lan_frames: usize,
    /// The most memory (KiB) and descriptors of each kind of process.
    pub resources: BTreeMap<&'static str, (u64, u64)>,
    /// Everything that broke an invariant.
    pub violations: Vec<watch::Violation>,
    /// One line per round.
    pub log: Vec<String>,
    /// How long it ran.
    pub elapsed: Duration,
    /// The options.
    pub seed: u64,
}

impl Report {
    /// The report as markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let secs = self.elapsed.as_secs();
        s.push_str(&format!(
            "### Chaos soak: {} rounds in {}m{:02}s (seed {})\n\n",
            self.rounds,
            secs / 60,
            secs % 60,
            self.seed
        ));
        s.push_str("| fault | injected |\n|---|---|\n");
        for (k, n) in &self.faults {
            s.push_str(&format!("| {k} | {n} |\n"));
        }
        s.push_str(&format!("| **total** | **{}** |\n\n", self.faults.values().sum::<u64>()));
        let (incs, echoes, tops) = self.traffic;
        s.push_str(&format!(
            "- failovers: {} ({} decided by the soak with `lost-heartbeat`), re-protections: {}\n",
            self.failovers, self.decided, self.reprotections
        ));
        s.push_str(&format!(
            "- worst client-visible gap of the counter session: {} ms ({})\n",
            self.worst_gap.0.as_millis(),
            self.worst_gap.1
        ));
        s.push_str(&format!(
            "- traffic: {incs} counter increments, {echoes} echo round trips, {tops} `top` lines; {} frames of the VM on the LAN\n",
            self.lan_frames
        ));
        for (kind, (rss, fds)) in &self.resources {
            s.push_str(&format!("- {kind}: at most {} MiB resident, {fds} descriptors\n", rss >> 10));
        }
        s.push_str(&format!("- **invariant violations: {}**\n", self.violations.len()));
        for v in &self.violations {
            s.push_str(&format!("  - at {:.1} s: {}\n", v.at.as_secs_f64(), v.what));
        }
        s
    }
}

/// Which host runs which VM.
#[derive(Debug, Clone, Copy)]
struct Pair {
    primary: usize,
    secondary: usize,
}

impl Pair {
    fn roles(&self) -> [&'static str; 2] {
        let mut r = ["", ""];
        r[self.primary] = "primary";
        r[self.secondary] = "secondary";
        r
    }
}

/// How the pair stood once a fault was over.
#[derive(Debug)]
enum Settled {
    /// COLO runs on both hosts.
    Protected,
    /// One host serves alone; the other is to be replaced.
    Alone { survivor: usize, decided: bool },
}

/// A control API call with a short timeout (a VMM that does not answer is not waited for).
fn api(path: &Path, command: &str) -> Result<Value, String> {
    let s = UnixStream::connect(path).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    (&s).write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
    v.get("return").cloned().ok_or_else(|| v.to_string())
}

/// Whether every process of host `i` runs.
fn host_intact(net: &mut ColoHosts, i: usize) -> bool {
    let on = &mut net.on[i];
    on.vmm.as_mut().is_some_and(|p| p.is_running()) && on.backends.iter_mut().all(|p| p.is_running())
}

fn vmm_running(net: &mut ColoHosts, i: usize) -> bool {
    net.on[i].vmm.as_mut().is_some_and(|p| p.is_running())
}

/// Waits until the pair is protected or one viable host serves; decides (fence and
/// `lost-heartbeat`) where a cluster manager would have to. Errors after `patience`.
fn settle(
    net: &mut ColoHosts,
    pair: Pair,
    patience: Duration,
    violations: &Violations,
    origin: Instant,
) -> Result<Settled, String> {
    let deadline = Instant::now() + patience;
    // Faults show only after a while (a killed backend once a checkpoint needs it, a silent
    // peer after the heartbeat timeout): the pair counts as protected only after this.
    let judged = Instant::now() + Duration::from_millis(3000);
    let mut decided = false;
    // And only once a checkpoint completed after the fault: both sides did their part.
    let mut checkpoints_before: Option<u64> = None;
    loop {
        let intact = [host_intact(net, 0), host_intact(net, 1)];
        let status: Vec<Option<Value>> = (0..2)
            .map(|i| if vmm_running(net, i) { api(&net.on[i].api, "query-colo-status").ok() } else { None })
            .collect();
        let state = |i: usize| status[i].as_ref().and_then(|s| s["state"].as_str()).unwrap_or("gone").to_string();
        let role = |i: usize| status[i].as_ref().and_then(|s| s["role"].as_str()).unwrap_or("").to_string();
        let (p, s) = (pair.primary, pair.secondary);
        if intact == [true, true] && state(p) == "running" && state(s) == "running" {
            let total = status[p].as_ref().and_then(|s| s["checkpoints"]["total"].as_u64()).unwrap_or(0);
            let before = *checkpoints_before.get_or_insert(total);
            if Instant::now() >= judged && total > before {
                return Ok(Settled::Protected);
            }
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let serving: Vec<usize> = (0..2).filter(|&i| state(i) == "failed-over").collect();
        match serving[..] {
            [_, _] => {
                // Both went on alone: the split brain the arbiter exists for. The LAN capture
                // shows whether both released output; the one that took over stays.
                violations.push(origin, "both hosts serve alone (each failed over)".into());
                net.fence_host(p);
                return Ok(Settled::Alone { survivor: s, decided });
            }
            [h] if intact[h] => {
                // The other host must have noticed (not in COLO any more) before it is replaced.
                if state(1 - h) != "running" || !intact[1 - h] {
                    return Ok(Settled::Alone { survivor: h, decided });
                }
            }
            [h] => {
                // It serves alone but lost a backend: its VM is cut off and cannot serve. The
                // other host's VM, waiting with the last checkpoint, takes over once this one
                // is fenced.
                net.fence_host(h);
            }
            _ => {
                // A secondary waits for a decision (its primary gone or cut off): fence the
                // primary, then tell the secondary to take over.
                for i in 0..2 {
                    let other_done = !intact[1 - i] || !matches!(state(1 - i).as_str(), "running" | "failed-over");
                    if state(i) == "stopped" && role(i) == "secondary" && intact[i] && other_done {
                        net.fence_host(1 - i);
                        api(&net.on[i].api, "lost-heartbeat")?;
                        decided = true;
                    }
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the pair did not settle within {patience:?}: host a {}, host b {}",
                status[0].as_ref().map_or("gone".into(), Value::to_string),
                status[1].as_ref().map_or("gone".into(), Value::to_string)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the soak; `progress` gets a line per round.
pub fn run(opts: &Options, mut progress: impl FnMut(&str)) -> Report {
    let origin = Instant::now();
    let mut rng = fastrand::Rng::with_seed(opts.seed);
    let mut report = Report { seed: opts.seed, ..Report::default() };
    let violations = Violations::default();
    let mut net = ColoHosts::start(opts.backend, 2, "app=counter,echo,top top_ms=500", true);
    net.set_params(0, PARAMS);
    net.start_colo(0, 1);
    let lan = LanWatch::start(&net);
    let mut counter = CounterLoad::start(&net, origin, violations.clone());
    let mut echo = LineLoad::start(&net, LineService::Echo, origin, violations.clone());
    let mut top = LineLoad::start(&net, LineService::Top, origin, violations.clone());
    let mut resources = Resources::default();
    let mut pair = Pair { primary: 0, secondary: 1 };
    let mut takeovers: Vec<(SystemTime, usize)> = Vec::new();
    let backends = net.on[0].backends.len();
    progress(&format!("soak: COLO runs across hosts a (primary) and b; seed {}", opts.seed));

    while report.rounds < opts.rounds && origin.elapsed() < opts.duration {
        let pause = rng.u64(opts.pause.0.as_millis() as u64..=opts.pause.1.as_millis() as u64);
        std::thread::sleep(Duration::from_millis(pause));
        report.rounds += 1;
        let fault = loop {
            let f = Fault::draw(&mut rng, pair.primary, backends, opts.partitions, opts.max_freeze_ms);
            if opts.only.is_empty() || opts.only.iter().any(|k| k == f.short()) {
                break f;
            }
        };
        *report.faults.entry(fault.kind()).or_default() += 1;
        let (at, at_wall, at_ms) = (Instant::now(), SystemTime::now(), origin.elapsed().as_millis() as u64);
        let counted = counter.answered();
        let what = fault.inject(&mut net, pair.roles());
        let settled = match settle(&mut net, pair, Duration::from_secs(45), &violations, origin) {
            Ok(s) => s,
            Err(e) => {
                violations.push(origin, format!("round {} ({what}): {e}", report.rounds));
                progress(&net.logs());
                break;
            }
        };
        let outcome = match settled {
            Settled::Protected => "rode through".to_string(),
            Settled::Alone { survivor, decided } => {
                report.failovers += 1;
                report.decided += u64::from(decided);
                if survivor != pair.primary {
                    takeovers.push((at_wall, survivor));
                }
                let failed_over = at.elapsed();
                if let Some(dir) = &opts.logs {
                    let _ = std::fs::create_dir_all(dir);
                    let logs = format!("{}{}", net.take_fenced_logs(), net.logs());
                    let _ = std::fs::write(dir.join(format!("round-{}.log", report.rounds)), logs);
                }
                let other = 1 - survivor;
                let t = Instant::now();
                let reprotected = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    net.restart_host(other, false);
                    net.set_params(survivor, PARAMS);
                    net.start_colo(survivor, other);
                }));
                if let Err(e) = reprotected {
                    let why = e.downcast_ref::<String>().cloned().unwrap_or_else(|| "a panic".into());
                    violations.push(origin, format!("round {}: re-protection failed: {why}", report.rounds));
                    break;
                }
                report.reprotections += 1;
                pair = Pair { primary: survivor, secondary: other };
                format!(
                    "{}failover to host {} after {:.1} s; host {} back as secondary in {:.1} s",
                    if decided { "decided " } else { "" },
                    host_name(survivor),
                    failed_over.as_secs_f64(),
                    host_name(other),
                    t.elapsed().as_secs_f64()
                )
            }
        };
        // The service goes on: the counter session answers again.
        let wait = Instant::now() + Duration::from_secs(30);
        while counter.answered() < counted + 5 && Instant::now() < wait {
            std::thread::sleep(Duration::from_millis(50));
        }
        if counter.answered() < counted + 5 {
            violations.push(origin, format!("round {}: the counter session stalled after: {what}", report.rounds));
        }
        let (gap, _) = counter.worst_gap_since(at_ms);
        if gap > report.worst_gap.0 {
            report.worst_gap = (gap, what.clone());
        }
        for over in resources.sample(&net) {
            violations.push(origin, format!("round {}: {over}", report.rounds));
        }
        let line = format!(
            "round {} at {:.0} s: {what} → {outcome}; counter gap {} ms",
            report.rounds,
            origin.elapsed().as_secs_f64(),
            gap.as_millis()
        );
        progress(&line);
        report.log.push(line);
    }

    // Let the last round's traffic reach the captures.
    std::thread::sleep(Duration::from_secs(1));
    counter.stop();
    echo.stop();
    top.stop();
    let foreign = lan.foreign_frames(0, &takeovers);
    if let Some((t, h)) = foreign.first() {
        violations.push(
            origin,
            format!(
                "{} frames of the VM came from a host that was not serving (the first from host {} at unix time {t:.3})",
                foreign.len(),
                host_name(*h)
            ),
        );
    }
    report.lan_frames = lan.count();
    report.traffic = (counter.answered(), echo.count(), top.count());
    report.resources = resources.worst;
    report.violations = violations.all();
    report.elapsed = origin.elapsed();
    report
}
