//! COLO across hosts with an arbiter (etcd on a witness host of the replication network): the
//! serving replica holds the VM's key; a takeover needs it; a partition does not make two
//! replicas serve; survivors protect themselves again with a registered standby.
//!
//! One test at a time (each runs two or three VMs on what may be a two-core machine).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use colo_tests::colo_hosts::{ColoHosts, HostsOptions};
use colo_tests::colo_topology::CounterClient;
use colo_tests::counter_load::{gap_around, longest_gaps, CounterLoad};
use colo_tests::port_capture::{since_epoch, PortCaptures};
use serde_json::Value;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A counter session on host a's VM (see [`CounterLoad`]).
fn counter_load(net: &ColoHosts) -> CounterLoad {
    let c = CounterClient::over(net.connect(9000));
    // Long enough for a takeover that waits for a lease to expire.
    c.set_timeout(Duration::from_secs(20));
    CounterLoad::start(c)
}

/// Stops the session: its reply times and last value; fails on a lost or repeated value.
fn finish(load: CounterLoad, net: &ColoHosts) -> (Vec<std::time::Instant>, u64) {
    load.finish().unwrap_or_else(|e| panic!("{e}\n{}", net.logs()))
}

fn check(test: &str) -> bool {
    let pre = colo_tests::colo_hosts::prerequisites().and_then(|()| {
        for tool in ["etcd", "nft"] {
            if !colo_tests::have(tool) {
                return Err(format!("needs {tool} (apt-get install etcd-server nftables)"));
            }
        }
        Ok(())
    });
    colo_tests::can_run(test, pre)
}

fn with_arbiter(hosts: usize, cmdline: &str) -> ColoHosts {
    ColoHosts::start_with(HostsOptions { arbiter: true, ..HostsOptions::new(hosts, cmdline) })
}

/// `hosts` hosts with an arbiter, COLO from host a to host b, and a counter session that has
/// run for a second.
fn colo_under_load(hosts: usize) -> (ColoHosts, CounterLoad) {
    let net = with_arbiter(hosts, "app=counter,echo");
    net.wait_status(0, "holding the key", Duration::from_secs(10), |s| s["arbiter"]["held"] == true);
    net.start_colo(0, 1);
    let load = counter_load(&net);
    std::thread::sleep(Duration::from_secs(1));
    (net, load)
}

/// The last failover of a test: host `victim`'s processes are killed, host `survivor` takes
/// over, the counter runs a second more and stops. Returns the survivor's status, the reply
/// times, the last value, the longest gap around the kill and the replies after it.
fn last_failover(
    net: &ColoHosts,
    load: CounterLoad,
    victim: usize,
    survivor: usize,
) -> (Value, Vec<Instant>, u64, Duration, usize) {
    let killed = Instant::now();
    net.signal_host(victim, libc::SIGKILL);
    let status = net.wait_status(survivor, "took over", Duration::from_secs(10), failed_over);
    std::thread::sleep(Duration::from_secs(1));
    let (times, last) = finish(load, net);
    let (gap, after) = gap_around(&times, killed);
    (status, times, last, gap, after)
}

fn failed_over(s: &Value) -> bool {
    s["state"] == "failed-over"
}

#[test]
fn with_an_arbiter_a_killed_primary_process_is_replaced_at_once() {
    let _g = serial();
    if !check("with_an_arbiter_a_killed_primary_process_is_replaced_at_once") {
        return;
    }
    let (net, load) = colo_under_load(2);
    // Host a's processes die, its links stay up: the kernel resets the checkpoint link.
    let killed = Instant::now();
    net.signal_host(0, libc::SIGKILL);
    let s = net.wait_status(1, "took over", Duration::from_secs(10), failed_over);
    let took = killed.elapsed();
    // Whenever the client's backed-off retransmission timer lets its session resume.
    load.wait_for_more(25, Duration::from_secs(12));
    let (times, _) = finish(load, &net);
    let (gap, after) = gap_around(&times, killed);
    eprintln!("killed: took over within {took:?}; longest gap {gap:?}; arbiter {:#}", s["arbiter"]);
    assert!(after >= 20, "the session went on: {after}");
    assert_eq!(s["arbiter"]["holder"], "host-b", "{s:#}");
    assert!(s["arbiter"]["held"] == true, "{s:#}");
    assert!(took < Duration::from_millis(1500), "taken from a process known gone, not after its lease: {took:?}");
}

