//! Side-by-side benchmark of QEMU 7.2's colo-compare and `colo-proxy compare`: one driver, the
//! same UDP frame streams over the same four Unix sockets, both implementations in one run.
//!
//! For every frame size and flow count, each implementation is started fresh for every run
//! (`--repeat` rounds, each running every implementation in turn, so that all of them see the
//! same conditions on a shared machine; each round is one of each of):
//! - **loaded**: `--pairs` matching primary/secondary pairs are sent as fast as the
//!   implementation takes them (P batch, S batch, ...), with at most `--window` pairs in flight
//!   so that queues stay far below max_queue_size (QEMU drops frames silently beyond it) and
//!   nothing can deadlock; released frames per second = frames received on outdev / time from
//!   the first send to the last receive;
//! - **paced**: `--paced-pairs` pairs, one pair every 1/`--paced-rate` s, where queueing does not
//!   dominate the hold time.
//!
//! The hold time of a primary frame is the time from writing it to primary-in to reading it
//! from outdev. Frames are identified by a sequence number in the primary's IP ID and TOS, which
//! every UDP comparison ignores (its upper bits are recovered from the send counter). All frames
//! of a flow have the same payload, so QEMU's newest-first matching cannot turn reordering into
//! mismatches. The driver also acts as the
//! COLO controller on notify_dev: every `DO_CHECKPOINT` is answered with `COLO_CHECKPOINT`
//! (which releases anything held) and counted.
//!
//! Besides frames/s, each loaded run records the CPU time the implementation's process used
//! (all its threads, from /proc): on a machine shared with other work, CPU per frame is steadier
//! than frames/s. `--baseline` adds an earlier colo-proxy build as a third implementation, for
//! before/after figures from one run.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use colo_proxy::builder::{udp4, VM_MAC};
use colo_proxy::notify_dev::{CHECKPOINT, DO_CHECKPOINT};
use colo_tests::process_cpu;
use colo_tests::qemu::{check_qemu, colo_proxy_path, qemu_path, Compare, CompareConfig, Running};
use colo_tests::qframe::QPeer;

/// Ethernet + IPv4 + UDP headers of the built frames.
const HEADERS: usize = 14 + 20 + 8;

/// Bits of the sequence number carried in the primary's IP header: IP ID (16) and TOS (8), both
/// ignored by the UDP comparison. 16 bits alone are not enough: QEMU matches the newest held
/// frame first, so on a busy flow an old frame can stay held while 65536 newer ones pass.
const SEQ_BITS: u32 = 24;

/// Pairs written per syscall pair in the loaded run.
const BATCH: u64 = 32;

/// A run is abandoned when no frame comes out for this long although some are outstanding (a
/// held frame gets a timeout checkpoint after 3-4 s, so this is not a normal wait).
const STALL: Duration = Duration::from_secs(15);

#[derive(Parser, Debug)]
#[command(about = "Benchmark QEMU's colo-compare and colo-proxy compare side by side (UDP over Unix sockets)")]
struct Args {
    /// Matched pairs sent in each loaded (throughput) run.
    #[arg(long, default_value_t = 200_000)]
    pairs: u64,
    /// Ethernet frame sizes in bytes (without FCS), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64,1400")]
    sizes: Vec<usize>,
    /// Numbers of UDP flows the pairs are spread over (round robin), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    flows: Vec<u16>,
    /// Pairs per second in the paced (hold time) run.
    #[arg(long, default_value_t = 20_000)]
    paced_rate: u64,
    /// Pairs sent in each paced run.
    #[arg(long, default_value_t = 40_000)]
    paced_pairs: u64,
    /// Most pairs in flight (sent, primary not yet received on outdev). Default: 1000 per flow,
    /// at most 4000 — enough to keep both implementations busy (a smaller window measures
    /// round-trip latency, not capacity) while every flow's queue stays below QEMU's
    /// max_queue_size (1024), beyond which QEMU drops frames.
    #[arg(long)]
    window: Option<u64>,
    /// QEMU binary (default: $COLO_QEMU or /opt/colo-qemu/bin/qemu-system-x86_64).
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Our colo-proxy binary (default: $COLO_PROXY or next to this executable).
    #[arg(long)]
    ours: Option<PathBuf>,
    /// Run only one implementation.
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// An earlier colo-proxy build, run beside the others as "colo-proxy compare (baseline)"
    /// (before/after comparisons in one run).
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Rounds per stream, each running every implementation once of each kind; the table shows
    /// the median run (by frames/s for loaded runs, by p99 hold for paced ones) and counts over
    /// all runs.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Also write the markdown table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Only {
    Ours,
    Qemu,
}

