//! The demo's run: the three hosts, the watch, the counter session, the captures, and the
//! phases one after the other. A phase's check that fails is recorded and the demo goes on; a
//! step without which the next phases mean nothing (a takeover that never came) ends the
//! phases, and the demo still stops its session, reads its captures and cleans up.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use colo_tests::colo_hosts::{ColoHosts, HostsOptions};
use colo_tests::colo_topology::CounterClient;
use colo_tests::counter_load::CounterLoad;
use colo_tests::interrupt::{self, pause};
use colo_tests::port_capture::{PortCaptures, ETHERTYPE_RARP};
use colo_tests::status_watch::StatusWatch;
use serde_json::Value;

use crate::outcome::{describe, Change, Check, Event, Failover, Outcome, Phase, VmFrame, HOSTS};
use crate::Args;

/// The guest's services: the counter, and echo.
const CMDLINE: &str = "app=counter,echo";

/// The demo's clock: seconds since it started.
#[derive(Clone, Copy)]
struct Clock {
    t0: Instant,
    t0_epoch: Duration,
}

impl Clock {
    fn new() -> Clock {
        Clock { t0: Instant::now(), t0_epoch: SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() }
    }

    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn at(&self, i: Instant) -> f64 {
        i.saturating_duration_since(self.t0).as_secs_f64()
    }

    /// A time since the epoch (captures, the replicas' `at-unix-ms`).
    fn epoch(&self, d: Duration) -> f64 {
        d.as_secs_f64() - self.t0_epoch.as_secs_f64()
    }

    fn say(&self, msg: &str) {
        eprintln!("[{:6.2}s] {msg}", self.now());
    }
}

/// The run in progress.
struct Story {
    clock: Clock,
    net: ColoHosts,
    watch: StatusWatch,
    phases: Vec<Phase>,
    events: Arc<Mutex<Vec<Event>>>,
    failovers: Vec<Failover>,
    partition: Option<(f64, f64)>,
    load: Option<CounterLoad>,
    caps: Option<PortCaptures>,
    capture_t: f64,
    colo_t: f64,
    /// Logs of processes gone before the end (killed hosts, the superseded colo-vmm).
    logs: String,
}

/// `lf["survivor"] == "secondary"`: the last failover made a secondary serve.
fn took_over(s: &Value) -> bool {
    s["last-failover"]["survivor"] == "secondary"
}

fn holder(s: &Value) -> &str {
    s["arbiter"]["holder"].as_str().unwrap_or("nobody")
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Runs the demo; an error only if the hosts could not be set up (or it was interrupted then).
pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let clock = Clock::new();
    clock.say(&format!(
        "starting hosts a, b and c (namespaces on a LAN switch and a replication network), etcd on a witness \
         host, vhost-net-compare and colo-vmm on each host, every link keyed; host a boots the guest ({CMDLINE}), \
         b waits for COLO, c waits as a standby"
    ));
    let net = catch_unwind(|| ColoHosts::start_with(HostsOptions { arbiter: true, ..HostsOptions::new(3, CMDLINE) }))
        .map_err(|_| anyhow!("the hosts could not be set up: {}", crate::panic_message()))?;
    if interrupt::interrupted() {
        bail!("interrupted");
    }
    let apis = net.on.iter().map(|o| o.api.clone()).collect();
    let watch = StatusWatch::start(apis, move |c| {
        clock.say(&format!("host {}  {}", HOSTS[c.replica], describe(&c.look)));
    });
    let mut story = Story {
        clock,
        net,
        watch,
        phases: vec![],
        events: Arc::default(),
        failovers: vec![],
        partition: None,
        load: None,
        caps: None,
        capture_t: 0.0,
        colo_t: 0.0,
        logs: String::new(),
    };
    let result = catch_unwind(AssertUnwindSafe(|| story.phases(args)));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => story.abort(&format!("{e:#}")),
        Err(_) => story.abort(&format!("the harness failed: {}", crate::panic_message())),
    }
    Ok(story.finish())
}

