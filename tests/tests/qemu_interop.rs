//! QEMU 7.2's colo-compare and `colo-proxy compare` fed the same framed input over the same four
//! Unix sockets must release the same frames on outdev and agree on whether a checkpoint is
//! needed, except where docs/compare.md marks a deliberate difference (**Ours**); those cases are
//! asserted for both implementations explicitly, so a change in either one shows. Differences
//! these tests found that the spec does not mark yet are asserted the same way, in their own
//! section (`undocumented_difference_*`).
//!
//! Each scenario runs against a fresh process of each implementation (the two in parallel). Its
//! outcome is a list of phases, each the ordered frames released on outdev and the number of
//! `DO_CHECKPOINT`s seen; every scenario ends with a phase for what `COLO_CHECKPOINT` flushes.
//! Skipped, visibly, when QEMU is not installed (`COLO_REQUIRE_ALL=1` turns that into a failure).

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use colo_proxy::builder::*;
use colo_proxy::notify_dev::DO_CHECKPOINT;
use colo_proxy::wire::ipv4::protocol;
use colo_proxy::wire::tcp::Flags;
use colo_tests::qemu::{qemu_available, Compare, CompareConfig};
use colo_tests::qframe::QPeer;
use colo_tests::{bin, skip};

/// Pause after every frame sent. QEMU reads both inputs in one iothread, so without a pause a
/// primary frame and the secondary frame sent right after it could be taken in either order.
const GAP: Duration = Duration::from_millis(40);

/// A phase ends when neither outdev nor notify_dev produced anything for this long. Both
/// implementations answer within a few milliseconds; this is generous for loaded machines and
/// still far below the 3 s compare_timeout, so no timeout checkpoint enters a scenario.
const QUIET: Duration = Duration::from_millis(400);

/// Upper bound on one phase (a process that never goes quiet is a failure, not a hang).
const PHASE_LIMIT: Duration = Duration::from_secs(10);

/// Length of the virtio-net header used in vnet mode (virtio 1.0 with mergeable buffers).
const VNET_LEN: usize = 12;

/// Scenarios run one at a time: QEMU's ordering between its two inputs depends on the pauses
/// above, which a machine busy with other scenarios could stretch.
static SERIAL: Mutex<()> = Mutex::new(());

/// One input step of a scenario.
#[derive(Clone, Debug)]
enum Step {
    /// Send a frame on primary-in.
    P(Vec<u8>),
    /// Send a frame on secondary-in.
    S(Vec<u8>),
    /// Send a message on notify_dev (framed like QEMU expects its input: with the vnet field in
    /// vnet mode).
    Notify(Vec<u8>),
    /// Wait until both outputs are quiet and start a new phase.
    Observe,
    /// Just wait (for timeouts).
    Wait(Duration),
}

/// What came out during one phase.
#[derive(Clone, Debug, Default)]
struct Phase {
    /// Frames released on outdev, in order, with their vnet header length field.
    released: Vec<(Vec<u8>, u32)>,
    /// `DO_CHECKPOINT` messages on notify_dev.
    do_checkpoints: usize,
    /// Other messages on notify_dev.
    notify: Vec<Vec<u8>>,
}

/// Everything one implementation did in a scenario: the phases delimited by `Step::Observe`,
/// then the phase ending the input, then the phase after the final `COLO_CHECKPOINT` (the flush).
#[derive(Debug)]
struct Outcome {
    phases: Vec<Phase>,
}

impl Outcome {
    /// The phase before the final flush.
    fn before_flush(&self) -> &Phase {
        &self.phases[self.phases.len() - 2]
    }

    /// What the final `COLO_CHECKPOINT` released.
    fn flushed(&self) -> &Phase {
        self.phases.last().expect("flush phase")
    }

    /// Frames released before the flush, over all phases.
    fn released_before_flush(&self) -> Vec<Vec<u8>> {
        self.phases[..self.phases.len() - 1].iter().flat_map(|p| p.released.iter().map(|(f, _)| f.clone())).collect()
    }

    /// `DO_CHECKPOINT`s before the flush, over all phases.
    fn checkpoints_before_flush(&self) -> usize {
        self.phases[..self.phases.len() - 1].iter().map(|p| p.do_checkpoints).sum()
    }
}

/// Something read from the implementation's outputs.
enum Output {
    Released(Vec<u8>, u32),
    Notify(Vec<u8>),
}