/// What one run measured.
#[derive(Debug)]
struct RunResult {
    /// Pairs sent.
    sent: u64,
    /// Distinct primary frames received on outdev.
    received: u64,
    /// From the first send to the last receive.
    elapsed: Duration,
    /// Hold time of every received frame, sorted (ns).
    holds: Vec<u64>,
    /// `DO_CHECKPOINT`s answered.
    checkpoints: u64,
    /// Frames on outdev that were no primary frame in flight, or a second copy of one.
    unexpected: u64,
    /// CPU time of the implementation's process from its start-up (sockets connected) to the
    /// end of the run.
    cpu: Duration,
}

impl RunResult {
    fn frames_per_sec(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile of the hold time in µs.
    fn hold_us(&self, q: f64) -> f64 {
        if self.holds.is_empty() {
            return f64::NAN;
        }
        let i = ((self.holds.len() as f64 * q) as usize).min(self.holds.len() - 1);
        self.holds[i] as f64 / 1000.0
    }

    fn lost(&self) -> u64 {
        self.sent - self.received
    }

    /// CPU time of the implementation per released frame, in µs.
    fn cpu_us_per_frame(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / (self.received.max(1) as f64)
    }
}

/// One implementation in the comparison.
#[derive(Clone)]
struct Impl {
    kind: Compare,
    /// Name in the tables.
    label: &'static str,
    /// Its configuration (the colo-proxy binary differs for the baseline).
    cfg: CompareConfig,
}

/// Results of one implementation at one frame size and flow count.
struct Row {
    kind: Compare,
    label: &'static str,
    size: usize,
    flows: u16,
    /// Loaded runs, sorted by frames/s.
    loaded: Vec<RunResult>,
    /// Paced runs, sorted by p99 hold.
    paced: Vec<RunResult>,
}

impl Row {
    /// The loaded run with the median throughput.
    fn loaded(&self) -> &RunResult {
        &self.loaded[self.loaded.len() / 2]
    }

    /// The paced run with the median p99 hold time.
    fn paced(&self) -> &RunResult {
        &self.paced[self.paced.len() / 2]
    }

    /// The median over all loaded runs of the CPU time per frame, in µs.
    fn median_cpu_us_per_frame(&self) -> f64 {
        let mut v: Vec<f64> = self.loaded.iter().map(RunResult::cpu_us_per_frame).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// Checkpoints over all loaded runs and over all paced runs.
    fn checkpoints(&self) -> (u64, u64) {
        (self.loaded.iter().map(|r| r.checkpoints).sum(), self.paced.iter().map(|r| r.checkpoints).sum())
    }

    /// Frames lost and unexpected frames over all runs.
    fn lost(&self) -> (u64, u64) {
        let all = self.loaded.iter().chain(&self.paced);
        (all.clone().map(RunResult::lost).sum(), all.map(|r| r.unexpected).sum())
    }
}

/// The frames of one stream: per flow, a primary template (its IP ID and TOS are overwritten with
/// the sequence number) and the secondary's frame (same UDP header and payload, other IP ID, TOS
/// and source MAC).
struct Streams {
    primary: Vec<Vec<u8>>,
    secondary: Vec<Vec<u8>>,
}

impl Streams {
    fn new(size: usize, flows: u16) -> Streams {
        let mut primary = Vec::new();
        let mut secondary = Vec::new();
        for f in 0..flows {
            let payload: Vec<u8> = (0..size - HEADERS).map(|i| (i as u8).wrapping_add(f as u8)).collect();
            let p = udp4(10_000 + f, 7, &payload);
            assert_eq!(p.len(), size);
            let mut s = p.clone();
            s[6..12].copy_from_slice(&[VM_MAC.0[0], VM_MAC.0[1], VM_MAC.0[2], 0xaa, 0xbb, 0xcc]);
            set_seq(&mut s, (1 << SEQ_BITS) - 1);
            primary.push(p);
            secondary.push(s);
        }
        Streams { primary, secondary }
    }

