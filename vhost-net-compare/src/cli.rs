//! The command line.

use std::path::PathBuf;

use clap::Parser;
use colo_proxy::compare::{Config, Mode};
use colo_proxy::engine_args::EngineArgs;

use crate::device::MacAddr;

/// vhost-user net backend: a passthrough between one VM and a tap, or — with a second VM socket —
/// the COLO proxy on the fast path, which mirrors inbound frames into both VMs, compares their
/// output and releases the primary's.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "vhost-net-compare",
    version,
    after_help = "Frontends (QEMU -netdev vhost-user, colo-vmm) connect to the VM sockets; each socket \
accepts the next frontend when one disconnects (a migrated or restarted VM), with a fresh device. \
Guest RAM must be shared memory (memfd or shm). The device offers VERSION_1, MAC, STATUS, \
RING_EVENT_IDX and MRG_RXBUF, no checksum or segmentation offloads, and dirty logging \
(LOG_SHMFD, LOG_ALL). Two hosts: each host runs one backend per NIC with --vm-socket; its VM's \
colo-vmm sets the role (alone, primary, secondary); the primary's backend connects to the \
secondary's --peer-listen (frame link), and compares; the secondary's sends nothing to its tap \
until its VM takes over, when it announces the VM's MAC (RARP, gratuitous ARP). Beside each VM socket the backend keeps a directory .NAME.relay (mode 0700) \
for the socket its vhost-user daemons listen on behind a relay that accepts QEMU 7.2's order of \
requests; it is removed at exit, and replaced at the next start if a killed run left it behind. \
Needs CAP_NET_ADMIN for the tap. Logging: RUST_LOG (default info)."
)]
pub struct Options {
    /// Unix socket the primary VM's vhost-user frontend connects to (created; an existing file
    /// at that path is replaced). One host, both VMs on this backend.
    #[arg(long, value_name = "PATH", required_unless_present = "vm_socket", conflicts_with = "vm_socket")]
    pub primary_socket: Option<PathBuf>,
    /// Unix socket for the secondary VM. With it, the backend runs the COLO compare proxy;
    /// without it, it is a plain passthrough between the primary VM and the tap.
    #[arg(long, value_name = "PATH", conflicts_with = "vm_socket")]
    pub secondary_socket: Option<PathBuf>,
    /// Two hosts: the Unix socket of this host's one VM, whose role (alone, primary, secondary)
    /// its colo-vmm sets over the control socket. Until then nothing passes (fail-safe).
    #[arg(long, value_name = "PATH")]
    pub vm_socket: Option<PathBuf>,
    /// With --vm-socket: where the frame link from the primary's backend is accepted
    /// (HOST:PORT on the replication network). The secondary's colo-vmm tells the primary.
    #[arg(long, value_name = "HOST:PORT")]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// With --vm-socket: the key shared by the hosts of this VM (a file of at least 32 random
    /// bytes, mode 0600 or 0400). Frame links are then mutually authenticated and encrypted;
    /// without it they are plain (a warning at start).
    #[arg(long, value_name = "FILE")]
    pub link_key: Option<PathBuf>,
    /// The uplink tap interface (created if absent, brought up, opened with a 12-byte virtio-net
    /// header and no offloads). Frames from it go to the VMs; VM output (released output in
    /// COLO) goes to it.
    #[arg(long, value_name = "NAME")]
    pub tap: String,
    /// MAC address in the device's config space (both VMs get the same one).
    /// Default: 02:00:00:c0:10:01 (locally administered).
    #[arg(long, value_name = "MAC")]
    pub mac: Option<MacAddr>,
    /// The compare engine (COLO), its control socket and capture.
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// An inconsistent combination of options.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// Two sockets on one path.
    #[error("{0} and {1} must be different paths")]
    SamePath(&'static str, &'static str),
    /// A COLO mode without a secondary socket.
    #[error("--mode {0} needs --secondary-socket (a passthrough backend only runs primary-only)")]
    ModeNeedsSecondary(&'static str),
    /// A two-host option without `--vm-socket`.
    #[error("{0} needs --vm-socket (a backend serving both VMs has no peer host)")]
    NeedsVmSocket(&'static str),
    /// A mode for a one-VM backend, which takes roles instead.
    #[error("--mode does not apply to --vm-socket: the VM's colo-vmm sets its role (and, as primary, the mode)")]
    ModeWithVmSocket,
}

impl Options {
    /// Checks what clap cannot: distinct socket paths, and a mode a passthrough can run.
    pub fn validate(&self) -> Result<(), OptionsError> {
        if self.vm_socket.is_some() && self.engine.mode.is_some() {
            return Err(OptionsError::ModeWithVmSocket);
        }
        if self.vm_socket.is_none() {
            if self.peer_listen.is_some() {
                return Err(OptionsError::NeedsVmSocket("--peer-listen"));
            }
            if self.link_key.is_some() {
                return Err(OptionsError::NeedsVmSocket("--link-key"));
            }
        }
        let sockets = [
            ("--primary-socket", self.primary_socket.as_ref()),
            ("--vm-socket", self.vm_socket.as_ref()),
            ("--secondary-socket", self.secondary_socket.as_ref()),
            ("--control-socket", self.engine.control_socket.as_ref()),
        ];
        for (i, (a, pa)) in sockets.iter().enumerate() {
            for (b, pb) in &sockets[i + 1..] {
                if pa.is_some() && pa == pb {
                    return Err(OptionsError::SamePath(a, b));
                }
            }
        }
        if let Some(mode) = self.engine.mode {
            if self.secondary_socket.is_none() && mode != Mode::PrimaryOnly {
                return Err(OptionsError::ModeNeedsSecondary(mode.name()));
            }
        }
        Ok(())
    }

    /// Whether the COLO proxy runs (a secondary socket was given).
    pub fn colo(&self) -> bool {
        self.secondary_socket.is_some()
    }

    /// Whether this backend serves one VM whose role is set at run time (`--vm-socket`).
    pub fn replica(&self) -> bool {
        self.vm_socket.is_some()
    }

    /// The mode to start in: `primary-only` for passthrough, else `--mode` (default `colo`).
    pub fn initial_mode(&self) -> Mode {
        if self.colo() {
            self.engine.mode()
        } else {
            Mode::PrimaryOnly
        }
    }

    /// The compare engine's configuration.
    pub fn engine_config(&self) -> Config {
        self.engine.config()
    }

    /// The NIC name for control events.
    pub fn nic(&self) -> String {
        self.engine.nic.clone().unwrap_or_else(|| self.tap.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Options, clap::Error> {
        Options::try_parse_from(std::iter::once("vhost-net-compare").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Options::command().debug_assert();
    }

    #[test]
    fn passthrough_and_colo() {
        let o = parse(&["--primary-socket", "/tmp/p", "--tap", "t0"]).unwrap();
        o.validate().unwrap();
        assert!(!o.colo());
        assert_eq!(o.initial_mode(), Mode::PrimaryOnly);
        assert_eq!(o.nic(), "t0");
        let o =
            parse(&["--primary-socket", "/tmp/p", "--secondary-socket", "/tmp/s", "--tap", "t0", "--mode", "passive"])
                .unwrap();
        o.validate().unwrap();
        assert_eq!(o.initial_mode(), Mode::Passive);
    }

    #[test]
    fn bad_combinations_are_refused() {
        let o = parse(&["--primary-socket", "/tmp/p", "--secondary-socket", "/tmp/p", "--tap", "t0"]).unwrap();
        assert_eq!(o.validate(), Err(OptionsError::SamePath("--primary-socket", "--secondary-socket")));
        let o = parse(&["--primary-socket", "/tmp/p", "--tap", "t0", "--mode", "colo"]).unwrap();
        assert_eq!(o.validate(), Err(OptionsError::ModeNeedsSecondary("colo")));
        assert!(parse(&["--primary-socket", "/tmp/p", "--tap", "t0", "--mac", "01:00:00:00:00:00"]).is_err());
        assert!(parse(&["--primary-socket", "/tmp/p", "--tap", "t0", "--mode", "bogus"]).is_err());
        assert!(parse(&["--primary-socket", "/tmp/p", "--tap", "t0", "--compare-timeout", "0"]).is_err());
        assert!(parse(&["--tap", "t0"]).is_err(), "--primary-socket is required");
    }

    #[test]
    fn a_vm_socket_stands_alone_and_takes_peer_options() {
        let o = parse(&["--vm-socket", "/tmp/v", "--tap", "t0", "--peer-listen", "10.99.0.2:4445", "--link-key", "/k"])
            .unwrap();
        o.validate().unwrap();
        assert!(o.replica() && !o.colo());
        assert!(parse(&["--vm-socket", "/tmp/v", "--primary-socket", "/tmp/p", "--tap", "t0"]).is_err());
        assert!(parse(&["--vm-socket", "/tmp/v", "--secondary-socket", "/tmp/p", "--tap", "t0"]).is_err());
        let o = parse(&["--primary-socket", "/tmp/p", "--tap", "t0", "--peer-listen", "1.2.3.4:5"]).unwrap();
        assert_eq!(o.validate(), Err(OptionsError::NeedsVmSocket("--peer-listen")));
        assert!(parse(&["--vm-socket", "/tmp/v", "--tap", "t0", "--peer-listen", "nowhere"]).is_err());
        let o = parse(&["--vm-socket", "/tmp/v", "--tap", "t0", "--mode", "colo"]).unwrap();
        assert_eq!(o.validate(), Err(OptionsError::ModeWithVmSocket));
        let o = parse(&["--vm-socket", "/tmp/v", "--control-socket", "/tmp/v", "--tap", "t0"]).unwrap();
        assert_eq!(o.validate(), Err(OptionsError::SamePath("--vm-socket", "--control-socket")));
    }

    #[test]
    fn the_engine_options_are_colo_proxy_s() {
        let base = ["--primary-socket", "/tmp/p", "--secondary-socket", "/tmp/s", "--tap", "t0"];
        let args: Vec<&str> = base.iter().copied().chain(["--max-queue-bytes", "1048576", "--nic", "n1"]).collect();
        let o = parse(&args).unwrap();
        assert_eq!((o.engine_config().max_queue_bytes, o.nic()), (1 << 20, "n1".to_string()));
        let args: Vec<&str> = base.iter().copied().chain(["--expired-scan-cycle", "0"]).collect();
        assert!(parse(&args).is_err(), "bounded as in colo-proxy");
    }
}
