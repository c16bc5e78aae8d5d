//! colo-vmm's metrics endpoint (`--metrics HOST:PORT`): the COLO status that
//! `query-colo-status` reports — checkpoints by kind and trigger, their pause, pages and bytes,
//! mode and hybrid state, role and failovers, the checkpoint link, the arbiter — read from
//! [`ColoShared`] at each scrape and served by colo-proxy's small HTTP exporter.

use std::net::SocketAddr;
use std::sync::Arc;

use colo_proxy::compare::Reason;
use colo_proxy::metrics::{Exposition, MetricsError, MetricsServer};
use serde::Serialize;

use crate::colo::shared::ColoShared;
use crate::colo::status::State;

/// The compare engine's reasons for a miscompare.
const REASONS: [Reason; 5] = [Reason::Payload, Reason::Size, Reason::Ack, Reason::Timeout, Reason::QueueFull];

/// Serves `colo`'s metrics on `addr` until the returned server is dropped.
pub fn serve(addr: SocketAddr, colo: Arc<ColoShared>) -> Result<MetricsServer, MetricsError> {
    MetricsServer::spawn(addr, move || collect(&colo).encode().map_err(|e| e.to_string()))
}

/// The name a value has in `query-colo-status` (its serde name), so both speak alike.
fn name(v: &impl Serialize) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

