//! COLO across hosts with an arbiter (etcd on a witness host of the replication network): the
//! serving replica holds the VM's key; a takeover needs it; a partition does not make two
//! replicas serve; survivors protect themselves again with a registered standby.
//!
//! One test at a time (each runs two or three VMs on what may be a two-core machine).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use colo_tests::colo_hosts::{ColoHosts, HostsOptions};
use colo_tests::colo_topology::CounterClient;
use serde_json::Value;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
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

/// A counter session incrementing every 10 ms on its own thread until stopped.
struct CounterLoad {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(Vec<Instant>, u64, Option<String>)>,
}

impl CounterLoad {
    fn start(net: &ColoHosts) -> CounterLoad {
        let mut c = CounterClient::over(net.connect(9000));
        // Long enough for a takeover that waits for a lease to expire.
        c.set_timeout(Duration::from_secs(20));
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

    fn finish(self, net: &ColoHosts) -> (Vec<Instant>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let (times, last, err) = self.thread.join().expect("counter thread");
        if let Some(e) = err {
            panic!("counter session: {e}\n{}", net.logs());
        }
        (times, last)
    }
}

fn gap_around(times: &[Instant], at: Instant) -> (Duration, usize) {
    let after = times.iter().filter(|t| **t > at).count();
    let gap = times.windows(2).filter(|w| w[1] > at).map(|w| w[1] - w[0]).max().unwrap_or_default();
    (gap, after)
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
    let net = with_arbiter(2, "app=counter,echo");
    net.wait_status(0, "holding the key", Duration::from_secs(10), |s| s["arbiter"]["held"] == true);
    net.start_colo(0, 1);
    let load = CounterLoad::start(&net);
    std::thread::sleep(Duration::from_secs(1));
    // Host a's processes die, its links stay up: the kernel resets the checkpoint link.
    let killed = Instant::now();
    net.signal_host(0, libc::SIGKILL);
    let s = net.wait_status(1, "took over", Duration::from_secs(10), failed_over);
    let took = killed.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let (times, _) = load.finish(&net);
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
    let mut net = with_arbiter(2, "app=counter,echo");
    net.wait_status(0, "holding the key", Duration::from_secs(10), |s| s["arbiter"]["held"] == true);
    net.start_colo(0, 1);
    let load = CounterLoad::start(&net);
    std::thread::sleep(Duration::from_secs(1));
    let killed = Instant::now();
    net.kill_host(0);
    let waiting = net.wait_status(1, "waiting for the key", Duration::from_secs(10), |s| !s["waiting"].is_null());
    let s = net.wait_status(1, "took over", Duration::from_secs(15), failed_over);
    let took = killed.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let (times, _) = load.finish(&net);
    let (gap, after) = gap_around(&times, killed);
    eprintln!("host a dead: took over after {took:?}; longest gap {gap:?}; waited for: {}", waiting["waiting"]);
    assert!(waiting["waiting"].as_str().unwrap_or("").contains("held by host-a"), "{waiting:#}");
    assert!(after >= 20, "the session went on: {after}");
    assert_eq!(s["arbiter"]["holder"], "host-b");
    // Heartbeat timeout (1 s), then the rest of host a's lease (arbiter-ttl 2 s).
    assert!(took >= Duration::from_millis(1500), "not before host a's lease could expire: {took:?}");
}
