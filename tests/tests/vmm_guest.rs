//! colo-vmm with its reference guest on vhost-net-compare (passthrough) and a tap: the guest's
//! services answer from a client namespace, with one vCPU and with four; `stop`/`cont` freeze
//! and resume it with its state intact; an idle VM costs almost no CPU, with any number of
//! vCPUs; `burn` keeps every vCPU busy; SIGTERM disconnects from the backend in order.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use colo_proxy::control::{ControlClient, Event, PeerState};
use colo_tests::skip;
use colo_tests::vm_topology::{burn_per_vcpu, cpu_time, prerequisites, thread_cpu_times, LineClient, VmNet, GUEST_IP};

fn check(test: &str) -> bool {
    colo_tests::can_run(test, prerequisites())
}

#[test]
fn guest_services_answer_through_the_passthrough_backend() {
    if !check("guest_services_answer_through_the_passthrough_backend") {
        return;
    }
    services_answer(&VmNet::start("app=echo,http,counter,top top_ms=200"), 1);
}

#[test]
fn guest_services_answer_with_four_vcpus() {
    if !check("guest_services_answer_with_four_vcpus") {
        return;
    }
    let vm = VmNet::start_with("app=echo,http,counter,top top_ms=200", &["--cpus", "4"]);
    services_answer(&vm, 4);
}

