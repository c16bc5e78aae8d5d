//! What a run of the demo recorded — phases and their checks, what the demo did, every role
//! change the watch saw, the failovers, the counter's replies, the frames each host sent as the
//! VM — and the summary made of it (text for stdout, JSON for --json).

use std::fmt::Write as _;

use colo_tests::status_watch::Look;
use serde_json::{json, Value};

use crate::Args;

/// The hosts' names, by index.
pub const HOSTS: [&str; 3] = ["a", "b", "c"];

/// One check: what it asserts, whether it held, and what was seen.
#[derive(Debug, Clone)]
pub struct Check {
    pub what: String,
    pub pass: bool,
    pub detail: String,
}

/// A phase of the demo, in seconds since the demo started.
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: &'static str,
    pub title: String,
    pub start: f64,
    pub end: f64,
    pub checks: Vec<Check>,
}

/// Something the demo did or saw outside the replicas' status (a host killed, the partition, a
/// process's exit).
#[derive(Debug, Clone)]
pub struct Event {
    pub t: f64,
    /// The host it concerns, if one.
    pub host: Option<usize>,
    pub what: String,
}

/// A change of a replica as the watch saw it.
#[derive(Debug, Clone)]
pub struct Change {
    pub t: f64,
    pub host: usize,
    /// `None`: it did not answer.
    pub look: Option<Look>,
    /// Not seen by a look but read from the replica's `last-failover` at the next one.
    pub inferred: bool,
}

/// A failover: a host died, another took over.
#[derive(Debug, Clone)]
pub struct Failover {
    pub dead: usize,
    pub survivor: usize,
    pub kill_t: f64,
    /// When the survivor says it took over (its `last-failover`).
    pub took_over_t: Option<f64>,
    /// Its `last-failover` reason.
    pub reason: String,
    /// When it ran COLO again with a new secondary, if it did in this phase.
    pub protected_t: Option<f64>,
}

/// A frame a host sent from the VM's MAC.
#[derive(Debug, Clone, Copy)]
pub struct VmFrame {
    pub t: f64,
    pub rarp: bool,
}

/// The whole run.
pub struct Outcome {
    pub phases: Vec<Phase>,
    pub events: Vec<Event>,
    pub changes: Vec<Change>,
    pub failovers: Vec<Failover>,
    /// The partition: cut and healed, seconds.
    pub partition: Option<(f64, f64)>,
    /// Reply times of the counter session.
    pub replies: Vec<f64>,
    pub counter_first: u64,
    pub counter_last: u64,
    /// Per host, the frames it sent from the VM's MAC (while captured).
    pub frames: Vec<Vec<VmFrame>>,
    /// When COLO first started (the timeline's left edge).
    pub colo_t: f64,
    pub end_t: f64,
    pub logs: String,
}

impl Outcome {
    /// Whether every check of every phase passed.
    pub fn passed(&self) -> bool {
        !self.phases.is_empty() && self.phases.iter().all(|p| p.checks.iter().all(|c| c.pass))
    }

    /// When host `i` died, if it did.
    pub fn killed_at(&self, i: usize) -> Option<f64> {
        self.failovers.iter().find(|f| f.dead == i).map(|f| f.kill_t)
    }
}

