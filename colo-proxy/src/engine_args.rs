//! The compare engine's command-line options, shared by every program that runs the engine:
//! `colo-proxy compare`, `colo-proxy run` and vhost-net-compare (QEMU colo-compare's names and
//! defaults).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::compare::{Config, Mode, DEFAULT_MAX_QUEUE_BYTES, MAX_TIMER_MS};

/// Options of the compare engine, its control socket and its capture.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// A frame held longer than this (ms, at most a day) causes a checkpoint request.
    #[arg(long, value_name = "MS", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMER_MS))]
    pub compare_timeout: u64,
    /// How often (ms, at most a day) held frames are checked against --compare-timeout.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMER_MS))]
    pub expired_scan_cycle: u64,
    /// Most frames held per flow and side. A full queue requests a checkpoint and holds the
    /// input back (a socket waits, a guest's TX descriptors stay on its ring) or, on an
    /// interface, drops the frame.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_queue_size: u64,
    /// Most bytes of frames held for each VM, all flows together. Past it, as with a full
    /// queue: a checkpoint request, and the input is held back or the frame dropped.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_QUEUE_BYTES as u64, value_parser = clap::value_parser!(u64).range(1 << 16..=1 << 40))]
    pub max_queue_bytes: u64,
    /// Listen for controllers on this Unix socket (JSON lines, docs/control.md; mode 0600):
    /// checkpoint, mode and query-stats commands; hello, miscompare and peer events.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Write every miscompared frame of both sides, with its verdict, to this pcapng file.
    #[arg(long, value_name = "FILE.pcap")]
    pub capture: Option<PathBuf>,
    /// Initial mode: colo (the default), passive, primary-only or secondary-only. (A
    /// vhost-net-compare passthrough only runs primary-only; with --vm-socket the VM's colo-vmm
    /// sets it.)
    #[arg(long, value_name = "MODE")]
    pub mode: Option<Mode>,
    /// Name of this NIC in control events (default: the uplink or tap interface; "net0" for
    /// `colo-proxy compare`).
    #[arg(long, value_name = "NAME")]
    pub nic: Option<String>,
    /// The metrics endpoint.
    #[arg(long, value_name = "HOST:PORT", help = crate::metrics::FLAG_HELP)]
    pub metrics: Option<std::net::SocketAddr>,
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

    /// The mode to start in: `--mode`, or colo.
    pub fn mode(&self) -> Mode {
        self.mode.unwrap_or(Mode::Colo)
    }
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
        assert_eq!(parse(&[]).unwrap().mode(), Mode::Colo);
        assert_eq!(parse(&["--mode", "passive"]).unwrap().mode(), Mode::Passive);
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
