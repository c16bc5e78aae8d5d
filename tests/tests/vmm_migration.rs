//! Snapshot/restore and live migration of the reference guest under load (pages dirtied by the
//! guest, TCP echo and counter traffic, frames arriving from the backend during the last
//! round): sessions continue, the counter neither loses nor repeats a value, and in the test
//! mode the destination's memory equals the source's at the pause, page for page; with four
//! vCPUs, each vCPU carries on from its own state. Broken, corrupt or truncated streams and
//! killed peers leave a consistent outcome.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use colo_tests::vm_topology::{burn_per_vcpu, prerequisites, LineClient, VmNet, GUEST_IP, GUEST_MAC};
use colo_tests::{bin, wait_for_path, Proc};

fn check(test: &str) -> bool {
    colo_tests::can_run(test, prerequisites())
}

/// Starts a destination VMM waiting on `uri` with the same backend as `vm`.
fn destination(vm: &VmNet, uri: &str, tag: &str) -> (Proc, PathBuf, PathBuf) {
    let api = vm.dir.path(&format!("{tag}-api.sock"));
    let serial = vm.dir.path(&format!("{tag}-serial.log"));
    let mut c = Command::new(bin("colo-vmm"));
    c.args(["run", "--incoming", uri])
        .arg("--net")
        .arg(format!("vhost-user={},mac={GUEST_MAC}", vm.vhost_socket.display()))
        .arg("--api")
        .arg(&api)
        .arg("--serial")
        .arg(format!("file:{}", serial.display()));
    let p = Proc::spawn(tag, c);
    if let Some(path) = uri.strip_prefix("unix:") {
        assert!(wait_for_path(Path::new(path), Duration::from_secs(10)), "destination not listening");
    }
    (p, api, serial)
}

fn ctl(api: &Path, args: &[&str]) -> (bool, String) {
    let (st, out) = colo_tests::run(Command::new(bin("colo-vmm")).arg("ctl").arg("--api").arg(api).args(args));
    (st.success(), out)
}

/// Background load: counter increments (checking each answer is the previous + 1), TCP echo
/// round trips (checking every byte), and a stream of UDP datagrams into the guest (so the
/// backend keeps writing guest memory).
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<u32, String>>>,
    last_counter: Arc<AtomicU32>,
}

impl Load {
    fn start(vm: &VmNet, first_expected: u32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let last_counter = Arc::new(AtomicU32::new(first_expected - 1));
        let mut threads = vec![];
        let mut counter = LineClient::new(vm.connect(9000));
        counter.set_timeout(Duration::from_secs(15));
        let (s, last) = (stop.clone(), last_counter.clone());
        threads.push(std::thread::spawn(move || {
            let mut expect = first_expected;
            while !s.load(Ordering::Relaxed) {
                let got = counter.ask("inc").map_err(|e| format!("counter: {e}"))?;
                if got != expect.to_string() {
                    return Err(format!("counter answered {got}, expected {expect} (a lost or repeated increment)"));
                }
                last.store(expect, Ordering::Relaxed);
                expect += 1;
            }
            Ok(expect - first_expected)
        }));
        let mut echo = vm.connect(7);
        echo.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let s = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut n = 0u32;
            while !s.load(Ordering::Relaxed) {
                let msg: Vec<u8> = (0..1500u32).map(|i| (i.wrapping_mul(n + 7) % 251) as u8).collect();
                echo.write_all(&msg).map_err(|e| format!("echo write: {e}"))?;
                let mut back = vec![0u8; msg.len()];
                echo.read_exact(&mut back).map_err(|e| format!("echo read after {n} round trips: {e}"))?;
                if back != msg {
                    return Err(format!("echo round trip {n} came back different"));
                }
                n += 1;
            }
            Ok(n)
        }));
        let udp = vm.udp();
        let s = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut n = 0u32;
            while !s.load(Ordering::Relaxed) {
                let _ = udp.send_to(&[n as u8; 1000], (GUEST_IP, 7));
                n += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
            Ok(n)
        }));
        Load { stop, threads, last_counter }
    }

    /// Stops the load and returns (counter increments, echo round trips, datagrams).
    fn finish(self) -> (u32, u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        let r: Vec<u32> = self
            .threads
            .into_iter()
            .map(|t| t.join().expect("load thread").unwrap_or_else(|e| panic!("{e}")))
            .collect();
        (r[0], r[1], r[2])
    }
}

