//! A hostile guest: descriptor chains written by hand into the shared memory that loop, leave
//! guest memory, are too short or absurdly long, have the wrong direction, or carry a garbage
//! virtio-net header. Each is completed with used length 0 and counted (`rejected_input`),
//! and the backend keeps serving. And a hostile controller, flooding the control socket.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use vm_memory::Bytes;

const T: Duration = Duration::from_secs(5);
const F_INDIRECT: u16 = 4;

#[test]
fn malformed_chains_are_completed_empty_counted_and_survived() {
    if !prerequisites("malformed_chains_are_completed_empty_counted_and_survived") {
        return;
    }
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let backend = Backend::spawn(
        &dir,
        BackendOpts { one_vm: false, tap: &tap.name, secondary: false, control: true, extra: vec![] },
    );
    let wire = Wire::open(&tap.name);
    let mut ctl = backend.control();
    let mut vm = Vm::connect(&backend.primary);
    vm.setup();

    // --- TX ---------------------------------------------------------------------------------
    let good = test_frame(1, 80);
    let mut bytes = vec![0u8; 12];
    bytes.extend_from_slice(&good);
    vm.mem.write_slice(&bytes, vm_memory::GuestAddress(SCRATCH)).unwrap();
    let mut garbage = bytes.clone();
    garbage[0] = 0xff; // flags
    garbage[1] = 0x42; // gso_type
    vm.mem.write_slice(&garbage, vm_memory::GuestAddress(SCRATCH + PAGE)).unwrap();
    let len = bytes.len() as u32;
    // A loop: 100 -> 101 -> 100 -> ...
    vm.write_desc(&vm.tx, 100, SCRATCH, 16, F_NEXT, 101);
    vm.write_desc(&vm.tx, 101, SCRATCH, 16, F_NEXT, 100);
    vm.offer(1, 100);
    // A buffer outside guest memory.
    vm.write_desc(&vm.tx, 102, 0x10_0000_0000, 100, 0, 0);
    vm.offer(1, 102);
    // Too short for the header.
    vm.write_desc(&vm.tx, 103, SCRATCH, 8, 0, 0);
    vm.offer(1, 103);
    // Absurdly long: 97 descriptors of 4 KiB (≈ 400 KB, far past any frame).
    for i in 104..=200u16 {
        vm.write_desc(&vm.tx, i, SCRATCH, 4096, if i < 200 { F_NEXT } else { 0 }, i + 1);
    }
    vm.offer(1, 104);
    // A header asking for offloads that were never negotiated.
    vm.write_desc(&vm.tx, 201, SCRATCH + PAGE, len, 0, 0);
    vm.offer(1, 201);
    // A device-writable buffer on the TX ring.
    vm.write_desc(&vm.tx, 202, SCRATCH, len, F_WRITE, 0);
    vm.offer(1, 202);
    // A broken indirect table (length not a multiple of 16).
    vm.write_desc(&vm.tx, 203, SCRATCH, 17, F_INDIRECT, 0);
    vm.offer(1, 203);
    // A head index outside the ring: refused, but it cannot be completed.
    vm.offer(1, 999);
    // And a good one after all of that.
    vm.write_desc(&vm.tx, 204, SCRATCH, len, 0, 0);
    vm.offer(1, 204);
    vm.kick(1);
    let used = vm.wait_used(1, 8, T);
    assert_eq!(used, vec![(100, 0), (102, 0), (103, 0), (104, 0), (201, 0), (202, 0), (203, 0), (204, 0)]);
    let f = wire.recv_matching(T, |f| test_tag(f).is_some()).expect("the good frame");
    assert_eq!(f, good, "only the good frame reached the tap");
    assert!(wire.recv_matching(Duration::from_millis(200), |f| test_tag(f).is_some()).is_none());
    assert_eq!(ctl.stats().unwrap().rejected_input, 8);

    // --- RX ---------------------------------------------------------------------------------
    // Device-readable, outside memory, a loop, then a good buffer.
    vm.write_desc(&vm.rx, 10, RX_BUFS, 4096, 0, 0);
    vm.offer(0, 10);
    vm.write_desc(&vm.rx, 11, 0x10_0000_0000, 4096, F_WRITE, 0);
    vm.offer(0, 11);
    vm.write_desc(&vm.rx, 12, RX_BUFS, 64, F_WRITE | F_NEXT, 13);
    vm.write_desc(&vm.rx, 13, RX_BUFS, 64, F_WRITE | F_NEXT, 12);
    vm.offer(0, 12);
    vm.post_rx_buffer(14, RX_BUFS + 14 * PAGE, BUF_SIZE as u32);
    vm.kick(0);
    wire.send(&test_frame(50, 100));
    let used = vm.wait_used(0, 4, T);
    assert_eq!(used, vec![(10, 0), (11, 0), (12, 0), (14, 112)]);
    assert_eq!(ctl.stats().unwrap().rejected_input, 11);

    // Still serving both ways.
    vm.post_rx(8);
    vm.send(&test_frame(2, 64));
    assert_eq!(wire.recv_matching(T, |f| test_tag(f).is_some()).map(|f| test_tag(&f)), Some(Some(2)));
    wire.send(&test_frame(51, 64));
    let mut got = None;
    for _ in 0..8 {
        // Entries already consumed above are skipped by reading the rest of the ring.
        match vm.recv(T) {
            Some(f) if test_tag(&f.eth) == Some(51) => {
                got = Some(f);
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert!(got.is_some(), "RX after hostile chains");

    // A guest that moves its avail index absurdly far: that ring stops, nothing else does.
    vm.mem
        .store(
            vm.tx.avail_idx.wrapping_add(5000),
            vm_memory::GuestAddress(TX_AVAIL + 2),
            std::sync::atomic::Ordering::Release,
        )
        .unwrap();
    vm.kick(1);
    std::thread::sleep(Duration::from_millis(200));
    assert!(backend.alive());
    wire.send(&test_frame(52, 64));
    assert!(vm.recv_matching(T, |f| test_tag(f) == Some(52)).is_some(), "RX still works");
    assert!(ctl.stats().is_ok(), "control still answers");
    let log = backend.log_text();
    assert!(log.contains("refused a descriptor chain"), "refusals are logged:\n{log}");
    // Rate-limited: at most a couple of lines for eleven refusals within a second.
    assert!(log.matches("refused a descriptor chain").count() <= 3, "{log}");
}

#[test]
fn a_frontend_with_no_memory_table_or_bogus_rings_does_not_hurt_the_backend() {
    if !prerequisites("a_frontend_with_no_memory_table_or_bogus_rings_does_not_hurt_the_backend") {
        return;
    }
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let backend = Backend::spawn(
        &dir,
        BackendOpts { one_vm: false, tap: &tap.name, secondary: false, control: false, extra: vec![] },
    );
    let wire = Wire::open(&tap.name);
    {
        // Rings started before any memory table: the backend refuses SET_VRING_ADDR, which
        // ends this connection.
        let mut vm = Vm::connect(&backend.primary);
        vm.negotiate();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vm.start_ring(0, 0)));
        assert!(r.is_err(), "vring setup without a memory table must fail");
    }
    {
        // A ring that does not fit in guest memory (used ring at the very end).
        let mut vm = Vm::connect(&backend.primary);
        vm.setup();
        vm.tx.used = MEM_SIZE as u64 - 8;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vm.start_ring(1, 0)));
        let _ = r;
        wire.send(&test_frame(1, 64));
        vm.kick(1);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(backend.alive());
    let mut vm = Vm::connect(&backend.primary);
    vm.setup();
    vm.send(&test_frame(7, 64));
    assert!(wire.recv_matching(T, |f| test_tag(f) == Some(7)).is_some());
}

