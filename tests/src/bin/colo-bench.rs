//! Scripted end-to-end measurements of COLO with the reference guest behind vhost-net-compare,
//! printed as a markdown report:
//! - checkpoint pause against dirty pages per checkpoint, next to the local memory-copy budget
//!   for the same pages (background RAM transfer off and on);
//! - COLO-only vs passive-only (hybrid disabled by parameters) vs hybrid vs no protection, on a
//!   deterministic service (TCP echo) and a divergent one (`top` next to a CPU burner): client
//!   throughput, checkpoints per second, secondary CPU;
//! - failover gap (the longest silence a counter client sees) for a killed primary and for a
//!   frozen one (detected by the heartbeat), against the heartbeat timeout;
//! - checkpoint pause against vCPUs (an idle guest, and every vCPU burning);
//! - checkpoint pause against dirty disk blocks per checkpoint (background transfer off and on);
//! - the guest's disk throughput (the `kv` service's `fill`/`read` of 64 MiB, and `put`s, each
//!   flushed) without COLO and with it.
//!
//! Run as root: `cargo run --release -p colo-tests --bin colo-bench` (or scripts/bench-colo.sh).

use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

use clap::Parser;
use colo_tests::checkpoint_steps::{cells, header, median_steps, step_times, StepTimes, STEPS};
use colo_tests::colo_topology::{prerequisites, Backend, ColoNet, CounterClient, Side};
use colo_tests::kv::{make_image, KvClient};
use colo_tests::vm_topology::cpu_time;
use colo_tests::TempDir;
use serde_json::Value;

/// COLO end-to-end benchmarks.
#[derive(Parser, Debug)]
struct Args {
    /// Seconds each throughput measurement runs.
    #[arg(long, default_value_t = 8.0)]
    secs: f64,
    /// Guest dirty rates for the pause table, pages per second (one checkpoint per second).
    #[arg(long, value_delimiter = ',', default_value = "0,1000,5000,20000")]
    dirty: Vec<u64>,
    /// Heartbeat timeouts for the failover table, ms.
    #[arg(long, value_delimiter = ',', default_value = "250,500,1000")]
    heartbeat: Vec<u64>,
    /// Repeat each failover, and each row of the vCPU, blocks and disk tables, this many times
    /// on a fresh pair (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// vCPU counts for the vCPU table.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    cpus: Vec<u32>,
    /// Guest disk dirty rates for the blocks table, 4 KiB blocks per second.
    #[arg(long, value_delimiter = ',', default_value = "0,100,1000,4000")]
    blocks: Vec<u64>,
    /// Run only these parts (pause, modes, echo, failover, cpus, blocks, disk); default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Write the report here as well as to stdout.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// The pause rows run with `resume-before-load=false`: the PVM waits for the secondary's
    /// load before it resumes (colo-vmm's default is to resume while the secondary loads).
    #[arg(long)]
    wait_for_load: bool,
}