#[test]
fn live_migration_under_load_keeps_sessions_and_memory_identical() {
    if !check("live_migration_under_load_keeps_sessions_and_memory_identical") {
        return;
    }
    let mut vm = VmNet::start("app=echo,counter,dirty dirty=3000 dirty_mib=32");
    let uri = format!("unix:{}", vm.dir.path("migrate.sock").display());
    let (mut dst, dst_api, dst_serial) = destination(&vm, &uri, "destination");
    let load = Load::start(&vm, 1);
    std::thread::sleep(Duration::from_millis(500));
    let (ok, out) = vm.ctl("migrate", &[&format!("uri={uri}"), "verify=true", "downtime-limit=30"]);
    assert!(ok, "migration failed:\n{out}\nsource:\n{}\ndestination:\n{}", vm.vmm_stderr(), dst.stderr());
    assert!(out.contains("\"completed\""), "{out}");
    std::thread::sleep(Duration::from_millis(700));
    let last = load.last_counter.clone();
    let (incs, echoes, datagrams) = load.finish();
    let last = last.load(Ordering::Relaxed);
    eprintln!("during the test: {incs} increments, {echoes} echo round trips, {datagrams} datagrams; migration: {out}");
    assert!(incs > 20 && echoes > 20, "the load ran through the migration");
    assert!(dst.stderr().contains("verified: memory equals the source's page for page"), "{}", dst.stderr());
    let (_, st) = vm.ctl("query-status", &[]);
    assert!(st.contains("postmigrate"), "{st}");
    let (_, st) = ctl(&dst_api, &["query-status"]);
    assert!(st.contains("\"running\""), "{st}");
    // A new connection reaches the migrated guest, and the counter carries on.
    let mut c = LineClient::new(vm.connect(9000));
    assert_eq!(c.ask("get").unwrap(), last.to_string());
    let _ = std::fs::read_to_string(dst_serial);
    vm.ctl("quit", &[]);
    vm.vmm.take();
    ctl(&dst_api, &["quit"]);
    dst.wait_timeout(Duration::from_secs(5));
}

/// Each vCPU's burner counts on its own stack: `after` must carry on from `before` on every
/// vCPU (a vCPU restored from the wrong state, or restarted, would count from zero again).
fn every_vcpu_carried_on(before: &[u64], after: &[u64], later: &[u64]) {
    eprintln!("burn iterations per vCPU: {before:?} -> {after:?} -> {later:?}");
    assert_eq!(before.len(), 4, "four vCPUs");
    assert_eq!(after.len(), before.len(), "the same vCPUs");
    for i in 0..before.len() {
        assert!(after[i] >= before[i], "vCPU {i} went back from {} to {}: its state was lost", before[i], after[i]);
        assert!(later[i] > after[i], "vCPU {i} runs on: {} -> {}", after[i], later[i]);
    }
}

