//! Command-line options (QEMU colo-compare's names and defaults).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use colo_proxy::compare::{Config, Mode, DEFAULT_MAX_QUEUE_BYTES, MAX_TIMER_MS};
use colo_proxy::endpoint::Endpoint;

/// Options of the compare engine and its control, shared by `compare` and `run`.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// A frame held longer than this (ms, at most a day) causes a checkpoint request.
    #[arg(long, value_name = "MS", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMER_MS))]
    pub compare_timeout: u64,
    /// How often (ms, at most a day) held frames are checked against --compare-timeout.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMER_MS))]
    pub expired_scan_cycle: u64,
    /// Most frames held per flow and side; a full queue requests a checkpoint and makes the
    /// input wait (sockets) or drops the frame (interfaces).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_queue_size: u64,
    /// Most bytes of frames held for each VM, all flows together. Past it, as with a full
    /// queue: a checkpoint request, and the input waits (sockets) or the frame is dropped
    /// (interfaces).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_QUEUE_BYTES as u64, value_parser = clap::value_parser!(u64).range(1 << 16..=1 << 40))]
    pub max_queue_bytes: u64,
    /// Listen for controllers on this Unix socket (JSON lines, docs/control.md; mode 0600).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Write every miscompared frame of both sides, with its verdict, to this pcapng file.
    #[arg(long, value_name = "FILE.pcap")]
    pub capture: Option<PathBuf>,
    /// Initial mode: colo, passive, primary-only or secondary-only.
    #[arg(long, value_name = "MODE", default_value = "colo")]
    pub mode: Mode,
    /// Name of this NIC in control events (default: the uplink for `run`, "net0" for `compare`).
    #[arg(long, value_name = "NAME")]
    pub nic: Option<String>,
}

impl EngineArgs {
    /// The engine configuration.
    pub fn config(&self) -> Config {
        Config {
            compare_timeout: Duration::from_millis(self.compare_timeout),
            expired_scan_cycle: Duration::from_millis(self.expired_scan_cycle),
            max_queue_size: self.max_queue_size as usize,
            max_queue_bytes: usize::try_from(self.max_queue_bytes).unwrap_or(usize::MAX),
            ..Config::default()
        }
    }
}

/// `colo-proxy compare`.
#[derive(Args, Debug, Clone)]
#[command(after_help = "ENDPOINTS: unix:PATH (connect), unix:PATH,server (listen; accepts the next peer when \
one leaves), tcp:HOST:PORT, tcp:HOST:PORT,server. Client endpoints must be reachable at start and \
reconnect every second after their peer leaves.")]
pub struct CompareArgs {
    /// Frames the primary VM sent (QEMU: filter-mirror's outdev).
    #[arg(long, value_name = "EP")]
    pub primary_in: Endpoint,
    /// Frames the secondary VM sent (QEMU: filter-redirector's outdev).
    #[arg(long, value_name = "EP")]
    pub secondary_in: Endpoint,
    /// Where released primary frames go (QEMU: filter-redirector's indev).
    #[arg(long, value_name = "EP")]
    pub outdev: Endpoint,
    /// The notify_dev text protocol: DO_CHECKPOINT out, COLO_CHECKPOINT in (Xen-style COLO).
    #[arg(long, value_name = "EP")]
    pub notify_dev: Option<Endpoint>,
    /// Frames carry a virtio-net header length field (QEMU's vnet_hdr_support=on).
    #[arg(long)]
    pub vnet_hdr: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// `colo-proxy run`.
#[derive(Args, Debug, Clone)]
#[command(after_help = "Needs CAP_NET_RAW. Disable checksum and segmentation offloads on the VM-side \
interfaces' peers (ethtool -K IF tx off tso off gso off), so frames are complete and comparable.")]
pub struct RunArgs {
    /// Interface towards the clients: inbound frames are mirrored to both VMs, released
    /// primary frames leave here.
    #[arg(long, value_name = "IF")]
    pub uplink: String,
    /// Interface towards the primary VM (one host: both VMs behind this proxy).
    #[arg(long, value_name = "IF", required_unless_present = "vm", requires = "secondary", conflicts_with = "vm")]
    pub primary: Option<String>,
    /// Interface towards the secondary VM (one host).
    #[arg(long, value_name = "IF", requires = "primary", conflicts_with = "vm")]
    pub secondary: Option<String>,
    /// Two hosts: the interface towards this host's one VM, whose role (alone, primary,
    /// secondary) its colo-vmm sets on the control socket; until then nothing passes.
    #[arg(long, value_name = "IF")]
    pub vm: Option<String>,
    /// With --vm: where the frame link from the primary's proxy is accepted (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT", requires = "vm")]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// With --vm: the key shared by the hosts of this VM (at least 32 random bytes, mode 0600
    /// or 0400); frame links are then mutually authenticated and encrypted.
    #[arg(long, value_name = "FILE", requires = "vm")]
    pub link_key: Option<std::path::PathBuf>,
    /// With --vm: the VM's MAC, announced on the uplink when the VM takes over (RARP and
    /// gratuitous ARP). Default: learned from the VM's first frame.
    #[arg(long, value_name = "MAC", requires = "vm")]
    pub mac: Option<colo_proxy::wire::MacAddr>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Engine {
        #[command(flatten)]
        args: EngineArgs,
    }

    fn parse(args: &[&str]) -> Result<EngineArgs, clap::Error> {
        Engine::try_parse_from(std::iter::once("test").chain(args.iter().copied())).map(|e| e.args)
    }

    #[test]
    fn the_byte_budget_has_a_default_and_bounds() {
        assert_eq!(parse(&[]).unwrap().config().max_queue_bytes, 64 << 20);
        assert_eq!(parse(&["--max-queue-bytes", "1048576"]).unwrap().config().max_queue_bytes, 1 << 20);
        for bad in ["0", "65535", "1099511627777", "1M"] {
            assert!(parse(&["--max-queue-bytes", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn timer_options_are_bounded() {
        let day = MAX_TIMER_MS.to_string();
        let e = parse(&["--compare-timeout", &day, "--expired-scan-cycle", &day]).unwrap();
        assert_eq!(e.config().compare_timeout, std::time::Duration::from_secs(86_400));
        assert_eq!(e.config().expired_scan_cycle, std::time::Duration::from_secs(86_400));
        // Beyond 2^64 ns this once became a 0.45 ms scan.
        for opt in ["--compare-timeout", "--expired-scan-cycle"] {
            for bad in ["0", "86400001", "18446744073710"] {
                let e = parse(&[opt, bad]).unwrap_err().to_string();
                assert!(e.contains(opt) && e.contains(bad), "{opt} {bad}: {e}");
            }
        }
    }
}