#[test]
fn with_an_arbiter_a_dead_primary_host_is_replaced_once_its_lease_expired() {
    let _g = serial();
    if !check("with_an_arbiter_a_dead_primary_host_is_replaced_once_its_lease_expired") {
        return;
    }
    let (mut net, load) = colo_under_load(2);
    let killed = Instant::now();
    net.kill_host(0);
    let waiting = net.wait_status(1, "waiting for the key", Duration::from_secs(10), |s| !s["waiting"].is_null());
    let s = net.wait_status(1, "took over", Duration::from_secs(15), failed_over);
    let took = killed.elapsed();
    // Whenever the client's backed-off retransmission timer lets its session resume.
    load.wait_for_more(25, Duration::from_secs(12));
    let (times, _) = finish(load, &net);
    let (gap, after) = gap_around(&times, killed);
    eprintln!("host a dead: took over after {took:?}; longest gap {gap:?}; waited for: {}", waiting["waiting"]);
    assert!(waiting["waiting"].as_str().unwrap_or("").contains("held by host-a"), "{waiting:#}");
    assert!(after >= 20, "the session went on: {after}");
    assert_eq!(s["arbiter"]["holder"], "host-b");
    // Heartbeat timeout (1 s), then the rest of host a's lease (arbiter-ttl 2 s).
    assert!(took >= Duration::from_millis(1500), "not before host a's lease could expire: {took:?}");
}

#[test]
fn with_an_arbiter_a_cut_replication_link_leaves_the_primary_serving_and_the_secondary_silent() {
    let _g = serial();
    if !check("with_an_arbiter_a_cut_replication_link_leaves_the_primary_serving_and_the_secondary_silent") {
        return;
    }
    let mut net = with_arbiter(2, "app=counter,echo");
    net.wait_status(0, "holding the key", Duration::from_secs(10), |s| s["arbiter"]["held"] == true);
    net.start_colo(0, 1);
    let caps = PortCaptures::start(&net, &[0, 1]);
    let load = counter_load(&net);
    std::thread::sleep(Duration::from_secs(1));
    // Host a and host b no longer hear each other; both still reach the witness.
    let cut = Instant::now();
    net.lan.partition(0, 1);
    let a = net.wait_status(0, "serving alone", Duration::from_secs(10), failed_over);
    assert_eq!(a["arbiter"]["holder"], "host-a", "{a:#}");
    assert!(a["fenced"].is_null(), "the primary keeps serving: {a:#}");
    // Host b's secondary gives up: its VM is out of date for good; exit status 75 asks its
    // service manager for a fresh standby.
    let status = net.on[1].vmm.as_mut().expect("host b's colo-vmm").wait_timeout(Duration::from_secs(15));
    assert_eq!(status.and_then(|s| s.code()), Some(75), "host b's colo-vmm exits as superseded\n{}", net.logs());
    let superseded = cut.elapsed();
    assert!(net.log(1).contains("superseded: host-a"), "it says why\n{}", net.log(1));
    let healed = superseded.as_secs_f64();
    // Healed, host b comes back as a standby, and host a protects itself again by itself.
    net.lan.heal(0);
    net.restart_vmm(1, true);
    let a = net.wait_status(0, "re-protected", Duration::from_secs(30), |s| s["state"] == "running");
    net.wait_status(1, "secondary again", Duration::from_secs(10), |s| s["state"] == "running");
    std::thread::sleep(Duration::from_secs(1));
    let (times, last) = finish(load, &net);
    let from = caps.finish();
    let (gap, after) = gap_around(&times, cut);
    eprintln!("partition: host b superseded after {superseded:?}; longest gap {gap:?}; {after} increments since (last {last}); reprotect: {}", a["reprotect"]);
    eprintln!("longest waits (from the cut; healed at {healed:.2}s): {}", longest_gaps(&times, cut, 3));
    assert!(after >= 50, "the counter went on with host a: {after}");
    assert!(!from[0].is_empty(), "host a served");
    assert!(from[1].is_empty(), "host b never sent from the VM's MAC: {} frames", from[1].len());
}

