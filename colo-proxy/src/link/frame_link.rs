//! A frame link: the connection between the backends of one NIC on two hosts, carrying the
//! mirrored inbound frames to the secondary and the secondary VM's output back, with pings that
//! measure a lease and credits that bound what the secondary may send ahead.
//!
//! Threads: a reader, which hands every event to the caller's handler (so the handler runs on
//! one thread, in stream order), and a writer, which drains a bounded queue in batches (one
//! sealed record and one system call for many frames) and sends a ping every
//! `ping_interval`. Senders never block: a full queue refuses the frame.
//!
//! **The lease.** A side may count on its peer only while a ping it sent less than `max_age`
//! ago has been answered. The time that counts is when the ping was *sent*, so answers to pings
//! sent before this process was stopped or starved renew nothing: after a freeze the lease has
//! lapsed until a ping sent after waking comes back — which never happens if the peer has
//! dropped the link meanwhile. The primary's backend releases output only under a live lease.
//!
//! **Credits.** The secondary may have at most `window` bytes of `outbound` frames that the
//! primary has not yet taken into its compare engine; the primary returns credit as it takes
//! them. A secondary out of credit leaves its VM's frames on the TX ring (backpressure across
//! hosts), and the primary never has to buffer more than one window of them: a peer that sends
//! beyond its credit is dropped, whatever it is.
//!
//! **Answers.** Only the newest unanswered ping is answered (the lease counts the newest answer
//! only), so a peer that pings without reading costs one pending answer, not one per ping.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::message::{MessageError, PeerMessage};
use super::secure::{is_tampered, LinkConn};
use super::socket::LinkSocket;

/// Pings remembered for matching their answers.
const PING_HISTORY: u64 = 64;

/// The link's sizes and periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLinkConfig {
    /// How often a ping is sent.
    pub ping_interval: Duration,
    /// Bytes of `outbound` frames the secondary may send ahead of the primary's credit.
    pub window: u64,
    /// Bytes queued for the writer at most (beyond, inbound frames are refused).
    pub queue_bytes: usize,
}

impl Default for FrameLinkConfig {
    fn default() -> Self {
        FrameLinkConfig { ping_interval: Duration::from_millis(50), window: 4 << 20, queue_bytes: 8 << 20 }
    }
}

/// What the reader hands to the handler.
#[derive(Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// A mirrored frame from the primary's LAN.
    Inbound {
        /// Its number.
        seq: u64,
        /// The Ethernet frame.
        frame: Vec<u8>,
    },
    /// A frame of the secondary VM. The handler must [`FrameLink::grant`] its length once
    /// the frame is taken (at once, or later from a backlog).
    Outbound(Vec<u8>),
    /// The secondary VM loads the checkpoint with this inbound mark: the `outbound` frames
    /// after this event come from the checkpoint's state.
    Loading(u64),
    /// Credit arrived: `outbound` frames refused for lack of it may be sent now.
    Room,
    /// A ping was answered after the lease had lapsed (or for the first time).
    Renewed,
    /// The link ended; why. Nothing follows.
    Closed(String),
}

/// Counters of one link.
#[derive(Debug, Default)]
pub struct FrameLinkStats {
    /// Messages sent with frames.
    pub frames_sent: AtomicU64,
    /// Messages received with frames.
    pub frames_received: AtomicU64,
    /// Frames refused because the writer's queue was full.
    pub refused_full: AtomicU64,
}

/// A link as the metrics endpoint shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLinkState {
    /// Not closed.
    pub open: bool,
    /// The peer answered a ping within the lease (see [`FrameLink::lease_fresh`]).
    pub lease_fresh: bool,
    /// Authenticated and encrypted.
    pub secure: bool,
    /// See [`FrameLinkStats::frames_sent`].
    pub frames_sent: u64,
    /// See [`FrameLinkStats::frames_received`].
    pub frames_received: u64,
    /// See [`FrameLinkStats::refused_full`].
    pub refused_full: u64,
}

/// A view of a [`FrameLink`] for the metrics endpoint ([`FrameLink::watch`]).
#[derive(Clone)]
pub struct FrameLinkWatch {
    shared: Arc<Shared>,
    secure: bool,
    lease: Duration,
}

impl std::fmt::Debug for FrameLinkWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameLinkWatch").field("state", &self.state()).finish()
    }
}

impl FrameLinkWatch {
    /// The link's state and counters now.
    pub fn state(&self) -> FrameLinkState {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.shared;
        FrameLinkState {
            open: !s.closed.load(Ordering::Relaxed),
            lease_fresh: s.lease_fresh(self.lease),
            secure: self.secure,
            frames_sent: get(&s.stats.frames_sent),
            frames_received: get(&s.stats.frames_received),
            refused_full: get(&s.stats.refused_full),
        }
    }
}

