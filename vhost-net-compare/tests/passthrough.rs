//! vhost-net-compare as a passthrough backend, driven by the vhost crate's frontend in this
//! process over memfd guest memory: negotiation, memory table, traffic both ways through a
//! real tap, GET_VRING_BASE and restart, the dirty log, reconnection, the command line.

mod common;

use std::time::{Duration, Instant};

use colo_proxy::compare::Mode;
use colo_proxy::control::{Event, PeerState};
use colo_proxy::Side;
use colo_test_support::expect_event;
use common::*;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

const T: Duration = Duration::from_secs(5);

fn passthrough(dir: &TempDir, tap: &TestTap, control: bool) -> Backend {
    Backend::spawn(dir, BackendOpts { one_vm: false, tap: &tap.name, secondary: false, control, extra: vec![] })
}

#[test]
fn negotiation_config_and_frames_both_ways() {
    if !prerequisites("negotiation_config_and_frames_both_ways") {
        return;
    }
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let backend = Backend::spawn(
        &dir,
        BackendOpts {
            one_vm: false,
            tap: &tap.name,
            secondary: false,
            control: false,
            extra: vec!["--mac".into(), "02:11:22:33:44:55".into()],
        },
    );
    let wire = Wire::open(&tap.name);
    let mut vm = Vm::connect(&backend.primary);

    vm.negotiate();
    let offered = vm.frontend.get_features().unwrap();
    for bit in [5u32, 15, 16, 29, 32] {
        assert!(offered & (1 << bit) != 0, "virtio feature bit {bit} offered");
    }
    for bit in [0u32, 1, 7, 11, 17, 22, 34] {
        assert!(offered & (1 << bit) == 0, "no offload/ctrl/mq/packed bit {bit}");
    }
    assert!(offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
    assert!(offered & VhostUserVirtioFeatures::LOG_ALL.bits() != 0);
    assert!(vm.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::LOG_SHMFD));
    let (mac, status) = vm.config_mac();
    assert_eq!(mac, [0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
    assert_eq!(status, 1, "link up");
    vm.set_mem_table();
    vm.start_ring(0, 0);
    vm.start_ring(1, 0);

    // TX: the guest's frame appears on the tap, header stripped by the kernel.
    let out = test_frame(1, 100);
    vm.send(&out);
    assert_eq!(vm.wait_used(1, 1, T), vec![(0, 0)], "TX completed with used length 0");
    let got = wire.recv_matching(T, |f| test_tag(f) == Some(1)).expect("frame on the tap");
    assert_eq!(got, out);

    // RX: a frame from the network lands in an RX buffer with a 12-byte header.
    vm.post_rx(4);
    let inbound = test_frame(2, 300);
    wire.send(&inbound);
    let rx = vm.recv_matching(T, |f| test_tag(f) == Some(2)).expect("frame in the RX ring");
    assert_eq!(rx.hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "flags 0, GSO none, num_buffers 1");
    assert_eq!(rx.eth, inbound);
    assert_eq!(rx.heads, vec![(0, 312)]);

    // Several frames in a row keep their order both ways.
    for i in 10..20 {
        vm.send(&test_frame(i, 60 + i as usize));
    }
    for i in 10..20 {
        let f = wire.recv_matching(T, |f| test_tag(f).is_some()).expect("frame");
        assert_eq!(test_tag(&f), Some(i));
    }
    vm.post_rx(16);
    for i in 30..40 {
        wire.send(&test_frame(i, 64));
    }
    for i in 30..40 {
        let f = vm.recv(T).expect("frame");
        assert_eq!(test_tag(&f.eth), Some(i));
    }
    assert!(backend.alive());
}

#[test]
fn mergeable_rx_buffers_carry_a_long_frame() {
    if !prerequisites("mergeable_rx_buffers_carry_a_long_frame") {
        return;
    }
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let backend = passthrough(&dir, &tap, false);
    let wire = Wire::open(&tap.name);
    let mut vm = Vm::connect(&backend.primary);
    vm.setup();
    // Five 512-byte buffers; a 1400-byte frame needs three of them.
    for i in 0..5u16 {
        vm.post_rx_buffer(i, SCRATCH + u64::from(i) * PAGE, 512);
    }
    vm.kick(0);
    let f = test_frame(7, 1400);
    wire.send(&f);
    let rx = vm.recv_matching(T, |e| test_tag(e) == Some(7)).expect("frame");
    assert_eq!(rx.heads, vec![(0, 512), (1, 512), (2, 388)]);
    assert_eq!(u16::from_le_bytes([rx.hdr[10], rx.hdr[11]]), 3, "num_buffers");
    assert_eq!(rx.eth, f);
}

#[test]
fn get_vring_base_stops_the_rings_and_a_restart_resumes_them() {
    if !prerequisites("get_vring_base_stops_the_rings_and_a_restart_resumes_them") {
        return;
    }
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let backend = passthrough(&dir, &tap, false);
    let wire = Wire::open(&tap.name);
    let mut vm = Vm::connect(&backend.primary);
    vm.setup();
    vm.post_rx(8);
    for i in 0..3 {
        vm.send(&test_frame(i, 80));
    }
    vm.wait_used(1, 3, T);
    for i in 0..3 {
        assert_eq!(wire.recv_matching(T, |f| test_tag(f).is_some()).map(|f| test_tag(&f)), Some(Some(i)));
    }
    wire.send(&test_frame(100, 80));
    wire.send(&test_frame(101, 80));
    assert_eq!(test_tag(&vm.recv(T).unwrap().eth), Some(100));
    assert_eq!(test_tag(&vm.recv(T).unwrap().eth), Some(101));

    // Stop both rings: the bases are where the backend stopped taking chains.
    let rx_base = vm.frontend.get_vring_base(0).unwrap();
    let tx_base = vm.frontend.get_vring_base(1).unwrap();
    assert_eq!((rx_base, tx_base), (2, 3));

    // While stopped, nothing is taken or written: a TX chain stays, an inbound frame waits.
    vm.queue_tx(&test_frame(3, 80));
    let _ = vm.tx.kick.write(1);
    wire.send(&test_frame(102, 80));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.used_idx(1), 3, "no TX while stopped");
    assert_eq!(vm.used_idx(0), 2, "no RX while stopped");
    assert!(wire.recv_matching(Duration::from_millis(100), |f| test_tag(f) == Some(3)).is_none());

    // Restart with the bases: the waiting chain and frame go through, then new traffic.
    vm.start_ring(0, rx_base as u16);
    vm.start_ring(1, tx_base as u16);
    let f = wire.recv_matching(T, |f| test_tag(f).is_some()).expect("TX after restart");
    assert_eq!(test_tag(&f), Some(3));
    assert_eq!(test_tag(&vm.recv(T).expect("RX after restart").eth), Some(102));
    vm.send(&test_frame(4, 80));
    assert_eq!(test_tag(&wire.recv_matching(T, |f| test_tag(f).is_some()).unwrap()), Some(4));
    wire.send(&test_frame(103, 80));
    assert_eq!(test_tag(&vm.recv(T).unwrap().eth), Some(103));
}

#[test]
fn the_dirty_log_holds_exactly_the_pages_the_backend_wrote() {
    if !prerequisites("the_dirty_log_holds_exactly_the_pages_the_backend_wrote") {
        return;
    }
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let backend = passthrough(&dir, &tap, false);
    let wire = Wire::open(&tap.name);
    let mut vm = Vm::connect(&backend.primary);
    vm.setup();
    // One round trip each way first, so that the rings' start-up passes (which write the
    // avail_event fields of both used rings) are over before logging starts.
    vm.post_rx_buffer(5, RX_BUFS + 5 * PAGE, BUF_SIZE as u32);
    vm.kick(0);
    wire.send(&test_frame(0, 64));
    vm.recv(T).expect("warm-up frame");
    vm.send(&test_frame(0, 64));
    vm.wait_used(1, 1, T);
    std::thread::sleep(Duration::from_millis(100));
    let log = vm.start_dirty_log();
    assert!(log.pages().is_empty(), "nothing written yet: {:?}", log.pages());

    // RX into a one-page buffer: that page and the RX used ring's page.
    vm.post_rx_buffer(0, RX_BUFS, BUF_SIZE as u32);
    vm.kick(0);
    wire.send(&test_frame(1, 200));
    vm.recv(T).expect("frame");
    assert_eq!(log.pages(), vec![RX_USED / PAGE, RX_BUFS / PAGE]);

    // RX into a buffer spanning three pages, with a frame that reaches into the second only.
    log.clear();
    let buf = SCRATCH + PAGE - 1000;
    vm.post_rx_buffer(1, buf, 3 * PAGE as u32);
    vm.kick(0);
    wire.send(&test_frame(2, 1500));
    vm.recv(T).expect("frame");
    assert_eq!(log.pages(), vec![RX_USED / PAGE, SCRATCH / PAGE, SCRATCH / PAGE + 1]);

    // TX writes only its used ring (reading the frame marks nothing).
    log.clear();
    vm.send(&test_frame(3, 1000));
    vm.wait_used(1, 1, T);
    wire.recv_matching(T, |f| test_tag(f) == Some(3)).expect("frame");
    assert_eq!(log.pages(), vec![TX_USED / PAGE]);

    // A new log replaces the old one: later writes go to the new one only.
    let old = log;
    let new = vm.start_dirty_log();
    old.clear();
    vm.post_rx_buffer(2, RX_BUFS + 2 * PAGE, BUF_SIZE as u32);
    vm.kick(0);
    wire.send(&test_frame(4, 100));
    vm.recv(T).expect("frame");
    assert!(old.pages().is_empty());
    assert_eq!(new.pages(), vec![RX_USED / PAGE, RX_BUFS / PAGE + 2]);
    let _ = old.raw_fd();
}

/// One frame each way between a started VM and the wire: tagged `tx` out, `rx` in.
fn exchange_one(vm: &mut Vm, wire: &Wire, tx: u32, rx: u32) {
    vm.post_rx(4);
    vm.send(&test_frame(tx, 90));
    let f = wire.recv_matching(T, |f| test_tag(f).is_some()).expect("a TX frame on the wire");
    assert_eq!(test_tag(&f), Some(tx));
    wire.send(&test_frame(rx, 90));
    assert_eq!(test_tag(&vm.recv(T).expect("an RX frame in the VM").eth), Some(rx));
}

#[test]
fn a_new_frontend_is_served_after_a_disconnect() {
    if !prerequisites("a_new_frontend_is_served_after_a_disconnect") {
        return;
    }
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let backend = passthrough(&dir, &tap, true);
    let wire = Wire::open(&tap.name);
    let mut ctl = backend.control();
    assert!(matches!(
        ctl.hello(),
        Event::Hello { component, mode: Mode::PrimaryOnly, .. } if component == "vhost-net-compare"
    ));
    let peer = |state| move |e: &Event| *e == Event::Peer { role: Side::Primary, state };
    // Passthrough has no secondary: only primary-only is a mode it can run, and a checkpoint
    // has nothing to flush.
    assert_eq!(ctl.set_mode(Mode::PrimaryOnly).unwrap(), Mode::PrimaryOnly);
    let err = ctl.set_mode(Mode::Colo).unwrap_err();
    assert!(err.to_string().contains("needs a secondary"), "{err}");
    let flushed = ctl.checkpoint().unwrap();
    assert_eq!((flushed.released, flushed.dropped), (0, 0));

    for round in 0..3u32 {
        let mut vm = Vm::connect(&backend.primary);
        vm.setup();
        expect_event(&mut ctl, T, "peer connected", peer(PeerState::Connected));
        exchange_one(&mut vm, &wire, round, 1000 + round);
        drop(vm);
        expect_event(&mut ctl, T, "peer disconnected", peer(PeerState::Disconnected));
    }
    // Frames arriving while no VM is connected are dropped, not kept for the next VM.
    wire.send(&test_frame(5000, 90));
    std::thread::sleep(Duration::from_millis(200));
    let mut vm = Vm::connect(&backend.primary);
    vm.setup();
    vm.post_rx(4);
    wire.send(&test_frame(5001, 90));
    assert_eq!(test_tag(&vm.recv(T).unwrap().eth), Some(5001));
    assert!(backend.alive());
}

/// Every connection's descriptors (exit event, memory, sockets) go with it: the backend can
/// serve any number of migrations, COLO starts and failovers.
#[test]
fn connections_leave_no_descriptors_behind() {
    if !prerequisites("connections_leave_no_descriptors_behind") {
        return;
    }
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let backend = passthrough(&dir, &tap, false);
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", backend.pid())).unwrap().count();
    const ROUNDS: usize = 30;
    let mut counts = vec![];
    for _ in 0..ROUNDS {
        // Connections are served one after the other: once this one is set up, the previous
        // one's daemon is gone.
        let mut vm = Vm::connect(&backend.primary);
        vm.setup();
        counts.push(fds());
    }
    // The first connections may still allocate lazily (thread stacks, logs); after that, flat.
    let (warm, last) = (counts[4], counts[ROUNDS - 1]);
    assert!(last <= warm + 2, "descriptors per connection leak: {counts:?}");
    assert!(backend.alive());
}

#[test]
fn rings_enabled_before_set_features_like_qemu_7_2_work() {
    if !prerequisites("rings_enabled_before_set_features_like_qemu_7_2_work") {
        return;
    }
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let backend = passthrough(&dir, &tap, true);
    let wire = Wire::open(&tap.name);
    let mut ctl = backend.control();
    for round in 0..2u32 {
        // SET_OWNER and the early SET_VRING_ENABLEs raw, then the rest without any
        // SET_VRING_ENABLE, as QEMU 7.2 does: the rings must run all the same.
        let mut vm = Vm::connect_with(&backend.primary, qemu_7_2_prelude);
        {
            let f = &mut vm.frontend;
            let offered = f.get_features().unwrap();
            let wanted = VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::LOG_SHMFD;
            assert!(f.get_protocol_features().unwrap().contains(wanted));
            f.set_protocol_features(wanted).unwrap();
            f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            vm.features = offered & !VhostUserVirtioFeatures::LOG_ALL.bits();
            vm.frontend.set_features(vm.features).unwrap();
        }
        vm.set_mem_table();
        vm.configure_ring(0, 0);
        vm.configure_ring(1, 0);
        expect_event(&mut ctl, T, "peer connected", |e| {
            *e == Event::Peer { role: Side::Primary, state: PeerState::Connected }
        });
        exchange_one(&mut vm, &wire, round, 100 + round);
        drop(vm);
        expect_event(&mut ctl, T, "peer disconnected", |e| {
            *e == Event::Peer { role: Side::Primary, state: PeerState::Disconnected }
        });
    }
    assert!(backend.alive());
    let (_, log) = backend.terminate();
    assert!(log.contains("sent SET_VRING_ENABLE before SET_FEATURES"), "{log}");
}

#[test]
fn a_second_set_owner_or_garbage_ends_only_that_connection() {
    if !prerequisites("a_second_set_owner_or_garbage_ends_only_that_connection") {
        return;
    }
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let backend = passthrough(&dir, &tap, false);
    let vm = Vm::connect(&backend.primary);
    vm.frontend.set_owner().unwrap();
    // A second SET_OWNER is refused by the backend, which ends the connection.
    let _ = vm.frontend.set_owner();
    drop(vm);
    // Raw garbage on the socket.
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&backend.primary).unwrap();
        let _ = s.write_all(&[0xde; 100]);
    }
    let wire = Wire::open(&tap.name);
    let mut vm = Vm::connect(&backend.primary);
    vm.setup();
    vm.send(&test_frame(9, 64));
    assert!(wire.recv_matching(T, |f| test_tag(f) == Some(9)).is_some());
    assert!(backend.alive());
}

