//! The metrics endpoint shared by colo-vmm, vhost-net-compare and colo-proxy (`--metrics
//! HOST:PORT`): Prometheus' text format over HTTP, built at scrape time on the server's own
//! thread from the same state the control sockets report; the event loops only update counters
//! (atomics, or a copy they leave in a slot) and never wait for a scrape.
//!
//! - [`http`]: the small, bounded, read-only HTTP server on one thread;
//! - [`exposition`]: one scrape's metric families and their text;
//! - [`histogram`]: fixed-bucket distributions the recording side keeps (lock-free);
//! - [`published`]: the copy of its counters a single-threaded event loop leaves for scrapes;
//! - [`compare`]: what a compare process shows.

pub mod compare;
pub mod exposition;
pub mod histogram;
pub mod http;
pub mod published;

pub use compare::CompareState;
pub use exposition::{Exposition, CONTENT_TYPE};
pub use histogram::histogram;
pub use http::{MetricsError, MetricsServer};

/// What `--metrics` says in each binary's help.
pub const FLAG_HELP: &str = "Serve metrics in Prometheus' text format on http://HOST:PORT/metrics \
(read-only, one thread, a few connections at a time). The endpoint is not authenticated: bind it \
to a management address (e.g. 127.0.0.1:9464), never a public one. Off unless given. The metrics are listed in docs/operations.md.";