    /// Appends pair `seq` (QEMU socket framing, no vnet field) to the two buffers.
    fn append(&self, seq: u64, pbuf: &mut Vec<u8>, sbuf: &mut Vec<u8>) {
        let flow = (seq % self.primary.len() as u64) as usize;
        let p = &self.primary[flow];
        pbuf.extend_from_slice(&(p.len() as u32).to_be_bytes());
        let at = pbuf.len();
        pbuf.extend_from_slice(p);
        set_seq(&mut pbuf[at..], seq);
        let s = &self.secondary[flow];
        sbuf.extend_from_slice(&(s.len() as u32).to_be_bytes());
        sbuf.extend_from_slice(s);
    }
}

/// Reads QEMU-framed frames (no vnet field) from a socket through a large buffer: many frames per
/// read, and a read timeout never loses a partly received frame (QEMU writes the length and the
/// frame separately).
struct FrameReader {
    stream: UnixStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameReader {
    /// Reads from a second handle of `peer`'s stream, waiting at most 100 ms per call.
    fn new(peer: &mut QPeer) -> anyhow::Result<FrameReader> {
        let stream = peer.stream().try_clone().context("cloning a socket")?;
        stream.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(FrameReader { stream, buf: vec![0; 1 << 18], start: 0, end: 0 })
    }

    /// The next frame, or `None` if none completed within the timeout.
    fn next(&mut self) -> anyhow::Result<Option<&[u8]>> {
        loop {
            let avail = self.end - self.start;
            if avail >= 4 {
                let len = u32::from_be_bytes(self.buf[self.start..self.start + 4].try_into().unwrap()) as usize;
                if avail >= 4 + len {
                    let at = self.start + 4;
                    self.start = at + len;
                    return Ok(Some(&self.buf[at..at + len]));
                }
                if 4 + len > self.buf.len() {
                    self.buf.resize(4 + len, 0);
                }
            }
            // Keep the partial frame at the front and read more behind it.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(0) => bail!("the implementation closed the socket"),
                Ok(n) => self.end += n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Puts `seq` (its low [`SEQ_BITS`]) into the IP ID and TOS of an IPv4 frame and fixes the
/// header checksum.
fn set_seq(frame: &mut [u8], seq: u64) {
    frame[15] = (seq >> 16) as u8;
    frame[18..20].copy_from_slice(&(seq as u16).to_be_bytes());
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = colo_proxy::wire::checksum::internet(&frame[14..34]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

/// Sends `pairs` pairs to a fresh `kind` process, paced at `rate` pairs/s if given, and
/// measures what comes out.
fn run(
    kind: Compare,
    cfg: &CompareConfig,
    streams: &Streams,
    pairs: u64,
    rate: Option<u64>,
    window: u64,
) -> anyhow::Result<RunResult> {
    let running = kind.start(cfg).with_context(|| format!("starting {}", kind.name()))?;
    // `proc` and `dir` stay alive (and the process running) until the end of this function.
    let Running { mut pri, mut sec, mut out, mut notify, proc, dir: _dir, .. } = running;
    // CPU spent starting up (QEMU's is large) is not the compare's.
    let cpu_at_start = process_cpu(proc.pid());

    // Send time of each pair (ns since `base`, +1 so that 0 means "not sent").
    let sent_at: Vec<AtomicU64> = (0..pairs).map(|_| AtomicU64::new(0)).collect();
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let sending_done = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let checkpoints = AtomicU64::new(0);
    let base = Instant::now();
    let elapsed_ns = |t: Instant| t.duration_since(base).as_nanos() as u64 + 1;

    std::thread::scope(|scope| -> anyhow::Result<RunResult> {
        // outdev reader: identifies each frame by its sequence number and records its hold time.
        let reader = scope.spawn(|| {
            let mut frames = FrameReader::new(&mut out)?;
            let mut seen = vec![false; pairs as usize];
            let mut holds = Vec::with_capacity(pairs as usize);
            let mut unexpected = 0u64;
            let mut last = base;
            while (holds.len() as u64) < pairs {
                let Some(f) = frames.next()? else {
                    // Timed out: give up when told to, or when the frames are not coming.
                    if stop.load(Ordering::Relaxed) || (sending_done.load(Ordering::Relaxed) && last.elapsed() > STALL)
                    {
                        break;
                    }
                    continue;
                };
                let now = Instant::now();
                let hi = sent.load(Ordering::Acquire);
                if f.len() < 34 || hi == 0 {
                    unexpected += 1;
                    continue;
                }
                // The newest pair sent whose sequence number ends in these bits.
                let bits = u64::from(f[15]) << 16 | u64::from(u16::from_be_bytes([f[18], f[19]]));
                let seq = (hi - 1) - ((hi - 1).wrapping_sub(bits) & ((1 << SEQ_BITS) - 1));
                let t0 = sent_at[seq as usize].load(Ordering::Relaxed);
                if t0 == 0 || seen[seq as usize] {
                    unexpected += 1;
                    continue;
                }
                seen[seq as usize] = true;
                holds.push(elapsed_ns(now) - t0);
                received.store(holds.len() as u64, Ordering::Release);
                last = now;
            }
            holds.sort_unstable();
            anyhow::Ok((holds, last, unexpected))
        });

        // The controller on notify_dev: every checkpoint request is granted at once.
        let controller = scope.spawn(|| {
            let mut messages = FrameReader::new(&mut notify)?;
            while !stop.load(Ordering::Relaxed) {
                if messages.next()? == Some(DO_CHECKPOINT) {
                    checkpoints.fetch_add(1, Ordering::Relaxed);
                    notify.send(CHECKPOINT, 0).context("sending COLO_CHECKPOINT")?;
                }
            }
            anyhow::Ok(())
        });

        let send_result = send_all(&mut pri, &mut sec, streams, pairs, rate, window, &sent_at, &sent, &received, base);
        sending_done.store(true, Ordering::Relaxed);
        if send_result.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let read_result = reader.join().expect("reader thread");
        stop.store(true, Ordering::Relaxed);
        controller.join().expect("controller thread").context("notify_dev")?;
        send_result?;
        let (holds, last, unexpected) = read_result.context("outdev")?;
        let cpu = process_cpu(proc.pid()).saturating_sub(cpu_at_start);
        Ok(RunResult {
            sent: sent.load(Ordering::Relaxed),
            received: holds.len() as u64,
            elapsed: last.duration_since(base),
            holds,
            checkpoints: checkpoints.load(Ordering::Relaxed),
            unexpected,
            cpu,
        })
    })
}

/// The sender: pairs in batches (or one by one at `rate`), never more than `window` in flight.
#[allow(clippy::too_many_arguments)]
fn send_all(
    pri: &mut QPeer,
    sec: &mut QPeer,
    streams: &Streams,
    pairs: u64,
    rate: Option<u64>,
    window: u64,
    sent_at: &[AtomicU64],
    sent: &AtomicU64,
    received: &AtomicU64,
    base: Instant,
) -> anyhow::Result<()> {
    let mut pbuf = Vec::new();
    let mut sbuf = Vec::new();
    let mut seq = 0u64;
    let mut waiting_since: Option<(Instant, u64)> = None;
    while seq < pairs {
        let in_flight = seq - received.load(Ordering::Acquire);
        if in_flight >= window {
            let got = received.load(Ordering::Relaxed);
            match waiting_since {
                Some((t, n)) if n == got && t.elapsed() > STALL => {
                    bail!("no progress for {STALL:?} with {in_flight} pairs in flight (frames lost?)")
                }
                Some((_, n)) if n == got => {}
                _ => waiting_since = Some((Instant::now(), got)),
            }
            std::thread::sleep(Duration::from_micros(20));
            continue;
        }
        waiting_since = None;
        let batch = match rate {
            Some(r) => {
                // Absolute schedule: a late pair is sent at once, the next ones catch up.
                let due = base + Duration::from_nanos(seq * 1_000_000_000 / r);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                1
            }
            None => BATCH.min(window - in_flight).min(pairs - seq),
        };
        pbuf.clear();
        sbuf.clear();
        for k in seq..seq + batch {
            streams.append(k, &mut pbuf, &mut sbuf);
        }
        let t = Instant::now().duration_since(base).as_nanos() as u64 + 1;
        for k in seq..seq + batch {
            sent_at[k as usize].store(t, Ordering::Relaxed);
        }
        sent.store(seq + batch, Ordering::Release);
        pri.stream().write_all(&pbuf).context("writing to primary-in")?;
        sec.stream().write_all(&sbuf).context("writing to secondary-in")?;
        seq += batch;
    }
    Ok(())
}

/// The name of the baseline's rows.
const BASELINE: &str = "colo-proxy compare (baseline)";

/// The name of an implementation's rows.
fn label(kind: Compare) -> &'static str {
    match kind {
        Compare::Qemu => "QEMU 7.2 colo-compare",
        Compare::Ours => "colo-proxy compare",
    }
}

/// The in-flight window for a run with `flows` flows.
fn window(args: &Args, flows: u16) -> u64 {
    args.window.unwrap_or((1000 * u64::from(flows)).min(4000))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for &s in &args.sizes {
        if !(HEADERS + 1..=1514).contains(&s) {
            bail!("--sizes: {s} is not a UDP frame size in {}..=1514", HEADERS + 1);
        }
    }
    if args.flows.contains(&0) {
        bail!("--flows: 0 flows");
    }
    if args.window.is_some_and(|w| w == 0 || args.flows.iter().any(|&f| w >= 1024 * u64::from(f))) {
        bail!("--window must be in 1..1024×flows (QEMU drops frames beyond max_queue_size = 1024 per flow)");
    }
    if args.paced_rate == 0 {
        bail!("--paced-rate must be positive");
    }
    if args.repeat == 0 {
        bail!("--repeat must be positive");
    }
    if args.pairs.max(args.paced_pairs) >= 1 << SEQ_BITS {
        bail!("at most {} pairs per run", (1u64 << SEQ_BITS) - 1);
    }
    let kinds: Vec<Compare> = match args.only {
        Some(Only::Ours) => vec![Compare::Ours],
        Some(Only::Qemu) => vec![Compare::Qemu],
        None => Compare::BOTH.to_vec(),
    };
    let mut cfg = CompareConfig::new();
    cfg.qemu = args.qemu.clone().unwrap_or_else(qemu_path);
    cfg.ours = args.ours.clone().unwrap_or_else(colo_proxy_path);
    if kinds.contains(&Compare::Qemu) {
        check_qemu(&cfg.qemu).map_err(anyhow::Error::msg)?;
    }
    if kinds.contains(&Compare::Ours) && !cfg.ours.exists() {
        bail!("{} not found (build it: cargo build --release -p colo-proxy, or pass --ours)", cfg.ours.display());
    }
    let mut impls: Vec<Impl> = kinds.iter().map(|&kind| Impl { kind, label: label(kind), cfg: cfg.clone() }).collect();
    if let Some(b) = &args.baseline {
        if !b.exists() {
            bail!("--baseline: {} not found", b.display());
        }
        let mut c = cfg.clone();
        c.ours = b.clone();
        impls.push(Impl { kind: Compare::Ours, label: BASELINE, cfg: c });
    }
    // Sleeps in the paced sender should last what they ask for, not 50 µs more.
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1) };

    let mut rows = Vec::new();
    for &size in &args.sizes {
        for &flows in &args.flows {
            let streams = Streams::new(size, flows);
            let mut stream_rows: Vec<Row> = impls
                .iter()
                .map(|i| Row { kind: i.kind, label: i.label, size, flows, loaded: vec![], paced: vec![] })
                .collect();
            for round in 1..=args.repeat {
                for (imp, row) in impls.iter().zip(&mut stream_rows) {
                    eprint!("round {round} {:>28} {size:>5} B {flows:>3} flows: loaded ", imp.label);
                    let l = run(imp.kind, &imp.cfg, &streams, args.pairs, None, window(&args, flows))?;
                    eprint!(
                        "{:.0} frames/s, {:.2} CPU µs/frame (checkpoints {}, lost {}), paced ",
                        l.frames_per_sec(),
                        l.cpu_us_per_frame(),
                        l.checkpoints,
                        l.lost()
                    );
                    let p = run(
                        imp.kind,
                        &imp.cfg,
                        &streams,
                        args.paced_pairs,
                        Some(args.paced_rate),
                        window(&args, flows),
                    )?;
                    eprintln!("p50 {:.1} µs p99 {:.1} µs", p.hold_us(0.5), p.hold_us(0.99));
                    row.loaded.push(l);
                    row.paced.push(p);
                }
            }
            for mut row in stream_rows {
                row.loaded.sort_by(|a, b| a.frames_per_sec().total_cmp(&b.frames_per_sec()));
                row.paced.sort_by(|a, b| a.hold_us(0.99).total_cmp(&b.hold_us(0.99)));
                rows.push(row);
            }
        }
    }
    let table = report(&args, &cfg, &kinds, &rows);
    print!("{table}");
    if let Some(path) = &args.out {
        std::fs::write(path, &table).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The markdown report: conditions, one row per implementation and stream, then the ratios.
fn report(args: &Args, cfg: &CompareConfig, kinds: &[Compare], rows: &[Row]) -> String {
    let mut t = String::new();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let _ = writeln!(t, "### colo-compare side by side: QEMU colo-compare vs colo-proxy compare\n");
    if kinds.contains(&Compare::Qemu) {
        let v = Command::new(&cfg.qemu).arg("-version").output().map(|o| o.stdout).unwrap_or_default();
        let v = String::from_utf8_lossy(&v);
        let _ = writeln!(t, "- QEMU: {}", v.lines().next().unwrap_or("?"));
    }
    let _ = writeln!(t, "- Machine: {cpus} CPUs, {cpu}");
    let _ = writeln!(
        t,
        "- UDP over Unix sockets (QEMU chardev framing); loaded: {} pairs, at most {} in flight; \
         paced: {} pairs at {} pairs/s; median of {} rounds, each running every implementation \
         in turn (fresh process per run)",
        args.pairs,
        args.window.map_or_else(|| "1000 per flow (≤ 4000)".to_string(), |w| w.to_string()),
        args.paced_pairs,
        args.paced_rate,
        args.repeat
    );
    let _ = writeln!(
        t,
        "- frames/s: primary frames released on outdev per second (loaded run); hold: primary-in \
         write to outdev read; CPU µs/frame: CPU time of the implementation's process (all \
         its threads, start-up excluded) per released frame (loaded run with the median frames/s; the median of all \
         loaded runs in brackets); checkpoints: DO_CHECKPOINT requests answered, all loaded / \
         all paced runs; lost: primary frames never released, all runs\n"
    );
    let _ = writeln!(
        t,
        "| implementation | frame | flows | frames/s | CPU µs/frame | hold p50 / p99 paced (µs) | hold p50 / p99 / max loaded (µs) | checkpoints | lost |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let name = r.label;
        let (cl, cp) = r.checkpoints();
        let (lost, unexpected) = r.lost();
        let _ = writeln!(
            t,
            "| {name} | {} B | {} | {:.0} | {:.2} ({:.2}) | {:.1} / {:.1} | {:.0} / {:.0} / {:.0} | {cl} / {cp} | {lost}{} |",
            r.size,
            r.flows,
            r.loaded().frames_per_sec(),
            r.loaded().cpu_us_per_frame(),
            r.median_cpu_us_per_frame(),
            r.paced().hold_us(0.5),
            r.paced().hold_us(0.99),
            r.loaded().hold_us(0.5),
            r.loaded().hold_us(0.99),
            r.loaded().hold_us(1.0),
            if unexpected > 0 { format!(" ({unexpected} unexpected)") } else { String::new() },
        );
    }
    if kinds.len() == 2 {
        let _ = writeln!(
            t,
            "\n| implementation | frame | flows | throughput / QEMU | QEMU CPU per frame / its | p99 / QEMU p50 paced | p99 / QEMU p50 loaded |"
        );
        let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---:|");
        for q in rows.iter().filter(|r| r.kind == Compare::Qemu) {
            for o in rows.iter().filter(|r| r.kind == Compare::Ours && r.size == q.size && r.flows == q.flows) {
                let _ = writeln!(
                    t,
                    "| {} | {} B | {} | {:.2}x | {:.2}x | {:.2} | {:.2} |",
                    o.label,
                    q.size,
                    q.flows,
                    o.loaded().frames_per_sec() / q.loaded().frames_per_sec(),
                    q.median_cpu_us_per_frame() / o.median_cpu_us_per_frame(),
                    o.paced().hold_us(0.99) / q.paced().hold_us(0.5),
                    o.loaded().hold_us(0.99) / q.loaded().hold_us(0.5),
                );
            }
        }
    }
    t
}
