//! Scripted end-to-end measurements of colo-vmm with its reference guest on vhost-net-compare
//! (passthrough), printed as a markdown report:
//! - boot: process start to the guest's "net up" line;
//! - TCP echo round trips per second and guest→client TCP throughput through the backend;
//! - host CPU of an idle VM;
//! - live migration: downtime and total time against guest memory size and dirty rate, next
//!   to the local memory-copy budget;
//! - snapshot time.
//!
//! Run as root: `cargo run --release -p colo-tests --bin vmm-bench` (or scripts/bench-vmm.sh).

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use colo_tests::vm_topology::{cpu_time, prerequisites, VmNet, GUEST_MAC};
use colo_tests::{bin, wait_for_path, Proc};

/// colo-vmm end-to-end benchmarks.
#[derive(Parser, Debug)]
struct Args {
    /// Repeat each measurement this many times (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Guest memory sizes for the migration table, MiB.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    mem: Vec<u64>,
    /// Guest dirty rates for the migration table, pages per second.
    #[arg(long, value_delimiter = ',', default_value = "0,2000,10000")]
    dirty: Vec<u64>,
    /// Write the report here as well as to stdout.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn boot_ms() -> f64 {
    let t = Instant::now();
    let vm = VmNet::start("app=echo");
    vm.wait_serial("colo-guest: net up", Duration::from_secs(20));
    t.elapsed().as_secs_f64() * 1000.0
}

fn echo_rate(vm: &VmNet, secs: f64) -> f64 {
    let mut s = vm.connect(7);
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        s.write_all(&msg).unwrap();
        s.read_exact(&mut buf).unwrap();
        n += 1;
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn throughput_mb_s(vm: &VmNet, bytes: u64) -> f64 {
    let mut s = vm.connect(80);
    write!(s, "GET /bytes/{bytes} HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n").unwrap();
    let t = Instant::now();
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n as u64,
        }
    }
    assert!(got >= bytes, "short response: {got} of {bytes}");
    bytes as f64 / t.elapsed().as_secs_f64() / 1e6
}

fn idle_cpu_pct(vm: &VmNet) -> f64 {
    let pid = vm.vmm.as_ref().unwrap().pid();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_time(pid);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    (cpu_time(pid) - before).as_secs_f64() / t.elapsed().as_secs_f64() * 100.0
}

/// One migration of a guest with `mem` MiB dirtying `dirty` pages/s; returns the status JSON.
fn migrate_once(mem: u64, dirty: u64, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
    let app = if dirty > 0 { format!("app=echo,dirty dirty={dirty} dirty_mib=128") } else { "app=echo".into() };
    let mut vm = VmNet::start_with(&app, &["--mem", &mem.to_string()]);
    let uri = format!("unix:{}", vm.dir.path("mig.sock").display());
    let dst_api = vm.dir.path("dst-api.sock");
    let mut c = Command::new(bin("colo-vmm"));
    c.args(["run", "--incoming", &uri, "--serial", "none"])
        .arg("--net")
        .arg(format!("vhost-user={},mac={GUEST_MAC}", vm.vhost_socket.display()))
        .arg("--api")
        .arg(&dst_api);
    let mut dst = Proc::spawn("destination", c);
    wait_for_path(&vm.dir.path("mig.sock"), Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1)); // let the dirtying settle
    let uri_arg = format!("uri={uri}");
    let mut margs = vec![uri_arg.as_str()];
    margs.extend_from_slice(extra);
    let (ok, out) = vm.ctl("migrate", &margs);
    anyhow::ensure!(ok, "migration failed: {out}");
    let json_start = out.find('{').context("no JSON")?;
    let v: serde_json::Value = serde_json::from_str(&out[json_start..])?;
    vm.ctl("quit", &[]);
    vm.vmm.take();
    let _ = colo_tests::run(Command::new(bin("colo-vmm")).arg("ctl").arg("--api").arg(&dst_api).arg("quit"));
    dst.wait_timeout(Duration::from_secs(5));
    Ok(v)
}

fn snapshot_ms(mem: u64) -> anyhow::Result<(f64, u64)> {
    let vm = VmNet::start_with("app=echo,dirty dirty=20000 dirty_mib=64", &["--mem", &mem.to_string()]);
    std::thread::sleep(Duration::from_secs(4)); // 64 MiB of written pages
    let path = vm.dir.path("bench.snap");
    let t = Instant::now();
    let (ok, out) = vm.ctl("snapshot", &[&format!("path={}", path.display())]);
    anyhow::ensure!(ok, "snapshot failed: {out}");
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    Ok((ms, std::fs::metadata(&path)?.len()))
}

