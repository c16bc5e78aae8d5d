//! The faults the soak injects, and how each is injected into a pair across hosts.

use std::time::Duration;

use crate::colo_hosts::{ColoHosts, CHECKPOINT_PORT};
use crate::soak::watch::flood;

/// Which process of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The VM's colo-vmm.
    Vmm,
    /// The host's backend number `n` (vhost-net-compare; with colo-proxy backends, 0 is the
    /// passthrough vhost-net-compare and 1 colo-proxy).
    Backend(usize),
}

/// Where a flood of bad lines goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloodTarget {
    /// The backend's control socket (spec/control.md).
    Control,
    /// colo-vmm's API socket.
    Api,
}

/// One fault.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// `kill -9` of one process.
    Kill { host: usize, target: Target },
    /// SIGSTOP of one process, SIGCONT after `ms`.
    Freeze { host: usize, target: Target, ms: u64 },
    /// Every process of a host killed and its links down (its power fails).
    HostDeath { host: usize },
    /// The checkpoint link's packets dropped in a host for `ms`.
    CutCheckpointLink { host: usize, ms: u64 },
    /// Loss and delay on a host's replication link for `ms`: `tc netem` where the kernel has
    /// it; otherwise random drops (nftables `numgen`) and a slow link (`tbf`, whose queue adds
    /// the delay).
    Netem { host: usize, loss_pct: f64, delay_ms: u64, jitter_ms: u64, ms: u64 },
    /// Bad lines written without reading the replies for `ms`.
    Flood { host: usize, to: FloodTarget, ms: u64 },
}

/// Names of the hosts.
pub fn host_name(i: usize) -> char {
    (b'a' + i as u8) as char
}

impl Fault {
    /// The kind, for the counts in the report.
    pub fn kind(&self) -> String {
        match self {
            Fault::Kill { target, .. } => format!("kill -9 {}", target_name(*target)),
            Fault::Freeze { target, .. } => format!("SIGSTOP/SIGCONT {}", target_name(*target)),
            Fault::HostDeath { .. } => "host death".into(),
            Fault::CutCheckpointLink { .. } => "cut checkpoint link".into(),
            Fault::Netem { .. } => "loss and delay on the replication link".into(),
            Fault::Flood { to: FloodTarget::Control, .. } => "flood of bad control lines".into(),
            Fault::Flood { to: FloodTarget::Api, .. } => "flood of bad API lines".into(),
        }
    }

    /// The host it hits.
    pub fn host(&self) -> usize {
        match *self {
            Fault::Kill { host, .. }
            | Fault::Freeze { host, .. }
            | Fault::HostDeath { host }
            | Fault::CutCheckpointLink { host, .. }
            | Fault::Netem { host, .. }
            | Fault::Flood { host, .. } => host,
        }
    }