/// `--wait-for-load`, for the pause rows.
static WAIT_FOR_LOAD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Args {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn n(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// Seconds per 4 KiB page copied in memory here (the floor under any checkpoint's pause).
fn copy_budget_per_page() -> f64 {
    let pages = 16_384;
    let src = vec![1u8; pages * 4096];
    let mut dst = vec![0u8; pages * 4096];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for (d, s) in dst.chunks_mut(4096).zip(src.chunks(4096)) {
            d.copy_from_slice(s);
        }
        std::hint::black_box(&dst);
        best = best.min(t.elapsed().as_secs_f64() / pages as f64);
    }
    best
}

/// The checkpoints of the primary's recent history after `from` (by seq).
fn checkpoints_since(net: &ColoNet, from: u64) -> Vec<Value> {
    let s = net.status(Side::Primary);
    s["recent"].as_array().cloned().unwrap_or_default().into_iter().filter(|c| n(&c["seq"]) as u64 > from).collect()
}

fn last_seq(net: &ColoNet) -> u64 {
    n(&net.status(Side::Primary)["checkpoints"]["total"]) as u64
}

/// The `p` quantile (0..=1) of `v` (nearest rank).
fn quantile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// A pause row: medians of pages and pause per checkpoint, the pause's p99, background pages,
/// and the median of each step.
struct PauseRow {
    pages: f64,
    pause: f64,
    p99: f64,
    checkpoints: usize,
    bg_pages: f64,
    steps: StepTimes,
}

/// Pause and pages per checkpoint with the guest dirtying `rate` pages per second, one
/// checkpoint every `every_ms`.
fn pause_row(rate: u64, background: bool, secs: f64, every_ms: u64) -> PauseRow {
    let app =
        if rate == 0 { "app=counter".to_string() } else { format!("app=counter,dirty dirty={rate} dirty_mib=128") };
    let mut net = ColoNet::start(Backend::VhostNetCompare, &app, &[]);
    let bg = if background { 1 << 20 } else { 0 };
    // `passive-limit=0`: every checkpoint is a COLO one at the interval asked for. (Hybrid mode
    // would go passive at intervals below its limit, 400 ms, and checkpoint every 250 ms.)
    net.set_params(Side::Primary, &[("max-time", every_ms), ("ram-background-limit", bg), ("passive-limit", 0)]);
    if WAIT_FOR_LOAD.load(std::sync::atomic::Ordering::Relaxed) {
        net.ctl(Side::Primary, "set-parameters", &["resume-before-load=false"])
            .unwrap_or_else(|e| panic!("set-parameters: {e}"));
    }
    net.start_colo();
    // Let the first (larger) checkpoint pass.
    std::thread::sleep(Duration::from_millis(1500));
    let from = last_seq(&net);
    std::thread::sleep(Duration::from_secs_f64(secs));
    let cps = checkpoints_since(&net, from);
    let pauses: Vec<f64> = cps.iter().map(|c| n(&c["pause-ms"])).collect();
    let pages: Vec<f64> = cps.iter().map(|c| n(&c["pages"])).collect();
    let bg_pages = n(&net.status(Side::Primary)["background-pages"]);
    let times = step_times(&net.log(Side::Primary), from);
    if let Some(dir) = std::env::var_os("COLO_BENCH_LOGS") {
        // Where each row's processes logged, for a closer look (COLO_BENCH_LOGS=DIR).
        let dir = std::path::PathBuf::from(dir);
        let name = format!("pause-{rate}-{}-{every_ms}", if background { "bg" } else { "nobg" });
        let _ = std::fs::write(dir.join(format!("{name}.log")), net.logs());
    }
    let steps = median_steps(&times);
    if pauses.is_empty() {
        return PauseRow { pages: 0.0, pause: 0.0, p99: 0.0, checkpoints: 0, bg_pages, steps };
    }
    PauseRow {
        pages: median(pages),
        pause: median(pauses.clone()),
        p99: quantile(pauses.clone(), 0.99),
        checkpoints: pauses.len(),
        bg_pages,
        steps,
    }
}

/// How the pair is configured for a mode comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    /// Primary only (no COLO started): the baseline.
    Unprotected,
    /// Hybrid disabled towards COLO: never passive.
    ColoOnly,
    /// Hybrid disabled towards passive: passive at once and for good.
    PassiveOnly,
    /// The defaults.
    Hybrid,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Unprotected => "no COLO (primary-only)",
            Setup::ColoOnly => "COLO only",
            Setup::PassiveOnly => "passive only",
            Setup::Hybrid => "hybrid",
        }
    }
}

/// A pair ready for a workload in `setup` (settled: passive modes reached).
fn pair(setup: Setup, app: &str) -> ColoNet {
    let mut net = ColoNet::start(Backend::VhostNetCompare, app, &[]);
    match setup {
        Setup::Unprotected => return net,
        Setup::ColoOnly => net.set_params(Side::Primary, &[("passive-limit", 0)]),
        Setup::PassiveOnly => net.set_params(
            Side::Primary,
            &[("max-time", 100), ("passive-limit", 1_000_000), ("passive-count", 1_000_000)],
        ),
        Setup::Hybrid => {}
    }
    net.start_colo();
    if setup == Setup::PassiveOnly {
        net.wait_status(Side::Primary, "passive", Duration::from_secs(10), |s| s["mode"] == "passive");
    }
    net
}

struct Measured {
    /// Client operations per second (echo round trips, top lines).
    rate: f64,
    checkpoints_per_s: f64,
    secondary_cpu: f64,
    passive_share: f64,
}