#[test]
fn live_migration_with_four_vcpus_keeps_memory_identical_and_every_vcpu_state() {
    if !check("live_migration_with_four_vcpus_keeps_memory_identical_and_every_vcpu_state") {
        return;
    }
    let mut vm = VmNet::start_with("app=echo,counter,http,dirty,burn dirty=2000 dirty_mib=16", &["--cpus", "4"]);
    let uri = format!("unix:{}", vm.dir.path("migrate.sock").display());
    let (mut dst, dst_api, _) = destination(&vm, &uri, "destination");
    let load = Load::start(&vm, 1);
    // Long enough that every burner is far from zero.
    std::thread::sleep(Duration::from_secs(2));
    let before = burn_per_vcpu(&vm.stats());
    let (ok, out) = vm.ctl("migrate", &[&format!("uri={uri}"), "verify=true", "downtime-limit=30"]);
    assert!(ok, "migration failed:\n{out}\nsource:\n{}\ndestination:\n{}", vm.vmm_stderr(), dst.stderr());
    let after = burn_per_vcpu(&vm.stats());
    std::thread::sleep(Duration::from_millis(500));
    let later = burn_per_vcpu(&vm.stats());
    let (incs, echoes, _) = load.finish();
    assert!(incs > 10 && echoes > 10, "the load ran through the migration");
    assert!(dst.stderr().contains("verified: memory equals the source's page for page"), "{}", dst.stderr());
    every_vcpu_carried_on(&before, &after, &later);
    vm.ctl("quit", &[]);
    vm.vmm.take();
    ctl(&dst_api, &["quit"]);
    dst.wait_timeout(Duration::from_secs(5));
}

#[test]
fn snapshot_and_restore_with_four_vcpus_keep_every_vcpu_state() {
    if !check("snapshot_and_restore_with_four_vcpus_keep_every_vcpu_state") {
        return;
    }
    let mut vm = VmNet::start_with("app=counter,http,burn", &["--cpus", "4"]);
    let mut counter = LineClient::new(vm.connect(9000));
    for i in 1..=10 {
        assert_eq!(counter.ask("inc").unwrap(), i.to_string());
    }
    std::thread::sleep(Duration::from_secs(2));
    let before = burn_per_vcpu(&vm.stats());
    let snap = vm.dir.path("vm.snap");
    assert!(vm.ctl("stop", &[]).0);
    let (ok, out) = vm.ctl("snapshot", &[&format!("path={}", snap.display())]);
    assert!(ok, "{out}");
    assert!(vm.ctl("quit", &[]).0);
    vm.vmm.take().unwrap().wait_timeout(Duration::from_secs(5));
    vm.launch_vmm(&["run".into(), "--restore".into(), snap.display().to_string()]);
    counter.set_timeout(Duration::from_secs(10));
    assert_eq!(counter.ask("inc").unwrap(), "11", "the counter keeps its value");
    let after = burn_per_vcpu(&vm.stats());
    std::thread::sleep(Duration::from_millis(500));
    let later = burn_per_vcpu(&vm.stats());
    every_vcpu_carried_on(&before, &after, &later);
    // A restore takes its vCPU count from the snapshot; asking for one is refused.
    let (st, text) = colo_tests::run(
        Command::new(bin("colo-vmm")).args(["run", "--cpus", "2", "--restore"]).arg(&snap).args(["--serial", "none"]),
    );
    assert!(!st.success() && text.contains("--cpus"), "{text}");
}

#[test]
fn snapshot_and_restore_keep_sessions_counter_and_console() {
    if !check("snapshot_and_restore_keep_sessions_counter_and_console") {
        return;
    }
    let mut vm = VmNet::start("app=echo,counter");
    let mut counter = LineClient::new(vm.connect(9000));
    for i in 1..=10 {
        assert_eq!(counter.ask("inc").unwrap(), i.to_string());
    }
    let mut echo = LineClient::new(vm.connect(7));
    assert_eq!(echo.ask("before the snapshot").unwrap(), "before the snapshot");
    let snap = vm.dir.path("vm.snap");
    assert!(vm.ctl("stop", &[]).0);
    let (ok, out) = vm.ctl("snapshot", &[&format!("path={}", snap.display())]);
    assert!(ok, "{out}");
    let (_, st) = vm.ctl("query-status", &[]);
    assert!(st.contains("\"paused\""), "stopped before the snapshot stays stopped: {st}");
    assert!(vm.ctl("quit", &[]).0);
    vm.vmm.take().unwrap().wait_timeout(Duration::from_secs(5));
    let console_before = vm.serial_log();
    // A new VMM process resumes it on the same backend.
    vm.launch_vmm(&["run".into(), "--restore".into(), snap.display().to_string()]);
    counter.set_timeout(Duration::from_secs(10));
    echo.set_timeout(Duration::from_secs(10));
    assert_eq!(counter.ask("inc").unwrap(), "11", "the counter keeps its value");
    assert_eq!(echo.ask("after the restore").unwrap(), "after the restore", "the TCP session goes on");
    let console_after = vm.serial_log();
    assert!(console_after.starts_with(&console_before), "the console log goes on (appended, not replaced)");
    // A truncated snapshot is refused and nothing runs.
    let bytes = std::fs::read(&snap).unwrap();
    let cut = vm.dir.path("cut.snap");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (st, text) =
        colo_tests::run(Command::new(bin("colo-vmm")).args(["run", "--restore"]).arg(&cut).args(["--serial", "none"]));
    assert_eq!(st.code(), Some(1), "{text}");
    assert!(text.contains("truncated"), "{text}");
}

