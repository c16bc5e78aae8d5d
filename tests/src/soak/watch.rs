//! What the soak watches all along: the clients' sessions (counter, echo, top), the frames the
//! VM's MAC sends from each host's port on the LAN switch, and every process's memory and
//! descriptors.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::colo_hosts::ColoHosts;
use crate::colo_topology::CounterClient;
use crate::vm_topology::{LineClient, GUEST_MAC};

/// Something that broke an invariant, with when it happened.
#[derive(Debug, Clone)]
pub struct Violation {
    /// When (since the soak started).
    pub at: Duration,
    /// What.
    pub what: String,
}

/// Violations found by the watchers' threads.
#[derive(Clone, Default)]
pub struct Violations(Arc<Mutex<Vec<Violation>>>);

impl Violations {
    /// Records one.
    pub fn push(&self, origin: Instant, what: String) {
        eprintln!("soak: VIOLATION at {:.1}s: {what}", origin.elapsed().as_secs_f64());
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(Violation { at: origin.elapsed(), what });
    }

    /// All so far.
    pub fn all(&self) -> Vec<Violation> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The counter session: an increment every 10 ms, each reply checked to be one more than the
/// last; reply times kept for the gaps. A broken connection is a violation (COLO keeps every
/// connection across failovers); the session then reconnects and checks the value went on
/// from where it was (the last increment may or may not have been applied when its reply was
/// lost).
pub struct CounterLoad {
    stop: Arc<AtomicBool>,
    /// Increments answered.
    pub count: Arc<AtomicU64>,
    /// Reply times, ms since the soak's start.
    pub times: Arc<Mutex<Vec<u64>>>,
    thread: Option<JoinHandle<()>>,
}

/// How long a client waits for a reply before the session counts as broken: far beyond any
/// failover (a heartbeat timeout and an announcement).
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

impl CounterLoad {
    /// Starts the session.
    pub fn start(net: &ColoHosts, origin: Instant, violations: Violations) -> CounterLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let times = Arc::new(Mutex::new(Vec::new()));
        let connect = net.connector(9000);
        let (s, c, t) = (stop.clone(), count.clone(), times.clone());
        let thread = std::thread::spawn(move || {
            let mut client = CounterClient::over(connect());
            while !s.load(Ordering::Relaxed) {
                match client.inc() {
                    Ok(_) => {
                        c.fetch_add(1, Ordering::Relaxed);
                        t.lock().unwrap().push(origin.elapsed().as_millis() as u64);
                    }
                    Err(e) => {
                        violations.push(origin, format!("counter session: {e}"));
                        if s.load(Ordering::Relaxed) {
                            return;
                        }
                        let last = client.last;
                        std::thread::sleep(Duration::from_secs(1));
                        client = CounterClient::over(connect());
                        if client.last < last || client.last > last + 1 {
                            violations.push(
                                origin,
                                format!("counter after reconnecting: {} where the session had {last}", client.last),
                            );
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        CounterLoad { stop, count, times, thread: Some(thread) }
    }

    /// Increments answered so far.
    pub fn answered(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The longest silence between two replies that ended after `from` (ms since the start),
    /// and when it ended; the time from `from` to the first reply after it counts too.
    pub fn worst_gap_since(&self, from: u64) -> (Duration, u64) {
        let times = self.times.lock().unwrap();
        let start = times.partition_point(|&t| t < from);
        let mut worst = (0u64, from);
        let mut prev = if start > 0 { times[start - 1] } else { from };
        for &t in &times[start..] {
            if t - prev > worst.0 {
                worst = (t - prev, t);
            }
            prev = t;
        }
        (Duration::from_millis(worst.0), worst.1)
    }

    /// Stops the session.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A line session on its own thread: the echo (each line must come back as sent) or the `top`
/// stream (each line must be a `top` line). Counts lines; a broken connection is a violation,
/// then it reconnects.
pub struct LineLoad {
    stop: Arc<AtomicBool>,
    /// Lines checked.
    pub lines: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// Which line service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineService {
    /// TCP echo on port 7: a line every 50 ms, of varying length.
    Echo,
    /// The `top` stream on port 9100: read what comes.
    Top,
}

impl LineLoad {
    /// Starts the session.
    pub fn start(net: &ColoHosts, service: LineService, origin: Instant, violations: Violations) -> LineLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let lines = Arc::new(AtomicU64::new(0));
        let port = if service == LineService::Echo { 7 } else { 9100 };
        let connect = net.connector(port);
        let (s, l) = (stop.clone(), lines.clone());
        let thread = std::thread::spawn(move || {
            let mut client = LineClient::new(connect());
            client.set_timeout(REPLY_TIMEOUT);
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                let checked = match service {
                    LineService::Echo => {
                        // No trailing blank: the line comes back trimmed.
                        let line = format!("echo {i} {}", "x".repeat((i % 300) as usize + 1));
                        i += 1;
                        let r = client.ask(&line).map_err(|e| e.to_string()).and_then(|back| {
                            if back == line {
                                Ok(())
                            } else {
                                Err(format!("sent {} bytes, got back '{}'", line.len(), back.escape_debug()))
                            }
                        });
                        std::thread::sleep(Duration::from_millis(50));
                        r
                    }
                    LineService::Top => client.read_line().map_err(|e| e.to_string()).and_then(|line| {
                        if line.starts_with("top seq=") {
                            Ok(())
                        } else {
                            Err(format!("bad top line '{}'", line.escape_debug()))
                        }
                    }),
                };
                match checked {
                    Ok(()) => {
                        l.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if s.load(Ordering::Relaxed) {
                            return;
                        }
                        violations.push(origin, format!("{service:?} session: {e}"));
                        std::thread::sleep(Duration::from_secs(1));
                        client = LineClient::new(connect());
                        client.set_timeout(REPLY_TIMEOUT);
                    }
                }
            }
        });
        LineLoad { stop, lines, thread: Some(thread) }
    }

    /// Lines so far.
    pub fn count(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    /// Stops the session (the thread may be waiting for a line: it is not joined).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take();
    }
}

/// Frames from the VM's MAC as each host's switch port received them (`tcpdump -l` per port):
/// (seconds since the epoch, host).
pub struct LanWatch {
    frames: Arc<Mutex<Vec<(f64, usize)>>>,
    children: Vec<Child>,
}

impl LanWatch {
    /// Starts one tcpdump per host port; returns once they listen.
    pub fn start(net: &ColoHosts) -> LanWatch {
        let frames = Arc::new(Mutex::new(Vec::new()));
        let mut children = Vec::new();
        for (i, host) in net.lan.hosts.iter().enumerate() {
            let mut cmd = net.lan.switch.command("tcpdump");
            cmd.args(["-l", "-n", "-tt", "-Q", "in", "-i", &host.switch_port, "ether", "src", GUEST_MAC]);
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
            let mut child = cmd.spawn().expect("tcpdump");
            let (out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
            // tcpdump says "listening on" on stderr once its capture runs.
            let mut said = Vec::new();
            let mut b = [0u8; 1];
            while !String::from_utf8_lossy(&said).contains("listening on") {
                match err.read(&mut b) {
                    Ok(1) => said.push(b[0]),
                    _ => panic!("tcpdump on {} did not start: {}", host.switch_port, String::from_utf8_lossy(&said)),
                }
            }
            std::thread::spawn(move || {
                let mut sink = Vec::new();
                let _ = err.read_to_end(&mut sink);
            });
            let f = frames.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { return };
                    if let Some(t) = line.split_whitespace().next().and_then(|t| t.parse::<f64>().ok()) {
                        f.lock().unwrap().push((t, i));
                    }
                }
            });
            children.push(child);
        }
        LanWatch { frames, children }
    }

    /// Frames seen so far.
    pub fn count(&self) -> usize {
        self.frames.lock().unwrap().len()
    }

    /// The frames sent by a host that was not serving (see [`foreign_frames`]), given the
    /// takeovers as (when the fault began, the serving host after it).
    pub fn foreign_frames(&self, first_owner: usize, takeovers: &[(SystemTime, usize)]) -> Vec<(f64, usize)> {
        let secs = |t: &SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let takeovers: Vec<(f64, usize)> = takeovers.iter().map(|(t, h)| (secs(t), *h)).collect();
        foreign_frames(&self.frames.lock().unwrap(), first_owner, &takeovers)
    }
}

/// Checks that only one host ever released the VM's frames: `frames` are (time, host) as the
/// switch saw them; the serving host changes only at takeovers, each (when its fault began, the
/// serving host after it). From a takeover's start the old host may still send until the new
/// one's first frame, and never after it. Returns the frames sent by a host that was not
/// serving.
pub fn foreign_frames(frames: &[(f64, usize)], first_owner: usize, takeovers: &[(f64, usize)]) -> Vec<(f64, usize)> {
    let mut frames = frames.to_vec();
    frames.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut owner = first_owner;
    let mut next = 0;
    let mut coming: Option<usize> = None;
    let mut foreign = Vec::new();
    for &(t, host) in &frames {
        while next < takeovers.len() && t >= takeovers[next].0 {
            let to = takeovers[next].1;
            coming = (to != owner).then_some(to);
            next += 1;
        }
        if coming == Some(host) {
            owner = host;
            coming = None;
        } else if host != owner {
            foreign.push((t, host));
        }
    }
    foreign
}

impl Drop for LanWatch {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The most memory and descriptors each kind of process was seen with.
#[derive(Debug, Default, Clone)]
pub struct Resources {
    /// Per process kind: (most resident KiB, most open descriptors).
    pub worst: std::collections::BTreeMap<&'static str, (u64, u64)>,
}

/// Bounds: a backend holds at most its engine's byte budget and the rings it maps; a VMM its
/// guest's memory, the secondary's RAM cache of it, and buffers.
fn limits(kind: &str) -> (u64, u64) {
    match kind {
        "colo-vmm" => (1 << 20, 256),
        _ => (384 << 10, 256),
    }
}

impl Resources {
    /// Samples every process of both hosts; returns the bounds exceeded.
    pub fn sample(&mut self, net: &ColoHosts) -> Vec<String> {
        let mut over = Vec::new();
        for i in 0..net.on.len() {
            for (kind, p) in net.processes(i) {
                let pid = p.pid();
                let Some(rss) = rss_kib(pid) else { continue };
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
                let w = self.worst.entry(kind).or_default();
                *w = (w.0.max(rss), w.1.max(fds));
                let (max_rss, max_fds) = limits(kind);
                if rss > max_rss || fds > max_fds {
                    over.push(format!(
                        "{kind} on host {i} (pid {pid}): {} MiB resident, {fds} descriptors (bounds {} MiB, {max_fds})",
                        rss >> 10,
                        max_rss >> 10
                    ));
                }
            }
        }
        over
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    if status.lines().any(|l| l.starts_with("State:") && l.contains('Z')) {
        return None;
    }
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
}

/// Writes bad control lines to a Unix socket as fast as it takes them for `duration`, never
/// reading a reply (what a broken or hostile controller does). Returns the lines written.
pub fn flood(path: &std::path::Path, duration: Duration) -> u64 {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(path) else { return 0 };
    let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
    let deadline = Instant::now() + duration;
    let junk = [&b"{\"type\":\"nope\",\"id\":1}\n"[..], b"not json at all\n", b"{\"type\":\"mode\",\"mode\":\"x\"}\n"];
    let mut n = 0u64;
    while Instant::now() < deadline {
        let mut batch = Vec::with_capacity(64 * 32);
        for k in 0..64 {
            batch.extend_from_slice(junk[(n as usize + k) % junk.len()]);
        }
        match s.write_all(&batch) {
            Ok(()) => n += 64,
            // The peer stopped taking lines (it bounds what it reads) or dropped us.
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(_) => break,
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_takeover_hands_the_lan_over_once() {
        // a serves; b takes over at 10 (a died at 10, its frames in flight arrive until 10.2).
        let frames = [(1.0, 0), (5.0, 0), (10.1, 0), (10.2, 0), (11.0, 1), (12.0, 1)];
        assert!(foreign_frames(&frames, 0, &[(10.0, 1)]).is_empty());
        // Later a serves again after a takeover back.
        let back = [&frames[..], &[(20.5, 0), (21.0, 0)]].concat();
        assert!(foreign_frames(&back, 0, &[(10.0, 1), (20.0, 0)]).is_empty());
    }

    #[test]
    fn a_host_sending_out_of_its_turn_is_caught() {
        // The secondary leaks output while a serves.
        assert_eq!(foreign_frames(&[(1.0, 0), (2.0, 1), (3.0, 0)], 0, &[]), [(2.0, 1)]);
        // After b's first frame, a thawed a sends again: both release (the split brain).
        let frames = [(1.0, 0), (11.0, 1), (12.0, 0), (13.0, 1), (14.0, 0)];
        assert_eq!(foreign_frames(&frames, 0, &[(10.0, 1)]), [(12.0, 0), (14.0, 0)]);
        // A fault the primary survived hands nothing over.
        assert_eq!(foreign_frames(&[(1.0, 0), (11.0, 1)], 0, &[(10.0, 0)]), [(11.0, 1)]);
    }
}