#[test]
fn with_an_arbiter_a_primary_cut_off_from_arbiter_and_secondary_fences_itself_before_its_lease_expires() {
    let _g = serial();
    if !check("with_an_arbiter_a_primary_cut_off_from_arbiter_and_secondary_fences_itself_before_its_lease_expires") {
        return;
    }
    let net = with_arbiter(2, "app=counter,echo");
    net.wait_status(0, "holding the key", Duration::from_secs(10), |s| s["arbiter"]["held"] == true);
    net.start_colo(0, 1);
    let caps = PortCaptures::start(&net, &[0, 1]);
    let load = counter_load(&net);
    std::thread::sleep(Duration::from_secs(1));
    // Host a loses its replication link only: its clients still reach it over the LAN.
    let cut = Instant::now();
    net.lan.host(0).ns.exec(&["ip", "link", "set", "dev", "rep0", "down"]);
    let b = net.wait_status(1, "took over", Duration::from_secs(15), failed_over);
    let took = cut.elapsed();
    let a = net.wait_status(0, "fenced", Duration::from_secs(10), |s| !s["fenced"].is_null());
    // Whenever the client's backed-off retransmission timer lets its session resume.
    load.wait_for_more(25, Duration::from_secs(12));
    let (times, last) = finish(load, &net);
    let from = caps.finish();
    let (gap, after) = gap_around(&times, cut);
    eprintln!(
        "host a cut off: host b took over after {took:?}; longest gap {gap:?}; {after} increments since (last {last})"
    );
    eprintln!("host a: {}", a["fenced"]);
    assert_eq!(b["arbiter"]["holder"], "host-b", "{b:#}");
    assert!(after >= 20, "the counter went on with host b: {after}");
    let first_b = *from[1].first().unwrap_or_else(|| panic!("host b never sent from the VM's MAC\n{}", net.logs()));
    assert!(first_b > since_epoch(cut), "host b sent as the VM only after the cut");
    let last_a = *from[0].last().expect("host a served before the cut");
    assert!(
        last_a < first_b,
        "no moment when both hosts sent from the VM's MAC: host a's last {last_a:?}, host b's first {first_b:?}"
    );
    assert!(net.status(0)["fenced"].is_string(), "host a stays fenced: the key is host b's");
}

#[test]
fn with_the_arbiter_down_colo_goes_on_and_a_failover_waits_for_it() {
    let _g = serial();
    if !check("with_the_arbiter_down_colo_goes_on_and_a_failover_waits_for_it") {
        return;
    }
    let mut net = with_arbiter(2, "app=counter,echo");
    net.wait_status(0, "holding the key", Duration::from_secs(10), |s| s["arbiter"]["held"] == true);
    net.set_params(0, &[("max-time", 500)]);
    net.start_colo(0, 1);
    let load = counter_load(&net);
    net.stop_etcd();
    let s = net.wait_status(0, "arbiter unreachable", Duration::from_secs(10), |s| s["arbiter"]["reachable"] == false);
    let before = s["checkpoints"]["total"].as_u64().unwrap_or(0);
    std::thread::sleep(Duration::from_secs(3));
    let s = net.status(0);
    assert_eq!(s["state"], "running", "COLO goes on without the arbiter: {s:#}");
    assert!(s["fenced"].is_null(), "a primary in COLO does not fence: {s:#}");
    assert!(s["checkpoints"]["total"].as_u64().unwrap_or(0) > before, "checkpoints go on: {s:#}");
    // Host a's processes die: host b knows, but may not serve without the arbiter.
    let killed = Instant::now();
    net.signal_host(0, libc::SIGKILL);
    let b = net.wait_status(1, "waiting for the arbiter", Duration::from_secs(10), |s| {
        s["waiting"].as_str().is_some_and(|w| w.contains("arbiter"))
    });
    std::thread::sleep(Duration::from_secs(2));
    let b2 = net.status(1);
    assert_ne!(b2["state"], "failed-over", "no takeover without the arbiter: {b2:#}");
    // The arbiter is back: the takeover goes through.
    let back = Instant::now();
    net.start_etcd();
    let b3 = net.wait_status(1, "took over", Duration::from_secs(15), failed_over);
    let took = back.elapsed();
    // The client's retransmission timer backed off during the outage (a run once saw its
    // session resume 3 s after the kill, with 17 increments in the second left).
    load.wait_for_more(25, Duration::from_secs(12));
    let (times, last) = finish(load, &net);
    let (gap, after) = gap_around(&times, killed);
    eprintln!(
        "arbiter down: host b waited ({}); took over {took:?} after etcd returned; gap {gap:?}; last {last}",
        b["waiting"]
    );
    assert_eq!(b3["arbiter"]["holder"], "host-b", "{b3:#}");
    assert!(after >= 20, "the session went on once the arbiter returned: {after}");
}

