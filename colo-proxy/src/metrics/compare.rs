//! The metrics of a compare process (colo-proxy, vhost-net-compare): the engine's counters and
//! hold-time histogram, the routing of a one-VM backend and its frame link. Every sample has a
//! `nic` label, so one Prometheus can tell a VM's NICs apart.

use super::exposition::Exposition;
use crate::compare::{Mode, Stats};
use crate::link::{FrameLinkState, FrameLinkWatch};
use crate::replica::Role;

/// What a compare process shows, read at scrape time.
#[derive(Debug, Clone)]
pub struct CompareState {
    /// The NIC's name (as in control events).
    pub nic: String,
    /// The compare mode.
    pub mode: Mode,
    /// The engine's counters (with a one-VM backend's routing counters in `replica`).
    pub stats: Stats,
    /// A one-VM backend's role.
    pub role: Option<Role>,
    /// The engine's hold-time histogram (a live handle; none without an engine).
    pub hold: Option<prometheus::Histogram>,
    /// A one-VM backend's frame link, while it has one (a live view).
    pub frame_link: Option<FrameLinkWatch>,
}

const MODES: [&str; 4] = ["colo", "passive", "primary-only", "secondary-only"];
const ROLES: [&str; 4] = ["unset", "alone", "primary", "secondary"];

impl CompareState {
    /// Adds the samples to `x`.
    pub fn expose(&self, x: &mut Exposition) {
        let nic = self.nic.as_str();
        let s = &self.stats;
        let l = &[("nic", nic)];
        for (side, frames, bytes) in
            [("primary", s.frames_primary, s.bytes_primary), ("secondary", s.frames_secondary, s.bytes_secondary)]
        {
            let ls = &[("nic", nic), ("side", side)];
            x.counter("colo_compare_frames_total", "Frames the engine took from each VM.", ls, frames);
            x.counter(
                "colo_compare_bytes_total",
                "Ethernet bytes of the frames the engine took from each VM.",
                ls,
                bytes,
            );
        }
        x.counter(
            "colo_compare_released_frames_total",
            "Frames sent out (the primary's; the secondary's in secondary-only mode).",
            l,
            s.released,
        );
        for (side, n) in [("primary", s.dropped_primary), ("secondary", s.dropped_secondary)] {
            x.counter(
                "colo_compare_dropped_frames_total",
                "Frames discarded: the secondary's once matched, flushed or not compared; the primary's in secondary-only mode.",
                &[("nic", nic), ("side", side)],
                n,
            );
        }
        x.counter(
            "colo_compare_overflow_frames_total",
            "Frames discarded because a queue was full and the transport could not wait.",
            l,
            s.dropped_overflow,
        );
        x.counter(
            "colo_compare_uncompared_frames_total",
            "Frames passed without comparison (ARP, non-IP, unparsable, neighbour discovery).",
            l,
            s.passed_uncompared,
        );
        x.counter("colo_compare_malformed_frames_total", "Uncompared frames that were unparsable.", l, s.malformed);
        x.counter(
            "colo_compare_inbound_dropped_frames_total",
            "Inbound frames that could not be delivered to a VM.",
            l,
            s.inbound_dropped,
        );
        x.counter(
            "colo_compare_rejected_frames_total",
            "Frames the transport refused before the engine saw them.",
            l,
            s.rejected_input,
        );
        let m = &s.miscompares;
        for (reason, n) in [
            ("payload", m.payload),
            ("size", m.size),
            ("ack", m.ack),
            ("timeout", m.timeout),
            ("queue-full", m.queue_full),
        ] {
            x.counter(
                "colo_compare_miscompares_total",
                "Inconsistencies between the VMs' output, by reason (each asks for a checkpoint).",
                &[("nic", nic), ("reason", reason)],
                n,
            );
        }
        x.counter(
            "colo_compare_miscompare_events_total",
            "Inconsistencies reported to the controllers (the rest were rate-limited).",
            l,
            s.notifies,
        );
        x.counter("colo_compare_flushes_total", "Flushes (checkpoints).", l, s.flushes);
        x.gauge("colo_compare_flows", "Flows in the table.", l, s.flows as f64);
        x.counter(
            "colo_compare_evicted_flows_total",
            "Idle flows evicted to keep the table bounded.",
            l,
            s.flows_evicted,
        );
        for (side, n) in [("primary", s.held_primary), ("secondary", s.held_secondary)] {
            x.gauge("colo_compare_held_frames", "Frames held now.", &[("nic", nic), ("side", side)], n as f64);
        }
        if let Some(hold) = &self.hold {
            x.histogram(
                "colo_compare_hold_seconds",
                "How long released primary frames were held (the output delay COLO adds).",
                l,
                hold,
            );
        }
        x.gauge(
            "colo_compare_hold_max_seconds",
            "Longest time a primary frame was held before release.",
            l,
            s.max_hold_us as f64 * 1e-6,
        );
        x.state_set(
            "colo_compare_mode",
            "The compare mode (1 for the current one).",
            l,
            ("mode", &MODES),
            Some(self.mode.name()),
        );
        if let Some(role) = self.role {
            x.state_set(
                "colo_replica_role",
                "A one-VM backend's role, set by its VM's colo-vmm (1 for the current one).",
                l,
                ("role", &ROLES),
                Some(role.name()),
            );
        }
        if let Some(r) = &s.replica {
            for (name, help, n) in [
                ("colo_replica_lan_ignored_frames_total", "LAN frames a secondary ignored.", r.lan_ignored),
                ("colo_replica_unset_dropped_frames_total", "Frames dropped while no role was set.", r.unset_dropped),
                ("colo_replica_mirrored_frames_total", "Inbound frames mirrored to the peer.", r.mirrored),
                (
                    "colo_replica_mirror_failed_frames_total",
                    "Inbound frames the frame link could not take.",
                    r.mirror_failed,
                ),
                ("colo_replica_peer_inbound_frames_total", "Inbound frames received from the peer.", r.peer_inbound),
                ("colo_replica_to_peer_frames_total", "Frames of the secondary VM sent to the peer.", r.to_peer),
                ("colo_replica_gated_frames_total", "Released frames that waited for the lease.", r.gated),
                (
                    "colo_replica_gate_overflow_frames_total",
                    "Gated frames dropped because the gate was full.",
                    r.gate_overflow,
                ),
                (
                    "colo_replica_fenced_frames_total",
                    "Released frames dropped because the role no longer allows sending.",
                    r.fenced,
                ),
                (
                    "colo_replica_window_dropped_frames_total",
                    "Numbered inbound frames the secondary's window let go.",
                    r.window_dropped,
                ),
                ("colo_replica_takeovers_total", "Times the VM was announced after a takeover.", r.takeovers),
                (
                    "colo_replica_stale_secondary_frames_total",
                    "Frames of the secondary VM from before a checkpoint that arrived after its flush (dropped).",
                    r.stale_secondary,
                ),
                (
                    "colo_replica_loading_ignored_total",
                    "Loading messages from the secondary ignored because one already waited for its flush.",
                    r.loading_ignored,
                ),
                (
                    "colo_replica_loading_missing_total",
                    "Flushes whose loading message from the secondary did not come within a second.",
                    r.loading_missing,
                ),
            ] {
                x.counter(name, help, l, n);
            }
        }
        if self.role.is_some() {
            frame_link_samples(x, l, self.frame_link.as_ref().map(FrameLinkWatch::state));
        }
    }

