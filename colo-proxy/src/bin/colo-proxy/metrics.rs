//! `--metrics` for colo-proxy's event loops: the HTTP server runs on its own thread and reads
//! the copy of the loop's counters the loop leaves after its iterations (at most every
//! [`PUBLISH_EVERY`](colo_proxy::metrics::published::PUBLISH_EVERY)); the hold-time histogram
//! and a frame link are read live. A scrape never waits for the loop.

use std::net::SocketAddr;
use std::time::Duration;

use colo_proxy::metrics::published::{self, Publisher};
use colo_proxy::metrics::{CompareState, MetricsServer};

/// The endpoint of one loop.
pub struct LoopMetrics {
    _server: MetricsServer,
    publisher: Publisher<CompareState>,
}

impl LoopMetrics {
    /// Serves on `addr` (a clear error if it cannot be bound); scrapes before the loop's first
    /// copy get 503 "starting".
    pub fn start(addr: SocketAddr) -> anyhow::Result<LoopMetrics> {
        let (publisher, published) = published::slot::<CompareState>();
        let server = MetricsServer::spawn(addr, move || match published.latest() {
            Some(state) => state.encode(),
            None => Err("starting".into()),
        })?;
        Ok(LoopMetrics { _server: server, publisher })
    }

    /// After a loop iteration: leaves a fresh copy if the last is old enough.
    pub fn offer(&mut self, state: impl FnOnce() -> CompareState) {
        self.publisher.offer(state);
    }

    /// When the loop must wake to leave the copy it held back.
    pub fn next_due(&self) -> Option<Duration> {
        self.publisher.next_due()
    }
}

/// The earlier of two optional poll timeouts.
pub fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