#[test]
fn passthrough_frames_per_second() {
    if !prerequisites("passthrough_frames_per_second") {
        return;
    }
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let backend = passthrough(&dir, &tap, true);
    let mut vm = Vm::connect(&backend.primary);
    vm.setup();
    let n = 50_000usize;
    let frame = test_frame(1, 64);
    let mut done = 0usize;
    let mut sent = 0usize;
    let start = Instant::now();
    while done < n {
        while sent < n && sent - done < usize::from(QSIZE) {
            vm.queue_tx(&frame);
            sent += 1;
        }
        vm.kick(1);
        let got = vm.used(1).len();
        done += got;
        if got == 0 {
            std::thread::yield_now();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "stalled at {done} of {n}");
    }
    let tx_rate = n as f64 / start.elapsed().as_secs_f64();

    // RX: frames written to the tap as fast as the packet socket takes them; count delivered.
    let wire = Wire::open(&tap.name);
    vm.post_rx(usize::from(QSIZE));
    let m = 20_000usize;
    let start = Instant::now();
    let mut received = 0usize;
    let mut injected = 0usize;
    while received < m && start.elapsed() < Duration::from_secs(30) {
        while injected < m && injected - received < 128 {
            wire.send(&test_frame(2, 64));
            injected += 1;
        }
        let used = vm.used(0);
        for (id, _) in &used {
            let head = *id as u16;
            vm.post_rx_buffer(head, RX_BUFS + u64::from(head) * BUF_SIZE, BUF_SIZE as u32);
        }
        if !used.is_empty() {
            vm.kick(0);
        }
        received += used.len();
        if used.is_empty() {
            std::thread::yield_now();
        }
    }
    let rx_rate = received as f64 / start.elapsed().as_secs_f64();
    let mut ctl = backend.control();
    let stats = ctl.stats().unwrap();
    assert_eq!(stats.frames_primary, n as u64);
    eprintln!(
        "MEASURED passthrough: TX {tx_rate:.0} frames/s (64-byte frames, {n}), RX {rx_rate:.0} frames/s ({received} of {m})"
    );
    assert!(received >= m * 9 / 10, "RX lost too much: {received} of {m}");
}

