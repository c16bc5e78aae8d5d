//! Packet-capture test of `colo-proxy run`. Network namespaces stand in for the machines: a
//! client on the uplink, and two "VMs" with the same IP and MAC behind the primary and secondary
//! interfaces, each running real services (kernel ICMP, socat UDP and TCP echo). The client's
//! ping, UDP and TCP sessions work through the proxy (the rewriter maps the two kernels'
//! different TCP sequence numbers); tcpdump on the uplink shows every reply exactly once (a TCP
//! segment exactly as often as the primary's kernel sent it: it may retransmit while held); a
//! service that answers differently in the two namespaces makes the control socket report a
//! miscompare and the capture contain both versions.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use colo_proxy::control::{ControlClient, Event};
use colo_tests::netns::prerequisites;
use colo_tests::topology::{ProxyTopology, VM_IP};
use colo_tests::{pcapread, skip, TempDir};

/// Parsed view of a frame on the uplink, as far as this test cares.
#[derive(Debug, PartialEq, Eq, Hash, Clone)]
enum Seen {
    IcmpReply { id: u16, seq: u16 },
    Udp { sport: u16, payload: Vec<u8> },
    Tcp { sport: u16, seq: u32, payload: Vec<u8> },
}

fn parse(f: &[u8]) -> Option<Seen> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[26..30] != [10, 0, 0, 2] {
        return None; // only IPv4 from the VM
    }
    let ihl = usize::from(f[14] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let l4 = &f[14 + ihl..14 + total];
    match f[23] {
        1 if l4[0] == 0 => {
            Some(Seen::IcmpReply { id: u16::from_be_bytes([l4[4], l4[5]]), seq: u16::from_be_bytes([l4[6], l4[7]]) })
        }
        17 => Some(Seen::Udp { sport: u16::from_be_bytes([l4[0], l4[1]]), payload: l4[8..].to_vec() }),
        6 => {
            let hl = usize::from(l4[12] >> 4) * 4;
            let payload = l4[hl..].to_vec();
            (!payload.is_empty()).then(|| Seen::Tcp {
                sport: u16::from_be_bytes([l4[0], l4[1]]),
                seq: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
                payload,
            })
        }
        _ => None,
    }
}

/// How often each frame of interest appears in a tcpdump capture.
fn seen_in(pcap: &std::path::Path) -> HashMap<Seen, usize> {
    let mut counts = HashMap::new();
    for f in pcapread::frames(&std::fs::read(pcap).unwrap()) {
        if let Some(s) = parse(&f) {
            *counts.entry(s).or_default() += 1;
        }
    }
    counts
}