/// Runs `work` for `secs` against a pair, measuring checkpoints and the secondary's CPU.
fn measure(net: &ColoNet, secs: f64, work: impl FnOnce(&ColoNet, f64) -> f64) -> Measured {
    let colo = net.secondary.is_some() && net.status(Side::Primary)["state"] == "running";
    let before = if colo { last_seq(net) } else { 0 };
    let pid = net.secondary.as_ref().map(|p| p.pid());
    let cpu0 = pid.map(cpu_time);
    let t = Instant::now();
    let rate = work(net, secs);
    let wall = t.elapsed().as_secs_f64();
    let secondary_cpu = match (pid, cpu0) {
        (Some(p), Some(c)) => (cpu_time(p) - c).as_secs_f64() / wall,
        _ => 0.0,
    };
    let (mut cps, mut passive) = (0.0, 0.0);
    if colo {
        let list = checkpoints_since(net, before);
        cps = list.len() as f64 / wall;
        passive = list.iter().filter(|c| c["kind"] == "passive").count() as f64 / list.len().max(1) as f64;
    }
    Measured { rate, checkpoints_per_s: cps, secondary_cpu, passive_share: passive }
}

/// TCP echo round trips per second (64 bytes, one connection).
fn echo(net: &ColoNet, secs: f64) -> f64 {
    let mut s = net.connect(7);
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    let t = Instant::now();
    let mut k = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        s.write_all(&msg).unwrap();
        s.read_exact(&mut buf).unwrap();
        k += 1;
    }
    k as f64 / t.elapsed().as_secs_f64()
}

/// `top` lines per second received (the guest sends one every 200 ms).
fn top(net: &ColoNet, secs: f64) -> f64 {
    let s = net.connect(9100);
    let mut r = BufReader::new(s);
    let t = Instant::now();
    let mut k = 0u64;
    let mut line = String::new();
    while t.elapsed().as_secs_f64() < secs {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        k += 1;
    }
    k as f64 / t.elapsed().as_secs_f64()
}

/// The longest silence a counter client (an `inc` every 5 ms) sees around a fault.
fn failover_gap(heartbeat_ms: u64, freeze: bool) -> f64 {
    let mut net = ColoNet::start(Backend::VhostNetCompare, "app=counter", &[]);
    let interval = (heartbeat_ms / 5).max(10);
    let params = [("heartbeat-interval", interval), ("heartbeat-timeout", heartbeat_ms)];
    net.set_params(Side::Primary, &params);
    net.start_colo();
    net.set_params(Side::Secondary, &params);
    let mut c = CounterClient::connect(&net);
    let mut last = Instant::now();
    let mut gap = Duration::ZERO;
    let t = Instant::now();
    let mut faulted = false;
    while t.elapsed() < Duration::from_secs(4) {
        if !faulted && t.elapsed() > Duration::from_secs(1) {
            faulted = true;
            if freeze {
                net.signal(Side::Primary, libc::SIGSTOP);
            } else {
                net.kill(Side::Primary);
            }
        }
        c.inc().expect("the counter session survives");
        gap = gap.max(last.elapsed());
        last = Instant::now();
        std::thread::sleep(Duration::from_millis(5));
    }
    gap.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    WAIT_FOR_LOAD.store(args.wait_for_load, std::sync::atomic::Ordering::Relaxed);
    if let Err(why) = prerequisites(Backend::VhostNetCompare) {
        anyhow::bail!("colo-bench {why}");
    }
    let mut r = String::new();
    if args.wants("pause") {
        pause_table(&args, &mut r)?;
    }
    if args.wants("modes") {
        modes_table(&args, &mut r)?;
    }
    if args.wants("echo") {
        echo_table(&args, &mut r)?;
    }
    if args.wants("failover") {
        failover_table(&args, &mut r)?;
    }
    if args.wants("cpus") {
        cpus_table(&args, &mut r)?;
    }
    if args.wants("blocks") {
        blocks_table(&args, &mut r)?;
    }
    if args.wants("disk") {
        disk_table(&args, &mut r)?;
    }
    print!("{r}");
    if let Some(p) = args.out {
        std::fs::write(&p, &r)?;
    }
    Ok(())
}