/// Takes the serial lock and the configuration, or reports a skip (returns `None`) when QEMU is
/// missing.
fn setup(test: &str, vnet: bool) -> Option<(std::sync::MutexGuard<'static, ()>, CompareConfig)> {
    if let Err(why) = qemu_available() {
        skip(test, &why);
        return None;
    }
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // `bin` fails with a clear message when the binary was not built.
    let cfg = CompareConfig { ours: bin("colo-proxy"), ..CompareConfig::new().vnet(vnet) };
    Some((guard, cfg))
}

/// Runs `steps` against a fresh process of `kind`.
fn run_one(kind: Compare, cfg: &CompareConfig, steps: &[Step]) -> Outcome {
    let mut r = kind.start(cfg).unwrap_or_else(|e| panic!("starting {}: {e:#}", kind.name()));
    let vnet_len = if cfg.vnet { VNET_LEN as u32 } else { 0 };
    let rx = spawn_readers(&mut r.out, &mut r.notify, cfg.vnet);
    let mut phases = Vec::new();
    for step in steps {
        match step {
            Step::P(f) => {
                r.pri.send(f, vnet_len).expect("send on primary-in");
                std::thread::sleep(GAP);
            }
            Step::S(f) => {
                r.sec.send(f, vnet_len).expect("send on secondary-in");
                std::thread::sleep(GAP);
            }
            Step::Notify(m) => {
                r.notify.send(m, 0).expect("send on notify_dev");
                std::thread::sleep(GAP);
            }
            Step::Observe => phases.push(settle(kind, &rx)),
            Step::Wait(t) => std::thread::sleep(*t),
        }
    }
    phases.push(settle(kind, &rx));
    r.send_checkpoint().expect("send COLO_CHECKPOINT");
    phases.push(settle(kind, &rx));
    r.proc.assert_running();
    Outcome { phases }
}

/// Threads that forward everything from outdev and notify_dev to one channel. They end when the
/// process is killed (end of file) or the receiver is gone.
fn spawn_readers(out: &mut QPeer, notify: &mut QPeer, vnet: bool) -> Receiver<Output> {
    let (tx, rx) = channel();
    let mut out = QPeer::from_stream(out.stream().try_clone().expect("clone outdev"), vnet);
    let tx_out = tx.clone();
    std::thread::spawn(move || loop {
        let item = match out.recv() {
            Ok((f, v)) => Output::Released(f, v),
            Err(e) if is_timeout(&e) => continue,
            Err(_) => break,
        };
        if tx_out.send(item).is_err() {
            break;
        }
    });
    // notify_dev output never carries the vnet field.
    let mut notify = QPeer::from_stream(notify.stream().try_clone().expect("clone notify_dev"), false);
    std::thread::spawn(move || loop {
        let item = match notify.recv_plain() {
            Ok(m) => Output::Notify(m),
            Err(e) if is_timeout(&e) => continue,
            Err(_) => break,
        };
        if tx.send(item).is_err() {
            break;
        }
    });
    rx
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

/// Collects outputs until both sockets have been quiet for [`QUIET`].
fn settle(kind: Compare, rx: &Receiver<Output>) -> Phase {
    let mut phase = Phase::default();
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < PHASE_LIMIT, "{}: outputs never went quiet: {phase:?}", kind.name());
        match rx.recv_timeout(QUIET) {
            Ok(Output::Released(f, v)) => phase.released.push((f, v)),
            Ok(Output::Notify(m)) if m == DO_CHECKPOINT => phase.do_checkpoints += 1,
            Ok(Output::Notify(m)) => phase.notify.push(m),
            Err(RecvTimeoutError::Timeout) => return phase,
            Err(RecvTimeoutError::Disconnected) => panic!("{}: an output socket closed", kind.name()),
        }
    }
}

/// Runs `steps` against QEMU and ours at the same time: (qemu, ours).
fn run_both(cfg: &CompareConfig, steps: &[Step]) -> (Outcome, Outcome) {
    // Each process lives and dies on the thread that started it (see `Compare::start`).
    std::thread::scope(|s| {
        let q = s.spawn(|| run_one(Compare::Qemu, cfg, steps));
        let o = s.spawn(|| run_one(Compare::Ours, cfg, steps));
        (q.join().expect("qemu run"), o.join().expect("ours run"))
    })
}

/// A readable one-line description of a frame for assertion messages.
fn describe(f: &[u8]) -> String {
    let tail: String = f[f.len().saturating_sub(16)..]
        .iter()
        .map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' })
        .collect();
    format!("{}B ..{tail:?}", f.len())
}