    /// The scrape's text with these samples only.
    pub fn encode(&self) -> Result<String, String> {
        let mut x = Exposition::new();
        self.expose(&mut x);
        x.encode().map_err(|e| e.to_string())
    }
}

/// A one-VM backend's frame link (`link`: none while it has none).
fn frame_link_samples(x: &mut Exposition, l: &[(&str, &str)], link: Option<FrameLinkState>) {
    x.flag("colo_frame_link_up", "The frame link to the peer host is up.", l, link.is_some_and(|k| k.open));
    if let Some(k) = link {
        x.flag(
            "colo_frame_link_lease_fresh",
            "The peer answered a ping within the lease (a primary releases nothing without it).",
            l,
            k.lease_fresh,
        );
        x.flag("colo_frame_link_secure", "The frame link is authenticated and encrypted.", l, k.secure);
        x.counter("colo_frame_link_sent_frames_total", "Frames sent on the current frame link.", l, k.frames_sent);
        x.counter(
            "colo_frame_link_received_frames_total",
            "Frames received on the current frame link.",
            l,
            k.frames_received,
        );
        x.counter(
            "colo_frame_link_refused_frames_total",
            "Frames the current frame link refused (its queue full).",
            l,
            k.refused_full,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::MiscompareCounts;
    use crate::replica::ReplicaCounters;

    #[test]
    fn counters_roles_and_links_become_samples() {
        let stats = Stats {
            frames_primary: 7,
            bytes_primary: 700,
            miscompares: MiscompareCounts { queue_full: 2, ..Default::default() },
            replica: Some(ReplicaCounters { to_peer: 5, ..Default::default() }),
            ..Stats::default()
        };
        let hold = crate::metrics::histogram(&crate::compare::HOLD_BUCKETS);
        hold.observe(0.002);
        let link = FrameLinkState {
            open: true,
            lease_fresh: false,
            secure: true,
            frames_sent: 3,
            frames_received: 4,
            refused_full: 0,
        };
        let state = CompareState {
            nic: "net0".into(),
            mode: Mode::Passive,
            stats,
            role: Some(Role::Secondary),
            hold: Some(hold),
            frame_link: None,
        };
        let mut x = Exposition::new();
        state.expose(&mut x);
        frame_link_samples(&mut x, &[("nic", "net0")], Some(link));
        let text = x.encode().unwrap();
        for line in [
            "colo_compare_frames_total{nic=\"net0\",side=\"primary\"} 7",
            "colo_compare_bytes_total{nic=\"net0\",side=\"primary\"} 700",
            "colo_compare_miscompares_total{nic=\"net0\",reason=\"queue-full\"} 2",
            "colo_compare_mode{nic=\"net0\",mode=\"passive\"} 1",
            "colo_compare_mode{nic=\"net0\",mode=\"colo\"} 0",
            "colo_compare_hold_seconds_bucket{nic=\"net0\",le=\"0.0025\"} 1",
            "colo_compare_hold_seconds_count{nic=\"net0\"} 1",
            "colo_replica_role{nic=\"net0\",role=\"secondary\"} 1",
            "colo_replica_to_peer_frames_total{nic=\"net0\"} 5",
            "colo_frame_link_up{nic=\"net0\"} 1",
            "colo_frame_link_lease_fresh{nic=\"net0\"} 0",
            "colo_frame_link_received_frames_total{nic=\"net0\"} 4",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // A backend serving both VMs has no role and no link.
        let both = CompareState { role: None, stats: Stats::default(), ..state };
        let text = both.encode().unwrap();
        assert!(!text.contains("colo_replica_") && !text.contains("colo_frame_link_"), "{text}");
    }
}