/// The local memory-copy budget: microseconds to copy one random 4 KiB page.
fn copy_budget_us() -> f64 {
    let src = vec![1u8; 256 << 20];
    let mut dst = vec![0u8; 4096];
    let pages = src.len() / 4096;
    let t = Instant::now();
    let mut x = 12345usize;
    for _ in 0..100_000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let p = (x >> 17) % pages;
        dst.copy_from_slice(&src[p * 4096..(p + 1) * 4096]);
        std::hint::black_box(&dst);
    }
    t.elapsed().as_secs_f64() * 1e6 / 100_000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    prerequisites().map_err(|w| anyhow::anyhow!("vmm-bench {w}"))?;
    let mut r = String::new();
    use std::fmt::Write as _;
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    writeln!(r, "### colo-vmm with the reference guest (vhost-net-compare passthrough)\n")?;
    writeln!(r, "- Machine: {cpus} CPUs, nested KVM (PVM); median of {} runs\n", args.repeat)?;

    eprintln!("boot…");
    let boot = median((0..args.repeat).map(|_| boot_ms()).collect());
    let vm = VmNet::start("app=echo,http");
    eprintln!("echo, throughput, idle…");
    let echo = median((0..args.repeat).map(|_| echo_rate(&vm, 2.0)).collect());
    let tput = median((0..args.repeat).map(|_| throughput_mb_s(&vm, 64 << 20)).collect());
    let idle = idle_cpu_pct(&vm);
    drop(vm);
    writeln!(r, "| measurement | result |\n|---|---:|")?;
    writeln!(r, "| process start to guest \"net up\" | {boot:.0} ms |")?;
    writeln!(r, "| TCP echo round trips (64 B, one connection) | {echo:.0} /s |")?;
    writeln!(r, "| guest→client TCP throughput (HTTP, 64 MiB) | {tput:.0} MB/s |")?;
    writeln!(r, "| host CPU of an idle VM (5 s) | {idle:.2} % |\n")?;

    let budget = copy_budget_us();
    writeln!(r, "Live migration (Unix socket on one host; downtime = pause on the source to running on the destination; default parameters, downtime-limit 300 ms):\n")?;
    writeln!(r, "| memory | dirty pages/s | rounds | pages sent | total time | last-round pages | downtime | copy budget for those pages |")?;
    writeln!(r, "|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for &mem in &args.mem {
        for &dirty in &args.dirty {
            eprintln!("migration {mem} MiB, dirty {dirty}/s…");
            let runs: Vec<serde_json::Value> =
                (0..args.repeat).map(|_| migrate_once(mem, dirty, &[])).collect::<Result<_, _>>()?;
            let get = |k: &str| median(runs.iter().map(|v| v[k].as_f64().unwrap_or(0.0)).collect());
            writeln!(
                r,
                "| {mem} MiB | {dirty} | {:.0} | {:.0} | {:.0} ms | {:.0} | {:.0} ms | {:.1} ms |",
                get("rounds"),
                get("pages-sent"),
                get("total-time-ms"),
                get("final-pages"),
                get("downtime-ms"),
                get("final-pages") * budget / 1000.0
            )?;
        }
    }
    // Downtime against the number of dirty pages at the pause: no pre-copy rounds after the
    // first, so the last round carries whatever the guest dirtied meanwhile.
    writeln!(r, "\nDowntime against the pages left dirty at the pause (256 MiB guest, max-rounds=0):\n")?;
    writeln!(r, "| dirty pages/s | last-round pages | downtime | copy budget for those pages | downtime per page |")?;
    writeln!(r, "|---:|---:|---:|---:|---:|")?;
    for dirty in [1000u64, 10_000, 40_000, 100_000] {
        eprintln!("downtime, dirty {dirty}/s…");
        let runs: Vec<serde_json::Value> = (0..args.repeat)
            .map(|_| migrate_once(256, dirty, &["max-rounds=0", "downtime-limit=0"]))
            .collect::<Result<_, _>>()?;
        let get = |k: &str| median(runs.iter().map(|v| v[k].as_f64().unwrap_or(0.0)).collect());
        let (pages, down) = (get("final-pages"), get("downtime-ms"));
        writeln!(
            r,
            "| {dirty} | {pages:.0} | {down:.0} ms | {:.1} ms | {:.1} µs |",
            pages * budget / 1000.0,
            down * 1000.0 / pages.max(1.0)
        )?;
    }
    writeln!(r, "\nLocal memory-copy budget measured here: {budget:.2} µs per random 4 KiB page.\n")?;
    eprintln!("snapshot…");
    let (snap, bytes) = snapshot_ms(256)?;
    writeln!(r, "Snapshot of a 256 MiB guest with 64 MiB written: {snap:.0} ms, {} MiB file.", bytes >> 20)?;
    print!("{r}");
    if let Some(p) = args.out {
        std::fs::write(p, &r)?;
    }
    Ok(())
}
