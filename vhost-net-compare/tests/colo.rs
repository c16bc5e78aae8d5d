//! vhost-net-compare as the COLO proxy: two "VMs" (vhost-user frontends in this process) on
//! the two sockets, one tap, and a controller on the control socket.

mod common;

use std::time::{Duration, Instant};

use colo_proxy::builder::{udp4, udp4_to, CLIENT_IP, VM_IP};
use colo_proxy::compare::{Mode, Reason};
use colo_proxy::control::{ControlClient, Event, PeerState};
use colo_proxy::Side;
use colo_test_support::expect_event;
use common::*;
use vhost::VhostBackend;

const T: Duration = Duration::from_secs(5);
/// Long enough that no held frame times out during a test unless the test wants it to.
const NO_TIMEOUT: &str = "600000";

/// The UDP payload of an IPv4/UDP frame.
fn udp_payload(f: &[u8]) -> Option<&[u8]> {
    (f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 17).then(|| &f[42..])
}

fn has_payload(p: &'static [u8]) -> impl Fn(&[u8]) -> bool {
    move |f| udp_payload(f) == Some(p)
}

struct Colo {
    _dir: TempDir,
    backend: Backend,
    wire: Wire,
    ctl: ControlClient,
    p: Vm,
    s: Vm,
    _tap: TestTap,
}

fn peer(role: Side, state: PeerState) -> impl Fn(&Event) -> bool {
    move |e| *e == Event::Peer { role, state }
}

