//! A real Linux guest (Debian 12's cloud kernel, busybox initramfs) under QEMU TCG on a tap, as
//! the end-to-end tests of vhost-net-compare and COLO use it: the tap lives in a namespace the
//! test made (QEMU runs inside it), the host side of the tap is the client. The client pings the
//! guest, gets UDP and TCP echo, fetches a page and a 64 KiB file from busybox httpd, and reads
//! the per-boot token over UDP and TCP; tcpdump on the tap shows no frame larger than the MTU
//! (the device offers no segmentation offloads). Prints the boot time to the READY marker.

use std::time::{Duration, Instant};

use colo_tests::linux_guest::{
    blob, feature, linux_guest_available, GuestOpts, LinuxGuest, ECHO_PORT, INDEX_HTML, TOKEN_PORT,
};
use colo_tests::netns::{prerequisites, Netns};
use colo_tests::qemu_vhost::{
    http_get, tcp_connect, tcp_exchange, udp_request, CLIENT_IP as HOST_IP, GUEST_IP, GUEST_MAC,
};
use colo_tests::{pcapread, skip, TempDir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn linux_guest_on_a_tap_answers_ping_echo_http_and_token() {
    let test = "linux_guest_on_a_tap_answers_ping_echo_http_and_token";
    if let Err(why) = linux_guest_available().and_then(|()| prerequisites(&["ip", "ping", "tcpdump"])) {
        skip(test, &why);
        return;
    }
    let dir = TempDir::new("lgboot");
    // The namespace first: dropped last, after QEMU and tcpdump (which run inside it).
    let ns = Netns::new("lg");
    ns.exec(&["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ns.exec(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", "tap0"]);
    ns.exec(&["ip", "link", "set", "tap0", "up"]);

    let mut opts = GuestOpts::tap("boot", "tap0", &format!("{GUEST_IP}/24"));
    opts.mac = GUEST_MAC.into();
    opts.netns = Some(ns.name().to_string());
    let mut guest = LinuxGuest::start(&opts).expect("start the guest");
    let ready = guest.wait_ready(BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "{test}: guest ready {:.2} s after QEMU started; token {}; virtio-net features {:#x}",
        ready.boot.as_secs_f64(),
        ready.token,
        ready.features.unwrap_or(0)
    );
    let features = ready.features.expect("the guest reports virtio-net features");
    for (bit, name) in [(feature::VERSION_1, "VERSION_1"), (feature::MAC, "MAC")] {
        assert!(features & (1 << bit) != 0, "{name} not negotiated: {features:#x}");
    }
    for (bit, name) in [(feature::CSUM, "CSUM"), (feature::HOST_TSO4, "HOST_TSO4"), (feature::GUEST_CSUM, "GUEST_CSUM")]
    {
        assert!(features & (1 << bit) == 0, "offload {name} negotiated although turned off: {features:#x}");
    }
    assert!(!ready.token.is_empty(), "the guest printed no token");

    let pcap = dir.path("tap0.pcap");
    let pcap_arg = pcap.to_str().expect("utf-8 path").to_string();
    let mut tcpdump = ns.spawn(
        "tcpdump",
        "tcpdump",
        &["-i", "tap0", "-n", "-U", "--immediate-mode", "-B", "8192", "-s", "0", "-w", &pcap_arg],
    );
    let t0 = Instant::now();
    while std::fs::metadata(&pcap).map(|m| m.len()).unwrap_or(0) == 0 {
        tcpdump.assert_running();
        assert!(t0.elapsed() < Duration::from_secs(10), "tcpdump did not start: {}", tcpdump.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }

    let t = Instant::now();
    let (ok, out) = ns.try_exec(&["ping", "-c", "3", "-i", "0.2", "-W", "5", GUEST_IP]);
    assert!(ok, "ping {GUEST_IP}: {out}");
    eprintln!("{test}: ping: {}", out.lines().last().unwrap_or_default());

    let token = ready.token.clone();
    let blob_len = opts.blob_bytes;
    let stream_len = 100_000;
    ns.enter(move || {
        // UDP echo: a small datagram and one that fills a 1500-byte frame.
        assert_eq!(udp_request(ECHO_PORT, b"hello udp", 10).expect("a UDP answer"), b"hello udp");
        let big: Vec<u8> = (0..1472u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(udp_request(ECHO_PORT, &big, 10).expect("a UDP answer"), big);

        // TCP echo, twice on one connection, then 100 KB in one go.
        let mut s = tcp_connect(ECHO_PORT, IO_TIMEOUT);
        assert_eq!(tcp_exchange(&mut s, b"hello tcp\n", 10), b"hello tcp\n");
        assert_eq!(tcp_exchange(&mut s, b"again\n", 6), b"again\n");
        let stream = blob(stream_len);
        assert_eq!(tcp_exchange(&mut s, &stream, stream.len()), stream);
        drop(s);

        // busybox httpd.
        let (status, body) = http_get("/", IO_TIMEOUT);
        assert!(status.contains(" 200 "), "GET /: {status}");
        assert_eq!(String::from_utf8_lossy(&body), INDEX_HTML);
        let (status, body) = http_get("/blob.bin", IO_TIMEOUT);
        assert!(status.contains(" 200 "), "GET /blob.bin: {status}");
        assert_eq!(body.len(), blob_len, "length of /blob.bin");
        assert!(body == blob(blob_len), "content of /blob.bin differs");

        // The token, by UDP and by TCP (answered per read).
        let line = format!("{token}\n").into_bytes();
        assert_eq!(udp_request(TOKEN_PORT, b"token?", 10).expect("a UDP answer"), line);
        let mut s = tcp_connect(TOKEN_PORT, IO_TIMEOUT);
        assert_eq!(tcp_exchange(&mut s, b"token?\n", line.len()), line);
    });
    eprintln!("{test}: ping, echo, http and token took {:.2} s", t.elapsed().as_secs_f64());

    // Every frame the guest sent must reach the capture file before tcpdump is stopped (SIGINT
    // discards what is still in its kernel buffer): wait until the guest's bytes are all there.
    let want = blob_len + stream_len;
    let guest_frames = || -> Vec<Vec<u8>> {
        let bytes = std::fs::read(&pcap).unwrap_or_default();
        if bytes.len() < 24 {
            return vec![];
        }
        pcapread::frames(&bytes).into_iter().filter(|f| f.len() >= 12 && f[6..12] == mac_bytes(GUEST_MAC)).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut from_guest = guest_frames();
    while from_guest.iter().map(Vec::len).sum::<usize>() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        from_guest = guest_frames();
    }
    tcpdump.signal(libc::SIGINT);
    assert!(tcpdump.wait_timeout(Duration::from_secs(5)).is_some(), "tcpdump did not stop");
    let bytes: usize = from_guest.iter().map(Vec::len).sum();
    assert!(bytes >= want, "the capture misses the guest's output: {bytes} < {want} bytes; {}", tcpdump.stderr());
    let largest = from_guest.iter().map(Vec::len).max().unwrap_or(0);
    assert!(largest <= 1514, "a frame of {largest} bytes from the guest: segmentation offload in use");
    eprintln!("{test}: {} frames ({bytes} bytes) from the guest, largest {largest} bytes", from_guest.len());

    guest.qemu().assert_running();
}

fn mac_bytes(mac: &str) -> [u8; 6] {
    let v: Vec<u8> = mac.split(':').map(|h| u8::from_str_radix(h, 16).expect("hex")).collect();
    v.try_into().expect("6 bytes")
}