fn pause_table(args: &Args, r: &mut String) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let budget = copy_budget_per_page();
    let mut step_rows = vec![];
    writeln!(r, "### Idle checkpoint pause\n")?;
    writeln!(
        r,
        "The counter guest idle, a COLO checkpoint every 100 ms (`max-time=100`, `passive-limit=0`) \
         for {}s: the pause's median and p99 over every checkpoint.\n",
        args.secs
    )?;
    writeln!(r, "| checkpoints | pause p50 ms | pause p99 ms |")?;
    writeln!(r, "|---:|---:|---:|")?;
    eprintln!("pause: idle, every 100 ms…");
    let idle_row = pause_row(0, false, args.secs, 100);
    writeln!(r, "| {} | {:.2} | {:.2} |\n", idle_row.checkpoints, idle_row.pause, idle_row.p99)?;
    step_rows.push(("idle, every 100 ms".to_string(), idle_row.pause, idle_row.steps));
    writeln!(r, "### Checkpoint pause against dirty pages\n")?;
    writeln!(
        r,
        "One checkpoint per second (`max-time=1000`), the guest dirtying pages at the given rate; \
         medians over {}s. The per-page cost is the pause beyond the idle guest's, divided by the \
         pages; the copy budget is copying a page once in memory here ({:.2} µs).\n",
        args.secs,
        budget * 1e6
    )?;
    writeln!(
        r,
        "| dirty pages/s | background transfer | pages/checkpoint | pause ms | pause p99 ms | µs/page beyond idle | vs copy budget | background pages |"
    )?;
    writeln!(r, "|---:|:---|---:|---:|---:|---:|---:|---:|")?;
    let mut idle = None;
    for &rate in &args.dirty {
        for bg in [false, true] {
            if bg && rate == 0 {
                continue;
            }
            eprintln!("pause: {rate} pages/s, background {bg}…");
            let row = pause_row(rate, bg, args.secs, 1000);
            let (pages, pause) = (row.pages, row.pause);
            let base = *idle.get_or_insert(pause);
            let per_page = if rate > 0 && pages > 0.0 { (pause - base).max(0.0) * 1000.0 / pages } else { 0.0 };
            let (per, ratio) = if per_page > 0.0 {
                (format!("{per_page:.2}"), format!("{:.1}×", per_page / (budget * 1e6)))
            } else {
                ("–".into(), "–".into())
            };
            writeln!(
                r,
                "| {rate} | {} | {pages:.0} | {pause:.2} | {:.2} | {per} | {ratio} | {:.0} |",
                if bg { "1 MiB" } else { "off" },
                row.p99,
                row.bg_pages
            )?;
            step_rows.push((
                format!("{rate} pages/s, background {}", if bg { "1 MiB" } else { "off" }),
                pause,
                row.steps,
            ));
        }
    }
    writeln!(r, "\n### Checkpoint pause by step\n")?;
    writeln!(
        r,
        "The median of each step of the transaction over the same checkpoints, ms, as the primary \
         logs them: `pause` stops the vCPUs and the rings, `dirty` reads the dirty logs, `pages` \
         copies the dirty pages (and blocks) into the link, `marks` asks the compare processes \
         for their receive marks (two hosts), `state` saves, encodes and sends the device state, \
         `received` waits for the secondary to take everything in, `commit` releases the \
         interval's output, `loaded` waits for the secondary to load, `resume` restarts the PVM.\n"
    )?;
    writeln!(r, "| checkpoints | whole pause | {} |", header())?;
    writeln!(r, "|:---|---:|{}", "---:|".repeat(STEPS.len()))?;
    for (name, pause, steps) in step_rows {
        writeln!(r, "| {name} | {pause:.2} | {} |", cells(&steps))?;
    }
    Ok(())
}

fn modes_table(args: &Args, r: &mut String) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    writeln!(r, "\n### Modes: COLO only, passive only, hybrid\n")?;
    writeln!(
        r,
        "Echo: 64-byte TCP round trips on one connection (deterministic). Top: lines received from \
         `top` (one per 200 ms, divergent) while the guest burns CPU. {}s each.\n",
        args.secs
    )?;
    writeln!(r, "| workload | setup | client rate | vs unprotected | checkpoints/s | passive share | secondary CPU |")?;
    writeln!(r, "|:---|:---|---:|---:|---:|---:|---:|")?;
    let setups = [Setup::Unprotected, Setup::ColoOnly, Setup::PassiveOnly, Setup::Hybrid];
    for (name, app, work, unit) in [
        ("echo", "app=echo", echo as fn(&ColoNet, f64) -> f64, "round trips/s"),
        ("top", "app=top,burn", top as fn(&ColoNet, f64) -> f64, "lines/s"),
    ] {
        let mut base = 0.0;
        for setup in setups {
            eprintln!("modes: {name}, {}…", setup.name());
            let net = pair(setup, app);
            let m = measure(&net, args.secs, work);
            if setup == Setup::Unprotected {
                base = m.rate;
            }
            writeln!(
                r,
                "| {name} | {} | {:.1} {unit} | {:.2} | {:.2} | {:.0}% | {:.0}% |",
                setup.name(),
                m.rate,
                if base > 0.0 { m.rate / base } else { 0.0 },
                m.checkpoints_per_s,
                m.passive_share * 100.0,
                m.secondary_cpu * 100.0
            )?;
        }
    }
    Ok(())
}