struct Out {
    queue: VecDeque<PeerMessage>,
    bytes: usize,
    /// The ping to answer, if one is waiting: a newer one replaces it.
    pong: Option<u64>,
}

struct Shared {
    config: FrameLinkConfig,
    out: Mutex<Out>,
    wake: Condvar,
    /// Bytes of `outbound` frames this side may still send.
    window: AtomicI64,
    /// Credit taken but not yet returned to the peer.
    to_grant: AtomicU64,
    /// Bytes of `outbound` frames received and not yet granted back: at most one window from a
    /// peer that keeps to its credit.
    ahead: AtomicI64,
    /// Send times (ms since `origin`, +1 so that 0 means none) of the last pings, by number.
    ping_sent: [AtomicU64; PING_HISTORY as usize],
    next_ping: AtomicU64,
    /// Send time (as above) of the newest answered ping.
    answered: AtomicU64,
    origin: Instant,
    closed: AtomicBool,
    stats: FrameLinkStats,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    /// Whether a ping sent less than `max_age` ago has been answered.
    fn lease_fresh(&self, max_age: Duration) -> bool {
        let answered = self.answered.load(Ordering::SeqCst);
        answered != 0 && self.now_ms().saturating_sub(answered) < max_age.as_millis() as u64
    }

    /// Queues `msg`; control messages always fit, frames only within the queue's bound.
    fn push(&self, msg: PeerMessage, bounded: bool) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            return false;
        }
        let len = msg.wire_len();
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if bounded && out.bytes + len > self.config.queue_bytes {
            return false;
        }
        out.bytes += len;
        out.queue.push_back(msg);
        drop(out);
        self.wake.notify_one();
        true
    }

    /// Queues the answer to ping `n`, replacing an older one not yet sent.
    fn answer(&self, n: u64) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.pong = Some(n);
        drop(out);
        self.wake.notify_one();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        // Through the queue's lock: the writer checks `closed` and then waits under that lock,
        // so the wake-up cannot fall between its check and its wait (it slept on until its
        // next ping, holding its thread).
        drop(self.out.lock().unwrap_or_else(|p| p.into_inner()));
        self.wake.notify_all();
    }
}

/// One frame link (either end).
pub struct FrameLink {
    shared: Arc<Shared>,
    shutdown: Box<dyn Fn() + Send + Sync>,
    peer: String,
    secure: bool,
}

impl std::fmt::Debug for FrameLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameLink").field("peer", &self.peer).field("secure", &self.secure).finish()
    }
}

impl FrameLink {
    /// Starts the reader and writer on an established link. `handler` gets every event, on
    /// the reader thread.
    pub fn start<S: LinkSocket>(
        conn: LinkConn<S>,
        config: FrameLinkConfig,
        mut handler: impl FnMut(PeerEvent) + Send + 'static,
    ) -> std::io::Result<FrameLink> {
        let LinkConn { mut reader, mut writer, control, peer, secure } = conn;
        let shared = Arc::new(Shared {
            config,
            out: Mutex::new(Out { queue: VecDeque::new(), bytes: 0, pong: None }),
            wake: Condvar::new(),
            window: AtomicI64::new(config.window as i64),
            to_grant: AtomicU64::new(0),
            ahead: AtomicI64::new(0),
            ping_sent: std::array::from_fn(|_| AtomicU64::new(0)),
            next_ping: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            origin: Instant::now(),
            closed: AtomicBool::new(false),
            stats: FrameLinkStats::default(),
        });
        let stopper = control.try_clone_socket()?;
        let (r, w) = (shared.clone(), shared.clone());
        let writer_stop = control.try_clone_socket()?;
        std::thread::Builder::new().name("frame-link-tx".into()).spawn(move || {
            if let Err(e) = write_loop(&w, &mut writer) {
                tracing::debug!(target: "link", error = %e, "frame link writer stopped");
            }
            // Wakes the reader, which reports the end.
            writer_stop.shutdown_both();
        })?;
        std::thread::Builder::new().name("frame-link-rx".into()).spawn(move || {
            let why = read_loop(&r, &mut reader, &mut handler);
            r.close();
            handler(PeerEvent::Closed(why));
        })?;
        Ok(FrameLink { shared, shutdown: Box::new(move || stopper.shutdown_both()), peer, secure })
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Whether the link is encrypted.
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Whether the link is still up.
    pub fn is_open(&self) -> bool {
        !self.shared.closed.load(Ordering::Relaxed)
    }

    /// Mirrors an inbound frame; false if the queue is full (the frame is not sent).
    pub fn send_inbound(&self, seq: u64, frame: &[u8]) -> bool {
        let ok = self.shared.push(PeerMessage::Inbound { seq, frame: frame.to_vec() }, true);
        self.count(ok);
        ok
    }

    /// Whether `len` more bytes of `outbound` frames fit the credit now.
    pub fn has_credit(&self, len: usize) -> bool {
        self.shared.window.load(Ordering::SeqCst) >= len as i64
    }

    /// Sends a frame of the secondary VM; false if the credit or the queue does not allow it
    /// now (wait for [`PeerEvent::Room`]).
    pub fn send_outbound(&self, frame: &[u8]) -> bool {
        let len = frame.len() as i64;
        let took =
            self.shared.window.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| (w >= len).then_some(w - len));
        if took.is_err() {
            return false;
        }
        let ok = self.shared.push(PeerMessage::Outbound(frame.to_vec()), true);
        if !ok {
            self.shared.window.fetch_add(len, Ordering::SeqCst);
        }
        self.count(ok);
        ok
    }