/// What the relay does to the source's stream at a byte offset.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Flip one bit.
    Corrupt,
    /// Close both directions.
    Cut,
    /// SIGKILL this process, keep forwarding.
    Kill(u32),
}

/// Forwards a migration from a TCP port on loopback (its URI is returned) to `target`,
/// applying `fault` after `at` bytes from the source. The source reaches it over plain TCP,
/// where the stream sums its pages too (on a Unix socket the kernel guarantees them, and a
/// flipped byte of a page would go unseen by design: docs/links.md, "Page sums").
fn relay(target: &Path, at: usize, fault: Fault) -> (String, JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", l.local_addr().unwrap());
    let target = target.to_path_buf();
    let handle = std::thread::spawn(move || {
        let (src, _) = l.accept().unwrap();
        let dst = UnixStream::connect(&target).unwrap();
        let (mut s_r, mut d_w) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let (mut d_r, mut s_w) = (dst.try_clone().unwrap(), src.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut d_r, &mut s_w);
            let _ = s_w.shutdown(std::net::Shutdown::Both);
        });
        let mut sent = 0usize;
        let mut buf = vec![0u8; 65536];
        let mut done = false;
        loop {
            let n = match s_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &mut buf[..n];
            if !done && sent + n > at {
                done = true;
                match fault {
                    Fault::Corrupt => chunk[at - sent] ^= 0x10,
                    Fault::Cut => break,
                    Fault::Kill(pid) => {
                        // SAFETY: kill(2) on a process this test started.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    }
                }
            }
            sent += n;
            if d_w.write_all(chunk).is_err() {
                break;
            }
        }
        let _ = d_w.shutdown(std::net::Shutdown::Both);
        let _ = src.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
    });
    (uri, handle)
}

/// A migration through a faulty relay fails; the source keeps running its VM (unless the fault
/// killed it); the destination exits with an error and runs nothing.
fn faulty_migration(fault_for: impl FnOnce(u32, u32) -> Fault, expect_source_alive: bool) {
    let vm = VmNet::start("app=echo,counter,dirty dirty=1000 dirty_mib=32");
    let mut counter = LineClient::new(vm.connect(9000));
    assert_eq!(counter.ask("inc").unwrap(), "1");
    let dst_path = vm.dir.path("dst.sock");
    let (mut dst, dst_api, _) = destination(&vm, &format!("unix:{}", dst_path.display()), "destination");
    let fault = fault_for(vm.vmm.as_ref().unwrap().pid(), dst.pid());
    let (relay_uri, r) = relay(&dst_path, 64 << 10, fault);
    let t = Instant::now();
    let (ok, out) = vm.ctl("migrate", &[&format!("uri={relay_uri}")]);
    let _ = r.join();
    let dst_status = dst.wait_timeout(Duration::from_secs(20)).expect("the destination exits");
    eprintln!("{fault:?}: migrate -> {ok}, destination exit {dst_status:?} after {:?}", t.elapsed());
    assert!(!dst_status.success(), "the destination must fail, not run a half-loaded VM");
    assert!(!dst_api.exists(), "the destination never served its API (it never ran)");
    if expect_source_alive {
        assert!(!ok, "the migration must report failure: {out}");
        assert!(out.contains("\"failed\""), "{out}");
        let (_, st) = vm.ctl("query-status", &[]);
        assert!(st.contains("\"running\""), "the source runs its VM again: {st}");
        counter.set_timeout(Duration::from_secs(10));
        assert_eq!(counter.ask("inc").unwrap(), "2", "and its state is intact");
    } else {
        let err = dst.stderr();
        assert!(err.contains("the source went away") || err.contains("truncated"), "{err}");
    }
}

