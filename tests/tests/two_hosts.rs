//! COLO across two hosts (network namespaces): each host runs the VM's colo-vmm and its
//! backend; the backends talk over a frame link, the VMMs over the checkpoint link, both on the
//! replication network; clients reach the VM over the LAN switch. Traffic through COLO, hybrid
//! mode, host deaths and freezes with the network following the survivor, and the link key.
//!
//! One test at a time (each runs two VMs and their backends on what may be a two-core machine).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use colo_tests::colo_hosts::{prerequisites, ColoHosts, HostBackend};
use colo_tests::colo_topology::CounterClient;
use colo_tests::hosts::read_capture;
use colo_tests::vm_topology::GUEST_MAC;
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

/// A counter session incrementing every 10 ms on its own thread until stopped; every reply
/// checked to be one more than the last (by [`CounterClient`]).
struct CounterLoad {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(Vec<Instant>, u64, Option<String>)>,
}

impl CounterLoad {
    fn start(net: &ColoHosts) -> CounterLoad {
        let mut c = CounterClient::over(net.connect(9000));
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut times = vec![];
            while !s.load(Ordering::Relaxed) {
                if let Err(e) = c.inc() {
                    return (times, c.last, Some(e));
                }
                times.push(Instant::now());
                std::thread::sleep(Duration::from_millis(10));
            }
            (times, c.last, None)
        });
        CounterLoad { stop, thread }
    }

    /// Stops; the reply times and the last value. Fails the test on a lost or repeated value.
    fn finish(self, net: &ColoHosts) -> (Vec<Instant>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let (times, last, err) = self.thread.join().expect("counter thread");
        if let Some(e) = err {
            panic!("counter session: {e}\n{}", net.logs());
        }
        (times, last)
    }
}

/// The longest silence between two replies around `at`, and the replies after it.
fn gap_around(times: &[Instant], at: Instant) -> (Duration, usize) {
    let after = times.iter().filter(|t| **t > at).count();
    let gap = times.windows(2).filter(|w| w[1] > at).map(|w| w[1] - w[0]).max().unwrap_or_default();
    (gap, after)
}

fn vm_mac() -> [u8; 6] {
    colo_proxy::wire::ethernet::parse_mac(GUEST_MAC).unwrap()
}

/// Times (since the epoch) of the frames in a capture sent from the VM's MAC.
fn vm_frames(path: &std::path::Path) -> Vec<Duration> {
    read_capture(path).into_iter().filter(|(_, f)| f.len() >= 12 && f[6..12] == vm_mac()).map(|(t, _)| t).collect()
}

#[test]
fn when_host_a_dies_the_counter_session_continues_on_host_b() {
    let _g = serial();
    if !check("when_host_a_dies_the_counter_session_continues_on_host_b") {
        return;
    }
    let mut net = ColoHosts::start(HostBackend::VhostNetCompare, 2, "app=counter,echo", true);
    net.start_colo(0, 1);
    let load = CounterLoad::start(&net);
    std::thread::sleep(Duration::from_secs(2));
    let killed = Instant::now();
    net.kill_host(0);
    let s = net.wait_status(1, "failed over", Duration::from_secs(10), |s| s["state"] == "failed-over");
    std::thread::sleep(Duration::from_secs(2));
    let (times, last) = load.finish(&net);
    let (gap, after) = gap_around(&times, killed);
    eprintln!("host a killed: {after} increments on host b after it (last value {last}); longest client-visible gap {gap:?}; {s:#}");
    assert!(after >= 20, "the session went on on host b: {after} increments");
    assert_eq!(s["last-failover"]["survivor"], "secondary", "{s:#}");
    assert!(
        s["last-failover"]["reason"].as_str().unwrap_or("").contains("heartbeat"),
        "no reset from a dead host: {s:#}"
    );
}

#[test]
fn a_frozen_host_a_is_replaced_by_b_whose_announcement_moves_the_clients_and_a_never_sends_again() {
    let _g = serial();
    if !check("a_frozen_host_a_is_replaced_by_b_whose_announcement_moves_the_clients_and_a_never_sends_again") {
        return;
    }
    let net = ColoHosts::start(HostBackend::VhostNetCompare, 2, "app=counter,echo", true);
    net.start_colo(0, 1);
    let (cap_a, cap_b) = (net.dir.path("port-a.pcap"), net.dir.path("port-b.pcap"));
    let mut tcpdump = [net.lan.capture_host(0, &cap_a), net.lan.capture_host(1, &cap_b)];
    let load = CounterLoad::start(&net);
    std::thread::sleep(Duration::from_millis(1500));
    let frozen = Instant::now();
    net.signal_host(0, libc::SIGSTOP);
    let s = net.wait_status(1, "failed over", Duration::from_secs(10), |s| s["state"] == "failed-over");
    std::thread::sleep(Duration::from_millis(1500));
    net.signal_host(0, libc::SIGCONT);
    let a = net.wait_status(0, "stepped down", Duration::from_secs(10), |s| s["state"] == "stopped");
    std::thread::sleep(Duration::from_secs(1));
    let (times, last) = load.finish(&net);
    for t in &mut tcpdump {
        t.signal(libc::SIGINT);
        t.wait_timeout(Duration::from_secs(5));
    }
    let (gap, after) = gap_around(&times, frozen);
    eprintln!("host a frozen: {after} increments after (last {last}); longest gap {gap:?}");
    assert!(after >= 20, "the session went on on host b: {after} increments");
    assert!(a["error"].as_str().unwrap_or("").contains("took over"), "host a stepped down: {a:#}");
    assert_eq!(s["last-failover"]["survivor"], "secondary");
    let (from_a, from_b) = (vm_frames(&cap_a), vm_frames(&cap_b));
    let since_epoch = |i: Instant| SystemTime::now().duration_since(UNIX_EPOCH).unwrap() - i.elapsed();
    let first_b = *from_b.first().unwrap_or_else(|| panic!("host b never sent from the VM's MAC\n{}", net.logs()));
    assert!(first_b > since_epoch(frozen), "host b sent from the VM's MAC only after host a froze");
    let late: Vec<&Duration> = from_a.iter().filter(|t| **t >= first_b).collect();
    assert!(
        late.is_empty(),
        "host a sent {} frames from the VM's MAC after host b's first\n{}",
        late.len(),
        net.logs()
    );
    assert!(!from_a.is_empty(), "the capture on host a's port saw the VM before the freeze");
}

#[test]
fn when_host_b_dies_host_a_goes_on_alone() {
    let _g = serial();
    if !check("when_host_b_dies_host_a_goes_on_alone") {
        return;
    }
    let mut net = ColoHosts::start(HostBackend::VhostNetCompare, 2, "app=counter,echo", true);
    net.start_colo(0, 1);
    let load = CounterLoad::start(&net);
    std::thread::sleep(Duration::from_secs(2));
    let killed = Instant::now();
    net.kill_host(1);
    let p = net.wait_status(0, "failed over", Duration::from_secs(10), |s| s["state"] == "failed-over");
    std::thread::sleep(Duration::from_secs(2));
    let (times, last) = load.finish(&net);
    let (gap, after) = gap_around(&times, killed);
    eprintln!("host b killed: {after} increments after (last {last}); longest gap {gap:?}");
    assert!(after >= 20, "the primary went on alone: {after} increments");
    assert_eq!(p["last-failover"]["survivor"], "primary", "{p:#}");
}