    /// As secondary: the VM loads the checkpoint with inbound mark `mark`. Queued behind every
    /// `outbound` frame sent before it (and never refused: the primary needs it to tell the
    /// VM's output before the checkpoint from the output after).
    pub fn send_loading(&self, mark: u64) {
        self.shared.push(PeerMessage::Loading(mark), false);
    }

    fn count(&self, ok: bool) {
        let c = if ok { &self.shared.stats.frames_sent } else { &self.shared.stats.refused_full };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Returns credit for `bytes` of `outbound` frames taken from the peer (sent in batches).
    pub fn grant(&self, bytes: usize) {
        // Frames taken from an earlier link (a backlog) do not count against this one's peer.
        let _ = self.shared.ahead.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |a| Some((a - bytes as i64).max(0)));
        let total = self.shared.to_grant.fetch_add(bytes as u64, Ordering::SeqCst) + bytes as u64;
        if total >= self.shared.config.window / 8 {
            let n = self.shared.to_grant.swap(0, Ordering::SeqCst);
            if n > 0 {
                self.shared.push(PeerMessage::Credit(n), false);
            }
        }
    }

    /// Whether a ping sent less than `max_age` ago has been answered.
    pub fn lease_fresh(&self, max_age: Duration) -> bool {
        self.shared.lease_fresh(max_age)
    }

    /// Counters.
    pub fn stats(&self) -> &FrameLinkStats {
        &self.shared.stats
    }

    /// A view of this link for the metrics endpoint, with `lease` as the lease: it reads the
    /// link's atomics from any thread, at any time.
    pub fn watch(&self, lease: Duration) -> FrameLinkWatch {
        FrameLinkWatch { shared: self.shared.clone(), secure: self.secure, lease }
    }

    /// Ends the link: both threads stop, the handler gets [`PeerEvent::Closed`].
    pub fn close(&self) {
        self.shared.close();
        (self.shutdown)();
    }
}

impl Drop for FrameLink {
    fn drop(&mut self) {
        self.close();
    }
}

fn write_loop<S: LinkSocket>(s: &Shared, w: &mut super::secure::LinkWriter<S>) -> std::io::Result<()> {
    let mut next_ping = Instant::now();
    loop {
        let batch = {
            let mut out = s.out.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if s.closed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                if !out.queue.is_empty() || out.pong.is_some() || Instant::now() >= next_ping {
                    break;
                }
                let wait = next_ping.saturating_duration_since(Instant::now());
                out = s.wake.wait_timeout(out, wait).unwrap_or_else(|p| p.into_inner()).0;
            }
            out.bytes = 0;
            (out.pong.take(), std::mem::take(&mut out.queue))
        };
        let (pong, batch) = batch;
        if let Some(n) = pong {
            PeerMessage::Pong(n).write_to(w)?;
        }
        for msg in &batch {
            msg.write_to(w)?;
        }
        if Instant::now() >= next_ping {
            let n = s.next_ping.fetch_add(1, Ordering::SeqCst);
            s.ping_sent[(n % PING_HISTORY) as usize].store(s.now_ms(), Ordering::SeqCst);
            PeerMessage::Ping(n).write_to(w)?;
            let credit = s.to_grant.swap(0, Ordering::SeqCst);
            if credit > 0 {
                PeerMessage::Credit(credit).write_to(w)?;
            }
            next_ping = Instant::now() + s.config.ping_interval;
        }
        w.flush()?;
    }
}