fn colo(extra: &[&str]) -> Colo {
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let mut args: Vec<String> = vec!["--compare-timeout".into(), NO_TIMEOUT.into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let backend = Backend::spawn(
        &dir,
        BackendOpts { one_vm: false, tap: &tap.name, secondary: true, control: true, extra: args },
    );
    let wire = Wire::open(&tap.name);
    let mut ctl = backend.control();
    match ctl.hello() {
        Event::Hello { component, nic, .. } => {
            assert_eq!(component, "vhost-net-compare");
            assert_eq!(nic, &tap.name);
        }
        other => panic!("hello expected, got {other:?}"),
    }
    let mut p = Vm::connect(&backend.primary);
    p.setup();
    expect_event(&mut ctl, T, "primary connected", peer(Side::Primary, PeerState::Connected));
    let mut s = Vm::connect(backend.secondary.as_ref().unwrap());
    s.setup();
    expect_event(&mut ctl, T, "secondary connected", peer(Side::Secondary, PeerState::Connected));
    Colo { _dir: dir, backend, wire, ctl, p, s, _tap: tap }
}

#[test]
fn identical_output_is_released_once_and_a_difference_waits_for_a_checkpoint() {
    if !prerequisites("identical_output_is_released_once_and_a_difference_waits_for_a_checkpoint") {
        return;
    }
    let mut c = colo(&[]);
    assert!(matches!(c.ctl.hello(), Event::Hello { mode: Mode::Colo, .. }));

    // The same frame from both: released once (whichever VM is first).
    c.p.send(&udp4(5000, 6000, b"same-1"));
    c.s.send(&udp4(5000, 6000, b"same-1"));
    c.s.send(&udp4(5000, 6000, b"same-2"));
    c.p.send(&udp4(5000, 6000, b"same-2"));
    let got = c.wire.collect(Duration::from_millis(500), |f| udp_payload(f).is_some_and(|p| p.starts_with(b"same")));
    let payloads: Vec<&[u8]> = got.iter().filter_map(|f| udp_payload(f)).collect();
    assert_eq!(payloads, vec![&b"same-1"[..], b"same-2"]);
    assert_eq!(got[0], udp4(5000, 6000, b"same-1"), "the primary's bytes, unchanged");

    // Different payloads: a miscompare, nothing released until the checkpoint.
    c.p.send(&udp4(5001, 6001, b"primary says AA"));
    c.s.send(&udp4(5001, 6001, b"second says BBB"));
    let e = expect_event(&mut c.ctl, T, "miscompare", |e| matches!(e, Event::Miscompare { .. }));
    match e {
        Event::Miscompare { reason, proto, flow, held, .. } => {
            assert_eq!(reason, Reason::Payload);
            assert_eq!(proto, "udp");
            assert_eq!(flow, "10.0.0.2:5001>10.0.0.1:6001");
            assert_eq!(held, 2);
        }
        _ => unreachable!(),
    }
    assert!(c.wire.recv_matching(Duration::from_millis(300), has_payload(b"primary says AA")).is_none());
    let flushed = c.ctl.checkpoint().unwrap();
    assert_eq!((flushed.released, flushed.dropped), (1, 1));
    // `flushed` comes after the frame was written to the tap.
    let f = c
        .wire
        .recv_matching(Duration::from_millis(500), |f| udp_payload(f).is_some())
        .expect("released by the checkpoint");
    assert_eq!(udp_payload(&f), Some(&b"primary says AA"[..]));
    assert!(c.wire.recv_matching(Duration::from_millis(200), has_payload(b"second says BBB")).is_none());

    // Inbound frames reach both VMs.
    c.p.post_rx(8);
    c.s.post_rx(8);
    let inbound = udp4_to(CLIENT_IP, VM_IP, 6000, 5000, b"to both");
    c.wire.send(&inbound);
    assert_eq!(c.p.recv_matching(T, has_payload(b"to both")).expect("primary RX").eth, inbound);
    assert_eq!(c.s.recv_matching(T, has_payload(b"to both")).expect("secondary RX").eth, inbound);

    let stats = c.ctl.stats().unwrap();
    assert_eq!((stats.frames_primary, stats.frames_secondary), (3, 3));
    assert_eq!(stats.released, 3);
    assert_eq!(stats.miscompares.payload, 1);
    assert_eq!(stats.flushes, 1);

    // A VM leaving is reported.
    drop(c.s);
    expect_event(&mut c.ctl, T, "secondary disconnected", peer(Side::Secondary, PeerState::Disconnected));
    assert!(c.backend.alive());
}

#[test]
fn a_secondary_restarting_its_rings_during_a_checkpoint_gets_what_the_primary_has_not_consumed() {
    if !prerequisites("a_secondary_restarting_its_rings_during_a_checkpoint_gets_what_the_primary_has_not_consumed") {
        return;
    }
    // The checkpoint as colo-vmm runs it: the secondary stops its rings (step 1), then the
    // primary (step 2); the secondary restarts its rings after loading the checkpoint (step 6),
    // which may come before the primary's flush (step 5 at the primary); the primary restarts
    // its rings after the flush.
    let mut c = colo(&[]);
    c.p.post_rx(16);
    c.s.post_rx(16);
    let s_bases = (c.s.frontend.get_vring_base(0).unwrap(), c.s.frontend.get_vring_base(1).unwrap());
    // Between the two pauses: the primary takes it into its ring, so the secondary gets it
    // with the checkpoint — not a second time from its queue.
    c.wire.send(&udp4_to(CLIENT_IP, VM_IP, 2, 1, b"before the primary's pause"));
    assert!(c.p.recv_matching(T, has_payload(b"before the primary's pause")).is_some());
    let p_bases = (c.p.frontend.get_vring_base(0).unwrap(), c.p.frontend.get_vring_base(1).unwrap());
    // While both are paused: it waits for both.
    c.wire.send(&udp4_to(CLIENT_IP, VM_IP, 2, 1, b"during the checkpoint"));
    std::thread::sleep(Duration::from_millis(200));

    c.s.set_mem_table();
    c.s.start_ring(0, s_bases.0 as u16);
    c.s.start_ring(1, s_bases.1 as u16);
    // Exactly that one, and not the frame the primary consumed before its pause.
    let first = c.s.recv(T).expect("the frame that arrived during the checkpoint");
    assert_eq!(udp_payload(&first.eth), Some(&b"during the checkpoint"[..]));
    let more = c.s.recv(Duration::from_millis(300)).map(|f| String::from_utf8_lossy(&f.eth[42..]).into_owned());
    assert_eq!(more, None, "the secondary got a frame the primary consumed before its pause");
    // The secondary, loaded, answers before the primary's controller has flushed the
    // checkpoint: its answer waits on its TX ring for the flush instead of being dropped by it.
    c.s.send(&udp4(2, 1, b"answer"));
    std::thread::sleep(Duration::from_millis(200));
    let flushed = c.ctl.checkpoint().unwrap();
    assert_eq!(flushed.dropped, 0, "the loaded secondary's answer is not the old interval's");
    c.p.set_mem_table();
    c.p.start_ring(0, p_bases.0 as u16);
    c.p.start_ring(1, p_bases.1 as u16);
    assert!(c.p.recv_matching(T, has_payload(b"during the checkpoint")).is_some());
    c.p.send(&udp4(2, 1, b"answer"));
    assert!(c.wire.recv_matching(T, has_payload(b"answer")).is_some(), "the two answers compared and released");
    let stats = c.ctl.stats().unwrap();
    assert_eq!((stats.miscompares.total(), stats.frames_secondary), (0, 1), "{stats:?}");
    // And on as usual.
    c.wire.send(&udp4_to(CLIENT_IP, VM_IP, 2, 1, b"after"));
    assert!(c.p.recv_matching(T, has_payload(b"after")).is_some());
    assert!(c.s.recv_matching(T, has_payload(b"after")).is_some());
}

#[test]
fn modes_decide_what_is_released_and_who_gets_inbound_frames() {
    if !prerequisites("modes_decide_what_is_released_and_who_gets_inbound_frames") {
        return;
    }
    let mut c = colo(&[]);
    c.p.post_rx(32);
    c.s.post_rx(32);

    // primary-only: the primary's output goes at once, the secondary's is dropped, inbound
    // frames go to the primary only.
    assert_eq!(c.ctl.set_mode(Mode::PrimaryOnly).unwrap(), Mode::PrimaryOnly);
    c.p.send(&udp4(1, 2, b"p-only"));
    c.s.send(&udp4(1, 2, b"s-dropped"));
    assert!(c.wire.recv_matching(T, has_payload(b"p-only")).is_some());
    assert!(c.wire.recv_matching(Duration::from_millis(200), has_payload(b"s-dropped")).is_none());
    c.wire.send(&udp4_to(CLIENT_IP, VM_IP, 2, 1, b"in-1"));
    assert!(c.p.recv_matching(T, has_payload(b"in-1")).is_some());
    assert!(c.s.recv_matching(Duration::from_millis(300), has_payload(b"in-1")).is_none());
    // A new controller is told the current mode.
    let other = c.backend.control();
    assert!(matches!(other.hello(), Event::Hello { mode: Mode::PrimaryOnly, .. }));

    // passive: the primary's output waits for the next checkpoint (output commit).
    assert_eq!(c.ctl.set_mode(Mode::Passive).unwrap(), Mode::Passive);
    c.p.send(&udp4(1, 2, b"committed later"));
    assert!(c.wire.recv_matching(Duration::from_millis(300), has_payload(b"committed later")).is_none());
    assert_eq!(c.ctl.checkpoint().unwrap().released, 1);
    assert!(c.wire.recv_matching(Duration::from_millis(500), has_payload(b"committed later")).is_some());

    // secondary-only (failover): the secondary's output goes out, inbound goes to it only.
    assert_eq!(c.ctl.set_mode(Mode::SecondaryOnly).unwrap(), Mode::SecondaryOnly);
    c.s.send(&udp4(1, 2, b"s-now"));
    c.p.send(&udp4(1, 2, b"p-gone"));
    assert!(c.wire.recv_matching(T, has_payload(b"s-now")).is_some());
    assert!(c.wire.recv_matching(Duration::from_millis(200), has_payload(b"p-gone")).is_none());
    c.wire.send(&udp4_to(CLIENT_IP, VM_IP, 2, 1, b"in-2"));
    assert!(c.s.recv_matching(T, has_payload(b"in-2")).is_some());
    assert!(c.p.recv_matching(Duration::from_millis(300), has_payload(b"in-2")).is_none());
}

#[test]
fn a_full_compare_queue_holds_tx_descriptors_instead_of_dropping() {
    if !prerequisites("a_full_compare_queue_holds_tx_descriptors_instead_of_dropping") {
        return;
    }
    let mut c = colo(&["--max-queue-size", "4"]);
    let payloads: Vec<Vec<u8>> = (0..10).map(|i| format!("frame {i}").into_bytes()).collect();
    for p in &payloads {
        c.p.send(&udp4(7, 8, p));
    }
    // Four are taken (held for comparison); the rest stay on the ring.
    let used = c.p.wait_used(1, 4, T);
    assert_eq!(used.len(), 4);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.p.used_idx(1), 4, "descriptors beyond the queue limit stay on the ring");
    let e = expect_event(&mut c.ctl, T, "queue-full miscompare", |e| matches!(e, Event::Miscompare { .. }));
    assert!(matches!(e, Event::Miscompare { reason: Reason::QueueFull, .. }), "{e:?}");

    // The secondary catches up: every frame is compared and released, none lost, in order.
    for p in &payloads {
        c.s.send(&udp4(7, 8, p));
    }
    c.p.wait_used(1, 6, T);
    c.s.wait_used(1, 10, T);
    let got = c.wire.collect(Duration::from_millis(500), |f| udp_payload(f).is_some());
    let got: Vec<&[u8]> = got.iter().filter_map(|f| udp_payload(f)).collect();
    let want: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
    assert_eq!(got, want);
    let stats = c.ctl.stats().unwrap();
    assert_eq!(stats.released, 10);
    assert_eq!(stats.dropped_overflow, 0);
    assert_eq!((stats.held_primary, stats.held_secondary), (0, 0));

    // Held back again, then freed by a checkpoint.
    for i in 0..6 {
        c.p.send(&udp4(7, 8, format!("late {i}").as_bytes()));
    }
    c.p.wait_used(1, 4, T);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(c.p.used_idx(1), 14);
    assert_eq!(c.ctl.checkpoint().unwrap().released, 4);
    c.p.wait_used(1, 2, T);
    assert_eq!(c.ctl.checkpoint().unwrap().released, 2);
    assert_eq!(c.wire.collect(Duration::from_millis(500), |f| udp_payload(f).is_some()).len(), 6);
}