/// The longest silence between two counter replies that overlaps [from, until]: (length, start).
pub fn longest_gap(replies: &[f64], from: f64, until: f64) -> Option<(f64, f64)> {
    replies
        .windows(2)
        .filter(|w| w[1] >= from && w[0] <= until)
        .map(|w| (w[1] - w[0], w[0]))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// The median interval between replies in [from, until].
pub fn median_interval(replies: &[f64], from: f64, until: f64) -> Option<f64> {
    let mut d: Vec<f64> = replies.windows(2).filter(|w| w[0] >= from && w[1] <= until).map(|w| w[1] - w[0]).collect();
    d.sort_by(f64::total_cmp);
    d.get(d.len() / 2).copied()
}

/// The gap a failover left the client: the longest silence from the kill to a second after the
/// takeover.
pub fn failover_gap(replies: &[f64], f: &Failover) -> Option<(f64, f64)> {
    longest_gap(replies, f.kill_t, f.took_over_t.unwrap_or(f.kill_t) + 1.0)
}

fn ms(s: f64) -> String {
    format!("{:.0} ms", s * 1000.0)
}

/// One line of the text timeline for a change.
pub fn describe(look: &Option<Look>) -> String {
    match look {
        None => "no answer (its colo-vmm is gone, or a standby without an API until COLO starts)".into(),
        Some(l) => {
            let mut s = format!("{:<32} [{}/{}", l.stands(), l.role, l.state);
            if let Some(h) = &l.holder {
                let _ = write!(s, "; key: {h}");
            }
            s.push(']');
            for (what, v) in [("waiting", &l.waiting), ("fenced", &l.fenced), ("re-protection", &l.reprotect)] {
                if let Some(v) = v {
                    let _ = write!(s, " {what}: {v};");
                }
            }
            s.trim_end_matches(';').to_string()
        }
    }
}

/// The timeline: what the demo did and every change the watch saw, in order.
fn timeline(o: &Outcome) -> Vec<(f64, String, String)> {
    let mut rows: Vec<(f64, String, String)> = o
        .changes
        .iter()
        .map(|c| {
            let what = describe(&c.look);
            let what = if c.inferred { format!("{what} (from its last-failover record)") } else { what };
            (c.t, format!("host {}", HOSTS[c.host]), what)
        })
        .collect();
    for e in &o.events {
        rows.push((e.t, "demo".into(), format!(">> {}", e.what)));
    }
    for p in &o.phases {
        rows.push((p.start, "demo".into(), format!("== phase {}: {}", p.name, p.title)));
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    rows
}

/// The summary for stdout and the JSON one.
pub fn summary(o: &Outcome, args: &Args) -> (String, Value) {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nArbiter demo: three hosts (a, b, c) and etcd on a witness host; reference guest; one counter session\n"
    );
    let _ = writeln!(s, "Timeline (seconds since the demo started; every role change the watch saw, every 100 ms):");
    for (t, who, what) in timeline(o) {
        let _ = writeln!(s, "{t:7.2}  {who:<6}  {what}");
    }
    let _ = writeln!(s, "\nPhases and checks:");
    for p in &o.phases {
        let _ = writeln!(s, "  {} ({:.1}-{:.1} s): {}", p.name, p.start, p.end, p.title);
        for c in &p.checks {
            let _ = writeln!(s, "    [{}] {} — {}", if c.pass { "PASS" } else { "FAIL" }, c.what, c.detail);
        }
    }
    let _ = writeln!(s, "\nFailovers:");
    for f in &o.failovers {
        let gap = failover_gap(&o.replies, f);
        let first = o.replies.iter().find(|t| **t > f.kill_t).map(|t| t - f.kill_t);
        let _ = writeln!(
            s,
            "  host {} died at {:.1} s: host {} took over after {} (\"{}\"); client-visible gap {}, first reply {} after the kill{}",
            HOSTS[f.dead],
            f.kill_t,
            HOSTS[f.survivor],
            f.took_over_t.map(|t| ms(t - f.kill_t)).unwrap_or("-".into()),
            f.reason,
            gap.map(|g| ms(g.0)).unwrap_or("-".into()),
            first.map(ms).unwrap_or("-".into()),
            f.protected_t.map(|t| format!("; protected again (COLO with a new secondary) {:.1} s after the kill", t - f.kill_t)).unwrap_or_default(),
        );
    }
    if let Some((cut, heal)) = o.partition {
        let gap = longest_gap(&o.replies, cut, heal);
        let replies = o.replies.iter().filter(|t| **t >= cut && **t <= heal).count();
        let _ = writeln!(
            s,
            "  partition b–c from {cut:.1} s to {heal:.1} s: no failover; {replies} counter replies meanwhile, longest gap {}",
            gap.map(|g| ms(g.0)).unwrap_or("-".into())
        );
    }
    let base = median_interval(&o.replies, o.colo_t, o.failovers.first().map(|f| f.kill_t).unwrap_or(o.end_t));
    let _ = writeln!(
        s,
        "\nCounter: {} -> {}, {} increments on one TCP connection (median {} between replies in COLO)",
        o.counter_first,
        o.counter_last,
        o.replies.len(),
        base.map(ms).unwrap_or("-".into())
    );
    let frames: Vec<String> = o
        .frames
        .iter()
        .enumerate()
        .map(|(i, f)| format!("host {} {} ({} RARP)", HOSTS[i], f.len(), f.iter().filter(|f| f.rarp).count()))
        .collect();
    let _ = writeln!(s, "Frames from the VM's MAC on the hosts' switch ports: {}", frames.join(", "));
    let _ = writeln!(s, "Timeline: {}", args.svg.display());
    let failures: Vec<String> = o
        .phases
        .iter()
        .flat_map(|p| {
            p.checks.iter().filter(|c| !c.pass).map(move |c| format!("{}: {} — {}", p.name, c.what, c.detail))
        })
        .collect();
    if o.passed() {
        let _ = writeln!(s, "\nRESULT: PASS");
    } else {
        let _ = writeln!(s, "\nRESULT: FAIL");
        for f in &failures {
            let _ = writeln!(s, "  - {f}");
        }
    }
    let r3 = |v: f64| (v * 1000.0).round() / 1000.0;
    let j = json!({
        "result": if o.passed() { "pass" } else { "fail" },
        "failures": failures,
        "parameters": {
            "steady-secs": args.steady_secs, "partition-secs": args.partition_secs, "after-secs": args.after_secs,
        },
        "phases": o.phases.iter().map(|p| json!({
            "name": p.name, "title": p.title, "start-s": r3(p.start), "end-s": r3(p.end),
            "checks": p.checks.iter().map(|c| json!({ "what": c.what, "pass": c.pass, "detail": c.detail })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "failovers": o.failovers.iter().map(|f| json!({
            "dead": HOSTS[f.dead], "survivor": HOSTS[f.survivor], "kill-s": r3(f.kill_t),
            "took-over-ms": f.took_over_t.map(|t| ((t - f.kill_t) * 1000.0).round()),
            "reason": f.reason,
            "gap-ms": failover_gap(&o.replies, f).map(|g| (g.0 * 1000.0).round()),
            "protected-again-s": f.protected_t.map(|t| r3(t - f.kill_t)),
        })).collect::<Vec<_>>(),
        "partition": o.partition.map(|(cut, heal)| json!({
            "cut-s": r3(cut), "healed-s": r3(heal),
            "gap-ms": longest_gap(&o.replies, cut, heal).map(|g| (g.0 * 1000.0).round()),
        })),
        "counter": {
            "first": o.counter_first, "last": o.counter_last, "increments": o.replies.len(),
            "median-interval-ms": base.map(|b| (b * 1000.0).round()),
        },
        "vm-frames": o.frames.iter().enumerate().map(|(i, f)| json!({
            "host": HOSTS[i], "frames": f.len(), "rarp": f.iter().filter(|f| f.rarp).count(),
            "first-s": f.first().map(|f| r3(f.t)), "last-s": f.last().map(|f| r3(f.t)),
        })).collect::<Vec<_>>(),
        "events": o.events.iter().map(|e| json!({
            "t-s": r3(e.t), "host": e.host.map(|h| HOSTS[h]), "what": e.what,
        })).collect::<Vec<_>>(),
        "changes": o.changes.iter().map(|c| json!({
            "t-s": r3(c.t), "host": HOSTS[c.host], "answers": c.look.is_some(), "inferred": c.inferred,
            "stands": c.look.as_ref().map(|l| l.stands()),
            "role": c.look.as_ref().map(|l| &l.role), "state": c.look.as_ref().map(|l| &l.state),
            "holder": c.look.as_ref().and_then(|l| l.holder.as_ref()),
            "fenced": c.look.as_ref().and_then(|l| l.fenced.as_ref()),
            "waiting": c.look.as_ref().and_then(|l| l.waiting.as_ref()),
            "reprotect": c.look.as_ref().and_then(|l| l.reprotect.as_ref()),
        })).collect::<Vec<_>>(),
        "counter-replies-s": o.replies.iter().map(|t| r3(*t)).collect::<Vec<_>>(),
    });
    (s, j)
}