/// One scrape.
pub fn collect(colo: &ColoShared) -> Exposition {
    let s = colo.summary();
    let mut x = Exposition::new();
    let c = &s.checkpoints;
    for (kind, n) in [("colo", c.colo), ("passive", c.passive)] {
        x.counter(
            "colo_checkpoints_total",
            "Checkpoints by kind: colo (the secondary resumed) or passive (it stayed paused).",
            &[("kind", kind)],
            n,
        );
    }
    let triggers = [("periodic", c.periodic), ("passive", c.passive_interval), ("user", c.user)];
    // Every reason the compare engine knows, so each series exists from the start; a reason
    // named by nobody else (a secondary reads the primary's) counts as `other`, so the set of
    // series stays bounded.
    let known = |r: &str| REASONS.iter().any(|k| k.name() == r);
    let other = c.miscompare.iter().filter(|(r, _)| !known(r)).map(|(_, n)| n).sum();
    let miscompares = REASONS
        .iter()
        .map(|r| (r.name(), c.miscompare.get(r.name()).copied().unwrap_or(0)))
        .chain([("other", other)])
        .map(|(r, n)| (format!("miscompare:{r}"), n));
    for (trigger, n) in triggers.into_iter().map(|(t, n)| (t.to_string(), n)).chain(miscompares) {
        x.counter(
            "colo_checkpoint_triggers_total",
            "Checkpoints by trigger: periodic (max-time), passive (the passive interval), user, \
             miscompare:REASON (a compare process's report).",
            &[("trigger", &trigger)],
            n,
        );
    }
    x.counter("colo_mode_switches_total", "Switches between COLO and passive mode.", &[], c.mode_switches);
    let h = &s.histograms;
    x.histogram(
        "colo_checkpoint_pause_seconds",
        "Pause of each checkpoint (primary: its VM paused; secondary: its VM loading the checkpoint).",
        &[],
        &h.pause_seconds,
    );
    x.histogram("colo_checkpoint_pages", "Guest pages (4 KiB) each checkpoint carried.", &[], &h.pages);
    x.histogram(
        "colo_checkpoint_blocks",
        "Disk blocks (4 KiB) each checkpoint carried (primary: sent; secondary: written into its image).",
        &[],
        &h.blocks,
    );
    x.histogram(
        "colo_checkpoint_bytes",
        "Bytes each checkpoint carried (pages, blocks and device state).",
        &[],
        &h.bytes,
    );
    x.gauge("colo_checkpoint_last_pause_seconds", "Pause of the last checkpoint.", &[], s.pause_last_ms / 1000.0);
    x.gauge("colo_checkpoint_last_pages", "Pages of the last checkpoint.", &[], s.pages_last as f64);
    x.gauge("colo_checkpoint_last_blocks", "Disk blocks of the last checkpoint.", &[], s.disk.blocks_last as f64);
    x.gauge("colo_checkpoint_last_bytes", "Bytes of the last checkpoint.", &[], s.bytes_last as f64);
    x.counter(
        "colo_background_pages_total",
        "Pages streamed to the secondary between checkpoints (ram-background-limit).",
        &[],
        s.background_pages,
    );
    x.counter(
        "colo_background_blocks_total",
        "Disk blocks streamed to the secondary between checkpoints (primary).",
        &[],
        s.disk.background_blocks,
    );
    x.counter(
        "colo_svm_discarded_blocks_total",
        "Blocks of the secondary VM's own writes that checkpoints discarded (secondary).",
        &[],
        s.disk.svm_blocks_discarded,
    );
    x.counter(
        "colo_released_frames_total",
        "Frames the compare processes released at checkpoints (primary).",
        &[],
        s.frames_released,
    );
    x.counter(
        "colo_dropped_frames_total",
        "Secondary frames the compare processes dropped at checkpoints (nobody matched them).",
        &[],
        s.frames_dropped,
    );
    let (role, state) = (name(&s.role), name(&s.state));
    x.state_set(
        "colo_role",
        "This VMM's part in COLO (1 for the current one).",
        &[],
        ("role", &["none", "primary", "secondary"]),
        Some(&role),
    );
    x.state_set(
        "colo_state",
        "Where COLO stands (1 for the current state).",
        &[],
        ("state", &["inactive", "starting", "running", "failed-over", "stopped"]),
        Some(&state),
    );
    let mode = s.mode.map(|m| name(&m));
    x.state_set(
        "colo_mode",
        "The checkpoint mode while COLO runs (1 for the current one; all 0 otherwise).",
        &[],
        ("mode", &["colo", "passive"]),
        mode.as_deref(),
    );
    if let Some(hy) = &s.hybrid {
        x.gauge(
            "colo_hybrid_passive_left",
            "Passive checkpoints still to do before COLO is tried again (0: COLO).",
            &[],
            f64::from(hy.passive_left),
        );
        x.gauge(
            "colo_hybrid_mean_interval_seconds",
            "The hybrid controller's weighted mean COLO interval.",
            &[],
            hy.mean_ms / 1000.0,
        );
    }
    x.flag("colo_protected", "A COLO pair runs: this VM has a replica.", &[], s.state == State::Running);
    x.counter("colo_failovers_total", "Failovers since this VMM started.", &[], s.failovers);
    if let Some(f) = &s.last_failover {
        x.gauge(
            "colo_last_failover_timestamp_seconds",
            "When the last failover happened (Unix time), by the side that survived.",
            &[("survivor", &name(&f.survivor))],
            f.at_unix_ms as f64 / 1000.0,
        );
    }
    x.flag(
        "colo_waiting",
        "This replica waits for something before it may serve (see query-colo-status).",
        &[],
        s.waiting.is_some(),
    );
    x.flag(
        "colo_fenced",
        "This replica fenced itself: nothing released, its VM paused, until it holds the arbiter's key again.",
        &[],
        s.fenced.is_some(),
    );
    x.flag(
        "colo_reprotect_pending",
        "Re-protection was tried and no COLO pair runs yet (see query-colo-status's reprotect).",
        &[],
        s.reprotect.is_some() && s.state != State::Running,
    );
    let link = colo.link();
    x.flag("colo_link_up", "The checkpoint link to the peer VMM is up.", &[], link.as_ref().is_some_and(|l| l.up()));
    if let Some(l) = &link {
        x.gauge(
            "colo_link_peer_silence_seconds",
            "Time since the peer was last heard on the checkpoint link (heartbeats count).",
            &[],
            l.silent_for().as_secs_f64(),
        );
    }
    if let Some(a) = &s.arbiter {
        x.flag("colo_arbiter_held", "This replica holds its VM's key in the arbiter (it may serve).", &[], a.held);
        x.flag("colo_arbiter_reachable", "The arbiter answered the last request.", &[], a.reachable);
        x.gauge("colo_arbiter_ttl_seconds", "The arbiter lease's TTL.", &[], a.ttl_ms as f64 / 1000.0);
        if let Some(ms) = a.lease_left_ms {
            x.gauge(
                "colo_arbiter_lease_left_seconds",
                "What this replica's lease has left for certain.",
                &[],
                ms as f64 / 1000.0,
            );
        }
        if let Some(holder) = &a.holder {
            x.gauge(
                "colo_arbiter_holder",
                "Who held the VM's key when last looked at (1, with the holder as a label).",
                &[("holder", holder)],
                1.0,
            );
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::colo::hybrid::CheckpointKind;
    use crate::colo::status::{Role, Trigger};

    #[test]
    fn the_status_becomes_samples() {
        let colo = ColoShared::new(vec![]);
        colo.update(|s| {
            s.role = Role::Primary;
            s.state = State::Running;
            s.mode = Some(CheckpointKind::Colo);
            let ms = Duration::from_millis;
            s.checkpoint(CheckpointKind::Colo, &Trigger::Miscompare("payload".into()), ms(100), ms(3), 10, 50_000);
            s.checkpoint(CheckpointKind::Passive, &Trigger::Periodic, ms(100), ms(20), 1000, 4_100_000);
        });
        let text = collect(&colo).encode().unwrap();
        for line in [
            "colo_checkpoints_total{kind=\"colo\"} 1",
            "colo_checkpoints_total{kind=\"passive\"} 1",
            "colo_checkpoint_triggers_total{trigger=\"miscompare:payload\"} 1",
            "colo_checkpoint_triggers_total{trigger=\"periodic\"} 1",
            "colo_checkpoint_triggers_total{trigger=\"user\"} 0",
            "colo_checkpoint_triggers_total{trigger=\"miscompare:ack\"} 0",
            "colo_checkpoint_triggers_total{trigger=\"miscompare:other\"} 0",
            "colo_checkpoint_pause_seconds_bucket{le=\"0.005\"} 1",
            "colo_checkpoint_pause_seconds_bucket{le=\"0.025\"} 2",
            "colo_checkpoint_pause_seconds_count 2",
            "colo_checkpoint_pages_sum 1010",
            "colo_checkpoint_bytes_bucket{le=\"65536\"} 1",
            "colo_checkpoint_last_pages 1000",
            "colo_role{role=\"primary\"} 1",
            "colo_role{role=\"secondary\"} 0",
            "colo_state{state=\"running\"} 1",
            "colo_mode{mode=\"colo\"} 1",
            "colo_protected 1",
            "colo_failovers_total 0",
            "colo_link_up 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("colo_arbiter_"), "no arbiter, no arbiter metrics");
        // A reason nobody knows (a secondary takes the primary's word) is `other`.
        colo.update(|s| {
            let ms = Duration::from_millis;
            s.checkpoint(CheckpointKind::Colo, &Trigger::Miscompare("no\"such".into()), ms(1), ms(1), 1, 1);
        });
        let text = collect(&colo).encode().unwrap();
        assert!(text.contains("colo_checkpoint_triggers_total{trigger=\"miscompare:other\"} 1\n"), "{text}");
        assert!(!text.contains("no\\\"such"), "{text}");
        colo.update(|s| s.failed_over(Role::Primary, "lost the secondary", "its own state"));
        let text = collect(&colo).encode().unwrap();
        assert!(text.contains("\ncolo_failovers_total 1\n") && text.contains("colo_state{state=\"failed-over\"} 1"));
        assert!(text.contains("colo_last_failover_timestamp_seconds{survivor=\"primary\"} "), "{text}");
        assert!(text.contains("colo_mode{mode=\"colo\"} 0\n") && text.contains("\ncolo_protected 0\n"), "{text}");
    }
}
