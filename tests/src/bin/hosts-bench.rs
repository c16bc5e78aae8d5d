//! COLO across two hosts (network namespaces on one machine), measured and printed as a
//! markdown report:
//! - the replication network's raw TCP throughput (iperf3 between the hosts' namespaces) and the
//!   local memory-copy budget, beside the checkpoint pause against dirty pages, with and
//!   without `--link-key`;
//! - the round-trip time a client sees through COLO on one host and across two (what the frame
//!   link adds), with the unprotected VM as the floor;
//! - the client-visible failover gap when the primary's host dies (no reset ever arrives) and
//!   when it freezes.
//!
//! Run as root: `scripts/bench-hosts.sh` (release build).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use clap::Parser;
use colo_tests::checkpoint_steps::{cells, header, median_steps, step_times, StepTimes, STEPS};
use colo_tests::colo_hosts::{ColoHosts, HostBackend};
use colo_tests::colo_topology::{Backend, ColoNet, CounterClient};
use colo_tests::hosts::Lan;
use serde_json::Value;

/// Two-host COLO benchmarks.
#[derive(Parser, Debug)]
struct Args {
    /// Seconds each pause measurement runs (one checkpoint per second).
    #[arg(long, default_value_t = 6.0)]
    secs: f64,
    /// Guest dirty rates for the pause table, pages per second.
    #[arg(long, value_delimiter = ',', default_value = "0,1000,5000,20000")]
    dirty: Vec<u64>,
    /// Round trips per latency measurement.
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// Repeat each failover this many times (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Run only these parts (iperf, pause, latency, failover); default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Write the report here as well as to stdout.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

impl Args {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn n(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// Seconds per 4 KiB page copied in memory here.
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

/// iperf3 from host a to host b on the replication network: Gbit/s.
fn iperf(secs: u64) -> anyhow::Result<f64> {
    let lan = Lan::new(2);
    let (a, b) = (lan.host(0), lan.host(1));
    let mut server = b.ns.spawn("iperf3-server", "iperf3", &["-s", "-1", "-B", &b.repl_ip, "--logfile", "/dev/null"]);
    std::thread::sleep(Duration::from_millis(500));
    let out = a.ns.exec(&["iperf3", "-c", &b.repl_ip, "-t", &secs.to_string(), "-J"]);
    server.wait_timeout(Duration::from_secs(5));
    let v: Value = serde_json::from_str(&out)?;
    Ok(n(&v["end"]["sum_received"]["bits_per_second"]) / 1e9)
}

/// A pause row: medians of pages and pause per checkpoint and of each step of the transaction.
struct PauseRow {
    pages: f64,
    pause: f64,
    steps: StepTimes,
}

/// Median pause, pages and step times per checkpoint, across two hosts, with the guest
/// dirtying `rate` pages per second.
fn pause_row(rate: u64, keyed: bool, secs: f64) -> PauseRow {
    let app =
        if rate == 0 { "app=counter".to_string() } else { format!("app=counter,dirty dirty={rate} dirty_mib=128") };
    let net = ColoHosts::start(HostBackend::VhostNetCompare, 2, &app, keyed);
    net.set_params(0, &[("max-time", 1000), ("ram-background-limit", 0)]);
    net.start_colo(0, 1);
    std::thread::sleep(Duration::from_millis(1500));
    let from = n(&net.status(0)["checkpoints"]["total"]);
    std::thread::sleep(Duration::from_secs_f64(secs));
    let recent = net.status(0)["recent"].as_array().cloned().unwrap_or_default();
    let cps: Vec<&Value> = recent.iter().filter(|c| n(&c["seq"]) > from).collect();
    let pauses = cps.iter().map(|c| n(&c["pause-ms"])).collect();
    let pages = cps.iter().map(|c| n(&c["pages"])).collect();
    let steps = median_steps(&step_times(&net.log(0), from as u64));
    PauseRow { pages: median(pages), pause: median(pauses), steps }
}

/// TCP echo round trips (64 bytes) from the client: their times in µs.
fn round_trips(mut s: std::net::TcpStream, count: usize) -> Vec<f64> {
    let msg = [b'x'; 63].iter().copied().chain(std::iter::once(b'\n')).collect::<Vec<u8>>();
    let mut back = vec![0u8; msg.len()];
    // Warm up.
    for _ in 0..50 {
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
    }
    (0..count)
        .map(|_| {
            let t = Instant::now();
            s.write_all(&msg).unwrap();
            s.read_exact(&mut back).unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

/// The gap a counter client (an increment every 5 ms) sees when host a dies or freezes.
fn failover_gap(freeze: bool) -> f64 {
    let mut net = ColoHosts::start(HostBackend::VhostNetCompare, 2, "app=counter", true);
    net.start_colo(0, 1);
    let mut c = CounterClient::over(net.connect(9000));
    let mut last = Instant::now();
    for _ in 0..100 {
        c.inc().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    if freeze {
        net.signal_host(0, libc::SIGSTOP);
    } else {
        net.kill_host(0);
    }
    let mut gap = Duration::ZERO;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        c.inc().unwrap_or_else(|e| panic!("{e}\n{}", net.logs()));
        gap = gap.max(last.elapsed());
        last = Instant::now();
        std::thread::sleep(Duration::from_millis(5));
    }
    gap.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Err(why) = colo_tests::colo_hosts::prerequisites() {
        anyhow::bail!("cannot run: {why}");
    }
    let mut r = String::new();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    r.push_str(&format!(
        "- Machine: {cpus} CPUs, nested KVM; hosts are network namespaces on one machine (LAN and replication network are Linux bridges)\n"
    ));
    let budget = copy_budget_per_page();
    r.push_str(&format!("- Local memory-copy budget: {:.2} µs per 4 KiB page\n", budget * 1e6));
    let mut iperf_mbs = None;
    if args.wants("iperf") {
        eprintln!("iperf3 across the replication network...");
        let gbps = iperf(5)?;
        iperf_mbs = Some(gbps * 1e9 / 8e6);
        r.push_str(&format!(
            "- Replication network, raw TCP (iperf3, 5 s): {gbps:.2} Gbit/s = {:.0} MB/s\n",
            gbps * 1e9 / 8e6
        ));
    }
    if args.wants("pause") {
        r.push_str("\n#### Checkpoint pause against dirty pages, across two hosts\n\n");
        r.push_str(
            "One checkpoint per second (`max-time=1000`), no background transfer; medians. The stream \
             column is the pages' bytes over the `pages` step alone (reading the dirty pages into \
             the link until the secondary took them), against iperf3's throughput above.\n\n",
        );
        r.push_str("| dirty pages/s | link | pages/checkpoint | pause ms | µs/page beyond idle | vs copy budget | MB/s beyond idle | stream MB/s (pages step) | vs iperf3 |\n");
        r.push_str("|---:|:---|---:|---:|---:|---:|---:|---:|---:|\n");
        let mut step_rows = vec![];
        for keyed in [false, true] {
            let mut idle = None;
            for &rate in &args.dirty {
                eprintln!("pause: {rate} pages/s, keyed {keyed}...");
                let PauseRow { pages, pause, steps } = pause_row(rate, keyed, args.secs);
                let idle_pause = *idle.get_or_insert(pause);
                let extra = (pause - idle_pause).max(0.0);
                let (per_page, ratio, mbs) = if rate == 0 || pages < 1.0 {
                    ("–".into(), "–".into(), "–".into())
                } else {
                    let pp = extra * 1000.0 / pages;
                    (
                        format!("{pp:.2}"),
                        format!("{:.1}×", pp / (budget * 1e6)),
                        format!("{:.0}", pages * 4096.0 / (extra / 1000.0) / 1e6),
                    )
                };
                let (stream, vs) = match steps[2] {
                    Some(ms) if rate > 0 && ms > 0.0 => {
                        let mbs = pages * 4096.0 / (ms / 1000.0) / 1e6;
                        let vs = iperf_mbs.map_or("–".into(), |i| format!("{:.0} %", mbs / i * 100.0));
                        (format!("{mbs:.0}"), vs)
                    }
                    _ => ("–".into(), "–".into()),
                };
                let link = if keyed { "Noise (AES-GCM)" } else { "plain" };
                r.push_str(&format!(
                    "| {rate} | {link} | {pages:.0} | {pause:.2} | {per_page} | {ratio} | {mbs} | {stream} | {vs} |\n"
                ));
                step_rows.push((format!("{rate} pages/s, {link}"), pause, steps));
            }
        }
        r.push_str("\nThe median of each step of the same checkpoints, ms, as the primary logs them:\n\n");
        r.push_str(&format!("| checkpoints | whole pause | {} |\n", header()));
        r.push_str(&format!("|:---|---:|{}\n", "---:|".repeat(STEPS.len())));
        for (name, pause, steps) in step_rows {
            r.push_str(&format!("| {name} | {pause:.2} | {} |\n", cells(&steps)));
        }
    }
    if args.wants("latency") {
        r.push_str("\n#### Round trips through COLO: one host and across two\n\n");
        r.push_str(&format!("{} TCP echo round trips of 64 bytes on one connection (COLO mode, deterministic: no checkpoint but the periodic).\n\n", args.round_trips));
        r.push_str("| path | p50 µs | p99 µs | vs one host (p50) |\n|:---|---:|---:|---:|\n");
        eprintln!("latency: unprotected...");
        let single = ColoNet::start(Backend::VhostNetCompare, "app=echo", &[]);
        let base = round_trips(single.connect(7), args.round_trips);
        let mut single = single;
        single.start_colo();
        eprintln!("latency: COLO on one host...");
        let one = round_trips(single.connect(7), args.round_trips);
        drop(single);
        eprintln!("latency: COLO across two hosts...");
        let hosts = ColoHosts::start(HostBackend::VhostNetCompare, 2, "app=echo", true);
        hosts.start_colo(0, 1);
        let two = round_trips(hosts.connect(7), args.round_trips);
        drop(hosts);
        let one_p50 = percentile(one.clone(), 0.5);
        for (name, v) in
            [("unprotected (one VM)", base), ("COLO, one host", one), ("COLO, two hosts (keyed links)", two)]
        {
            let (p50, p99) = (percentile(v.clone(), 0.5), percentile(v, 0.99));
            r.push_str(&format!("| {name} | {p50:.0} | {p99:.0} | {:.2}× |\n", p50 / one_p50));
        }
    }
    if args.wants("failover") {
        r.push_str("\n#### Failover gap across two hosts\n\n");
        r.push_str(&format!("The longest silence seen by a counter client (an `inc` every 5 ms) when host a dies (processes killed, links down: no reset arrives) or freezes (SIGSTOP); heartbeat timeout 1000 ms; median of {}.\n\n", args.repeat));
        r.push_str("| host a | gap ms (median) | all runs |\n|:---|---:|:---|\n");
        for (name, freeze) in [("dies", false), ("freezes", true)] {
            let runs: Vec<f64> = (0..args.repeat)
                .map(|i| {
                    eprintln!("failover: host a {name}, run {}...", i + 1);
                    failover_gap(freeze)
                })
                .collect();
            let all: Vec<String> = runs.iter().map(|g| format!("{g:.0}")).collect();
            r.push_str(&format!("| {name} | {:.0} | {} |\n", median(runs.clone()), all.join(", ")));
        }
    }
    println!("{r}");
    if let Some(out) = &args.out {
        std::fs::write(out, &r)?;
    }
    Ok(())
}
