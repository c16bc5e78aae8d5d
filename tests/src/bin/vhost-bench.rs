//! vhost-net-compare with real frontends: the same traffic through a passthrough backend (one
//! QEMU guest) and through the COLO compare path (two QEMU guests, same image, MAC and IP), as a
//! markdown table with the COLO/passthrough ratio.
//!
//! The guests are the Linux test guest of `colo_tests::linux_guest` under QEMU 7.2 **TCG**
//! (software emulation): the guest CPU bounds every figure here, so absolute numbers say little
//! about the backend; the ratio says what the compare path costs the guest. In COLO mode two
//! TCG guests share the machine's cores with the backend and the client.
//!
//! Workloads, from the client namespace on the tap's side:
//! - UDP echo round trip: 64-byte datagrams to the guest's echo port, one at a time;
//! - UDP echo frames/s: 64-byte datagrams with sequence numbers, a window of them in flight,
//!   for a fixed time: echoes received per second, and the backend's count of guest frames;
//! - UDP echo throughput: the same with 1472-byte datagrams (full 1514-byte frames both ways),
//!   in MB/s of echoed payload;
//! - TCP: busybox httpd's `/blob.bin` (16 MiB) over one connection, guest to client.
//!
//! In COLO mode this program is also the controller: it answers every `miscompare` event with a
//! `checkpoint`, and counts them. Nothing is copied between the guests (there is no VMM here),
//! so every workload is one whose output is the same on both guests; see [`download`] for the
//! one exception and how it is handled. A TCP echo stream is not measured: the guests'
//! segments acknowledge the client's data at different moments, which the compare engine's ACK
//! rule (as QEMU's) turns into checkpoints, and without a VMM to make them real the connection
//! stalls.
//!
//! Run as root: `scripts/bench-vhost.sh` (release build), or
//! `cargo build --release -p vhost-net-compare -p colo-tests && target/release/vhost-bench`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use colo_proxy::control::{ControlClient, Event};
use colo_tests::linux_guest::{LinuxGuest, ECHO_PORT, HTTP_PORT};
use colo_tests::process_cpu;
use colo_tests::qemu_vhost::{self, client_udp, guest, VhostNet, GUEST_IP};

/// vhost-net-compare passthrough vs COLO compare path, with QEMU guests.
#[derive(Parser, Debug)]
struct Args {
    /// Rounds, each running every measurement on each path in turn (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Length of each UDP echo run, seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Datagrams in flight in the UDP echo runs.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// UDP round trips per latency run.
    #[arg(long, default_value_t = 1000)]
    round_trips: usize,
    /// Size of `/blob.bin` for the TCP download, MiB.
    #[arg(long, default_value_t = 16)]
    blob_mib: usize,
    /// Extra option for the COLO backend, e.g. `--colo-arg=--capture=/tmp/m.pcapng` (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    colo_arg: Vec<String>,
    /// Measure only this path: `passthrough` or `colo` (default: both, and their ratio).
    #[arg(long, value_parser = ["passthrough", "colo"])]
    only: Option<String>,
    /// Write the report here as well as to stdout.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

/// Medians of one path's runs.
#[derive(Debug, Default, Clone, Copy)]
struct Results {
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    echo_per_s: f64,
    guest_frames_per_s: f64,
    bulk_mb_s: f64,
    lost_pct: f64,
    tcp_mb_s: f64,
    /// Backend CPU µs per guest TX frame in the 64-byte flood.
    backend_cpu_us: f64,
    stalled: u64,
    checkpoints: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The controller of a COLO run: a checkpoint for every miscompare.
struct Controller {
    stop: Arc<AtomicBool>,
    checkpoints: Arc<AtomicU64>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Controller {
    fn start(mut ctl: ControlClient) -> Controller {
        let stop = Arc::new(AtomicBool::new(false));
        let checkpoints = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), checkpoints.clone());
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            while !flag.load(Ordering::Relaxed) {
                if let Some(Event::Miscompare { .. }) = ctl.next_event(Some(Duration::from_millis(100)))? {
                    ctl.checkpoint()?;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        });
        Controller { stop, checkpoints, thread: Some(thread) }
    }