#[test]
fn survivors_are_protected_again_by_colo_start_and_one_session_outlives_three_failovers() {
    let _g = serial();
    if !check("survivors_are_protected_again_by_colo_start_and_one_session_outlives_three_failovers") {
        return;
    }
    // No arbiter: re-protection by command is the same with or without one.
    let mut net = ColoHosts::start_with(HostsOptions::new(2, "app=counter,echo"));
    net.start_colo(0, 1);
    let load = counter_load(&net);
    std::thread::sleep(Duration::from_secs(1));
    // 1. The secondary's host dies: host a runs on alone, then protects itself again.
    net.kill_host(1);
    net.wait_status(0, "lost its secondary", Duration::from_secs(10), failed_over);
    net.restart_host(1, false);
    net.start_colo(0, 1);
    std::thread::sleep(Duration::from_secs(1));
    // 2. The primary's host dies: host b takes over, then protects itself with host a.
    net.kill_host(0);
    net.wait_status(1, "took over", Duration::from_secs(10), failed_over);
    net.restart_host(0, false);
    net.start_colo(1, 0);
    std::thread::sleep(Duration::from_secs(1));
    // 3. Host b's processes die: host a takes over.
    let (a, times, last, gap, after) = last_failover(&net, load, 1, 0);
    eprintln!("three failovers, two re-protections: {} increments, last {last}; last gap {gap:?}", times.len());
    assert_eq!(a["last-failover"]["survivor"], "secondary", "{a:#}");
    assert!(after >= 20, "the session went on after the third failover: {after}");
    // No value lost or repeated (each reply was checked to follow the last), on one connection.
}

#[test]
fn with_an_arbiter_a_to_b_to_c_protects_itself_again_from_a_standby() {
    let _g = serial();
    if !check("with_an_arbiter_a_to_b_to_c_protects_itself_again_from_a_standby") {
        return;
    }
    let (net, load) = colo_under_load(3);
    // Host a's processes die: host b takes over and starts COLO with the standby on host c.
    net.signal_host(0, libc::SIGKILL);
    // It may re-protect itself before a look sees it failed over: the last failover stays.
    net.wait_status(1, "took over", Duration::from_secs(10), |s| s["last-failover"]["survivor"] == "secondary");
    let b = net.wait_status(1, "re-protected", Duration::from_secs(40), |s| s["state"] == "running");
    net.wait_status(2, "secondary", Duration::from_secs(10), |s| s["state"] == "running");
    assert!(b["reprotect"].as_str().unwrap_or("").contains("host-c"), "{b:#}");
    assert!(net.log(1).contains("re-protection"), "a trace event says so\n{}", net.logs());
    std::thread::sleep(Duration::from_secs(1));
    // Host b's processes die: host c takes over.
    let (c, times, last, gap, after) = last_failover(&net, load, 1, 2);
    eprintln!("a→b→c: {} increments, last {last}; gap at the second failover {gap:?}", times.len());
    assert_eq!(c["arbiter"]["holder"], "host-c", "{c:#}");
    assert!(after >= 20, "the session went on with host c: {after}");
}

/// Parameters that put the pair in passive mode at once and keep it there.
const FORCE_PASSIVE: &[(&str, u64)] = &[("max-time", 100), ("passive-limit", 100_000), ("passive-count", 1_000_000)];

#[test]
fn across_hosts_a_failover_in_passive_mode_needs_no_retransmission() {
    let _g = serial();
    if !check("across_hosts_a_failover_in_passive_mode_needs_no_retransmission") {
        return;
    }
    let net = with_arbiter(2, "app=counter,echo");
    net.wait_status(0, "holding the key", Duration::from_secs(10), |s| s["arbiter"]["held"] == true);
    net.set_params(0, FORCE_PASSIVE);
    net.start_colo(0, 1);
    net.wait_status(0, "passive", Duration::from_secs(10), |s| s["mode"] == "passive");
    let load = counter_load(&net);
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Instant::now();
    net.signal_host(0, libc::SIGKILL);
    net.wait_status(1, "took over", Duration::from_secs(10), failed_over);
    std::thread::sleep(Duration::from_secs(2));
    let (times, _) = finish(load, &net);
    let (gap, after) = gap_around(&times, killed);
    let first = times.iter().find(|t| **t > killed).map(|t| *t - killed).unwrap_or_default();
    // Reported; asserted loosely (the goal, 100 ms, is for an unloaded machine).
    eprintln!(
        "passive-mode failover across hosts: longest wait across it {gap:?}; first reply {first:?} after the kill"
    );
    assert!(after >= 20, "the session went on: {after}");
    assert!(gap < Duration::from_secs(3), "no long stall: {gap:?}");
}