/// The primary's colo-vmm waits for `flushed` at every checkpoint: controllers that flood the
/// control socket with bad lines and never read (a valid command every 1000, so that only their
/// unread replies get them dropped; each replaced at once) must not delay it, nor grow memory.
#[test]
fn a_control_flood_delays_no_flushed_reply_and_memory_stays_bounded() {
    if !prerequisites("a_control_flood_delays_no_flushed_reply_and_memory_stays_bounded") {
        return;
    }
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let backend = Backend::spawn(
        &dir,
        BackendOpts { one_vm: false, tap: &tap.name, secondary: true, control: true, extra: vec![] },
    );
    let mut ctl = backend.control();
    let peak = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().to_string();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
    };
    let peak_before = peak(backend.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(AtomicUsize::new(0));
    let flood = {
        let (path, stop, connections) = (backend.control.clone().unwrap(), stop.clone(), connections.clone());
        std::thread::spawn(move || {
            let cycle = [b"x\n".repeat(1000), b"{\"type\":\"query-stats\",\"id\":1}\n".to_vec()].concat();
            let chunk = cycle.repeat(32);
            let mut sent = 0usize;
            // At most 32 MiB, whatever happens.
            while sent < 32 << 20 && !stop.load(Ordering::SeqCst) {
                let Ok(mut s) = UnixStream::connect(&path) else { break };
                connections.fetch_add(1, Ordering::SeqCst);
                while sent < 32 << 20 && !stop.load(Ordering::SeqCst) && s.write_all(&chunk).is_ok() {
                    sent += chunk.len();
                }
            }
            sent
        })
    };
    // Checkpoints until a few flooders have come and gone; ControlClient's timeout (10 s) is
    // the generous bound on each reply's delay.
    let mut checkpoints = 0;
    while connections.load(Ordering::SeqCst) < 4 && !flood.is_finished() {
        ctl.checkpoint().unwrap();
        checkpoints += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let sent = flood.join().unwrap();
    let connections = connections.load(Ordering::SeqCst);
    let grown = peak(backend.pid()).saturating_sub(peak_before);
    eprintln!("{checkpoints} checkpoints during {connections} flooding controllers, {sent} bytes; the backend's peak memory +{grown} KiB");
    assert!(connections >= 4, "flooders are dropped ({connections} connections, {sent} bytes)");
    assert!(grown < 48 << 10, "the backend's peak memory grew by {grown} KiB");
    assert!(backend.alive());
}