    fn finish(mut self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| anyhow::anyhow!("controller thread panicked"))??;
        }
        Ok(self.checkpoints.load(Ordering::Relaxed))
    }
}

/// UDP echo round trips, one at a time: (p50, p99) in microseconds.
fn udp_rtt(net: &VhostNet, n: usize) -> anyhow::Result<(f64, f64)> {
    net.in_client(move || {
        let s = client_udp(Duration::from_secs(2));
        let mut buf = [0u8; 256];
        let mut rtts = Vec::with_capacity(n);
        for i in 0..n {
            let msg = format!("rtt {i:010}");
            let t = Instant::now();
            s.send_to(msg.as_bytes(), guest(ECHO_PORT))?;
            loop {
                let (len, _) = s.recv_from(&mut buf).context("no echo within 2 s")?;
                if &buf[..len] == msg.as_bytes() {
                    break;
                }
            }
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
        rtts.sort_by(f64::total_cmp);
        Ok((percentile(&rtts, 0.5), percentile(&rtts, 0.99)))
    })
}

/// What a windowed UDP echo run measured.
struct Flood {
    echoes_per_s: f64,
    lost_pct: f64,
    secs: f64,
}

/// Windowed UDP echo of `size`-byte datagrams for `secs`. Datagrams carry a sequence number;
/// when nothing comes back for 200 ms the window is taken as lost and refilled.
fn udp_flood(net: &VhostNet, secs: f64, window: usize, size: usize) -> anyhow::Result<Flood> {
    net.in_client(move || {
        let s = client_udp(Duration::from_millis(200));
        let mut buf = vec![0u8; 2048];
        let mut payload = vec![0u8; size.max(8)];
        let (mut sent, mut received, mut in_flight) = (0u64, 0u64, 0usize);
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(secs);
        while Instant::now() < end {
            while in_flight < window {
                payload[..8].copy_from_slice(&sent.to_be_bytes());
                s.send_to(&payload, guest(ECHO_PORT))?;
                sent += 1;
                in_flight += 1;
            }
            match s.recv_from(&mut buf) {
                Ok((n, _)) if n == payload.len() => {
                    received += 1;
                    in_flight -= 1;
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    in_flight = 0; // the rest of the window is lost
                }
                Err(e) => return Err(e.into()),
            }
        }
        let secs = start.elapsed().as_secs_f64();
        // Late echoes of the last window were delivered, not lost.
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            if n == payload.len() {
                received += 1;
            }
        }
        let lost_pct = sent.saturating_sub(received) as f64 / sent.max(1) as f64 * 100.0;
        Ok(Flood { echoes_per_s: received as f64 / secs, lost_pct, secs })
    })
}