impl Story {
    fn phases(&mut self, args: &Args) -> anyhow::Result<()> {
        let steady = Duration::from_secs_f64(args.steady_secs);
        self.colo(steady)?;
        self.first_failover(steady)?;
        self.partition_b_c(steady, Duration::from_secs_f64(args.partition_secs))?;
        self.second_failover(Duration::from_secs_f64(args.after_secs))?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // The phases.

    /// 1. COLO a→b; the counter session starts.
    fn colo(&mut self, steady: Duration) -> anyhow::Result<()> {
        self.phase("colo", "COLO from host a to host b; one counter session for the whole demo");
        self.wait(0, "holding the arbiter's key", 15, |s| s["arbiter"]["held"] == true)?;
        self.caps = Some(PortCaptures::start(&self.net, &[0, 1, 2]));
        self.capture_t = self.clock.now();
        self.colo_t = self.clock.now();
        let uri = format!("uri={}", self.net.uri(1));
        self.event(Some(0), &format!("colo-start on host a to host b ({uri})"));
        self.net.ctl(0, "colo-start", &[&uri]).map_err(|e| anyhow!("colo-start: {e}"))?;
        self.wait(0, "primary in COLO", 30, |s| s["role"] == "primary" && s["state"] == "running")?;
        self.wait(1, "secondary in COLO", 30, |s| s["role"] == "secondary" && s["state"] == "running")?;
        let c = CounterClient::over(self.net.connect(9000));
        // Long enough for a takeover that waits for a lease to expire.
        c.set_timeout(Duration::from_secs(20));
        self.event(None, &format!("counter session opened at {}; an increment every 10 ms from now on", c.last));
        self.load = Some(CounterLoad::start(c));
        let before = self.replies();
        pause(steady)?;
        let a = self.latest(0);
        self.check(
            "host a is the primary in COLO and holds the key",
            a["role"] == "primary" && a["state"] == "running" && a["arbiter"]["held"] == true,
            format!("{}/{}, key {}", text(&a["role"]), text(&a["state"]), holder(&a)),
        );
        let b = self.latest(1);
        self.check(
            "host b is the secondary in COLO",
            b["role"] == "secondary" && b["state"] == "running",
            format!("{}/{}", text(&b["role"]), text(&b["state"])),
        );
        self.counter_went_on("the counter runs", before);
        Ok(())
    }

    /// 2. Host a dies: b takes over once a's lease expired, then protects itself with c.
    fn first_failover(&mut self, steady: Duration) -> anyhow::Result<()> {
        self.phase("a dies", "host a dies; b takes over, then protects itself again with the standby on c");
        let before = self.replies();
        let f = self.kill_and_take_over(0, 1)?;
        self.failovers.push(f);
        self.wait(1, "protected again: primary in COLO with host c", 60, |s| {
            s["role"] == "primary" && s["state"] == "running" && text(&s["reprotect"]).contains("host-c")
        })?;
        let c = self.wait(2, "secondary in COLO", 20, |s| s["role"] == "secondary" && s["state"] == "running")?;
        let protected = self.clock.now();
        if let Some(f) = self.failovers.last_mut() {
            f.protected_t = Some(protected);
        }
        let b = self.latest(1);
        self.check(
            "host b protected itself again with the standby on host c, by itself",
            b["role"] == "primary" && b["state"] == "running" && c["state"] == "running",
            format!("re-protection: \"{}\"; {:.1} s after the kill", text(&b["reprotect"]), protected - self.kill_t()),
        );
        let in_colo = self.replies();
        pause(steady)?;
        self.counter_went_on("the counter went on across the failover", before);
        self.counter_went_on("the counter goes on with b and c in COLO", in_colo);
        Ok(())
    }

    /// 3. A partition between b and c while both reach etcd: b serves, c gives up; healed, c
    ///    comes back as a standby and b protects itself with it again.
    fn partition_b_c(&mut self, steady: Duration, hold: Duration) -> anyhow::Result<()> {
        self.phase("partition", "the replication link between b and c is cut (both still reach etcd), then healed");
        let before = self.replies();
        let cut = self.clock.now();
        self.event(Some(1), "partition: hosts b and c no longer hear each other (nftables drop in b)");
        self.net.lan.partition(1, 2);
        let b = self.wait(1, "serving alone", 20, |s| s["state"] == "failed-over")?;
        self.check(
            "host b keeps the key and serves alone, not fenced",
            holder(&b) == "host-b" && b["fenced"].is_null(),
            format!("{}/{}, key {}, fenced: {}", text(&b["role"]), text(&b["state"]), holder(&b), b["fenced"]),
        );
        let exit = self.net.on[2].vmm.as_mut().and_then(|p| p.wait_timeout(Duration::from_secs(25)));
        let code = exit.and_then(|s| s.code());
        let log = self.net.log(2);
        // The line that says why, from "superseded" on.
        let why = log.lines().find_map(|l| l.find("superseded:").map(|i| l[i..].to_string())).unwrap_or_default();
        match code {
            Some(code) => self.event(Some(2), &format!("host c's colo-vmm exited with status {code}")),
            None => self.event(Some(2), "host c's colo-vmm did not exit within 25 s"),
        }
        self.check(
            "host c's colo-vmm gives up: exit status 75 (superseded), never serving",
            code == Some(75) && !why.is_empty(),
            format!("exit status {code:?}; \"{}\"", why.chars().take(160).collect::<String>()),
        );
        pause(hold)?;
        let b = self.latest(1);
        self.check(
            "host b served throughout the partition",
            holder(&b) == "host-b" && b["fenced"].is_null(),
            format!("key {}, fenced: {}", holder(&b), b["fenced"]),
        );
        self.counter_went_on("the counter went on during the partition", before);
        self.logs.push_str(&format!("--- host c: colo-vmm (superseded) ---\n{log}\n"));
        self.event(Some(1), "partition healed");
        self.net.lan.heal(1);
        let healed = self.clock.now();
        self.partition = Some((cut, healed));
        self.event(
            Some(2),
            "host c's colo-vmm starts again as a standby (--standby-for testvm), as its service manager would",
        );
        self.net.restart_vmm(2, true);
        self.wait(1, "protected again: primary in COLO with host c", 60, |s| {
            s["role"] == "primary" && s["state"] == "running" && text(&s["reprotect"]).contains("host-c")
        })?;
        let c = self.wait(2, "secondary in COLO", 20, |s| s["role"] == "secondary" && s["state"] == "running")?;
        let b = self.latest(1);
        self.check(
            "host b protected itself again with host c, by itself",
            c["state"] == "running",
            format!("re-protection: \"{}\"; {:.1} s after the heal", text(&b["reprotect"]), self.clock.now() - healed),
        );
        let in_colo = self.replies();
        pause(steady)?;
        self.counter_went_on("the counter goes on with b and c in COLO again", in_colo);
        Ok(())
    }

    /// 4. Host b dies: c takes over.
    fn second_failover(&mut self, after: Duration) -> anyhow::Result<()> {
        self.phase("b dies", "host b dies; c takes over");
        let before = self.replies();
        let f = self.kill_and_take_over(1, 2)?;
        self.failovers.push(f);
        pause(after)?;
        let c = self.latest(2);
        self.check(
            "host c serves: it holds the key, not fenced",
            holder(&c) == "host-c" && c["arbiter"]["held"] == true && c["fenced"].is_null(),
            format!("{}/{}, key {}", text(&c["role"]), text(&c["state"]), holder(&c)),
        );
        self.counter_went_on("the counter went on with host c", before);
        Ok(())
    }

    /// Host `dead` dies; waits for `survivor` to take over, and checks it waited for the
    /// dead host's lease and took the key.
    fn kill_and_take_over(&mut self, dead: usize, survivor: usize) -> anyhow::Result<Failover> {
        self.logs.push_str(&host_log(&self.net, dead, "before its death"));
        let kill_t = self.clock.now();
        self.event(Some(dead), &format!("host {} dies: every process SIGKILLed, its links down", HOSTS[dead]));
        self.net.kill_host(dead);
        let s = self.wait(survivor, "taken over", 30, took_over)?;
        let lf = &s["last-failover"];
        let took_over_t = lf["at-unix-ms"].as_u64().map(|ms| self.clock.epoch(Duration::from_millis(ms)));
        let reason = text(&lf["reason"]).to_string();
        let dead_name = format!("host-{}", HOSTS[dead]);
        let waited = self.watch.changes().into_iter().find(|c| {
            c.replica == survivor
                && self.clock.at(c.at) >= kill_t
                && c.look.as_ref().and_then(|l| l.waiting.as_deref()).is_some_and(|w| w.contains(&dead_name))
        });
        self.check(
            &format!("host {} waited for host {}'s lease before taking over", HOSTS[survivor], HOSTS[dead]),
            waited.is_some(),
            match (&waited, took_over_t) {
                (Some(w), Some(t)) => format!(
                    "waiting for \"{}\" from {:.2} s; took over {:.0} ms after the kill",
                    w.look.as_ref().and_then(|l| l.waiting.as_deref()).unwrap_or(""),
                    self.clock.at(w.at),
                    (t - kill_t) * 1000.0
                ),
                _ => format!("no wait seen; took over: {reason}"),
            },
        );
        let me = format!("host-{}", HOSTS[survivor]);
        let key = self.wait(survivor, "holding the key", 10, |s| {
            s["arbiter"]["held"] == true && s["arbiter"]["holder"] == me.as_str()
        });
        self.check(
            &format!("host {} holds the key", HOSTS[survivor]),
            key.is_ok(),
            key.as_ref().map(|s| format!("key {}", holder(s))).unwrap_or_else(|e| format!("{e:#}")),
        );
        Ok(Failover { dead, survivor, kill_t, took_over_t, reason, protected_t: None })
    }

    // -----------------------------------------------------------------------------------------
    // The parts of a phase.

    fn phase(&mut self, name: &'static str, title: &str) {
        let now = self.clock.now();
        if let Some(p) = self.phases.last_mut() {
            p.end = now;
        }
        self.clock.say(&format!("== phase {}: {title}", name));
        self.phases.push(Phase { name, title: title.into(), start: now, end: f64::NAN, checks: vec![] });
    }

    fn event(&self, host: Option<usize>, what: &str) {
        self.clock.say(&format!(">> {what}"));
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push(Event {
            t: self.clock.now(),
            host,
            what: what.into(),
        });
    }

    /// Records a check of the current phase.
    fn check(&mut self, what: &str, pass: bool, detail: String) {
        self.clock.say(&format!("   [{}] {what} — {detail}", if pass { "PASS" } else { "FAIL" }));
        if let Some(p) = self.phases.last_mut() {
            p.checks.push(Check { what: what.into(), pass, detail });
        }
    }

    /// Records a check of the phase named `phase` (once the captures or the session are read).
    fn check_in(&mut self, phase: &str, what: &str, pass: bool, detail: String) {
        let Some(p) = self.phases.iter_mut().find(|p| p.name == phase) else { return };
        self.clock.say(&format!("   [{}] {phase}: {what} — {detail}", if pass { "PASS" } else { "FAIL" }));
        p.checks.push(Check { what: what.into(), pass, detail });
    }

    /// Waits for host `i`'s status to satisfy `pred` (as the watch last saw it).
    fn wait(&self, i: usize, what: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        self.watch
            .wait(i, what, Duration::from_secs(secs), interrupt::interrupted, pred)
            .map_err(|e| anyhow!("host {}: {e}", HOSTS[i]))
    }

    fn latest(&self, i: usize) -> Value {
        self.watch.latest(i).unwrap_or(Value::Null)
    }

    fn replies(&self) -> u64 {
        self.load.as_ref().map(|l| l.replies()).unwrap_or(0)
    }

    fn kill_t(&self) -> f64 {
        self.failovers.last().map(|f| f.kill_t).unwrap_or(f64::NAN)
    }

    /// Checks the session got replies since it had `before`.
    fn counter_went_on(&mut self, what: &str, before: u64) {
        let now = self.replies();
        self.check(what, now >= before + 20, format!("{} increments in this phase", now - before.min(now)));
    }

    /// A step failed: the current phase records why, the rest are skipped.
    fn abort(&mut self, why: &str) {
        self.clock.say(&format!("the demo cannot go on: {why}"));
        if self.phases.is_empty() {
            self.phase("colo", "COLO from host a to host b");
        }
        self.check("the phase ran to its end", false, why.to_string());
    }

    // -----------------------------------------------------------------------------------------
    // The end: the counter check, the captures, the timeline.

    fn finish(mut self) -> Outcome {
        let interrupted = interrupt::interrupted();
        self.phase("counter", "the counter session: every value consecutive, one session");
        let (mut replies, mut first, mut last) = (vec![], 0, 0);
        match self.load.take().map(|l| (l.first(), l.finish())) {
            Some((f, Ok((times, l)))) => {
                replies = times.iter().map(|t| self.clock.at(*t)).collect();
                (first, last) = (f, l);
                self.check(
                    "every reply exactly one more than the last, on one TCP connection",
                    true,
                    format!("{first} -> {last}: {} increments, none lost or repeated", times.len()),
                );
                let fresh = catch_unwind(AssertUnwindSafe(|| CounterClient::over(self.net.connect(9000)).last));
                self.check(
                    "a new session reads the value the client saw last",
                    fresh.as_ref().ok() == Some(&last),
                    match fresh {
                        Ok(v) => format!("get: {v}"),
                        Err(_) => format!("could not open a new session: {}", crate::panic_message()),
                    },
                );
            }
            Some((_, Err(e))) => self.check("the counter session", false, e),
            None => self.check("the counter session", false, "never started".into()),
        }
        let gaps: Vec<String> = self
            .failovers
            .iter()
            .map(|f| {
                let gap = crate::outcome::failover_gap(&replies, f);
                format!(
                    "{}→{}: {}",
                    HOSTS[f.dead],
                    HOSTS[f.survivor],
                    gap.map(|g| format!("{:.0} ms", g.0 * 1000.0)).unwrap_or("-".into())
                )
            })
            .collect();
        let after_last = self.failovers.last().map(|f| replies.iter().filter(|t| **t > f.kill_t).count());
        self.check(
            "the session outlived every failover",
            self.failovers.len() == 2 && after_last.is_some_and(|n| n >= 20),
            format!(
                "{} failovers, {} replies after the last; longest client-visible gap per failover: {}",
                self.failovers.len(),
                after_last.unwrap_or(0),
                gaps.join(", ")
            ),
        );
        let frames = self.read_captures();
        self.check_frames(&frames);
        let end_t = self.clock.now();
        if let Some(p) = self.phases.last_mut() {
            p.end = end_t;
        }
        let changes = with_missed_takeovers(&self.clock, self.watch.stop());
        let mut logs = std::mem::take(&mut self.logs);
        logs.push_str(&self.net.logs());
        if let Some(etcd) = self.net.arbiter.as_ref().and_then(|w| w.etcd.as_ref()) {
            logs.push_str(&format!("--- witness: etcd ---\n{}\n", etcd.stderr()));
        }
        if interrupted {
            self.check_in("counter", "not interrupted", false, "the demo was interrupted".into());
        }
        let events = std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()));
        Outcome {
            phases: self.phases,
            events,
            changes,
            failovers: self.failovers,
            partition: self.partition,
            replies,
            counter_first: first,
            counter_last: last,
            frames,
            colo_t: self.colo_t,
            end_t,
            logs,
        }
    }

    fn read_captures(&mut self) -> Vec<Vec<VmFrame>> {
        let Some(caps) = self.caps.take() else { return vec![vec![]; 3] };
        caps.finish_frames()
            .into_iter()
            .map(|h| {
                h.into_iter()
                    .map(|f| VmFrame { t: self.clock.epoch(f.at), rarp: f.ethertype == ETHERTYPE_RARP })
                    .collect()
            })
            .collect()
    }

    /// What the switch ports saw: c silent until it took over, each survivor announced the VM,
    /// and never two hosts sending as the VM at once.
    fn check_frames(&mut self, frames: &[Vec<VmFrame>]) {
        if frames.len() != 3 || self.caps_never_started() {
            return;
        }
        let b_dies = self.failovers.iter().find(|f| f.dead == 1).map(|f| f.kill_t).unwrap_or(f64::INFINITY);
        let c_early = frames[2].iter().filter(|f| f.t < b_dies).count();
        self.check_in(
            "partition",
            "host c never sent a frame from the VM's MAC (its switch port, from COLO's start until b died)",
            c_early == 0,
            format!("{c_early} frames"),
        );
        for f in self.failovers.clone() {
            let from = f.took_over_t.unwrap_or(f.kill_t) - 0.2;
            let rarp = frames[f.survivor].iter().filter(|x| x.rarp && x.t >= from).count();
            let phase = if f.dead == 0 { "a dies" } else { "b dies" };
            self.check_in(
                phase,
                &format!("host {} announced the VM on the LAN (RARP from its MAC)", HOSTS[f.survivor]),
                rarp > 0,
                format!("{rarp} RARP frames after the takeover"),
            );
        }
        // Host by host in the order they first spoke: each one's last frame before the next
        // one's first.
        let mut spans: Vec<(usize, f64, f64)> =
            frames.iter().enumerate().filter_map(|(i, f)| Some((i, f.first()?.t, f.last()?.t))).collect();
        spans.sort_by(|a, b| a.1.total_cmp(&b.1));
        let overlaps: Vec<String> = spans
            .windows(2)
            .filter(|w| w[0].2 >= w[1].1)
            .map(|w| {
                format!("host {} until {:.3} s, host {} from {:.3} s", HOSTS[w[0].0], w[0].2, HOSTS[w[1].0], w[1].1)
            })
            .collect();
        let order: Vec<String> = spans.iter().map(|(i, a, b)| format!("{} {a:.2}-{b:.2} s", HOSTS[*i])).collect();
        self.check_in(
            "counter",
            "never two hosts sending as the VM at once (captures on the switch ports)",
            overlaps.is_empty() && spans.len() == 3,
            if overlaps.is_empty() {
                format!("one after the other: {}", order.join(", "))
            } else {
                overlaps.join("; ")
            },
        );
    }

    fn caps_never_started(&self) -> bool {
        self.capture_t == 0.0
    }
}