    /// A short name of the kind, for choosing kinds (`--only`): `kill`, `freeze`, `host-death`,
    /// `cut`, `netem`, `flood`.
    pub fn short(&self) -> &'static str {
        match self {
            Fault::Kill { .. } => "kill",
            Fault::Freeze { .. } => "freeze",
            Fault::HostDeath { .. } => "host-death",
            Fault::CutCheckpointLink { .. } => "cut",
            Fault::Netem { .. } => "netem",
            Fault::Flood { .. } => "flood",
        }
    }

    /// Draws a fault for the pair (`primary`'s host serves). `partitions`: checkpoint-link cuts
    /// may outlast the heartbeat timeout (a partition, which needs the arbiter); freezes last
    /// at most `max_freeze_ms`.
    pub fn draw(
        rng: &mut fastrand::Rng,
        primary: usize,
        backends: usize,
        partitions: bool,
        max_freeze_ms: u64,
    ) -> Fault {
        let host = if rng.bool() { primary } else { 1 - primary };
        let target = if rng.u8(..3) == 0 { Target::Vmm } else { Target::Backend(rng.usize(..backends)) };
        match rng.u32(..100) {
            0..=19 => Fault::Kill { host, target },
            20..=44 => Fault::Freeze { host, target, ms: rng.u64(100..max_freeze_ms.max(101)) },
            45..=51 => Fault::HostDeath { host },
            52..=66 => Fault::CutCheckpointLink {
                host,
                ms: if partitions && rng.bool() { rng.u64(1500..4000) } else { rng.u64(50..250) },
            },
            67..=81 => Fault::Netem {
                host,
                loss_pct: f64::from(rng.u32(..30)) / 10.0,
                delay_ms: rng.u64(..30),
                jitter_ms: rng.u64(..10),
                ms: rng.u64(2000..6000),
            },
            _ => Fault::Flood {
                host,
                to: if rng.u8(..4) == 0 { FloodTarget::Api } else { FloodTarget::Control },
                ms: rng.u64(1000..4000),
            },
        }
    }

    /// Injects it (waiting out its duration: a frozen process is continued, a cut link
    /// restored) and says what was done.
    pub fn inject(&self, net: &mut ColoHosts, roles: [&str; 2]) -> String {
        let on = |h: usize| format!("host {} ({})", host_name(h), roles[h]);
        match *self {
            Fault::Kill { host, target } => {
                if let Some(p) = process(net, host, target) {
                    p.signal(libc::SIGKILL);
                    p.wait_timeout(Duration::from_secs(5));
                }
                format!("kill -9 {} on {}", target_name(target), on(host))
            }
            Fault::Freeze { host, target, ms } => {
                if let Some(p) = process(net, host, target) {
                    p.signal(libc::SIGSTOP);
                    std::thread::sleep(Duration::from_millis(ms));
                    p.signal(libc::SIGCONT);
                }
                format!("SIGSTOP {} on {} for {ms} ms", target_name(target), on(host))
            }
            Fault::HostDeath { host } => {
                net.kill_host(host);
                format!("{} dies (every process killed, links down)", on(host))
            }
            Fault::CutCheckpointLink { host, ms } => {
                let ns = &net.lan.host(host).ns;
                ns.exec(&["nft", "add table inet colosoak"]);
                ns.exec(&["nft", "add chain inet colosoak out { type filter hook output priority 0 ; }"]);
                ns.exec(&["nft", "add chain inet colosoak in { type filter hook input priority 0 ; }"]);
                for chain in ["out", "in"] {
                    for port in ["dport", "sport"] {
                        ns.exec(&["nft", &format!("add rule inet colosoak {chain} tcp {port} {CHECKPOINT_PORT} drop")]);
                    }
                }
                std::thread::sleep(Duration::from_millis(ms));
                ns.exec(&["nft", "delete table inet colosoak"]);
                format!("checkpoint link cut on {} for {ms} ms", on(host))
            }
            Fault::Netem { host, loss_pct, delay_ms, jitter_ms, ms } => {
                let ns = &net.lan.host(host).ns;
                let (delay, jitter, loss) = (format!("{delay_ms}ms"), format!("{jitter_ms}ms"), format!("{loss_pct}%"));
                let netem =
                    ["tc", "qdisc", "add", "dev", "rep0", "root", "netem", "delay", &delay, &jitter, "loss", &loss];
                if ns.try_exec(&netem).0 {
                    std::thread::sleep(Duration::from_millis(ms));
                    ns.exec(&["tc", "qdisc", "del", "dev", "rep0", "root"]);
                    return format!(
                        "{loss_pct}% loss, {delay_ms}±{jitter_ms} ms delay (netem) on {}'s replication link for {ms} ms",
                        on(host)
                    );
                }
                // No netem in this kernel: drop packets at random, and queue them behind a slow
                // link (50 Mbit/s; its queue holds up to `delay_ms` + 20 ms).
                let per_mille = (loss_pct * 10.0) as u32;
                let latency = format!("{}ms", delay_ms + 20);
                ns.exec(&[
                    "tc", "qdisc", "add", "dev", "rep0", "root", "tbf", "rate", "50mbit", "burst", "64kb", "latency",
                    &latency,
                ]);
                ns.exec(&["nft", "add table inet colosoakloss"]);
                ns.exec(&["nft", "add chain inet colosoakloss out { type filter hook output priority 0 ; }"]);
                ns.exec(&["nft", "add chain inet colosoakloss in { type filter hook input priority 0 ; }"]);
                ns.exec(&[
                    "nft",
                    &format!("add rule inet colosoakloss out oifname rep0 numgen random mod 1000 < {per_mille} drop"),
                ]);
                ns.exec(&[
                    "nft",
                    &format!("add rule inet colosoakloss in iifname rep0 numgen random mod 1000 < {per_mille} drop"),
                ]);
                std::thread::sleep(Duration::from_millis(ms));
                ns.exec(&["nft", "delete table inet colosoakloss"]);
                ns.exec(&["tc", "qdisc", "del", "dev", "rep0", "root"]);
                format!(
                    "{loss_pct}% loss (nft) and a 50 Mbit/s link queueing up to {latency} (tbf) on {}'s replication link for {ms} ms",
                    on(host)
                )
            }
            Fault::Flood { host, to, ms } => {
                let path = match to {
                    FloodTarget::Control => net.on[host].control.clone(),
                    FloodTarget::Api => net.on[host].api.clone(),
                };
                let lines = flood(&path, Duration::from_millis(ms));
                let what = if to == FloodTarget::Control { "the backend's control socket" } else { "colo-vmm's API" };
                format!("{lines} bad lines in {ms} ms to {what} on {}", on(host))
            }
        }
    }
}

fn target_name(t: Target) -> &'static str {
    match t {
        Target::Vmm => "colo-vmm",
        Target::Backend(_) => "backend",
    }
}

fn process(net: &mut ColoHosts, host: usize, target: Target) -> Option<&mut crate::Proc> {
    let on = &mut net.on[host];
    match target {
        Target::Vmm => on.vmm.as_mut(),
        Target::Backend(n) => on.backends.get_mut(n),
    }
}