/// Echo round trips without and with COLO, alternating fresh pairs `--repeat` times so both
/// see the same machine; with `COLO_BENCH_PERF=FILE`, the last COLO run is profiled
/// (`perf record` of the two VMMs and the backend) into FILE.
fn echo_table(args: &Args, r: &mut String) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    writeln!(r, "\n### Echo round trips, COLO against unprotected\n")?;
    writeln!(
        r,
        "64-byte TCP round trips on one connection for {}s; an unprotected pair and a COLO-only \
         pair (`passive-limit=0`) alternately, {} times; medians.\n",
        args.secs, args.repeat
    )?;
    let (mut plain, mut colo, mut ratios) = (vec![], vec![], vec![]);
    let perf = std::env::var_os("COLO_BENCH_PERF");
    for i in 0..args.repeat.max(1) {
        eprintln!("echo: round {}…", i + 1);
        let a = measure(&pair(Setup::Unprotected, "app=echo"), args.secs, echo).rate;
        let net = pair(Setup::ColoOnly, "app=echo");
        let profiler = match (&perf, i + 1 == args.repeat.max(1)) {
            (Some(out), true) => {
                let pids: Vec<String> = net
                    .primary
                    .iter()
                    .chain(net.secondary.iter())
                    .chain(net.backends.iter())
                    .map(|p| p.pid().to_string())
                    .collect();
                std::process::Command::new("perf")
                    .args(["record", "-F", "2000", "-g", "-o"])
                    .arg(out)
                    .args(["-p", &pids.join(","), "--", "sleep"])
                    .arg(format!("{}", args.secs))
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .ok()
            }
            _ => None,
        };
        let b = measure(&net, args.secs, echo).rate;
        if let Some(mut p) = profiler {
            let _ = p.wait();
        }
        plain.push(a);
        colo.push(b);
        ratios.push(if a > 0.0 { b / a } else { 0.0 });
    }
    writeln!(r, "| unprotected round trips/s | COLO round trips/s | COLO / unprotected (median of rounds) | rounds |")?;
    writeln!(r, "|---:|---:|---:|:---|")?;
    let rounds: Vec<String> = ratios.iter().map(|x| format!("{x:.2}")).collect();
    writeln!(
        r,
        "| {:.0} | {:.0} | {:.2} | {} |",
        median(plain),
        median(colo),
        median(ratios.clone()),
        rounds.join(", ")
    )?;
    Ok(())
}

fn failover_table(args: &Args, r: &mut String) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    writeln!(r, "\n### Failover gap\n")?;
    writeln!(
        r,
        "The longest silence seen by a counter client sending an `inc` every 5 ms when the primary \
         is killed (SIGKILL: the link breaks at once) or frozen (SIGSTOP: only the heartbeat \
         notices); median of {}.\n",
        args.repeat
    )?;
    writeln!(r, "| heartbeat timeout ms | primary killed: gap ms | primary frozen: gap ms |")?;
    writeln!(r, "|---:|---:|---:|")?;
    for &hb in &args.heartbeat {
        eprintln!("failover: heartbeat timeout {hb} ms…");
        let killed = median((0..args.repeat).map(|_| failover_gap(hb, false)).collect());
        let frozen = median((0..args.repeat).map(|_| failover_gap(hb, true)).collect());
        writeln!(r, "| {hb} | {killed:.0} | {frozen:.0} |")?;
    }
    Ok(())
}

/// Median pause and pages (and blocks) per checkpoint of a running pair over `secs`, after the
/// first checkpoints passed.
fn settled_pauses(net: &ColoNet, secs: f64) -> (f64, f64, f64) {
    std::thread::sleep(Duration::from_millis(1500));
    let from = last_seq(net);
    std::thread::sleep(Duration::from_secs_f64(secs));
    let cps = checkpoints_since(net, from);
    if cps.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let pick = |k: &str| median(cps.iter().map(|c| n(&c[k])).collect());
    (pick("pause-ms"), pick("pages"), pick("blocks"))
}