fn read_loop<S: LinkSocket>(
    s: &Shared,
    r: &mut super::secure::LinkReader<S>,
    handler: &mut impl FnMut(PeerEvent),
) -> String {
    loop {
        let msg = match PeerMessage::read_from(r) {
            Ok(Some(m)) => m,
            Ok(None) => return "the peer closed the link".into(),
            Err(MessageError::Io(e)) if is_tampered(&e) => return e.to_string(),
            Err(MessageError::Io(e)) => {
                return if s.closed.load(Ordering::Relaxed) {
                    "closed by this side".into()
                } else {
                    format!("link broken: {e}")
                }
            }
            Err(e @ MessageError::Malformed(_)) => return e.to_string(),
        };
        match msg {
            PeerMessage::Inbound { seq, frame } => {
                s.stats.frames_received.fetch_add(1, Ordering::Relaxed);
                handler(PeerEvent::Inbound { seq, frame });
            }
            PeerMessage::Outbound(frame) => {
                let len = frame.len() as i64;
                let ahead = s.ahead.fetch_add(len, Ordering::SeqCst) + len;
                if ahead > s.config.window as i64 {
                    return format!(
                        "the peer sent {ahead} bytes of frames not yet taken, beyond the {} its credit allows",
                        s.config.window
                    );
                }
                s.stats.frames_received.fetch_add(1, Ordering::Relaxed);
                handler(PeerEvent::Outbound(frame));
            }
            PeerMessage::Loading(mark) => handler(PeerEvent::Loading(mark)),
            PeerMessage::Ping(n) => s.answer(n),
            PeerMessage::Pong(n) => {
                let newest = s.next_ping.load(Ordering::SeqCst);
                if n >= newest || newest - n > PING_HISTORY {
                    continue; // not one of ours, or too old to know when it was sent
                }
                let sent = s.ping_sent[(n % PING_HISTORY) as usize].load(Ordering::SeqCst);
                let before = s.answered.fetch_max(sent, Ordering::SeqCst);
                let lapsed =
                    before == 0 || s.now_ms().saturating_sub(before) >= s.config.ping_interval.as_millis() as u64 * 4;
                if sent > before && lapsed {
                    handler(PeerEvent::Renewed);
                }
            }
            PeerMessage::Credit(n) => {
                let n = n.min(s.config.window) as i64;
                let before = s.window.fetch_add(n, Ordering::SeqCst);
                if before + n > s.config.window as i64 {
                    // A peer granting more than it was sent would let this side run away.
                    s.window.store(s.config.window as i64, Ordering::SeqCst);
                }
                handler(PeerEvent::Room);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::key::LinkKey;
    use crate::link::secure::{accept, connect};
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc::{channel, Receiver};

    fn linked(config: FrameLinkConfig) -> (FrameLink, Receiver<PeerEvent>, FrameLink, Receiver<PeerEvent>) {
        let (a, b) = UnixStream::pair().unwrap();
        let key = LinkKey::derive(&[3; 32]);
        let k2 = key.clone();
        let t = std::thread::spawn(move || accept(b, Some(&k2), "frames", Duration::from_secs(2)).unwrap());
        let ca = connect(a, Some(&key), "frames", Duration::from_secs(2)).unwrap();
        let cb = t.join().unwrap();
        let (ta, ra) = channel();
        let (tb, rb) = channel();
        let la = FrameLink::start(ca, config, move |e| {
            let _ = ta.send(e);
        })
        .unwrap();
        let lb = FrameLink::start(cb, config, move |e| {
            let _ = tb.send(e);
        })
        .unwrap();
        (la, ra, lb, rb)
    }

    fn next(rx: &Receiver<PeerEvent>) -> PeerEvent {
        loop {
            match rx.recv_timeout(Duration::from_secs(3)).expect("an event") {
                PeerEvent::Renewed => continue,
                e => return e,
            }
        }
    }

    #[test]
    fn frames_pass_both_ways_in_order_and_pings_keep_the_lease() {
        let cfg = FrameLinkConfig { ping_interval: Duration::from_millis(10), ..Default::default() };
        let (p, _prx, s, srx) = linked(cfg);
        for seq in 0..100u64 {
            assert!(p.send_inbound(seq, &seq.to_le_bytes()));
        }
        for seq in 0..100u64 {
            assert_eq!(next(&srx), PeerEvent::Inbound { seq, frame: seq.to_le_bytes().to_vec() });
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(p.lease_fresh(Duration::from_millis(60)) && s.lease_fresh(Duration::from_millis(60)));
        assert!(!p.lease_fresh(Duration::ZERO));
    }

    #[test]
    fn the_secondary_sends_no_more_than_its_credit_and_grants_refill_it() {
        let cfg = FrameLinkConfig { ping_interval: Duration::from_secs(10), window: 1000, queue_bytes: 1 << 20 };
        let (p, prx, s, srx) = linked(cfg);
        assert!(s.send_outbound(&[1; 600]));
        assert!(!s.send_outbound(&[2; 600]), "beyond the window");
        assert!(s.send_outbound(&[3; 400]));
        assert_eq!(next(&prx), PeerEvent::Outbound(vec![1; 600]));
        assert_eq!(next(&prx), PeerEvent::Outbound(vec![3; 400]));
        p.grant(600);
        assert_eq!(next(&srx), PeerEvent::Room);
        assert!(s.send_outbound(&[2; 600]));
        assert!(!s.has_credit(1));
    }

    /// A link on one end of a socket pair, the other end raw (a plain link: the peer's bytes
    /// are the messages).
    fn raw_peer(config: FrameLinkConfig) -> (FrameLink, Receiver<PeerEvent>, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, rx) = channel();
        let link = FrameLink::start(crate::link::secure::paired(a).unwrap(), config, move |e| {
            let _ = tx.send(e);
        })
        .unwrap();
        (link, rx, b)
    }

    #[test]
    fn a_peer_that_sends_beyond_its_credit_is_dropped() {
        // The primary trusted the secondary to keep to its credit: one that did not filled the
        // primary's backlog without bound.
        let cfg = FrameLinkConfig { ping_interval: Duration::from_secs(10), window: 1000, queue_bytes: 1 << 20 };
        let (link, rx, mut peer) = raw_peer(cfg);
        let mut bytes = Vec::new();
        for _ in 0..3 {
            PeerMessage::Outbound(vec![7; 400]).write_to(&mut bytes).unwrap();
        }
        peer.write_all(&bytes).unwrap();
        assert_eq!(next(&rx), PeerEvent::Outbound(vec![7; 400]));
        assert_eq!(next(&rx), PeerEvent::Outbound(vec![7; 400]));
        match next(&rx) {
            PeerEvent::Closed(why) => assert!(why.contains("credit"), "{why}"),
            other => panic!("a third frame beyond the window was taken: {other:?}"),
        }
        assert!(!link.is_open());
    }

    #[test]
    fn frames_granted_back_make_room_for_more() {
        let cfg = FrameLinkConfig { ping_interval: Duration::from_secs(10), window: 1000, queue_bytes: 1 << 20 };
        let (link, rx, mut peer) = raw_peer(cfg);
        for _ in 0..10 {
            let mut bytes = Vec::new();
            PeerMessage::Outbound(vec![1; 600]).write_to(&mut bytes).unwrap();
            peer.write_all(&bytes).unwrap();
            assert_eq!(next(&rx), PeerEvent::Outbound(vec![1; 600]));
            link.grant(600);
        }
        assert!(link.is_open());
    }

    #[test]
    fn a_peer_that_pings_without_reading_gets_only_the_newest_answers() {
        // Every ping queued an answer: a peer that never read made the queue grow without bound.
        let cfg = FrameLinkConfig { ping_interval: Duration::from_secs(10), ..Default::default() };
        let (_link, _rx, mut peer) = raw_peer(cfg);
        const PINGS: u64 = 50_000;
        let mut bytes = Vec::new();
        for n in 0..PINGS {
            PeerMessage::Ping(n).write_to(&mut bytes).unwrap();
        }
        peer.write_all(&bytes).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        peer.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let (mut pongs, mut newest) = (0u64, None);
        let mut r = std::io::BufReader::new(&peer);
        while let Ok(Some(m)) = PeerMessage::read_from(&mut r) {
            if let PeerMessage::Pong(n) = m {
                pongs += 1;
                newest = Some(n);
            }
        }
        assert!(pongs < PINGS, "every one of {PINGS} pings was answered");
        assert_eq!(newest, Some(PINGS - 1), "the newest ping is answered");
    }

    #[test]
    fn closing_one_end_reports_closed_at_the_other_and_the_lease_lapses() {
        let cfg = FrameLinkConfig { ping_interval: Duration::from_millis(10), ..Default::default() };
        let (p, prx, s, _srx) = linked(cfg);
        std::thread::sleep(Duration::from_millis(50));
        assert!(p.lease_fresh(Duration::from_millis(100)));
        s.close();
        match next(&prx) {
            PeerEvent::Closed(why) => assert!(why.contains("closed") || why.contains("broken"), "{why}"),
            other => panic!("{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(150));
        assert!(!p.lease_fresh(Duration::from_millis(100)));
        assert!(!p.send_inbound(1, b"x"), "a closed link takes nothing");
    }
}
