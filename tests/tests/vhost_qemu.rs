//! vhost-net-compare with a real vhost-user frontend: QEMU 7.2 (TCG) booting the Linux test
//! guest (`colo_tests::linux_guest`) with `-netdev vhost-user` on the backend's socket(s).
//!
//! - Passthrough: the client namespace on the tap's side pings the guest, gets UDP and TCP
//!   echo, and fetches a page and a file from busybox httpd.
//! - COLO: two guests (same image, MAC and IP) on the primary and secondary sockets. ICMP and
//!   UDP echo replies appear exactly once on the tap; a TCP echo session works through the
//!   rewriter (the two kernels pick different initial sequence numbers); the token service
//!   (a random token per boot) makes the control socket report a miscompare, and a
//!   `checkpoint` from the test, acting as the controller, releases the primary's answer.
//!
//! QEMU 7.2 enables the rings before it negotiates features; that these tests pass at all is
//! the test of vhost-net-compare's frontend relay (`frontend_shim`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use colo_proxy::compare::Reason;
use colo_proxy::control::{Event, PeerState};
use colo_proxy::Side;
use colo_tests::linux_guest::{blob, feature, LinuxGuest, Ready, ECHO_PORT, INDEX_HTML, TOKEN_PORT};
use colo_tests::qemu_vhost::{
    self, http_get, parse_from_guest, tcp_connect, tcp_exchange, udp_request, Seen, VhostNet, GUEST_IP, GUEST_MAC,
};
use colo_tests::{expect_event, skip, TempDir};

/// TCG boots take 10–30 s here; two guests at once on two cores take longer.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn boot(net: &VhostNet, name: &str, socket: &std::path::Path, blob_bytes: usize) -> LinuxGuest {
    let mut opts = net.guest_opts(name, socket);
    opts.blob_bytes = blob_bytes;
    LinuxGuest::start(&opts).unwrap_or_else(|e| panic!("starting guest {name}: {e:#}"))
}