/// GET /blob.bin over one connection: MB/s from the request to the last byte, or `None` when
/// the connection stalled (no byte for 3 s; see [`download`]).
fn tcp_download_once(net: &VhostNet, len: usize) -> anyhow::Result<Option<f64>> {
    net.in_client(move || {
        let mut s = std::net::TcpStream::connect_timeout(&guest(HTTP_PORT), Duration::from_secs(10))
            .with_context(|| format!("connecting to {GUEST_IP}:{HTTP_PORT}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let t = Instant::now();
        write!(s, "GET /blob.bin HTTP/1.0\r\nHost: {GUEST_IP}\r\n\r\n")?;
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let secs = t.elapsed().as_secs_f64();
        if got < len {
            bail!("short download: {got} of {len} bytes");
        }
        Ok(Some(len as f64 / secs / 1e6))
    })
}

/// A TCP download in COLO mode has one source of difference: busybox httpd's `Date:` header,
/// when a second boundary falls between the two guests' clocks. The guests' clocks are made
/// as close as this harness can make them ([`boot`]), but the difference still happens now and
/// then; the checkpoint this driver then asks for copies nothing into the secondary, and the
/// TCP rewriter, which trusts a checkpoint to make the secondary a copy of the primary, can no
/// longer map that connection, so it stalls. Such a run is repeated with a new connection (at
/// most five times in a row). Returns (MB/s, stalled attempts).
fn download(net: &VhostNet, len: usize) -> anyhow::Result<(f64, u64)> {
    let mut stalled = 0;
    loop {
        match tcp_download_once(net, len)? {
            Some(rate) => return Ok((rate, stalled)),
            None if stalled < 5 => {
                stalled += 1;
                eprintln!("  the download stalled after a difference (normally the Date: headers); again");
                // The dead connection's held frames time out (3 s) and are flushed meanwhile.
                std::thread::sleep(Duration::from_secs(4));
            }
            None => bail!("downloads stalled {stalled} times in a row"),
        }
    }
}

/// Starts the guests of one path, stopped (`-S`), then lets them run at the same moment through
/// their monitors. With `-rtc clock=vm` and a fixed base their clocks then differ only by how
/// differently they boot, so the `Date:` headers of [`download`] agree most of the time.
fn boot(net: &VhostNet, args: &Args) -> anyhow::Result<Vec<LinuxGuest>> {
    let sockets: Vec<_> = [Some(net.primary.clone()), net.secondary.clone()].into_iter().flatten().collect();
    let mut guests = Vec::new();
    let mut monitors = Vec::new();
    for (i, sock) in sockets.iter().enumerate() {
        let name = if i == 0 { "bench-pri" } else { "bench-sec" };
        let mut o = net.guest_opts(name, sock);
        o.blob_bytes = args.blob_mib << 20;
        let monitor = net.path(&format!("{name}-monitor.sock"));
        o.qemu_args.extend(
            ["-S", "-rtc", "base=2024-01-01T00:00:00,clock=vm", "-monitor"]
                .iter()
                .map(|s| s.to_string())
                .chain([format!("unix:{},server=on,wait=off", monitor.display())]),
        );
        guests.push(LinuxGuest::start(&o)?);
        monitors.push(monitor);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut conns = Vec::new();
    for m in &monitors {
        conns.push(loop {
            match UnixStream::connect(m) {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => bail!("QEMU monitor {}: {e}", m.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        });
    }
    for c in &mut conns {
        c.write_all(b"cont\n")?;
    }
    for g in &mut guests {
        g.wait_ready(Duration::from_secs(180))?;
    }
    Ok(guests)
}

/// One path, booted, and what its rounds measured so far.
struct PathRun {
    colo: bool,
    // Dropped in this order: the controller, the guests, then the backend.
    controller: Option<Controller>,
    guests: Vec<LinuxGuest>,
    stats_ctl: ControlClient,
    net: VhostNet,
    rtt50: Vec<f64>,
    rtt99: Vec<f64>,
    echo: Vec<f64>,
    frames: Vec<f64>,
    bulk: Vec<f64>,
    lost: Vec<f64>,
    tcp: Vec<f64>,
    /// Backend CPU µs per guest TX frame in the 64-byte floods.
    cpu: Vec<f64>,
    stalled: u64,
}

impl PathRun {
    /// Boots the guests of one path and warms it up.
    fn start(args: &Args, colo: bool) -> anyhow::Result<PathRun> {
        let extra: Vec<&str> = if colo { args.colo_arg.iter().map(String::as_str).collect() } else { vec![] };
        let net = VhostNet::start(colo, &extra);
        let stats_ctl = net.control();
        let guests = boot(&net, args)?;
        let controller = colo.then(|| Controller::start(net.control()));
        // The client's ARP, and a warm-up.
        let (ok, out) = net.client.try_exec(&["ping", "-c", "3", "-i", "0.2", "-W", "5", GUEST_IP]);
        if !ok {
            bail!("ping {GUEST_IP}: {out}");
        }
        udp_rtt(&net, 50)?;
        Ok(PathRun {
            colo,
            net,
            stats_ctl,
            guests,
            controller,
            rtt50: vec![],
            rtt99: vec![],
            echo: vec![],
            frames: vec![],
            bulk: vec![],
            lost: vec![],
            tcp: vec![],
            cpu: vec![],
            stalled: 0,
        })
    }

    /// Runs every workload once.
    fn round(&mut self, args: &Args) -> anyhow::Result<()> {
        let net = &self.net;
        let (p50, p99) = udp_rtt(net, args.round_trips)?;
        self.rtt50.push(p50);
        self.rtt99.push(p99);
        let before = self.stats_ctl.stats()?.frames_primary;
        let cpu_before = process_cpu(net.backend_pid());
        let small = udp_flood(net, args.seconds, args.window, 64)?;
        let cpu = process_cpu(net.backend_pid()).saturating_sub(cpu_before);
        let after = self.stats_ctl.stats()?.frames_primary;
        self.echo.push(small.echoes_per_s);
        let frames = after.saturating_sub(before);
        self.frames.push(frames as f64 / small.secs);
        self.cpu.push(cpu.as_secs_f64() * 1e6 / frames.max(1) as f64);
        let large = udp_flood(net, args.seconds, args.window, 1472)?;
        self.bulk.push(large.echoes_per_s * 1472.0 / 1e6);
        self.lost.push(small.lost_pct.max(large.lost_pct));
        let (rate, stalls) = download(net, args.blob_mib << 20)?;
        self.tcp.push(rate);
        self.stalled += stalls;
        eprintln!(
            "    {}: echoes/s {:.0}, guest TX frames/s {:.0}, backend {:.1} CPU µs/frame, RTT p50 {p50:.0} µs, \
             {:.1} MB/s UDP, {rate:.1} MB/s TCP",
            if self.colo { "COLO" } else { "passthrough" },
            small.echoes_per_s,
            self.frames.last().copied().unwrap_or(0.0),
            self.cpu.last().copied().unwrap_or(0.0),
            large.echoes_per_s * 1472.0 / 1e6
        );
        Ok(())
    }

    /// Stops the path; the medians of its rounds.
    fn finish(mut self) -> anyhow::Result<Results> {
        let checkpoints = match self.controller.take() {
            Some(c) => c.finish()?,
            None => 0,
        };
        let stats = self.stats_ctl.stats()?;
        eprintln!("  {} backend: {stats:?}", if self.colo { "COLO" } else { "passthrough" });
        drop(self.guests);
        Ok(Results {
            rtt_p50_us: median(self.rtt50),
            rtt_p99_us: median(self.rtt99),
            echo_per_s: median(self.echo),
            guest_frames_per_s: median(self.frames),
            bulk_mb_s: median(self.bulk),
            lost_pct: median(self.lost),
            tcp_mb_s: median(self.tcp),
            backend_cpu_us: median(self.cpu),
            stalled: self.stalled,
            checkpoints,
        })
    }
}

fn qemu_version() -> String {
    let q = colo_tests::qemu::qemu_path();
    Command::new(&q)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
        .unwrap_or_else(|| format!("{} (version unknown)", q.display()))
}

fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into())
}

fn report(args: &Args, pass: &Results, colo: &Results) -> anyhow::Result<String> {
    let mut r = String::new();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    writeln!(r, "### vhost-net-compare with QEMU guests: passthrough vs COLO compare path\n")?;
    writeln!(r, "- QEMU: {} — TCG: the guests are emulated, and their CPU bounds every figure", qemu_version())?;
    writeln!(
        r,
        "- Machine: {cpus} CPUs, {}; the COLO path runs two guests, the backend and the client on them",
        cpu_model()
    )?;
    writeln!(
        r,
        "- Guests: Debian 12 kernel and busybox, `-smp 1`, virtio-net-pci on vhost-user (INTx), no offloads; \
         median of {} rounds, each measuring both paths in turn (both booted throughout)",
        args.repeat
    )?;
    writeln!(
        r,
        "- UDP: echo RTT of {} 64-byte round trips one at a time; echoes/s with 64-byte datagrams, {} in flight, \
         {} s (guest TX frames/s: the backend's count of the primary's frames; backend CPU: the backend \
         process's CPU time during that flood per such frame, all its threads); echo MB/s the same with 1472-byte datagrams (full frames \
         both ways); TCP: GET of {} MiB from busybox httpd, guest to client",
        args.round_trips, args.window, args.seconds, args.blob_mib
    )?;
    writeln!(
        r,
        "- COLO: the driver checkpoints on every miscompare; stalled: downloads repeated because the two guests' \
         HTTP `Date:` headers differed (see `download` in tests/src/bin/vhost-bench.rs)\n"
    )?;
    writeln!(
        r,
        "| path | UDP echo RTT p50 / p99 (µs) | UDP echoes/s (64 B) | guest TX frames/s | backend CPU µs/frame \
         | UDP echo MB/s (1472 B) | lost | TCP download MB/s | checkpoints | stalled |"
    )?;
    writeln!(r, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for (name, x) in [("passthrough (1 guest)", pass), ("COLO compare (2 guests)", colo)] {
        writeln!(
            r,
            "| {name} | {:.0} / {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.2} % | {:.1} | {} | {} |",
            x.rtt_p50_us,
            x.rtt_p99_us,
            x.echo_per_s,
            x.guest_frames_per_s,
            x.backend_cpu_us,
            x.bulk_mb_s,
            x.lost_pct,
            x.tcp_mb_s,
            x.checkpoints,
            x.stalled
        )?;
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}", a / b) } else { "–".into() };
    writeln!(
        r,
        "| **COLO / passthrough** | {} / {} | **{}** | {} | {} | **{}** | | **{}** | | |",
        ratio(colo.rtt_p50_us, pass.rtt_p50_us),
        ratio(colo.rtt_p99_us, pass.rtt_p99_us),
        ratio(colo.echo_per_s, pass.echo_per_s),
        ratio(colo.guest_frames_per_s, pass.guest_frames_per_s),
        ratio(colo.backend_cpu_us, pass.backend_cpu_us),
        ratio(colo.bulk_mb_s, pass.bulk_mb_s),
        ratio(colo.tcp_mb_s, pass.tcp_mb_s)
    )?;
    Ok(r)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    qemu_vhost::prerequisites().map_err(|w| anyhow::anyhow!("vhost-bench: {w}"))?;
    if args.repeat == 0 || args.window == 0 || args.seconds <= 0.0 || args.round_trips == 0 {
        bail!("--repeat, --window, --seconds and --round-trips must be positive");
    }
    // Both paths are booted first, then every round measures one after the other: on a shared
    // machine both see the same conditions, and the ratio compares like with like. (The path
    // not being measured has idle guests.)
    let mut paths = Vec::new();
    for colo in [false, true] {
        if args.only.as_deref() == Some(if colo { "passthrough" } else { "colo" }) {
            continue;
        }
        eprintln!("{} booting…", if colo { "COLO compare (two guests)" } else { "passthrough (one guest)" });
        paths.push(PathRun::start(&args, colo)?);
    }
    for round in 0..args.repeat {
        eprintln!("  round {}/{}", round + 1, args.repeat);
        for p in &mut paths {
            p.round(&args)?;
        }
    }
    let (mut pass, mut colo) = (Results::default(), Results::default());
    for p in paths {
        if p.colo {
            colo = p.finish()?;
        } else {
            pass = p.finish()?;
        }
    }
    let r = report(&args, &pass, &colo)?;
    print!("{r}");
    std::io::stdout().flush()?;
    if let Some(p) = &args.out {
        std::fs::write(p, &r).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