fn cpus_table(args: &Args, r: &mut String) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    writeln!(r, "\n### Checkpoint pause against vCPUs\n")?;
    writeln!(
        r,
        "One checkpoint per second (`max-time=1000`); the guest idle (every vCPU halted), or every \
         vCPU burning (so each must be kicked out of the guest, finish its exit and be read); \
         medians over {}s, median of {} pairs. Both VMs have the vCPUs, on the same 2 host CPUs.\n",
        args.secs, args.repeat
    )?;
    writeln!(r, "| vCPUs | idle: pause ms | idle: pages | burning: pause ms | burning: pages |")?;
    writeln!(r, "|---:|---:|---:|---:|---:|")?;
    for &cpus in &args.cpus {
        let mut row = vec![];
        for app in ["app=counter", "app=counter,burn"] {
            let (mut pauses, mut pages) = (vec![], vec![]);
            for _ in 0..args.repeat.max(1) {
                eprintln!("cpus: {cpus} vCPUs, {app}…");
                let cpus_arg = cpus.to_string();
                let mut net = ColoNet::start_with(Backend::VhostNetCompare, app, &[], &["--cpus", &cpus_arg]);
                net.set_params(Side::Primary, &[("max-time", 1000)]);
                net.start_colo();
                let (pause, p, _) = settled_pauses(&net, args.secs);
                pauses.push(pause);
                pages.push(p);
            }
            row.push(format!("{:.2} | {:.0}", median(pauses), median(pages)));
        }
        writeln!(r, "| {cpus} | {} | {} |", row[0], row[1])?;
    }
    Ok(())
}

/// A pair whose VMs each have a 64 MiB image in `images`.
fn disk_pair(images: &TempDir, app: &str) -> ColoNet {
    let (p, s) = (images.path("primary.img"), images.path("secondary.img"));
    make_image(&p, 64);
    make_image(&s, 64);
    let (pd, sd) = (format!("path={}", p.display()), format!("path={}", s.display()));
    ColoNet::start_sides(Backend::VhostNetCompare, app, &[], &["--disk", &pd], &["--disk", &sd])
}

fn blocks_table(args: &Args, r: &mut String) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let budget = copy_budget_per_page();
    writeln!(r, "\n### Checkpoint pause against dirty disk blocks\n")?;
    writeln!(
        r,
        "One checkpoint per second (`max-time=1000`), the guest's `diskdirty` writing 4 KiB blocks \
         at the given rate (runs of up to 16 blocks per request) on a 64 MiB disk; medians over {}s, \
         median of {} pairs. The per-block cost is the pause beyond the idle guest's, divided by the blocks; the copy \
         budget is copying 4 KiB once in memory here ({:.2} µs).\n",
        args.secs,
        args.repeat,
        budget * 1e6
    )?;
    writeln!(
        r,
        "| dirty blocks/s | background transfer | blocks/checkpoint | pages/checkpoint | pause ms | µs/block beyond idle | vs copy budget | background blocks |"
    )?;
    writeln!(r, "|---:|:---|---:|---:|---:|---:|---:|---:|")?;
    let mut idle = None;
    for &rate in &args.blocks {
        for bg in [false, true] {
            if bg && rate == 0 {
                continue;
            }
            let mut rows = vec![];
            for _ in 0..args.repeat.max(1) {
                eprintln!("blocks: {rate} blocks/s, background {bg}…");
                let images = TempDir::new("bench-disk");
                let app =
                    if rate == 0 { "app=counter".into() } else { format!("app=counter,diskdirty disk_dirty={rate}") };
                let mut net = disk_pair(&images, &app);
                let limit = if bg { 1 << 20 } else { 0 };
                net.set_params(Side::Primary, &[("max-time", 1000), ("ram-background-limit", limit)]);
                net.start_colo();
                let (pause, pages, blocks) = settled_pauses(&net, args.secs);
                rows.push((pause, pages, blocks, n(&net.status(Side::Primary)["disk"]["background-blocks"])));
            }
            let pick = |f: fn(&(f64, f64, f64, f64)) -> f64| median(rows.iter().map(f).collect());
            let (pause, pages, blocks, background) = (pick(|r| r.0), pick(|r| r.1), pick(|r| r.2), pick(|r| r.3));
            let base = *idle.get_or_insert(pause);
            let per = if rate > 0 && blocks > 0.0 { (pause - base).max(0.0) * 1000.0 / blocks } else { 0.0 };
            let (per, ratio) = if per > 0.0 {
                (format!("{per:.2}"), format!("{:.1}×", per / (budget * 1e6)))
            } else {
                ("–".into(), "–".into())
            };
            writeln!(
                r,
                "| {rate} | {} | {blocks:.0} | {pages:.0} | {pause:.2} | {per} | {ratio} | {background:.0} |",
                if bg { "1 MiB" } else { "off" }
            )?;
        }
    }
    Ok(())
}

