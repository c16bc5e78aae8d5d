//! `--metrics` end to end: a COLO pair across two hosts with every process serving its metrics
//! (colo-vmm, and vhost-net-compare or colo-proxy with its passthrough vhost-net-compare),
//! scraped while checkpoints run: each scrape passes `promtool check metrics` and says what the
//! pair is doing (checkpoints counted, each side's role, frames compared, the frame link and the
//! arbiter). And an address that cannot be bound stops each binary at start with a clear error.
//!
//! One test at a time (each runs two VMs on what may be a two-core machine).

use std::net::TcpListener;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use colo_tests::colo_hosts::{ColoHosts, HostBackend, HostsOptions, METRICS_PORT};
use colo_tests::colo_topology::CounterClient;
use colo_tests::scrape::{promtool_check, value};

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn check(test: &str, arbiter: bool) -> bool {
    let pre = colo_tests::colo_hosts::prerequisites().and_then(|()| {
        if !colo_tests::have("promtool") {
            return Err("needs promtool (apt-get install prometheus)".into());
        }
        if arbiter && !colo_tests::have("etcd") {
            return Err("needs etcd (apt-get install etcd-server)".into());
        }
        Ok(())
    });
    colo_tests::can_run(test, pre)
}

/// Host `i`'s process serving on `port`: its scrape, checked by promtool. A process that has
/// not yet published its first counters answers 503 for a moment.
fn scrape(net: &ColoHosts, i: usize, port: u16, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        match net.scrape(i, port) {
            Ok(text) => break text,
            Err(e) if Instant::now() > deadline => panic!("scraping {what} on host {i}: {e}\n{}", net.logs()),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    promtool_check(&text).unwrap_or_else(|e| panic!("{what} on host {i}: {e}\n{text}"));
    eprintln!("--- {what} on host {i}: {} lines, promtool: ok", text.lines().count());
    text
}

/// COLO from host a to b with checkpoints every 300 ms under a counter session, until each
/// side has counted a few.
fn colo_with_checkpoints(net: &ColoHosts) {
    net.set_params(0, &[("max-time", 300)]);
    net.start_colo(0, 1);
    let mut counter = CounterClient::over(net.connect(9000));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for _ in 0..20 {
            counter.inc().unwrap_or_else(|e| panic!("counter: {e}\n{}", net.logs()));
        }
        let done = |i| net.status(i)["checkpoints"]["total"].as_u64().unwrap_or(0) >= 3;
        if done(0) && done(1) {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoints\n{}", net.logs());
    }
}

/// What both colo-vmm scrapes say about a running pair.
fn check_vmms(net: &ColoHosts) -> [String; 2] {
    let [p, s] = [0, 1].map(|i| scrape(net, i, METRICS_PORT, "colo-vmm"));
    for (text, role) in [(&p, "primary"), (&s, "secondary")] {
        assert_eq!(value(text, "colo_role", &[("role", role)]), 1.0, "{role}:\n{text}");
        assert_eq!(value(text, "colo_state", &[("state", "running")]), 1.0, "{role}:\n{text}");
        let checkpoints = value(text, "colo_checkpoints_total", &[("kind", "colo")])
            + value(text, "colo_checkpoints_total", &[("kind", "passive")]);
        assert!(checkpoints >= 3.0, "{role}: checkpoints counted:\n{text}");
        assert!(value(text, "colo_checkpoint_pause_seconds_count", &[]) >= 3.0, "{role}:\n{text}");
        assert!(value(text, "colo_checkpoint_pause_seconds_sum", &[]) > 0.0, "{role}:\n{text}");
        assert!(value(text, "colo_checkpoint_bytes_sum", &[]) > 0.0, "{role}:\n{text}");
        assert_eq!(value(text, "colo_link_up", &[]), 1.0, "{role}: the checkpoint link:\n{text}");
        assert_eq!(value(text, "colo_failovers_total", &[]), 0.0, "{role}:\n{text}");
    }
    // The primary's checkpoints were periodic (max-time) unless something miscompared.
    assert!(value(&p, "colo_checkpoint_triggers_total", &[("trigger", "periodic")]) >= 1.0, "{p}");
    assert_eq!(value(&p, "colo_mode", &[("mode", "colo")]), 1.0, "{p}");
    [p, s]
}

/// What both compare backends' scrapes say (port `METRICS_PORT + 1` on each host); the
/// primary's scrape.
fn check_backends(net: &ColoHosts, what: &str) -> String {
    let [p, s] = [0, 1].map(|i| scrape(net, i, METRICS_PORT + 1, what));
    let l = |side| [("nic", "net0"), ("side", side)];
    // The primary's backend compares the primary VM's frames with the secondary's, which
    // come over the frame link.
    assert!(value(&p, "colo_compare_frames_total", &l("primary")) > 0.0, "{what}:\n{p}");
    assert!(value(&p, "colo_compare_frames_total", &l("secondary")) > 0.0, "{what}:\n{p}");
    assert!(value(&p, "colo_compare_bytes_total", &l("primary")) > 0.0, "{what}:\n{p}");
    assert!(value(&p, "colo_compare_released_frames_total", &[]) > 0.0, "{what}:\n{p}");
    assert!(value(&p, "colo_compare_hold_seconds_count", &[]) > 0.0, "{what}:\n{p}");
    assert_eq!(value(&p, "colo_compare_mode", &[("mode", "colo")]), 1.0, "{what}:\n{p}");
    assert!(value(&s, "colo_replica_to_peer_frames_total", &[]) > 0.0, "{what}: the secondary's frames:\n{s}");
    for (text, role) in [(&p, "primary"), (&s, "secondary")] {
        assert_eq!(value(text, "colo_replica_role", &[("role", role)]), 1.0, "{what} {role}:\n{text}");
        assert_eq!(value(text, "colo_frame_link_up", &[]), 1.0, "{what} {role}:\n{text}");
        assert_eq!(value(text, "colo_frame_link_secure", &[]), 1.0, "{what} {role}: keyed:\n{text}");
    }
    p
}

#[test]
fn metrics_of_a_pair_with_vhost_net_compare_and_an_arbiter() {
    let _g = serial();
    if !check("metrics_of_a_pair_with_vhost_net_compare_and_an_arbiter", true) {
        return;
    }
    let net = ColoHosts::start_with(HostsOptions {
        arbiter: true,
        metrics: true,
        ..HostsOptions::new(2, "app=counter,echo")
    });
    net.wait_status(0, "holding the key", Duration::from_secs(10), |s| s["arbiter"]["held"] == true);
    colo_with_checkpoints(&net);
    let [p, s] = check_vmms(&net);
    assert_eq!(value(&p, "colo_arbiter_held", &[]), 1.0, "the primary holds the key:\n{p}");
    assert!(value(&p, "colo_arbiter_lease_left_seconds", &[]) > 0.0, "{p}");
    assert_eq!(value(&p, "colo_fenced", &[]), 0.0, "{p}");
    assert_eq!(value(&s, "colo_arbiter_held", &[]), 0.0, "the secondary does not:\n{s}");
    let backend = check_backends(&net, "vhost-net-compare");
    eprintln!("--- the primary's colo-vmm:\n{p}\n--- its vhost-net-compare:\n{backend}");
}

#[test]
fn metrics_of_a_pair_with_colo_proxy() {
    let _g = serial();
    if !check("metrics_of_a_pair_with_colo_proxy", false) {
        return;
    }
    let net = ColoHosts::start_with(HostsOptions {
        backend: HostBackend::ColoProxy,
        metrics: true,
        ..HostsOptions::new(2, "app=counter,echo")
    });
    colo_with_checkpoints(&net);
    check_vmms(&net);
    check_backends(&net, "colo-proxy");
    // The passthrough vhost-net-compare between each VM and colo-proxy.
    for i in 0..2 {
        let text = scrape(&net, i, METRICS_PORT + 2, "vhost-net-compare (passthrough)");
        let tx = [("nic", "vm0"), ("vm", "primary"), ("queue", "tx")];
        assert!(value(&text, "colo_vhost_frames_total", &tx) > 0.0, "host {i}: the VM sent frames:\n{text}");
    }
}

/// Runs `program args` with `--metrics` on a taken address: it must stop at once, saying so.
fn refuses_a_taken_address(program: &str, args: &[&str]) {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(colo_tests::bin(program))
        .args(args)
        .args(["--metrics", &addr])
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{program} started on a taken metrics address:\n{stderr}");
    assert!(stderr.contains(&format!("cannot listen for metrics on {addr}")), "{program}:\n{stderr}");
}

#[test]
fn a_metrics_address_that_cannot_be_bound_stops_each_binary_at_start() {
    let dir = colo_tests::TempDir::new("metrics-bind");
    let s = |name: &str| dir.path(name).display().to_string();
    let (p, sec) = (s("p.sock"), s("s.sock"));
    // Its tap is opened after the metrics endpoint (no root needed to see the refusal).
    refuses_a_taken_address(
        "vhost-net-compare",
        &["--primary-socket", &p, "--secondary-socket", &sec, "--tap", "mbind0", "--mac", "52:54:00:12:34:56"],
    );
    let (pi, si, out) =
        (format!("unix:{}", s("pi.sock")), format!("unix:{}", s("si.sock")), format!("unix:{}", s("o.sock")));
    refuses_a_taken_address("colo-proxy", &["compare", "--primary-in", &pi, "--secondary-in", &si, "--outdev", &out]);
    refuses_a_taken_address(
        "colo-proxy",
        &["run", "--uplink", "mbind1", "--primary", "mbind2", "--secondary", "mbind3"],
    );
    // Before any VM is built (no KVM needed).
    refuses_a_taken_address("colo-vmm", &["run", "--api", &s("api.sock")]);
}
