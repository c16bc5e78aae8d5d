//! The arbiter demo (`scripts/demo.sh --hosts 3`): continuous protection across three hosts.
//!
//! Three hosts (network namespaces on a LAN switch and a replication network), etcd on a
//! witness host as the arbiter, vhost-net-compare and colo-vmm on each host, every link keyed.
//! Host a boots the reference guest, host b waits for COLO, host c waits as a registered
//! standby. One counter session runs from the first phase to the last:
//!
//! 1. **colo** — COLO from a to b;
//! 2. **a dies** — every process of host a killed, its links down: b waits for a's lease in
//!    the arbiter, takes the key, takes over and announces the VM, then protects itself again
//!    by itself with the standby on c;
//! 3. **partition** — the replication link between b and c is cut while both reach etcd: b
//!    keeps the key and serves, c never serves (nothing from the VM's MAC on its switch port)
//!    and its colo-vmm exits with status 75 (superseded); healed, c's colo-vmm starts again as
//!    a standby and b protects itself with it by itself again;
//! 4. **b dies** — c takes over;
//! 5. **counter** — every value consecutive on the one session; the gap of each failover.
//!
//! A watch records every role change of the three replicas; the timeline, a summary and the
//! checks go to stdout, the timeline also to an SVG. Exit status 0 only if every check passed.
//!
//! Run as root: `cargo build --workspace --bins && target/debug/arbiter-demo`

mod outcome;
mod story;
mod svg;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::Context;
use clap::Parser;
use colo_tests::interrupt;

/// COLO across three hosts with an etcd arbiter (needs root, /dev/kvm, etcd, nft, tcpdump).
///
/// COLO a→b; host a dies: b takes over once a's lease expired, then protects itself again with
/// the standby on c by itself; a partition between b and c is shown to be harmless (b serves,
/// c never does, c's colo-vmm exits 75 and comes back as a standby); host b dies: c takes over.
/// One counter session throughout. Prints the timeline of every role change and a summary,
/// writes the timeline as an SVG, and exits non-zero if a check failed.
#[derive(Parser, Debug)]
#[command(name = "arbiter-demo", args_override_self = true)]
pub struct Args {
    /// Seconds the pair runs in COLO before each failure (and after each re-protection).
    #[arg(long, default_value_t = 3.0, value_name = "SECS")]
    pub steady_secs: f64,
    /// Seconds the partition holds after host c's colo-vmm gave up.
    #[arg(long, default_value_t = 3.0, value_name = "SECS")]
    pub partition_secs: f64,
    /// Seconds the counter goes on with host c after host b died.
    #[arg(long, default_value_t = 4.0, value_name = "SECS")]
    pub after_secs: f64,
    /// Where to write the timeline.
    #[arg(long, default_value = "arbiter-demo.svg", value_name = "PATH")]
    pub svg: PathBuf,
    /// Also write a machine-readable summary (JSON) here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Write every process's log (the VMMs, the backends, etcd) here at the end.
    #[arg(long, value_name = "PATH")]
    pub logs: Option<PathBuf>,
}

/// The first panic's message: a step of the harness that could not go on (it is reported as a
/// failed check; the hook prints only its head, the full logs go to --logs).
static PANIC: Mutex<Option<String>> = Mutex::new(None);

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = match (info.payload().downcast_ref::<&str>(), info.payload().downcast_ref::<String>()) {
            (Some(s), _) => s.to_string(),
            (_, Some(s)) => s.clone(),
            _ => "a panic".to_string(),
        };
        let head: Vec<&str> = msg.lines().take(12).collect();
        eprintln!("arbiter-demo: {}{}", head.join("\n  "), if msg.lines().count() > 12 { "\n  ..." } else { "" });
        PANIC.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(msg);
    }));
}

/// The first line of the panic caught last, for a failed check.
pub fn panic_message() -> String {
    let p = PANIC.lock().unwrap_or_else(|p| p.into_inner()).take();
    p.map(|m| m.lines().next().unwrap_or("").to_string()).unwrap_or_else(|| "a panic".into())
}

fn prerequisites() -> Result<(), String> {
    colo_tests::colo_hosts::prerequisites()?;
    for (tool, package) in [("etcd", "etcd-server"), ("nft", "nftables"), ("tcpdump", "tcpdump")] {
        if !colo_tests::have(tool) {
            return Err(format!("needs {tool} (apt-get install {package})"));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !colo_tests::is_root() {
        eprintln!("arbiter-demo: needs root (network namespaces, taps, KVM); run it with sudo");
        return ExitCode::from(2);
    }
    if let Err(why) = prerequisites() {
        eprintln!("arbiter-demo: this machine cannot run the demo: it {why}");
        return ExitCode::from(2);
    }
    interrupt::install();
    install_panic_hook();
    let o = match story::run(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("arbiter-demo: {e:#}");
            return ExitCode::from(if interrupt::interrupted() { 130 } else { 1 });
        }
    };
    let (text, json) = outcome::summary(&o, &args);
    print!("{text}");
    let mut outputs = vec![(args.svg.as_path(), "timeline", svg::timeline(&o).context("drawing it"))];
    if let Some(p) = &args.json {
        outputs.push((p, "JSON summary", Ok(format!("{json:#}\n"))));
    }
    if let Some(p) = &args.logs {
        outputs.push((p, "logs", Ok(o.logs.clone())));
    }
    let written = colo_tests::write_outputs("arbiter-demo", outputs);
    if interrupt::interrupted() {
        return ExitCode::from(130);
    }
    if !o.passed() {
        if args.logs.is_none() {
            eprintln!("arbiter-demo: rerun with --logs FILE to keep every process's log");
        }
        return ExitCode::from(1);
    }
    if !written {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