fn describe_phase(p: &Phase) -> String {
    let frames: Vec<String> = p.released.iter().map(|(f, v)| format!("[{} vnet={v}]", describe(f))).collect();
    let notify: Vec<_> = p.notify.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect();
    format!(
        "released {} {}, DO_CHECKPOINT x{}, other notify {notify:?}",
        frames.len(),
        frames.join(" "),
        p.do_checkpoints
    )
}

fn describe_outcome(o: &Outcome) -> String {
    o.phases.iter().enumerate().map(|(i, p)| format!("\n  phase {i}: {}", describe_phase(p))).collect()
}

/// Both outcomes, for assertion messages.
fn describe_both(q: &Outcome, o: &Outcome) -> String {
    format!("QEMU:{}\nours:{}", describe_outcome(q), describe_outcome(o))
}

/// The core claim: same frames released in each phase, same "checkpoint requested" verdict.
fn assert_same(q: &Outcome, o: &Outcome) {
    assert_same_but_verdicts_of(q, o, &[]);
}

/// [`assert_same`], except the checkpoint verdicts of the phases `chance`: phases where
/// whether either side's once-a-second age scan falls in them is chance.
fn assert_same_but_verdicts_of(q: &Outcome, o: &Outcome, chance: &[usize]) {
    let msg = || describe_both(q, o);
    assert_eq!(q.phases.len(), o.phases.len(), "{}", msg());
    for (i, (pq, po)) in q.phases.iter().zip(&o.phases).enumerate() {
        assert!(pq.released == po.released, "phase {i}: different frames released\n{}", msg());
        if !chance.contains(&i) {
            assert_eq!(
                pq.do_checkpoints > 0,
                po.do_checkpoints > 0,
                "phase {i}: checkpoint verdicts differ\n{}",
                msg()
            );
        }
        assert!(pq.notify == po.notify, "phase {i}: different notify_dev messages\n{}", msg());
    }
}

/// Runs the scenario on both and asserts they agree; returns QEMU's outcome (the reference) for
/// further checks of what was expected.
fn agree(cfg: &CompareConfig, steps: &[Step]) -> Outcome {
    let (q, o) = run_both(cfg, steps);
    assert_same(&q, &o);
    q
}