#[test]
fn proxy_run_in_namespaces_mirrors_compares_and_releases_once() {
    if let Err(why) = prerequisites(&["ip", "socat", "tcpdump", "ethtool", "ping"]) {
        return skip("proxy_run_in_namespaces_mirrors_compares_and_releases_once", &why);
    }
    let dir = TempDir::new("run");
    let mut topo = ProxyTopology::start(&dir.path(""), &[]);
    let mut control = ControlClient::connect(&topo.control).unwrap();
    topo.proxy().assert_running();

    // 1. Kernel ICMP.
    let (ok, out) = topo.client.try_exec(&["ping", "-c", "5", "-i", "0.2", "-W", "2", VM_IP]);
    assert!(ok, "ping through the proxy failed:\n{out}");

    // 2. UDP echo.
    let udp_payloads: Vec<Vec<u8>> = (0..5).map(|i| format!("udp-echo-{i}").into_bytes()).collect();
    let sent = udp_payloads.clone();
    topo.client.enter(move || {
        let s = UdpSocket::bind("10.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        for p in &sent {
            s.send_to(p, "10.0.0.2:7").unwrap();
            let mut buf = [0u8; 100];
            let (n, from) = s.recv_from(&mut buf).expect("UDP echo reply");
            assert_eq!(&buf[..n], &p[..]);
            assert_eq!(from.to_string(), "10.0.0.2:7");
        }
    });

    // 3. A TCP echo session: the two kernels choose different ISNs.
    let lines: Vec<String> = (0..20).map(|i| format!("line {i} of the tcp echo session")).collect();
    let to_send = lines.clone();
    let echoed = topo.client.enter(move || -> Result<(), String> {
        let s = TcpStream::connect_timeout(&"10.0.0.2:7".parse().unwrap(), Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        for (i, l) in to_send.iter().enumerate() {
            writeln!(w, "{l}").unwrap();
            let mut got = String::new();
            r.read_line(&mut got).map_err(|e| format!("no echo of line {i}: {e}"))?;
            assert_eq!(got.trim_end(), l);
        }
        Ok(())
    });
    if let Err(why) = echoed {
        // What the proxy held and why, for a failure that happened once in many runs.
        panic!("TCP echo through the proxy: {why}\nproxy stats: {:?}", control.stats());
    }
    let stats = control.stats().unwrap();
    assert_eq!(stats.miscompares.total(), 0, "deterministic services must not miscompare: {stats:?}");
    assert!(stats.released > 0 && stats.frames_secondary > 0);

    // 4. A service that answers differently: held, reported, released by a checkpoint.
    let query = topo.client.enter(|| {
        let s = UdpSocket::bind("10.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        s.send_to(b"who are you?", "10.0.0.2:9").unwrap();
        let mut buf = [0u8; 100];
        assert!(s.recv_from(&mut buf).is_err(), "a divergent reply must be held");
        s
    });
    let event = control.next_event(Some(Duration::from_secs(5))).unwrap();
    match event.clone() {
        Some(Event::Miscompare { reason, proto, flow, .. }) => {
            assert_eq!(proto, "udp", "{event:?}");
            assert_eq!(reason, colo_proxy::Reason::Size, "'primary' and 'secondary' differ in length: {event:?}");
            assert_eq!(flow.split('>').next().unwrap(), "10.0.0.2:9");
        }
        other => panic!("expected a miscompare event, got {other:?}"),
    }
    let flushed = control.checkpoint().unwrap();
    assert_eq!((flushed.released, flushed.dropped), (1, 1));
    query.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 100];
    let (n, _) = query.recv_from(&mut buf).expect("the primary's reply after the checkpoint");
    assert_eq!(&buf[..n], b"primary\n");

    // 5. What crossed the uplink: every reply exactly once.
    std::thread::sleep(Duration::from_millis(300));
    topo.stop_tcpdump();
    let counts = seen_in(&topo.uplink_pcap);
    let sent_by_primary = seen_in(&topo.primary_pcap);
    let icmp: Vec<_> = counts.iter().filter(|(k, _)| matches!(k, Seen::IcmpReply { .. })).collect();
    assert_eq!(icmp.len(), 5, "five echo replies: {icmp:?}");
    assert!(icmp.iter().all(|(_, &n)| n == 1), "each ICMP reply exactly once: {icmp:?}");
    for p in &udp_payloads {
        assert_eq!(counts.get(&Seen::Udp { sport: 7, payload: p.clone() }), Some(&1), "UDP echo {p:?} once");
    }
    assert_eq!(counts.get(&Seen::Udp { sport: 9, payload: b"primary\n".to_vec() }), Some(&1));
    assert!(!counts.contains_key(&Seen::Udp { sport: 9, payload: b"secondary\n".to_vec() }));
    let tcp: Vec<_> = counts.iter().filter(|(k, _)| matches!(k, Seen::Tcp { .. })).collect();
    let tcp_bytes: usize =
        tcp.iter().map(|(k, _)| if let Seen::Tcp { payload, .. } = k { payload.len() } else { 0 }).sum();
    let expect_bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    assert_eq!(tcp_bytes, expect_bytes, "the echoed stream crossed the uplink");
    // The primary's kernel may retransmit a segment the proxy held past its RTO (a slow
    // secondary); the spec releases such a retransmission. So each segment must cross the
    // uplink exactly as often as the primary sent it — never more, never less.
    for (segment, &n) in &tcp {
        let sent = sent_by_primary.get(segment).copied().unwrap_or(0);
        assert_eq!(n, sent, "{segment:?}: released {n} times, sent {sent} times by the primary");
    }

    // 6. The proxy's capture has both versions of the divergent reply.
    drop(control);
    assert!(topo.stop_proxy(), "clean exit on SIGTERM");
    let cap = std::fs::read(&topo.capture).unwrap();
    let text = String::from_utf8_lossy(&cap);
    assert!(text.contains("primary\n") && text.contains("secondary\n"), "both replies captured");
    assert!(text.contains("primary released (miscompare: size)"));
    assert!(text.contains("secondary dropped (flushed at checkpoint) (miscompare: size)"));
    if colo_tests::have("tshark") {
        let out = Command::new("tshark")
            .args(["-r", topo.capture.to_str().unwrap(), "-T", "fields", "-e", "frame.comment"])
            .output()
            .unwrap();
        let comments = String::from_utf8_lossy(&out.stdout);
        assert_eq!(comments.lines().filter(|l| !l.is_empty()).count(), 2, "tshark reads the capture: {comments}");
    }
}
