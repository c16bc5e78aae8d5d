//! Command-line options (QEMU colo-compare's names and defaults).

use clap::Args;
use colo_proxy::endpoint::Endpoint;

pub use colo_proxy::engine_args::EngineArgs;

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
