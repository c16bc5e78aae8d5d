//! How long this machine takes its CPUs away from a thread that wants to run.
//!
//! One thread per CPU, pinned to it, reads the monotonic clock in a loop for `--secs` seconds;
//! every gap between two consecutive reads longer than `--min-us` is time the thread did not
//! run: an interrupt, another task, or — in a virtual machine — the hypervisor running
//! something else (steal time). With `--fifo` (root) the threads run SCHED_FIFO, so no
//! ordinary task of this machine can take their CPU: what is left is interrupts and the
//! hypervisor. RT throttling (`kernel.sched_rt_runtime_us`, by default 50 ms of every second)
//! still takes the CPU from them; with `--fifo`, gaps of 40 ms or more are counted apart as
//! that (and `--fifo` is refused where throttling is off: the machine would freeze).
//!
//! Why: a checkpoint's pause is a chain of thread hand-offs across the CPUs, and a few ms
//! taken from any of them stalls the whole pause. This measures how often that happens with
//! nothing of ours running (README, "Checkpoint pause against dirty pages").

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Measure how often and how long each CPU is taken away from a spinning thread")]
struct Args {
    /// How long to spin on each CPU.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Shortest gap counted, µs.
    #[arg(long, default_value_t = 200)]
    min_us: u64,
    /// Run the spinning threads SCHED_FIFO (needs root): only interrupts, RT throttling and
    /// the hypervisor can take their CPU then.
    #[arg(long)]
    fifo: bool,
}

/// Upper bounds of the gap buckets, ms (the last bucket is "at least the previous bound").
const BUCKETS_MS: [f64; 7] = [0.5, 1.0, 2.0, 4.0, 8.0, 40.0, f64::INFINITY];
/// Gaps this long under `--fifo` are RT throttling, not the machine.
const THROTTLE_MS: f64 = 40.0;

#[derive(Default, Clone)]
struct Gaps {
    counts: [u64; BUCKETS_MS.len()],
    /// Summed length of the counted gaps (under `--fifo`, those below the throttling bound).
    lost: Duration,
    longest: Duration,
}

impl Gaps {
    fn add(&mut self, gap: Duration, fifo: bool) {
        let ms = gap.as_secs_f64() * 1000.0;
        let i = BUCKETS_MS.iter().position(|&b| ms < b).unwrap_or(BUCKETS_MS.len() - 1);
        self.counts[i] += 1;
        if !fifo || ms < THROTTLE_MS {
            self.lost += gap;
            self.longest = self.longest.max(gap);
        }
    }
}

fn spin(cpu: usize, secs: f64, min: Duration, fifo: bool) -> Result<Gaps> {
    // SAFETY: plain libc calls on this thread with a zeroed, then filled, CPU set and a
    // sched_param that outlives them.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
        if fifo {
            let p = libc::sched_param { sched_priority: 1 };
            if libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) != 0 {
                bail!("SCHED_FIFO (needs root): {}", std::io::Error::last_os_error());
            }
        }
    }
    let mut gaps = Gaps::default();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut last = start;
    while last < end {
        let now = Instant::now();
        let gap = now - last;
        if gap >= min {
            gaps.add(gap, fifo);
        }
        last = now;
    }
    Ok(gaps)
}

/// Each CPU's steal time so far, ms (the `steal` column of /proc/stat), by CPU number.
fn steal_ms() -> Result<std::collections::HashMap<usize, u64>> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(stat
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let cpu = f.next()?.strip_prefix("cpu")?.parse::<usize>().ok()?;
            let steal = f.nth(7)?.parse::<u64>().ok()?;
            Some((cpu, steal * 1000 / hz))
        })
        .collect())
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: a zeroed CPU set filled by the kernel, read with the libc macros.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            bail!("reading this process's CPUs: {}", std::io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect())
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !(args.secs > 0.0 && args.secs <= 600.0) {
        bail!("--secs must be above 0 and at most 600");
    }
    if args.fifo {
        let runtime = std::fs::read_to_string("/proc/sys/kernel/sched_rt_runtime_us").unwrap_or_default();
        if runtime.trim() == "-1" {
            bail!("--fifo: RT throttling is off (kernel.sched_rt_runtime_us = -1), and spinning SCHED_FIFO threads on every CPU would freeze the machine");
        }
    }
    let cpus = allowed_cpus()?;
    let min = Duration::from_micros(args.min_us.max(1));
    let before = steal_ms()?;
    let results: Vec<Result<Gaps>> = std::thread::scope(|s| {
        let threads: Vec<_> = cpus.iter().map(|&cpu| s.spawn(move || spin(cpu, args.secs, min, args.fifo))).collect();
        threads.into_iter().map(|t| t.join().expect("a spinning thread panicked")).collect()
    });
    let after = steal_ms()?;
    let gaps = results.into_iter().collect::<Result<Vec<Gaps>>>()?;
    let policy = if args.fifo { "SCHED_FIFO" } else { "SCHED_OTHER" };
    println!("{} CPUs, {} s each, {policy}, gaps of at least {} µs", cpus.len(), args.secs, min.as_micros());
    let header: Vec<String> = BUCKETS_MS
        .iter()
        .scan(min.as_secs_f64() * 1000.0, |lo, &hi| {
            let label = if hi.is_finite() { format!("{lo}–{hi} ms") } else { format!("≥ {lo} ms") };
            *lo = hi;
            Some(label)
        })
        .collect();
    let lost = if args.fifo { format!("lost (below {THROTTLE_MS} ms)") } else { "lost".to_string() };
    println!("| CPU | {} | {lost} | longest | steal (/proc/stat) |", header.join(" | "));
    println!("|---:|{}---:|---:|---:|", "---:|".repeat(header.len()));
    for (&cpu, g) in cpus.iter().zip(gaps) {
        let counts: Vec<String> = g.counts.iter().map(u64::to_string).collect();
        let steal = after.get(&cpu).zip(before.get(&cpu)).map(|(a, b)| a.saturating_sub(*b)).unwrap_or(0);
        println!(
            "| {cpu} | {} | {:.2} % | {:.2} ms | {steal} ms |",
            counts.join(" | "),
            g.lost.as_secs_f64() / args.secs * 100.0,
            g.longest.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}
