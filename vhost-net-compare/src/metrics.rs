//! vhost-net-compare's metrics endpoint (`--metrics HOST:PORT`): the compare engine's counters
//! and hold-time histogram, a one-VM backend's role, routing and frame link (colo-proxy's
//! [`CompareState`]), and each connected VM's ring traffic — all read from the router at
//! scrape time.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use colo_proxy::metrics::{CompareState, Exposition, MetricsError, MetricsServer};

use crate::chain::BadChain;
use crate::router::Router;

/// Serves the metrics of the router in `router` on `addr` until the returned server is
/// dropped. It listens before the router exists (so a bad address is refused before anything
/// else starts); scrapes until then get "starting".
pub fn serve(
    addr: SocketAddr,
    router: Arc<OnceLock<Arc<dyn Router>>>,
    nic: String,
) -> Result<MetricsServer, MetricsError> {
    MetricsServer::spawn(addr, move || match router.get() {
        Some(r) => collect(&**r, &nic).encode().map_err(|e| e.to_string()),
        None => Err("starting".into()),
    })
}

/// One scrape.
pub fn collect(router: &dyn Router, nic: &str) -> Exposition {
    let mut x = Exposition::new();
    let (role, frame_link) = match router.replica_state() {
        Some((role, link)) => (Some(role), link),
        None => (None, None),
    };
    let hold = router.hold_histogram();
    CompareState { nic: nic.to_string(), mode: router.mode(), stats: router.summary(), role, hold, frame_link }
        .expose(&mut x);
    let l = &[("nic", nic)];
    x.counter(
        "colo_vhost_unrouted_frames_total",
        "Inbound frames dropped because no VM was connected to take them.",
        l,
        router.unrouted(),
    );
    x.counter("colo_vhost_tap_errors_total", "Frames the tap refused.", l, router.tap_errors());
    let ports = router.ports();
    for side in ["primary", "secondary"] {
        x.flag(
            "colo_vhost_vm_connected",
            "A VM's vhost-user frontend is connected.",
            &[("nic", nic), ("vm", side)],
            ports.iter().any(|p| p.role().name() == side),
        );
    }
    for port in &ports {
        let c = port.stats.snapshot();
        let vm = port.role().name();
        let lv = &[("nic", nic), ("vm", vm)];
        let per_vm = "of the VM's current connection";
        for (dir, frames, bytes) in [("tx", c.tx_frames, c.tx_bytes), ("rx", c.rx_frames, c.rx_bytes)] {
            let ld = &[("nic", nic), ("vm", vm), ("queue", dir)];
            x.counter(
                "colo_vhost_frames_total",
                &format!("Frames through a VM's queue (tx: it sent, rx: delivered to it), {per_vm}."),
                ld,
                frames,
            );
            x.counter("colo_vhost_bytes_total", &format!("Ethernet bytes through a VM's queue, {per_vm}."), ld, bytes);
        }
        for (dir, bad) in [("tx", &c.tx_bad), ("rx", &c.rx_bad)] {
            for (kind, n) in bad.iter().enumerate() {
                x.counter(
                    "colo_vhost_refused_chains_total",
                    &format!("Descriptor chains refused, by queue and reason, {per_vm}."),
                    &[("nic", nic), ("vm", vm), ("queue", dir), ("reason", BadChain::kind_name(kind))],
                    *n,
                );
            }
        }
        for (cause, n) in [("queue-full", c.rx_overflow), ("too-big", c.rx_too_big)] {
            x.counter(
                "colo_vhost_rx_dropped_frames_total",
                &format!("Inbound frames a VM could not take, {per_vm}."),
                &[("nic", nic), ("vm", vm), ("cause", cause)],
                n,
            );
        }
        x.counter(
            "colo_vhost_tx_backpressure_total",
            &format!("Times a VM's TX waited for room in the compare queue, {per_vm}."),
            lv,
            c.tx_backpressure,
        );
        x.counter(
            "colo_vhost_ring_errors_total",
            &format!("Ring operations that failed on guest memory, {per_vm}."),
            lv,
            c.ring_errors,
        );
    }
    x
}
