//! COLO across two hosts (network namespaces): each host runs the VM's colo-vmm and its
//! backend; the backends talk over a frame link, the VMMs over the checkpoint link, both on the
//! replication network; clients reach the VM over the LAN switch. Traffic through COLO, hybrid
//! mode, host deaths and freezes with the network following the survivor, and the link key.
//!
//! One test at a time (each runs two VMs and their backends on what may be a two-core machine).

use std::io::{Read, Write};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use colo_tests::colo_hosts::{prerequisites, ColoHosts, HostBackend};
use colo_tests::colo_topology::CounterClient;
use serde_json::Value;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn check(test: &str) -> bool {
    colo_tests::can_run(test, prerequisites())
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn miscompares(s: &Value) -> u64 {
    s["checkpoints"]["miscompare"].as_object().map(|m| m.values().map(n).sum()).unwrap_or(0)
}

/// Counter increments, echo round trips and HTTP requests for `secs`; returns (incs, echoes, gets).
fn traffic(net: &ColoHosts, counter: &mut CounterClient, secs: u64) -> (u64, u64, u64) {
    let mut echo = net.connect(7);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut incs, mut echoes, mut gets) = (0u64, 0u64, 0u64);
    let mut i = 0u64;
    while Instant::now() < deadline {
        counter.inc().unwrap_or_else(|e| panic!("{e}\n{}", net.logs()));
        incs += 1;
        let msg = format!("echo {i} {}\n", "x".repeat((i % 200) as usize));
        echo.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        echo.read_exact(&mut back).unwrap_or_else(|e| panic!("echo: {e}\n{}", net.logs()));
        assert_eq!(back, msg.as_bytes());
        echoes += 1;
        if i.is_multiple_of(10) {
            let mut h = net.connect(80);
            h.write_all(b"GET / HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n").unwrap();
            let mut body = String::new();
            h.read_to_string(&mut body).unwrap_or_else(|e| panic!("http: {e}\n{}", net.logs()));
            assert!(body.starts_with("HTTP/1.1 200"), "{body}");
            gets += 1;
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    (incs, echoes, gets)
}

/// COLO across the hosts with deterministic traffic: only periodic checkpoints, the output
/// released by host a only.
fn colo_with_periodic_checkpoints(backend: HostBackend, keyed: bool) -> ColoHosts {
    let net = ColoHosts::start(backend, 2, "app=echo,counter,http", keyed);
    net.set_params(0, &[("max-time", 1000)]);
    net.start_colo(0, 1);
    let mut counter = CounterClient::over(net.connect(9000));
    let (incs, echoes, gets) = traffic(&net, &mut counter, 6);
    let p = net.status(0);
    let s = net.status(1);
    eprintln!("{incs} increments, {echoes} echoes, {gets} HTTP requests; primary: {p:#}");
    assert!(incs > 50 && echoes > 50 && gets > 5, "the traffic flowed");
    let total = n(&p["checkpoints"]["total"]);
    assert!(total >= 4, "periodic checkpoints every second: {total}");
    assert_eq!(miscompares(&p), 0, "deterministic services miscompared: {p:#}\n{}", net.logs());
    assert_eq!(n(&p["checkpoints"]["periodic"]), total, "every checkpoint periodic: {p:#}");
    assert!(n(&s["checkpoints"]["total"]) + 1 >= total, "the secondary loaded them: {s:#}");
    assert_eq!((p["role"].as_str(), s["role"].as_str()), (Some("primary"), Some("secondary")));
    net
}

#[test]
fn colo_across_two_hosts_carries_counter_echo_and_http_with_only_periodic_checkpoints() {
    let _g = serial();
    if !check("colo_across_two_hosts_carries_counter_echo_and_http_with_only_periodic_checkpoints") {
        return;
    }
    colo_with_periodic_checkpoints(HostBackend::VhostNetCompare, true);
}