/// Every service of a guest with `cpus` vCPUs answers correctly.
fn services_answer(vm: &VmNet, cpus: u64) {
    let log = vm.serial_log();
    assert!(log.contains(&format!("cpus={cpus}\n")), "{log}");
    assert!(log.contains("colo-guest: net up ip=10.0.0.2/24 mac=52:54:00:12:34:56"), "{log}");
    for svc in ["echo tcp/7", "echo udp/7", "http tcp/80", "counter tcp/9000", "top tcp/9100"] {
        assert!(log.contains(&format!("colo-guest: listening {svc}")), "missing {svc}:\n{log}");
    }

    // ICMP.
    let (ok, out) = vm.client.try_exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", GUEST_IP]);
    assert!(ok, "ping:\n{out}");

    // UDP echo.
    let u = vm.udp();
    for i in 0..5 {
        let msg = format!("datagram {i}");
        u.send_to(msg.as_bytes(), (GUEST_IP, 7)).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = u.recv_from(&mut buf).expect("UDP echo");
        assert_eq!(&buf[..n], msg.as_bytes());
        assert_eq!(from.port(), 7);
    }

    // TCP echo, with a larger write that spans several segments.
    let mut e = vm.connect(7);
    let big: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    e.write_all(&big).unwrap();
    let mut back = vec![0u8; big.len()];
    e.read_exact(&mut back).expect("TCP echo of 20000 bytes");
    assert_eq!(back, big);

    // HTTP.
    let get = |path: &str| -> String {
        let mut s = vm.connect(80);
        write!(s, "GET {path} HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).expect("HTTP response");
        r
    };
    let root = get("/");
    assert!(root.starts_with("HTTP/1.1 200"), "{root}");
    let stats = get("/stats");
    assert!(stats.starts_with("HTTP/1.1 200") && stats.contains("uptime"), "{stats}");
    assert!(stats.contains(&format!("\ncpus={cpus}\n")), "{stats}");
    assert!(get("/nope").starts_with("HTTP/1.1 404"));

    // Counter: 1000 increments answered 1..=1000.
    let mut c = LineClient::new(vm.connect(9000));
    for i in 1..=1000u32 {
        assert_eq!(c.ask("inc").unwrap(), i.to_string(), "increment {i}");
    }
    assert_eq!(c.ask("get").unwrap(), "1000");

    // top: lines about every top_ms (200 ms).
    let mut t = LineClient::new(vm.connect(9100));
    t.read_line().expect("first top line");
    let start = Instant::now();
    for _ in 0..10 {
        let line = t.read_line().expect("top line");
        assert!(line.starts_with("top"), "{line}");
    }
    let each = start.elapsed() / 10;
    assert!(
        each >= Duration::from_millis(150) && each <= Duration::from_millis(300),
        "top lines every {each:?}, expected about 200 ms"
    );
}

#[test]
fn stop_freezes_the_guest_and_cont_resumes_it_with_its_state() {
    if !check("stop_freezes_the_guest_and_cont_resumes_it_with_its_state") {
        return;
    }
    let vm = VmNet::start("app=counter,echo");
    let mut c = LineClient::new(vm.connect(9000));
    for i in 1..=5 {
        assert_eq!(c.ask("inc").unwrap(), i.to_string());
    }
    let (ok, out) = vm.ctl("stop", &[]);
    assert!(ok, "{out}");
    let (_, st) = vm.ctl("query-status", &[]);
    assert!(st.contains("\"paused\""), "{st}");
    assert!(!vm.pings(), "a stopped guest must not answer");
    c.set_timeout(Duration::from_millis(700));
    assert!(c.ask("inc").is_err(), "a stopped guest must not answer the counter");
    let (ok, out) = vm.ctl("cont", &[]);
    assert!(ok, "{out}");
    assert!(vm.pings(), "the guest answers again after cont");
    // The increment sent while stopped is answered now, then the counter goes on.
    c.set_timeout(Duration::from_secs(5));
    assert_eq!(c.read_line().unwrap(), "6");
    assert_eq!(c.ask("inc").unwrap(), "7");
    let (_, st) = vm.ctl("query-status", &[]);
    assert!(st.contains("\"running\""), "{st}");
}

#[test]
fn an_idle_vm_uses_almost_no_cpu() {
    if !check("an_idle_vm_uses_almost_no_cpu") {
        return;
    }
    idle_vm_uses_almost_no_cpu(&VmNet::start("app=echo,http,counter"));
}

#[test]
fn an_idle_vm_with_four_vcpus_uses_almost_no_cpu() {
    if !check("an_idle_vm_with_four_vcpus_uses_almost_no_cpu") {
        return;
    }
    let vm = VmNet::start_with("app=echo,http,counter,top", &["--cpus", "4"]);
    // Some traffic first, so every task has run and set its deadlines.
    let mut c = LineClient::new(vm.connect(9000));
    for i in 1..=50 {
        assert_eq!(c.ask("inc").unwrap(), i.to_string());
    }
    drop(c);
    std::thread::sleep(Duration::from_millis(500));
    idle_vm_uses_almost_no_cpu(&vm);
}

fn idle_vm_uses_almost_no_cpu(vm: &VmNet) {
    let pid = vm.vmm.as_ref().unwrap().pid();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_time(pid);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time(pid) - before;
    let share = used.as_secs_f64() / t.elapsed().as_secs_f64();
    eprintln!("idle VMM used {used:?} of CPU in {:?} ({:.2}%)", t.elapsed(), share * 100.0);
    assert!(share < 0.05, "an idle VM used {:.1}% of a CPU", share * 100.0);
    assert!(vm.pings(), "and it still answers");
}

#[test]
fn burn_keeps_every_vcpu_busy_and_the_services_answer() {
    if !check("burn_keeps_every_vcpu_busy_and_the_services_answer") {
        return;
    }
    let vm = VmNet::start_with("app=burn,counter,http", &["--cpus", "4"]);
    let pid = vm.vmm.as_ref().unwrap().pid();
    let before_cpu = thread_cpu_times(pid, "vcpu");
    let before = burn_per_vcpu(&vm.stats());
    let mut c = LineClient::new(vm.connect(9000));
    for i in 1..=100 {
        assert_eq!(c.ask("inc").unwrap(), i.to_string(), "the counter answers while every vCPU burns");
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = burn_per_vcpu(&vm.stats());
    let after_cpu = thread_cpu_times(pid, "vcpu");
    eprintln!("burn iterations per vCPU: {before:?} -> {after:?}; vCPU threads' CPU {before_cpu:?} -> {after_cpu:?}");
    assert_eq!(after.len(), 4, "four vCPUs in /stats");
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(a > b, "vCPU {i} burns: {b} -> {a}");
    }
    for i in 0..4 {
        let name = format!("vcpu{i}");
        let used =
            after_cpu.get(&name).copied().unwrap_or_default() - before_cpu.get(&name).copied().unwrap_or_default();
        assert!(used >= Duration::from_millis(100), "thread {name} ran the guest: {used:?} of CPU in 2 s");
    }
}

#[test]
fn sigterm_disconnects_from_the_backend_in_order() {
    if !check("sigterm_disconnects_from_the_backend_in_order") {
        return;
    }
    let mut vm = VmNet::start("app=echo");
    let mut ctl = ControlClient::connect(&vm.control).expect("backend control socket");
    let vmm = vm.vmm.as_mut().unwrap();
    vmm.signal(libc::SIGTERM);
    let st = vmm.wait_timeout(Duration::from_secs(5)).expect("colo-vmm exits on SIGTERM");
    assert!(st.success(), "exit status {st:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match ctl.next_event(Some(Duration::from_millis(500))).unwrap() {
            Some(Event::Peer { state: PeerState::Disconnected, .. }) => break,
            _ if Instant::now() > deadline => panic!("the backend never saw the VM leave"),
            _ => {}
        }
    }
    vm.backend.assert_running();
    assert!(!vm.api.exists(), "the API socket is removed");
}

#[test]
fn the_guest_exit_code_becomes_the_process_exit_code() {
    if !std::path::Path::new("/dev/kvm").exists() {
        return skip("the_guest_exit_code_becomes_the_process_exit_code", "needs /dev/kvm");
    }
    let (st, out) = colo_tests::run(std::process::Command::new(colo_tests::bin("colo-vmm")).args([
        "run",
        "--cmdline",
        "exit=7",
        "--serial",
        "none",
    ]));
    assert_eq!(st.code(), Some(7), "{out}");
}