#[test]
fn corrupt_stream_fails_cleanly_and_the_source_keeps_running() {
    if check("corrupt_stream_fails_cleanly_and_the_source_keeps_running") {
        faulty_migration(|_, _| Fault::Corrupt, true);
    }
}

#[test]
fn truncated_stream_fails_cleanly_and_the_source_keeps_running() {
    if check("truncated_stream_fails_cleanly_and_the_source_keeps_running") {
        faulty_migration(|_, _| Fault::Cut, true);
    }
}

#[test]
fn destination_killed_mid_migration_leaves_the_source_running() {
    if check("destination_killed_mid_migration_leaves_the_source_running") {
        faulty_migration(|_, dst| Fault::Kill(dst), true);
    }
}

#[test]
fn source_killed_mid_migration_makes_the_destination_give_up() {
    if check("source_killed_mid_migration_makes_the_destination_give_up") {
        faulty_migration(|src, _| Fault::Kill(src), false);
    }
}

#[test]
fn a_stream_with_unsummed_pages_relayed_onto_plain_tcp_is_refused() {
    if !check("a_stream_with_unsummed_pages_relayed_onto_plain_tcp_is_refused") {
        return;
    }
    // The source connects over a Unix socket, where its stream leaves the pages unsummed;
    // a relay carries it on over plain TCP, which does not guarantee them: the destination
    // must refuse rather than take pages nothing checks.
    let vm = VmNet::start("app=counter");
    let mut counter = LineClient::new(vm.connect(9000));
    assert_eq!(counter.ask("inc").unwrap(), "1");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (mut dst, dst_api, _) = destination(&vm, &format!("tcp:127.0.0.1:{port}"), "destination");
    let relay_path = vm.dir.path("relay.sock");
    let l = std::os::unix::net::UnixListener::bind(&relay_path).unwrap();
    let relay = std::thread::spawn(move || {
        let (src, _) = l.accept().unwrap();
        let t = Instant::now();
        let dst = loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(d) => break d,
                Err(e) if t.elapsed() > Duration::from_secs(10) => panic!("the destination never listened: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let (mut s_r, mut d_w) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let (mut d_r, mut s_w) = (dst, src);
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut d_r, &mut s_w);
            let _ = s_w.shutdown(std::net::Shutdown::Both);
        });
        let _ = std::io::copy(&mut s_r, &mut d_w);
        let _ = d_w.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
    });
    let (ok, out) = vm.ctl("migrate", &[&format!("uri=unix:{}", relay_path.display())]);
    let _ = relay.join();
    let status = dst.wait_timeout(Duration::from_secs(20)).expect("the destination exits");
    assert!(!status.success() && !dst_api.exists(), "the destination refused and ran nothing");
    let err = dst.stderr();
    assert!(err.contains("unsummed") && err.contains("plain TCP"), "a clear error: {err}");
    // The source may find the connection closed before it reads the destination's answer.
    assert!(!ok && out.contains("\"failed\""), "the migration fails: {out}");
    let (_, st) = vm.ctl("query-status", &[]);
    assert!(st.contains("\"running\""), "the source runs its VM again: {st}");
    assert_eq!(counter.ask("inc").unwrap(), "2", "and its state is intact");
}