/// `f` (IPv4, no VLAN) as the other VM might send it: other IP ID and TTL (valid IP checksum) and
/// the secondary's own source MAC. UDP, ICMP and TCP comparisons ignore all three.
fn as_secondary(f: &[u8], ident: u16, ttl: u8) -> Vec<u8> {
    let mut f = f.to_vec();
    f[6..12].copy_from_slice(&[0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]);
    f[18..20].copy_from_slice(&ident.to_be_bytes());
    f[22] = ttl;
    f[24..26].copy_from_slice(&[0, 0]);
    let c = colo_proxy::wire::checksum::internet(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// `f` behind a virtio-net header whose first byte is `flags` (the two VMs' headers may differ;
/// the comparison ignores them and the primary's is released).
fn with_vnet(f: &[u8], flags: u8) -> Vec<u8> {
    let mut v = vec![0u8; VNET_LEN];
    v[0] = flags;
    v.extend_from_slice(f);
    v
}

fn frames(fs: &[&[u8]]) -> Vec<Vec<u8>> {
    fs.iter().map(|f| f.to_vec()).collect()
}

// ---------------------------------------------------------------------------------------------
// Same behaviour expected.

#[test]
fn matching_udp_pairs_are_released_in_order() {
    let Some((_serial, cfg)) = setup("matching_udp_pairs_are_released_in_order", false) else { return };
    let ps: Vec<Vec<u8>> = (0..3).map(|i| udp4(5000, 7, format!("answer {i}").as_bytes())).collect();
    let mut steps = vec![];
    for (i, p) in ps.iter().enumerate() {
        steps.push(Step::P(p.clone()));
        steps.push(Step::S(as_secondary(p, 900 + i as u16, 17)));
    }
    let q = agree(&cfg, &steps);
    assert_eq!(q.released_before_flush(), ps);
    assert_eq!(q.checkpoints_before_flush(), 0);
    assert!(q.flushed().released.is_empty());
}

#[test]
fn udp_payload_difference_requests_a_checkpoint_and_the_flush_releases_the_primary() {
    let Some((_serial, cfg)) =
        setup("udp_payload_difference_requests_a_checkpoint_and_the_flush_releases_the_primary", false)
    else {
        return;
    };
    let p = udp4(5000, 7, b"value=1");
    let q = agree(&cfg, &[Step::P(p.clone()), Step::S(udp4(5000, 7, b"value=2"))]);
    assert!(q.released_before_flush().is_empty());
    assert!(q.checkpoints_before_flush() >= 1);
    assert_eq!(q.flushed().released, vec![(p, 0)]);
}

#[test]
fn udp_size_difference_requests_a_checkpoint() {
    let Some((_serial, cfg)) = setup("udp_size_difference_requests_a_checkpoint", false) else { return };
    let p = udp4(5000, 7, b"abc");
    let q = agree(&cfg, &[Step::P(p.clone()), Step::S(udp4(5000, 7, b"abcd"))]);
    assert!(q.released_before_flush().is_empty());
    assert!(q.checkpoints_before_flush() >= 1);
    assert_eq!(q.flushed().released, vec![(p, 0)]);
}

#[test]
fn icmp_echo_reply_with_other_ip_id_and_ttl_is_released() {
    let Some((_serial, cfg)) = setup("icmp_echo_reply_with_other_ip_id_and_ttl_is_released", false) else {
        return;
    };
    let p = icmp4_echo_reply(0x1234, 1, b"ping payload");
    let q = agree(&cfg, &[Step::P(p.clone()), Step::S(as_secondary(&p, 4242, 3))]);
    assert_eq!(q.released_before_flush(), vec![p]);
    assert_eq!(q.checkpoints_before_flush(), 0);
}

#[test]
fn gre_identical_is_released_and_another_ip_id_requests_a_checkpoint() {
    let Some((_serial, cfg)) = setup("gre_identical_is_released_and_another_ip_id_requests_a_checkpoint", false) else {
        return;
    };
    // Other protocols compare the whole frame, IP header included.
    let same = ip4_other(protocol::GRE, 7, b"\x00\x00\x08\x00tunnelled");
    let p = ip4_other(protocol::GRE, 8, b"\x00\x00\x08\x00tunnelled");
    let s = ip4_other(protocol::GRE, 9, b"\x00\x00\x08\x00tunnelled");
    let q = agree(&cfg, &[Step::P(same.clone()), Step::S(same.clone()), Step::Observe, Step::P(p.clone()), Step::S(s)]);
    assert_eq!(q.phases[0].released, vec![(same, 0)]);
    assert_eq!(q.phases[0].do_checkpoints, 0);
    assert!(q.before_flush().released.is_empty());
    assert!(q.before_flush().do_checkpoints >= 1);
    assert_eq!(q.flushed().released, vec![(p, 0)]);
}

#[test]
fn tcp_stream_segmented_differently_is_released() {
    let Some((_serial, cfg)) = setup("tcp_stream_segmented_differently_is_released", false) else { return };
    let data: Vec<u8> = (0..=255u8).cycle().take(400).collect();
    let seg = |seq: u32, range: std::ops::Range<usize>| tcp4(80, 40000, 1000 + seq, Some(1), Flags::PSH, &data[range]);
    // Round 1: the primary sends one segment, the secondary two.
    let p1 = seg(0, 0..200);
    // Round 2: the primary sends two segments, the secondary one.
    let p2 = seg(200, 200..260);
    let p3 = seg(260, 260..400);
    let steps = [
        Step::P(p1.clone()),
        Step::S(as_secondary(&seg(0, 0..120), 50, 64)),
        Step::S(as_secondary(&seg(120, 120..200), 51, 64)),
        Step::Observe,
        Step::P(p2.clone()),
        Step::P(p3.clone()),
        Step::S(as_secondary(&seg(200, 200..400), 52, 64)),
    ];
    let q = agree(&cfg, &steps);
    assert_eq!(q.phases[0].released, vec![(p1, 0)]);
    assert_eq!(q.before_flush().released, vec![(p2, 0), (p3, 0)]);
    assert_eq!(q.checkpoints_before_flush(), 0);
    assert!(q.flushed().released.is_empty());
}

#[test]
fn tcp_payload_difference_requests_a_checkpoint() {
    let Some((_serial, cfg)) = setup("tcp_payload_difference_requests_a_checkpoint", false) else { return };
    let p = tcp4(80, 40000, 5000, Some(1), Flags::PSH, b"HTTP/1.1 200 OK\r\n");
    let s = tcp4(80, 40000, 5000, Some(1), Flags::PSH, b"HTTP/1.1 500 ER\r\n");
    let q = agree(&cfg, &[Step::P(p.clone()), Step::S(s)]);
    assert!(q.released_before_flush().is_empty());
    assert!(q.checkpoints_before_flush() >= 1);
    assert_eq!(q.flushed().released, vec![(p, 0)]);
}

#[test]
fn tcp_pure_ack_from_the_primary_waits_for_a_secondary_frame() {
    let Some((_serial, cfg)) = setup("tcp_pure_ack_from_the_primary_waits_for_a_secondary_frame", false) else {
        return;
    };
    let ack = tcp4(80, 40000, 7000, Some(100), 0, &[]);
    let q = agree(&cfg, &[Step::P(ack.clone()), Step::Observe, Step::S(as_secondary(&ack, 3, 64))]);
    assert!(q.phases[0].released.is_empty(), "held until the secondary sends");
    assert_eq!(q.before_flush().released, vec![(ack, 0)]);
    assert_eq!(q.checkpoints_before_flush(), 0);
}

#[test]
fn arp_from_the_primary_is_released_at_once_and_from_the_secondary_dropped() {
    let Some((_serial, cfg)) = setup("arp_from_the_primary_is_released_at_once_and_from_the_secondary_dropped", false)
    else {
        return;
    };
    let arp = arp_request();
    let q = agree(&cfg, &[Step::P(arp.clone()), Step::Observe, Step::S(arp.clone())]);
    assert_eq!(q.phases[0].released, vec![(arp, 0)]);
    assert_eq!(q.released_before_flush().len(), 1, "the secondary's ARP is not released");
    assert_eq!(q.checkpoints_before_flush(), 0);
    assert!(q.flushed().released.is_empty());
}

#[test]
fn vnet_header_mode_udp_match_and_mismatch() {
    let Some((_serial, cfg)) = setup("vnet_header_mode_udp_match_and_mismatch", true) else { return };
    let p_ok = with_vnet(&udp4(6000, 53, b"same"), 1);
    let s_ok = with_vnet(&udp4(6000, 53, b"same"), 0);
    let p_bad = with_vnet(&udp4(6001, 53, b"mine"), 1);
    let s_bad = with_vnet(&udp4(6001, 53, b"your"), 0);
    let steps = [Step::P(p_ok.clone()), Step::S(s_ok), Step::Observe, Step::P(p_bad.clone()), Step::S(s_bad)];
    let q = agree(&cfg, &steps);
    let v = VNET_LEN as u32;
    assert_eq!(q.phases[0].released, vec![(p_ok, v)], "the primary's header comes out");
    assert!(q.before_flush().released.is_empty());
    assert!(q.before_flush().do_checkpoints >= 1);
    assert_eq!(q.flushed().released, vec![(p_bad, v)]);
}

#[test]
fn unparseable_frames_from_the_primary_pass_at_once() {
    let Some((_serial, cfg)) = setup("unparseable_frames_from_the_primary_pass_at_once", false) else { return };
    // An IPv4 frame cut inside its IP header, and a non-IP protocol (LLDP).
    let runt = udp4(1, 2, b"cut")[..30].to_vec();
    let mut lldp = ethernet(colo_proxy::wire::MacAddr([0x01, 0x80, 0xc2, 0, 0, 0x0e]), VM_MAC, 0x88cc);
    lldp.extend_from_slice(&[0x02, 0x07, 0x04, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0]);
    let q = agree(&cfg, &[Step::P(runt.clone()), Step::P(lldp.clone()), Step::Observe, Step::S(runt.clone())]);
    assert_eq!(q.phases[0].released, vec![(runt, 0), (lldp, 0)]);
    assert!(q.before_flush().released.is_empty(), "the secondary's copy is dropped");
    assert_eq!(q.checkpoints_before_flush(), 0);
    assert!(q.flushed().released.is_empty());
}

#[test]
fn tcp_held_segments_are_flushed_in_sequence_order() {
    let Some((_serial, cfg)) = setup("tcp_held_segments_are_flushed_in_sequence_order", false) else { return };
    let seg = |seq: u32| tcp4(80, 40000, seq, Some(1), Flags::PSH, &[b'x'; 10]);
    // Arrival out of order and no secondary output: the flush sorts them.
    let q = agree(&cfg, &[Step::P(seg(3020)), Step::P(seg(3000)), Step::P(seg(3010))]);
    assert!(q.released_before_flush().is_empty());
    assert_eq!(q.checkpoints_before_flush(), 0, "nothing compared yet, nothing timed out");
    assert_eq!(q.flushed().released, vec![(seg(3000), 0), (seg(3010), 0), (seg(3020), 0)]);
}

#[test]
fn xen_style_proxy_init_is_answered_by_both() {
    let Some((_serial, cfg)) = setup("xen_style_proxy_init_is_answered_by_both", false) else { return };
    let q = agree(&cfg, &[Step::Notify(colo_proxy::notify_dev::PROXY_INIT.to_vec())]);
    assert_eq!(q.phases[0].notify, vec![colo_proxy::notify_dev::PROXY_INIT_REPLY.to_vec()]);
}

#[test]
fn held_frames_time_out_into_a_checkpoint_request() {
    let Some((_serial, mut cfg)) = setup("held_frames_time_out_into_a_checkpoint_request", false) else { return };
    // A short compare_timeout keeps the test quick; the age scan still runs every second.
    cfg.compare_timeout_ms = Some(300);
    let p = udp4(9000, 7, b"no secondary answer");
    let checkpoint = colo_proxy::notify_dev::CHECKPOINT.to_vec();
    let steps = [
        // A primary frame nobody matches.
        Step::P(p.clone()),
        Step::Wait(Duration::from_millis(2500)),
        Step::Observe,
        Step::Notify(checkpoint),
        Step::Observe,
        // A secondary frame nobody matches.
        Step::S(udp4(9001, 7, b"secondary only")),
        Step::Wait(Duration::from_millis(2500)),
    ];
    let (q, o) = run_both(&cfg, &steps);
    // Phase 1 lasts from the checkpoint's flush to the next look. Each side scans for aged
    // frames once a second, at an offset of its own, and until the flush the primary frame is
    // still held: whether a scan falls in that short phase is chance (a CI run under load saw
    // QEMU's do so and ours not). Its released frames are compared all the same.
    assert_same_but_verdicts_of(&q, &o, &[1]);
    assert!(q.phases[0].released.is_empty());
    assert!(q.phases[0].do_checkpoints >= 1, "the held primary frame timed out");
    assert_eq!(q.phases[1].released, vec![(p, 0)], "the checkpoint flushed it");
    assert!(q.before_flush().do_checkpoints >= 1, "the held secondary frame timed out");
    assert!(q.before_flush().released.is_empty());
    assert!(q.flushed().released.is_empty(), "a secondary frame is dropped, never released");
}

// ---------------------------------------------------------------------------------------------
// Documented differences (docs/compare.md, **Ours**): both behaviours asserted.

#[test]
fn documented_difference_ipv6_is_compared_by_us_only() {
    let Some((_serial, cfg)) = setup("documented_difference_ipv6_is_compared_by_us_only", false) else { return };
    let p = udp6(5353, 5353, b"v6 answer A");
    let steps = [Step::P(p.clone()), Step::Observe, Step::S(udp6(5353, 5353, b"v6 answer B"))];
    assert_qemu_passes_ours_compares(&cfg, &steps, p);
}

/// QEMU passes `p` uncompared (released at once, no checkpoint, nothing left to flush); ours
/// holds it for the secondary, asks for one checkpoint, and the flush releases it.
fn assert_qemu_passes_ours_compares(cfg: &CompareConfig, steps: &[Step], p: Vec<u8>) {
    let (q, o) = run_both(cfg, steps);
    let msg = describe_both(&q, &o);
    assert_eq!(q.phases[0].released, vec![(p.clone(), 0)], "{msg}");
    assert_eq!(q.checkpoints_before_flush(), 0, "{msg}");
    assert!(q.flushed().released.is_empty(), "{msg}");
    assert!(o.released_before_flush().is_empty(), "{msg}");
    assert_eq!(o.checkpoints_before_flush(), 1, "{msg}");
    assert_eq!(o.flushed().released, vec![(p, 0)], "{msg}");
}

#[test]
fn documented_difference_vlan_tagged_frames_are_compared_by_us_only() {
    let Some((_serial, cfg)) = setup("documented_difference_vlan_tagged_frames_are_compared_by_us_only", false) else {
        return;
    };
    let p = vlan_tagged(&udp4(5000, 7, b"tagged A"), 10);
    let steps = [Step::P(p.clone()), Step::Observe, Step::S(vlan_tagged(&udp4(5000, 7, b"tagged B"), 10))];
    assert_qemu_passes_ours_compares(&cfg, &steps, p);
}

#[test]
fn documented_difference_burst_order_fifo_versus_newest_first() {
    let Some((_serial, cfg)) = setup("documented_difference_burst_order_fifo_versus_newest_first", false) else {
        return;
    };
    let m = |i: u16| udp4(3001, 7, format!("m{i}").as_bytes());
    let mut steps: Vec<Step> = (1..=3).map(|i| Step::P(m(i))).collect();
    steps.extend((1..=3).map(|i| Step::S(as_secondary(&m(i), 100 + i, 64))));
    let (q, o) = run_both(&cfg, &steps);
    let msg = describe_both(&q, &o);
    // QEMU takes the newest held primary frame first: S1 and S2 find no partner for P3 (two
    // spurious checkpoint requests), S3 releases P3, then P2 and P1 match.
    assert_eq!(q.released_before_flush(), frames(&[&m(3), &m(2), &m(1)]), "{msg}");
    assert!(q.checkpoints_before_flush() >= 1, "{msg}");
    // Ours: oldest first, each S matches its P at once, nothing to report.
    assert_eq!(o.released_before_flush(), frames(&[&m(1), &m(2), &m(3)]), "{msg}");
    assert_eq!(o.checkpoints_before_flush(), 0, "{msg}");
    for out in [&q, &o] {
        assert!(out.flushed().released.is_empty(), "{msg}");
    }
}

#[test]
fn documented_difference_one_checkpoint_request_per_flush_interval() {
    let Some((_serial, cfg)) = setup("documented_difference_one_checkpoint_request_per_flush_interval", false) else {
        return;
    };
    const N: u16 = 4;
    let mut steps = vec![];
    let mut ps = vec![];
    for i in 0..N {
        // One flow per pair, so each pair is one failing comparison in QEMU.
        let p = udp4(7000 + i, 7, format!("primary {i}").as_bytes());
        steps.push(Step::P(p.clone()));
        steps.push(Step::S(udp4(7000 + i, 7, format!("second. {i}").as_bytes())));
        ps.push(p);
    }
    let (q, o) = run_both(&cfg, &steps);
    let msg = describe_both(&q, &o);
    assert!(q.checkpoints_before_flush() >= N as usize, "QEMU: one request per failing comparison\n{msg}");
    assert_eq!(o.checkpoints_before_flush(), 1, "ours: the first inconsistency since the flush only\n{msg}");
    for out in [&q, &o] {
        assert!(out.released_before_flush().is_empty(), "{msg}");
        let flushed: Vec<Vec<u8>> = out.flushed().released.iter().map(|(f, _)| f.clone()).collect();
        assert_eq!(flushed, ps, "{msg}");
    }
    // One frame per flow: both flush in the order the flows first appeared.
    assert_eq!(q.flushed().released, o.flushed().released, "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Differences found by these tests that docs/compare.md does not mark **Ours** (yet). Both
// behaviours are asserted so that a change on either side is noticed and the spec is settled.

/// Spec "Flush": "others in arrival order". QEMU flushes connection by connection (in the order
/// the connections were first seen) and pops each queue from its tail: newest first.
#[test]
fn undocumented_difference_flush_order_of_held_udp_frames() {
    let Some((_serial, cfg)) = setup("undocumented_difference_flush_order_of_held_udp_frames", false) else {
        return;
    };
    // Primary frames of two flows, interleaved, and no secondary output yet: all held.
    let a = |i: u8| udp4(8001, 7, &[b'a', b'0' + i]);
    let b = |i: u8| udp4(8002, 7, &[b'b', b'0' + i]);
    let steps = [Step::P(a(1)), Step::P(b(1)), Step::P(a(2)), Step::P(b(2))];
    let (q, o) = run_both(&cfg, &steps);
    let msg = describe_both(&q, &o);
    let flushed = |out: &Outcome| out.flushed().released.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>();
    for out in [&q, &o] {
        assert!(out.released_before_flush().is_empty(), "{msg}");
        assert_eq!(out.checkpoints_before_flush(), 0, "{msg}");
    }
    // QEMU: flows in first-seen order, each flow's frames newest first.
    assert_eq!(flushed(&q), frames(&[&a(2), &a(1), &b(2), &b(1)]), "{msg}");
    // Ours: arrival order.
    assert_eq!(flushed(&o), frames(&[&a(1), &b(1), &a(2), &b(2)]), "{msg}");
}

/// Spec "TCP": segments are aligned by sequence number. QEMU compares the lowest-sequence heads
/// of both queues from their byte offsets without checking that they start at the same
/// sequence number, so a secondary segment arriving early is a (spurious) mismatch.
#[test]
fn undocumented_difference_tcp_secondary_segments_out_of_order() {
    let Some((_serial, cfg)) = setup("undocumented_difference_tcp_secondary_segments_out_of_order", false) else {
        return;
    };
    let t = |seq: u32, d: &[u8]| tcp4(80, 40001, seq, Some(5), Flags::PSH, d);
    let steps =
        [Step::P(t(100, b"hello")), Step::P(t(105, b"world")), Step::S(t(105, b"world")), Step::S(t(100, b"hello"))];
    let (q, o) = run_both(&cfg, &steps);
    let msg = describe_both(&q, &o);
    for out in [&q, &o] {
        assert_eq!(out.released_before_flush(), frames(&[&t(100, b"hello"), &t(105, b"world")]), "{msg}");
    }
    // QEMU compares the two queue heads without aligning them ("hello" against "world"): a
    // spurious checkpoint request. Ours aligns by sequence number and waits for the gap.
    assert!(q.checkpoints_before_flush() >= 1, "{msg}");
    assert_eq!(o.checkpoints_before_flush(), 0, "{msg}");
}

/// Spec "TCP": aligned by sequence number. Overlapping secondary segments (a retransmission that
/// repeats bytes already compared) are a mismatch in QEMU, the same stream for us.
#[test]
fn undocumented_difference_tcp_overlapping_secondary_retransmission() {
    let Some((_serial, cfg)) = setup("undocumented_difference_tcp_overlapping_secondary_retransmission", false) else {
        return;
    };
    let t = |seq: u32, d: &[u8]| tcp4(80, 40002, seq, Some(5), Flags::PSH, d);
    // The secondary's second segment repeats 2 bytes of its first (a partial retransmission).
    let p = t(100, b"0123456789");
    let (q, o) = run_both(&cfg, &[Step::P(p.clone()), Step::S(t(100, b"01234")), Step::S(t(103, b"3456789"))]);
    let msg = describe_both(&q, &o);
    // QEMU continues from its byte offset into the new segment ("56789" against "34567").
    assert!(q.released_before_flush().is_empty(), "{msg}");
    assert!(q.checkpoints_before_flush() >= 1, "{msg}");
    assert_eq!(q.flushed().released, vec![(p.clone(), 0)], "{msg}");
    // Ours compares by sequence number: the same stream.
    assert_eq!(o.released_before_flush(), vec![p], "{msg}");
    assert_eq!(o.checkpoints_before_flush(), 0, "{msg}");
}

/// Spec "TCP" step 1: a P without payload waits while the S queue is empty. Ours keeps a
/// "secondary credit" for every consumed S frame (compare/tcp.rs) and releases the ACK at once;
/// QEMU only behaves like that after a partial match (where it leaves the consumed S queued).
#[test]
fn undocumented_difference_tcp_pure_ack_after_an_exact_match() {
    let Some((_serial, cfg)) = setup("undocumented_difference_tcp_pure_ack_after_an_exact_match", false) else {
        return;
    };
    let data = tcp4(80, 40003, 100, Some(5), Flags::PSH, b"hello");
    let ack = tcp4(80, 40003, 105, Some(6), 0, &[]);
    let steps = [
        Step::P(data.clone()),
        Step::S(data.clone()),
        Step::Observe,
        Step::P(ack.clone()),
        Step::Observe,
        Step::S(ack.clone()),
    ];
    let (q, o) = run_both(&cfg, &steps);
    let msg = describe_both(&q, &o);
    for out in [&q, &o] {
        assert_eq!(out.phases[0].released, vec![(data.clone(), 0)], "{msg}");
        assert_eq!(out.released_before_flush(), frames(&[&data, &ack]), "{msg}");
        assert_eq!(out.checkpoints_before_flush(), 0, "{msg}");
    }
    // QEMU freed both frames of the exact match, so the ACK waits for the next secondary frame
    // (spec step 1). Ours counts the consumed secondary frame as progress and releases it at once.
    assert!(q.phases[1].released.is_empty(), "{msg}");
    assert_eq!(o.phases[1].released, vec![(ack, 0)], "{msg}");
}
