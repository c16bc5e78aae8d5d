//! colo-proxy: the COLO compare engine and everything around it.
//!
//! - [`wire`]: typed, zero-copy views over Ethernet, VLAN, IPv4, IPv6, TCP, UDP, ICMP, ARP.
//! - [`classify`] and [`flow`]: what the engine reads from each frame, and flow keys.
//! - [`compare`]: the engine of docs/compare.md (rules, modes, timeouts, limits, flushes).
//! - [`rewrite`]: the secondary's TCP sequence rewriter.
//! - [`replica`]: the backend of one VM on one host, by role (two-host COLO), and [`announce`].
//! - [`proxy`]: engine and rewriter together, as transports use them.
//! - [`framing`] and [`notify_dev`]: QEMU's chardev socket framing and its text protocol.
//! - [`control`]: the JSON-lines control socket of docs/control.md, server and client.
//! - [`link`]: links between hosts (authenticated, encrypted) and the frame link's protocol.
//! - [`pcap`]: a pcapng writer for captures.
//! - [`metrics`]: the Prometheus endpoint (`--metrics`) of every binary.

pub mod announce;
pub mod builder;
pub mod capture;
pub mod classify;
pub mod clock;
pub mod compare;
pub mod control;
pub mod endpoint;
pub mod engine_args;
pub mod flow;
pub mod frame;
pub mod frame_pool;
pub mod framing;
pub mod link;
pub mod metrics;
pub mod notify_dev;
pub mod packet_socket;
pub mod pcap;
pub mod proxy;
pub mod replica;
pub mod rewrite;
pub mod stream_addr;
pub mod virtio_net;
pub mod wire;

pub use classify::{classify, Class};
pub use clock::{Clock, ManualClock, MonotonicClock, Timestamp};
pub use compare::{Config, Engine, Mode, Push, Reason, Sink};
pub use flow::FlowKey;
pub use frame::{Frame, Side};