#[test]
fn bad_options_and_unusable_paths_fail_clearly() {
    let bin = env!("CARGO_BIN_EXE_vhost-net-compare");
    let run = |args: &[&str]| {
        let out = {
            let _guard = fork_guard();
            std::process::Command::new(bin).args(args).output().unwrap()
        };
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (code, err) = run(&["--tap", "x"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--primary-socket"), "{err}");
    let (code, err) = run(&["--primary-socket", "/tmp/a", "--tap", "x", "--mode", "sideways"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown mode"), "{err}");
    let (code, err) = run(&["--primary-socket", "/tmp/a", "--tap", "x", "--mac", "zz"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("MAC"), "{err}");
    let (code, err) = run(&["--primary-socket", "/tmp/a", "--tap", "x", "--mode", "colo"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("needs --secondary-socket"), "{err}");
    let (code, err) = run(&["--primary-socket", "/tmp/a", "--tap", "much-too-long-name"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not a valid interface name"), "{err}");
    let (code, out) = run(&["--help"]);
    assert_eq!(code, Some(0));
    let _ = out;

    if !prerequisites("bad_options_and_unusable_paths_fail_clearly (paths, taps)") {
        return;
    }
    let dir = TempDir::new("vnc");
    let missing = dir.path("no/such/dir/p.sock");
    let tap = TestTap::new();
    let (code, err) = run(&["--primary-socket", missing.to_str().unwrap(), "--tap", &tap.name]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot listen on"), "{err}");
    let file = dir.path("plain-file");
    std::fs::write(&file, "keep me").unwrap();
    let (code, err) = run(&["--primary-socket", file.to_str().unwrap(), "--tap", &tap.name]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    let (code, err) = run(&["--primary-socket", dir.path("p.sock").to_str().unwrap(), "--tap", "lo"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not a single-queue tap"), "{err}");
}

#[test]
fn sigterm_exits_cleanly_and_removes_the_sockets() {
    if !prerequisites("sigterm_exits_cleanly_and_removes_the_sockets") {
        return;
    }
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let backend = Backend::spawn(
        &dir,
        BackendOpts { one_vm: false, tap: &tap.name, secondary: true, control: true, extra: vec![] },
    );
    let mut vm = Vm::connect(&backend.primary);
    vm.setup();
    let paths = [backend.primary.clone(), backend.secondary.clone().unwrap(), backend.control.clone().unwrap()];
    // The daemons' private sockets live in `.NAME.relay` beside each VM socket.
    let private: Vec<std::path::PathBuf> = paths[..2]
        .iter()
        .map(|p| p.with_file_name(format!(".{}.relay", p.file_name().unwrap().to_string_lossy())))
        .collect();
    for p in &private {
        assert!(p.join("daemon.sock").exists(), "{} exists", p.display());
    }
    let (status, log) = backend.terminate();
    assert!(status.success(), "exit status {status:?}\n{log}");
    for p in paths.iter().chain(&private) {
        assert!(!p.exists(), "{} removed", p.display());
    }
    assert!(log.contains("shutting down"), "{log}");
}

#[test]
fn inbound_frames_wait_for_rx_buffers_up_to_a_bound() {
    if !prerequisites("inbound_frames_wait_for_rx_buffers_up_to_a_bound") {
        return;
    }
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let backend = passthrough(&dir, &tap, false);
    let wire = Wire::open(&tap.name);
    let mut vm = Vm::connect(&backend.primary);
    vm.setup();
    // No RX buffers yet: frames queue up to 1024, the rest are dropped (and counted).
    let sent = 1200u32;
    for i in 0..sent {
        wire.send(&test_frame(i, 64));
        if i % 50 == 49 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut tags = vec![];
    loop {
        vm.post_rx(usize::from(QSIZE) - 1);
        let mut got_any = false;
        while let Some(f) = vm.recv(Duration::from_millis(300)) {
            tags.extend(test_tag(&f.eth));
            got_any = true;
        }
        if !got_any {
            break;
        }
    }
    let want: Vec<u32> = (0..1024).collect();
    assert_eq!(tags, want, "the oldest 1024 frames, in order");
    let (_, log) = backend.terminate();
    assert!(log.contains("RX queue is full"), "{log}");
}