#[test]
fn timeouts_are_reported_and_a_hostile_secondary_does_not_disturb_the_primary() {
    if !prerequisites("timeouts_are_reported_and_a_hostile_secondary_does_not_disturb_the_primary") {
        return;
    }
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let backend = Backend::spawn(
        &dir,
        BackendOpts {
            one_vm: false,
            tap: &tap.name,
            secondary: true,
            control: true,
            extra: ["--compare-timeout", "300", "--expired-scan-cycle", "100", "--capture"]
                .iter()
                .map(|s| s.to_string())
                .chain([dir.path("miscompares.pcapng").to_string_lossy().to_string()])
                .collect(),
        },
    );
    let wire = Wire::open(&tap.name);
    let mut ctl = backend.control();
    let mut p = Vm::connect(&backend.primary);
    p.setup();
    let mut s = Vm::connect(backend.secondary.as_ref().unwrap());
    s.setup();

    // The secondary offers a looping chain: refused, counted; the primary is not affected.
    s.write_desc(&s.tx, 200, SCRATCH, 64, F_NEXT, 201);
    s.write_desc(&s.tx, 201, SCRATCH, 64, F_NEXT, 200);
    s.offer(1, 200);
    s.kick(1);
    assert_eq!(s.wait_used(1, 1, T), vec![(200, 0)]);
    p.send(&udp4(9, 9, b"match"));
    s.send(&udp4(9, 9, b"match"));
    assert!(wire.recv_matching(T, has_payload(b"match")).is_some());
    assert_eq!(ctl.stats().unwrap().rejected_input, 1);

    // A primary frame the secondary never matches times out.
    p.send(&udp4(9, 9, b"alone"));
    let start = Instant::now();
    let e = expect_event(&mut ctl, T, "timeout miscompare", |e| matches!(e, Event::Miscompare { .. }));
    assert!(matches!(e, Event::Miscompare { reason: Reason::Timeout, .. }), "{e:?}");
    assert!(start.elapsed() >= Duration::from_millis(250), "not before the timeout");
    assert_eq!(ctl.checkpoint().unwrap().released, 1);
    assert!(wire.recv_matching(T, has_payload(b"alone")).is_some());
    let (status, log) = backend.terminate();
    assert!(status.success(), "{log}");
    let capture = std::fs::read(dir.path("miscompares.pcapng")).unwrap();
    let text = String::from_utf8_lossy(&capture);
    assert!(text.contains("primary released (miscompare: timeout)"), "capture holds the timed-out frame");
}