fn wait_ready(g: &mut LinuxGuest) -> Ready {
    g.wait_ready(BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{e:#}"))
}

fn peer(role: Side, state: PeerState) -> impl Fn(&Event) -> bool {
    move |e| *e == Event::Peer { role, state }
}

#[test]
fn qemu_guest_on_the_passthrough_backend_answers_ping_echo_and_http() {
    let test = "qemu_guest_on_the_passthrough_backend_answers_ping_echo_and_http";
    if let Err(why) = qemu_vhost::prerequisites() {
        return skip(test, &why);
    }
    let t0 = Instant::now();
    let mut net = VhostNet::start(false, &[]);
    let mut ctl = net.control();
    let blob_len = 256 * 1024;
    let mut guest = boot(&net, "vq-pass", &net.primary.clone(), blob_len);
    let ready = wait_ready(&mut guest);
    expect_event(&mut ctl, IO_TIMEOUT, "peer connected", peer(Side::Primary, PeerState::Connected));
    eprintln!("{test}: guest ready {:.1} s after QEMU started", ready.boot.as_secs_f64());
    // The device as vhost-net-compare offers it: VERSION_1, MAC, MRG_RXBUF, EVENT_IDX, and no
    // checksum or segmentation offloads.
    let f = ready.features.expect("the guest reports its virtio-net features");
    for (bit, name) in [
        (feature::VERSION_1, "VERSION_1"),
        (feature::MAC, "MAC"),
        (feature::MRG_RXBUF, "MRG_RXBUF"),
        (feature::EVENT_IDX, "EVENT_IDX"),
    ] {
        assert!(f & (1 << bit) != 0, "{name} not negotiated: {f:#x}");
    }
    for (bit, name) in [(feature::CSUM, "CSUM"), (feature::GUEST_CSUM, "GUEST_CSUM"), (feature::HOST_TSO4, "HOST_TSO4")]
    {
        assert!(f & (1 << bit) == 0, "{name} negotiated: {f:#x}");
    }

    let (ok, out) = net.client.try_exec(&["ping", "-c", "3", "-i", "0.2", "-W", "5", GUEST_IP]);
    assert!(ok, "ping {GUEST_IP}: {out}");
    let token = ready.token.clone();
    net.in_client(move || {
        assert_eq!(udp_request(ECHO_PORT, b"hello udp", 10).as_deref(), Some(&b"hello udp"[..]));
        let big: Vec<u8> = (0..1472u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(udp_request(ECHO_PORT, &big, 10), Some(big));

        let mut s = tcp_connect(ECHO_PORT, IO_TIMEOUT);
        assert_eq!(tcp_exchange(&mut s, b"hello tcp\n", 10), b"hello tcp\n");
        let stream = blob(100_000);
        assert_eq!(tcp_exchange(&mut s, &stream, stream.len()), stream);
        drop(s);

        let (status, body) = http_get("/", IO_TIMEOUT);
        assert!(status.contains(" 200 "), "GET /: {status}");
        assert_eq!(String::from_utf8_lossy(&body), INDEX_HTML);
        let (status, body) = http_get("/blob.bin", IO_TIMEOUT);
        assert!(status.contains(" 200 "), "GET /blob.bin: {status}");
        assert_eq!(body.len(), blob_len);
        assert!(body == blob(blob_len), "content of /blob.bin differs");

        let line = format!("{token}\n").into_bytes();
        assert_eq!(udp_request(TOKEN_PORT, b"token?", 10), Some(line));
    });
    let stats = ctl.stats().expect("stats");
    assert!(stats.frames_primary > (blob_len / 1514) as u64, "{stats:?}");
    assert_eq!(stats.rejected_input, 0, "{stats:?}");
    guest.qemu().assert_running();
    net.backend().assert_running();
    // QEMU 7.2 enables the rings before SET_FEATURES: the relay answered and applied that.
    let log = net.backend().stderr();
    if qemu_version().contains("version 7.2") {
        assert!(log.contains("sent SET_VRING_ENABLE before SET_FEATURES"), "the relay's log line:\n{log}");
    }
    drop(guest);
    expect_event(&mut ctl, IO_TIMEOUT, "peer disconnected", peer(Side::Primary, PeerState::Disconnected));
    eprintln!("{test}: {:.1} s in all", t0.elapsed().as_secs_f64());
}

#[test]
fn two_qemu_guests_on_the_colo_backend_are_compared_and_released_once() {
    let test = "two_qemu_guests_on_the_colo_backend_are_compared_and_released_once";
    if let Err(why) = qemu_vhost::prerequisites() {
        return skip(test, &why);
    }
    let t0 = Instant::now();
    let dir = TempDir::new("vqcolo");
    let capture_path = dir.path("miscompares.pcapng");
    // No timeout during the test: every release is a match or the test's checkpoint.
    let mut net = VhostNet::start(
        true,
        &["--compare-timeout", "600000", "--capture", capture_path.to_str().expect("utf-8 path")],
    );
    let mut ctl = net.control();
    let (p_sock, s_sock) = (net.primary.clone(), net.secondary.clone().expect("secondary socket"));
    // Both QEMUs boot at once; same image, MAC and IP, different random tokens.
    let mut primary = boot(&net, "vq-pri", &p_sock, 64 * 1024);
    let mut secondary = boot(&net, "vq-sec", &s_sock, 64 * 1024);
    let p_ready = wait_ready(&mut primary);
    let s_ready = wait_ready(&mut secondary);
    eprintln!(
        "{test}: guests ready {:.1} s / {:.1} s after their QEMU started",
        p_ready.boot.as_secs_f64(),
        s_ready.boot.as_secs_f64()
    );
    assert_ne!(p_ready.token, s_ready.token, "each guest has its own token");
    for role in [Side::Primary, Side::Secondary] {
        expect_event(&mut ctl, IO_TIMEOUT, "peer connected", peer(role, PeerState::Connected));
    }
    let capture = net.capture("tap.pcap");

    // 1. Kernel ICMP (the client's ARP request reaches both guests first).
    let (ok, out) = net.client.try_exec(&["ping", "-c", "5", "-i", "0.2", "-W", "5", GUEST_IP]);
    assert!(ok, "ping through the compare path: {out}");

    // 2. UDP echo, one datagram at a time, no retries: each must come back.
    let udp_payloads: Vec<Vec<u8>> = (0..10).map(|i| format!("udp-echo-{i}").into_bytes()).collect();
    let sent = udp_payloads.clone();
    net.in_client(move || {
        let s = qemu_vhost::client_udp(IO_TIMEOUT);
        let mut buf = [0u8; 2048];
        for p in &sent {
            s.send_to(p, qemu_vhost::guest(ECHO_PORT)).expect("udp send");
            let (n, from) = s.recv_from(&mut buf).expect("UDP echo reply");
            assert_eq!((&buf[..n], from), (&p[..], qemu_vhost::guest(ECHO_PORT)));
        }
    });

    // 3. A TCP echo session through the rewriter: lines, then 64 KB in 1400-byte exchanges.
    //    Request and answer, not a stream both ways at once: then both guests' answers
    //    acknowledge the same client data, whereas a bulk echo makes one guest acknowledge
    //    data the other has not received yet, which the compare engine's ACK rule (QEMU's too)
    //    reports as a difference until the slower guest catches up.
    let lines: Vec<String> = (0..20).map(|i| format!("line {i} of the tcp echo session\n")).collect();
    let chunk = blob(64 * 1024);
    let (to_send, big) = (lines.clone(), chunk.clone());
    net.in_client(move || {
        let mut s = tcp_connect(ECHO_PORT, IO_TIMEOUT);
        for l in &to_send {
            assert_eq!(tcp_exchange(&mut s, l.as_bytes(), l.len()), l.as_bytes());
        }
        for piece in big.chunks(1400) {
            assert!(tcp_exchange(&mut s, piece, piece.len()) == piece, "a 1400-byte piece echoed intact");
        }
    });
    let stats = ctl.stats().expect("stats");
    assert_eq!(stats.miscompares.total(), 0, "identical guests must not miscompare: {stats:?}");
    assert!(stats.frames_secondary > 0 && stats.released > 0, "{stats:?}");
    assert_eq!(stats.dropped_overflow, 0, "{stats:?}");

    // 4. The token service answers differently: held, reported, released by a checkpoint.
    let query = net.in_client(|| {
        let s = qemu_vhost::client_udp(Duration::from_millis(1000));
        s.send_to(b"token?", qemu_vhost::guest(TOKEN_PORT)).expect("udp send");
        let mut buf = [0u8; 256];
        assert!(s.recv_from(&mut buf).is_err(), "a divergent reply must be held");
        s
    });
    match expect_event(&mut ctl, IO_TIMEOUT, "miscompare", |e| matches!(e, Event::Miscompare { .. })) {
        Event::Miscompare { reason, proto, flow, .. } => {
            assert_eq!(proto, "udp");
            assert_eq!(reason, Reason::Payload, "two UUIDs of the same length");
            assert_eq!(flow.split('>').next(), Some(format!("{GUEST_IP}:{TOKEN_PORT}").as_str()));
        }
        _ => unreachable!(),
    }
    let flushed = ctl.checkpoint().expect("checkpoint");
    assert_eq!((flushed.released, flushed.dropped), (1, 1));
    query.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut buf = [0u8; 256];
    let (n, _) = query.recv_from(&mut buf).expect("the primary's answer after the checkpoint");
    assert_eq!(String::from_utf8_lossy(&buf[..n]), format!("{}\n", p_ready.token), "the primary's token");

    // 5. The tap saw every reply exactly once, the primary's token and never the secondary's.
    let p_token = format!("{}\n", p_ready.token).into_bytes();
    let expect_tcp: usize = lines.iter().map(String::len).sum::<usize>() + chunk.len();
    let tcp_bytes = |frames: &[Vec<u8>]| -> usize {
        let mut seen = std::collections::HashSet::new();
        frames
            .iter()
            .filter_map(|f| parse_from_guest(f))
            .filter_map(|s| match s {
                Seen::Tcp { seq, payload, .. } if seen.insert((seq, payload.len())) => Some(payload.len()),
                _ => None,
            })
            .sum()
    };
    let token_seen = |frames: &[Vec<u8>]| {
        frames
            .iter()
            .filter_map(|f| parse_from_guest(f))
            .any(|s| s == Seen::Udp { sport: TOKEN_PORT, payload: p_token.clone() })
    };
    let frames = capture.stop_when(IO_TIMEOUT, |f| tcp_bytes(f) >= expect_tcp && token_seen(f));
    let mut counts: HashMap<Seen, usize> = HashMap::new();
    for s in frames.iter().filter_map(|f| parse_from_guest(f)) {
        *counts.entry(s).or_default() += 1;
    }
    let icmp: Vec<_> = counts.iter().filter(|(k, _)| matches!(k, Seen::IcmpReply { .. })).collect();
    assert_eq!(icmp.len(), 5, "five echo replies: {icmp:?}");
    assert!(icmp.iter().all(|(_, &n)| n == 1), "each ICMP reply exactly once: {icmp:?}");
    for p in &udp_payloads {
        assert_eq!(counts.get(&Seen::Udp { sport: ECHO_PORT, payload: p.clone() }), Some(&1), "UDP echo {p:?} once");
    }
    assert_eq!(counts.get(&Seen::Udp { sport: TOKEN_PORT, payload: p_token.clone() }), Some(&1));
    let s_token = format!("{}\n", s_ready.token).into_bytes();
    assert!(!counts.contains_key(&Seen::Udp { sport: TOKEN_PORT, payload: s_token.clone() }), "the secondary's token");
    assert_eq!(tcp_bytes(&frames), expect_tcp, "the echoed stream crossed the tap");
    let tcp: Vec<_> = counts.iter().filter(|(k, n)| matches!(k, Seen::Tcp { .. }) && **n > 1).collect();
    assert!(tcp.is_empty(), "TCP segments released twice: {tcp:?}");
    let largest = frames.iter().filter(|f| f.len() >= 12 && f[6..12] == mac(GUEST_MAC)).map(Vec::len).max();
    assert!(largest.unwrap_or(0) <= 1514, "a frame of {largest:?} bytes: an offload in use");

    // 6. The backend's capture holds both answers with their verdicts.
    let stats = ctl.stats().expect("stats");
    assert_eq!(stats.miscompares.total(), 1, "only the token: {stats:?}");
    primary.qemu().assert_running();
    secondary.qemu().assert_running();
    net.backend().assert_running();
    drop(secondary);
    expect_event(&mut ctl, IO_TIMEOUT, "secondary disconnected", peer(Side::Secondary, PeerState::Disconnected));
    drop(primary);
    expect_event(&mut ctl, IO_TIMEOUT, "primary disconnected", peer(Side::Primary, PeerState::Disconnected));
    net.backend().signal(libc::SIGTERM);
    assert!(net.backend().wait_timeout(Duration::from_secs(10)).is_some_and(|st| st.success()), "clean exit");
    for sock in [&p_sock, &s_sock] {
        let relay = sock.with_file_name(format!(".{}.relay", sock.file_name().unwrap_or_default().to_string_lossy()));
        assert!(!sock.exists() && !relay.exists(), "{} and its relay directory removed at exit", sock.display());
    }
    let cap = std::fs::read(&capture_path).expect("the backend's capture file");
    let text = String::from_utf8_lossy(&cap);
    assert!(text.contains(&p_ready.token) && text.contains(&s_ready.token), "both answers captured");
    assert!(text.contains("primary released (miscompare: payload)"), "verdicts recorded");
    eprintln!("{test}: {:.1} s in all", t0.elapsed().as_secs_f64());
}

fn qemu_version() -> String {
    let out = std::process::Command::new(colo_tests::qemu::qemu_path()).arg("--version").output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

fn mac(s: &str) -> colo_proxy::wire::MacAddr {
    s.parse().expect("a MAC address")
}