/// The watch's changes in demo time, with the takeovers it missed put back: a secondary that
/// takes over and at once starts COLO with a standby can be a primary again before the next
/// look; its `last-failover` still says when it took over.
fn with_missed_takeovers(clock: &Clock, seen: Vec<colo_tests::status_watch::Change>) -> Vec<Change> {
    let mut out: Vec<Change> = vec![];
    let mut last: Vec<Option<colo_tests::status_watch::Look>> = vec![None; HOSTS.len()];
    for c in seen {
        let t = clock.at(c.at);
        if let (Some(look), Some(prev)) = (&c.look, &last[c.replica]) {
            let new_failover = look.last_failover_unix_ms.filter(|ms| prev.last_failover_unix_ms != Some(*ms));
            if let Some(ms) = new_failover.filter(|_| look.state != "failed-over") {
                let at = clock.epoch(Duration::from_millis(ms)).min(t);
                let took = colo_tests::status_watch::Look {
                    role: prev.role.clone(),
                    state: "failed-over".into(),
                    waiting: None,
                    fenced: None,
                    reprotect: prev.reprotect.clone(),
                    ..look.clone()
                };
                out.push(Change { t: at, host: c.replica, look: Some(took), inferred: true });
            }
        }
        if c.look.is_some() {
            last[c.replica] = c.look.clone();
        }
        out.push(Change { t, host: c.replica, look: c.look, inferred: false });
    }
    out.sort_by(|a, b| a.t.total_cmp(&b.t));
    out
}

/// Every log of host `i` (its colo-vmm and backends) so far, headed with `when`.
fn host_log(net: &ColoHosts, i: usize, when: &str) -> String {
    let on = &net.on[i];
    let mut s = String::new();
    if let Some(v) = &on.vmm {
        s.push_str(&format!("--- host {}: colo-vmm ({when}) ---\n{}\n", HOSTS[i], v.stderr()));
    }
    for b in &on.backends {
        s.push_str(&format!("--- host {}: backend ({when}) ---\n{}\n", HOSTS[i], b.stderr()));
    }
    s
}