#[test]
fn a_burst_of_frames_crosses_passthrough_and_colo_without_loss_or_differences() {
    if !prerequisites("a_burst_of_frames_crosses_passthrough_and_colo_without_loss_or_differences") {
        return;
    }
    let n = 20_000usize;
    let frames: Vec<Vec<u8>> = (0..n).map(|i| udp4(40000, 9, &(i as u32).to_be_bytes())).collect();

    // Passthrough, one VM.
    let dir = TempDir::new("vnc");
    let tap = TestTap::new();
    let pass = Backend::spawn(
        &dir,
        BackendOpts { one_vm: false, tap: &tap.name, secondary: false, control: false, extra: vec![] },
    );
    let mut vm = Vm::connect(&pass.primary);
    vm.setup();
    let start = Instant::now();
    blast(&mut vm, &frames);
    let pass_rate = n as f64 / start.elapsed().as_secs_f64();
    drop(vm);
    drop(pass);

    // COLO, both VMs sending the same frames concurrently.
    let mut c = colo(&[]);
    let start = Instant::now();
    std::thread::scope(|scope| {
        let (p, s) = (&mut c.p, &mut c.s);
        let frames = &frames;
        scope.spawn(move || blast(p, frames));
        scope.spawn(move || blast(s, frames));
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let stats = loop {
        let stats = c.ctl.stats().unwrap();
        if stats.released >= n as u64 || Instant::now() > deadline {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let colo_rate = n as f64 / start.elapsed().as_secs_f64();
    assert_eq!(stats.released, n as u64, "{stats:?}");
    assert_eq!(stats.dropped_overflow, 0, "{stats:?}");
    let m = stats.miscompares;
    // The primary may run up to a full compare queue ahead of the secondary: that is
    // backpressure (queue-full), never a difference.
    assert_eq!((m.payload, m.size, m.ack, m.timeout), (0, 0, 0, 0), "{stats:?}");
    eprintln!(
        "MEASURED 64-byte UDP frames/s: passthrough {pass_rate:.0}, COLO compare (released, both VMs sending) \
         {colo_rate:.0}, ratio {:.2}; queue-full backpressure episodes {}",
        colo_rate / pass_rate,
        m.queue_full
    );
}

/// Sends every frame on `vm`'s TX ring, keeping it full, until all are completed.
fn blast(vm: &mut Vm, frames: &[Vec<u8>]) {
    let (mut sent, mut done) = (0usize, 0usize);
    let start = Instant::now();
    while done < frames.len() {
        let before = sent;
        while sent < frames.len() && sent - done < usize::from(QSIZE) {
            vm.queue_tx(&frames[sent]);
            sent += 1;
        }
        if sent != before {
            vm.kick(1);
        }
        let got = vm.used(1).len();
        done += got;
        if got == 0 {
            std::thread::yield_now();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "stalled at {done} of {}", frames.len());
    }
}
