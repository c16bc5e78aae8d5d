//! The chaos soak (see `colo_tests::soak`): a COLO pair across two hosts under traffic, a random
//! fault every few seconds, every invariant checked; prints a round per line on stderr and the
//! report (markdown) on stdout. Exits 1 on any invariant violation.
//!
//! Run as root: `cargo run --release -p colo-tests --bin colo-soak -- --minutes 30`.

use std::time::Duration;

use clap::Parser;
use colo_tests::colo_hosts::{prerequisites, HostBackend};
use colo_tests::soak::{run, Options};

/// The chaos soak.
#[derive(Parser, Debug)]
struct Args {
    /// Minutes to run at most.
    #[arg(long, default_value_t = 1.0)]
    minutes: f64,
    /// Faults to inject at most.
    #[arg(long)]
    rounds: Option<usize>,
    /// Seed of the fault choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// colo-proxy as each host's backend instead of vhost-net-compare.
    #[arg(long)]
    colo_proxy: bool,
    /// Let checkpoint-link cuts outlast the heartbeat timeout (a partition: both hosts live,
    /// each takes the other for dead; only an arbiter can decide).
    #[arg(long)]
    partitions: bool,
    /// Only these kinds of faults: kill, freeze, host-death, cut, netem, flood.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Longest SIGSTOP of a process, ms.
    #[arg(long, default_value_t = 3000)]
    max_freeze_ms: u64,
    /// Write the report here as well.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Keep every process's log at each failover in this directory (round-N.log).
    #[arg(long)]
    logs: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    prerequisites().map_err(|e| anyhow::anyhow!("colo-soak cannot run here: {e}"))?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
    });
    let opts = Options {
        rounds: args.rounds.unwrap_or(usize::MAX),
        duration: Duration::from_secs_f64(args.minutes * 60.0),
        seed,
        backend: if args.colo_proxy { HostBackend::ColoProxy } else { HostBackend::VhostNetCompare },
        partitions: args.partitions,
        only: args.only,
        max_freeze_ms: args.max_freeze_ms,
        logs: args.logs,
        ..Options::default()
    };
    let report = run(&opts, |line| eprintln!("{line}"));
    let md = report.markdown();
    print!("{md}");
    if let Some(path) = &args.out {
        std::fs::write(path, &md)?;
    }
    if !report.violations.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