/// MB/s of `fill MIB` or `read MIB` over the kv service, best of two.
fn disk_rate(kv: &mut KvClient, verb: &str, mib: u32) -> f64 {
    (0..2)
        .map(|_| {
            let t = Instant::now();
            let reply = kv.ask(&format!("{verb} {mib}")).expect("the kv service answers");
            assert_eq!(reply, "ok", "{verb}: {reply}");
            f64::from(mib) * 1.048_576 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// `put`s per second (each written and flushed before its `ok`) over `secs`.
fn put_rate(kv: &mut KvClient, secs: f64) -> f64 {
    let t = Instant::now();
    let mut k = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        kv.put(&format!("bench{k}"), "a value of some forty bytes, give or take").expect("put");
        k += 1;
    }
    k as f64 / t.elapsed().as_secs_f64()
}

fn disk_table(args: &Args, r: &mut String) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    writeln!(r, "\n### The guest's disk throughput, with and without COLO\n")?;
    writeln!(
        r,
        "The `kv` service on a 64 MiB disk: `fill 64` / `read 64` (64 MiB written or read in \
         64 KiB requests, the client timing the round trip; best of two), and `put`s on one \
         connection for {}s (each record written and flushed before its `ok`); median of {} pairs. \
         COLO: periodic checkpoints every second, dirty RAM and blocks streamed in the background \
         from 1 MiB.\n",
        args.secs, args.repeat
    )?;
    writeln!(r, "| setup | write MB/s | read MB/s | puts/s | checkpoints | blocks/checkpoint (median) |")?;
    writeln!(r, "|:---|---:|---:|---:|---:|---:|")?;
    let mut base = (0.0, 0.0, 0.0);
    for colo in [false, true] {
        let mut rows = vec![];
        for _ in 0..args.repeat.max(1) {
            eprintln!("disk: COLO {colo}…");
            let images = TempDir::new("bench-disk");
            let mut net = disk_pair(&images, "app=kv");
            if colo {
                net.set_params(Side::Primary, &[("max-time", 1000), ("ram-background-limit", 1 << 20)]);
                net.start_colo();
            }
            let from = if colo { last_seq(&net) } else { 0 };
            let mut kv = KvClient::over(net.connect(9200));
            kv.set_timeout(Duration::from_secs(120));
            let write = disk_rate(&mut kv, "fill", 64);
            let read = disk_rate(&mut kv, "read", 64);
            let puts = put_rate(&mut kv, args.secs);
            let (cps, blocks) = if colo {
                let list = checkpoints_since(&net, from);
                let b = if list.is_empty() { 0.0 } else { median(list.iter().map(|c| n(&c["blocks"])).collect()) };
                (list.len() as f64, b)
            } else {
                (0.0, 0.0)
            };
            rows.push([write, read, puts, cps, blocks]);
        }
        let pick = |i: usize| median(rows.iter().map(|r| r[i]).collect());
        let (write, read, puts, cps, blocks) = (pick(0), pick(1), pick(2), pick(3), pick(4));
        if !colo {
            base = (write, read, puts);
        }
        let rel = |v: f64, b: f64| if colo && b > 0.0 { format!(" ({:.2}×)", v / b) } else { String::new() };
        writeln!(
            r,
            "| {} | {write:.1}{} | {read:.1}{} | {puts:.0}{} | {cps:.0} | {blocks:.0} |",
            if colo { "COLO" } else { "no COLO" },
            rel(write, base.0),
            rel(read, base.1),
            rel(puts, base.2)
        )?;
    }
    Ok(())
}
