//! `--metrics` for colo-proxy's event loops: the HTTP server runs on its own thread and asks
//! the loop, which owns the engine, for a [`CompareState`] at each scrape (colo-proxy's
//! [`relay`](colo_proxy::metrics::relay)).

use std::net::SocketAddr;
use std::sync::Arc;

use colo_proxy::metrics::relay::{relay, ScrapeRequests, ANSWER_TIMEOUT};
use colo_proxy::metrics::{CompareState, MetricsServer};
use mio::Waker;

/// The endpoint of one loop.
pub struct LoopMetrics {
    _server: MetricsServer,
    requests: ScrapeRequests<CompareState>,
}

impl LoopMetrics {
    /// Serves on `addr`; a scrape wakes the loop through `waker` (the loop's only one: mio
    /// allows one per poll), which then calls [`answer`](Self::answer).
    pub fn start(addr: SocketAddr, waker: Arc<Waker>) -> anyhow::Result<LoopMetrics> {
        let (mut ask, requests) = relay(waker, ANSWER_TIMEOUT);
        let server = MetricsServer::spawn(addr, move || ask().and_then(|s: CompareState| s.encode()))?;
        Ok(LoopMetrics { _server: server, requests })
    }

    /// Answers the scrapes waiting (the loop's waker fired).
    pub fn answer(&self, state: impl FnMut() -> CompareState) {
        self.requests.answer(state);
    }
}
