//! The checkpoint link between primary and secondary: the state stream in both directions,
//! a reader thread that turns records into [`Incoming`] messages, and a heartbeat thread, so a
//! silent or broken peer is noticed within `heartbeat-timeout` whatever the controller is doing.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::message::Control;
use crate::migration::uri::Channel;
use crate::persist::message;
use crate::persist::stream::{Kind, StreamError, StreamReader, StreamWriter};

/// A wait that overran by more than this means this process itself was stopped or not
/// scheduled (SIGSTOP, a stalled host).
const STALL_SLACK: Duration = Duration::from_millis(50);

/// After such a stall, silence is not judged for this long: what the peer sent meanwhile waits
/// in the socket until the reader thread runs again, so the silence is this side's own. On a
/// loaded host that thread may wait well beyond 100 ms for a CPU (a woken primary once judged a
/// secondary that had taken over silent and went on alone instead of stepping down); only a
/// side that itself stalled waits this long.
const WAKE_GRACE: Duration = Duration::from_millis(500);

/// Spent payload buffers kept for the reader to fill again (see [`Link::recycle`]).
const SPARE_BUFFERS: usize = 4;

/// Writing to the peer failed.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint link: {0}")]
pub struct LinkError(#[from] StreamError);

impl From<std::io::Error> for LinkError {
    fn from(e: std::io::Error) -> LinkError {
        LinkError(e.into())
    }
}

/// What arrives from the peer.
#[derive(Debug)]
pub enum Incoming {
    /// A control message (heartbeats are consumed by the link).
    Control(Control),
    /// A batch of pages.
    Pages(Vec<u8>),
    /// A batch of disk blocks.
    Blocks(Vec<u8>),
    /// Device state.
    State(Vec<u8>),
    /// The link broke; why.
    Closed(String),
    /// The peer sent something that is not a valid record or message (checksum, framing,
    /// unknown message): the link is unusable, but the peer may well be alive.
    Corrupt(String),
}

/// Why waiting for the peer ended without a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Silence {
    /// Nothing within the wait.
    Timeout,
    /// The link is gone.
    Closed(String),
    /// The peer sent garbage (see [`Incoming::Corrupt`]).
    Corrupt(String),
}

/// What the metrics endpoint reads of a link, from any thread: whether it is up and how long
/// the peer has been silent.
#[derive(Debug, Clone)]
pub struct LinkWatch {
    last_heard: Arc<AtomicU64>,
    origin: Instant,
    up: Arc<AtomicBool>,
}

impl LinkWatch {
    /// Whether the link still carries messages (not closed, not broken, no garbage received).
    pub fn up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// How long the peer has been silent (heartbeats count as speech).
    pub fn silent_for(&self) -> Duration {
        self.origin.elapsed().saturating_sub(Duration::from_millis(self.last_heard.load(Ordering::Relaxed)))
    }
}

/// One end of the checkpoint link.
pub struct Link<W: Write + Send + 'static> {
    writer: Arc<Mutex<StreamWriter<W>>>,
    rx: Receiver<Incoming>,
    /// Milliseconds since `origin` when the peer was last heard.
    last_heard: Arc<AtomicU64>,
    /// Milliseconds since `origin` when this process last woke from a stall.
    woke: Arc<AtomicU64>,
    origin: Instant,
    stop: Arc<AtomicBool>,
    /// Cleared when the link breaks or is closed.
    up: Arc<AtomicBool>,
    chan: Channel,
    closed: Option<Silence>,
    /// Hands spent payload buffers back to the reader thread.
    spare: SyncSender<Vec<u8>>,
}

impl<W: Write + Send + 'static> Link<W> {
    /// Starts the reader and heartbeat threads. `interval_ms` is read at each beat, so a
    /// parameter change applies at once.
    pub fn new<R: Read + Send + 'static>(
        mut reader: StreamReader<R>,
        writer: StreamWriter<W>,
        chan: Channel,
        interval_ms: Arc<AtomicU64>,
    ) -> Link<W> {
        let origin = Instant::now();
        let last_heard = Arc::new(AtomicU64::new(0));
        let woke = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = Arc::new(Mutex::new(writer));
        let (tx, rx) = channel();
        let (spare, spares) = sync_channel::<Vec<u8>>(SPARE_BUFFERS);
        let heard = last_heard.clone();
        let up = Arc::new(AtomicBool::new(true));
        let reader_up = up.clone();
        std::thread::Builder::new()
            .name("colo-link-rx".into())
            .spawn(move || {
                // A control record's buffer stays here for the next record.
                let mut own: Option<Vec<u8>> = None;
                loop {
                    let buf = own.take().or_else(|| spares.try_recv().ok()).unwrap_or_default();
                    let msg = match reader.next_record_into(buf) {
                        Ok(Some(rec)) => {
                            heard.store(origin.elapsed().as_millis() as u64, Ordering::Relaxed);
                            match rec.kind {
                                Kind::Control => {
                                    let parsed = message::parse(&rec.payload);
                                    own = Some(rec.payload);
                                    match parsed {
                                        Ok(Control::Heartbeat) => continue,
                                        Ok(c) => Incoming::Control(c),
                                        Err(e) => Incoming::Corrupt(e.to_string()),
                                    }
                                }
                                Kind::Pages => Incoming::Pages(rec.payload),
                                Kind::Blocks => Incoming::Blocks(rec.payload),
                                Kind::State => Incoming::State(rec.payload),
                                Kind::End => Incoming::Closed("the peer ended the stream".into()),
                            }
                        }
                        Ok(None) => Incoming::Closed("the peer ended the stream".into()),
                        Err(e @ (StreamError::Io(_) | StreamError::Truncated(_))) => Incoming::Closed(e.to_string()),
                        Err(e) => Incoming::Corrupt(e.to_string()),
                    };
                    let last = matches!(msg, Incoming::Closed(_) | Incoming::Corrupt(_));
                    if tx.send(msg).is_err() || last {
                        reader_up.store(false, Ordering::Relaxed);
                        return;
                    }
                }
            })
            .expect("spawn the link reader");
        let (w, s, wk) = (writer.clone(), stop.clone(), woke.clone());
        std::thread::Builder::new()
            .name("colo-heartbeat".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let interval = Duration::from_millis(interval_ms.load(Ordering::Relaxed).max(1));
                    let slept = Instant::now();
                    std::thread::sleep(interval);
                    if slept.elapsed() > interval + STALL_SLACK {
                        wk.store(origin.elapsed().as_millis() as u64, Ordering::Relaxed);
                    }
                    let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
                    if message::send(&mut w, &Control::Heartbeat).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn the heartbeat");
        Link { writer, rx, last_heard, woke, origin, stop, up, chan, closed: None, spare }
    }

    /// A view of this link for the metrics endpoint.
    pub fn watch(&self) -> LinkWatch {
        LinkWatch { last_heard: self.last_heard.clone(), origin: self.origin, up: self.up.clone() }
    }

    /// Gives a spent payload (of [`Incoming::Pages`] or [`Incoming::Blocks`]) back for the
    /// reader to fill again; beyond a few spares it is dropped.
    pub fn recycle(&self, payload: Vec<u8>) {
        let _ = self.spare.try_send(payload);
    }

    /// Sends a control message.
    pub fn send(&self, c: &Control) -> Result<(), LinkError> {
        let mut w = self.writer();
        Ok(message::send(&mut w, c)?)
    }

    /// Writes a control message without flushing: it leaves with the next flush (a
    /// checkpoint's `vmstate-send`, pages, device state and `vmstate-size` go out in as few
    /// writes as fit, so the secondary's reader wakes once for them, not once each).
    pub fn queue(&self, c: &Control) -> Result<(), LinkError> {
        let mut w = self.writer();
        Ok(message::write(&mut w, c)?)
    }

    /// Runs `f` with the stream writer without flushing (see [`Link::queue`]).
    pub fn with_writer_queued<T, E>(&self, f: impl FnOnce(&mut StreamWriter<W>) -> Result<T, E>) -> Result<T, E> {
        f(&mut self.writer())
    }

    /// The stream writer; heartbeats wait meanwhile.
    fn writer(&self) -> MutexGuard<'_, StreamWriter<W>> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends what was queued.
    pub fn flush(&self) -> Result<(), LinkError> {
        Ok(self.writer().flush()?)
    }

    /// Runs `f` with the stream writer (heartbeats wait meanwhile), then flushes.
    pub fn with_writer<T, E: From<std::io::Error>>(
        &self,
        f: impl FnOnce(&mut StreamWriter<W>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut w = self.writer();
        let v = f(&mut w)?;
        w.flush()?;
        Ok(v)
    }

    /// Sends a state record (an encoded `persist::state::StateRecord`).
    pub fn send_state(&self, payload: &[u8]) -> Result<(), LinkError> {
        let mut w = self.writer();
        w.record(Kind::State, payload)?;
        Ok(w.flush()?)
    }

    /// Sends a state record and the control message `then` in one flush.
    pub fn send_state_then(&self, payload: &[u8], then: &Control) -> Result<(), LinkError> {
        let mut w = self.writer();
        w.record(Kind::State, payload)?;
        Ok(message::send(&mut w, then)?)
    }

    /// The next message, waiting at most `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Incoming, Silence> {
        if let Some(end) = &self.closed {
            return Err(end.clone());
        }
        let asked = Instant::now();
        let end = match self.rx.recv_timeout(timeout) {
            Ok(Incoming::Closed(why)) => Silence::Closed(why),
            Ok(Incoming::Corrupt(why)) => Silence::Corrupt(why),
            Ok(m) => return Ok(m),
            Err(RecvTimeoutError::Timeout) => {
                self.note_wait(asked, timeout);
                return Err(Silence::Timeout);
            }
            Err(RecvTimeoutError::Disconnected) => Silence::Closed("the link reader stopped".into()),
        };
        self.closed = Some(end.clone());
        Err(end)
    }

    /// After this side waited up to `wait` from `asked` for something else (the compare
    /// processes, a sleep): a wait that overran means this process stalled, as a [`Link::recv`]
    /// that overran does, and silence is not judged for [`WAKE_GRACE`]. Without it a primary
    /// frozen while it waited for miscompares judged, the moment it woke, a secondary that had
    /// taken over meanwhile silent, before its reader thread took in the `taken-over` waiting
    /// in the socket.
    pub fn note_wait(&self, asked: Instant, wait: Duration) {
        if asked.elapsed() > wait + STALL_SLACK {
            self.woke.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// After a failed write: whether the peer explained itself before the link went down (an
    /// `error` or `taken-over` it sent just before closing), waiting at most `wait`.
    pub fn last_words(&mut self, wait: Duration) -> Option<Control> {
        let deadline = Instant::now() + wait;
        loop {
            match self.recv(deadline.saturating_duration_since(Instant::now())) {
                Ok(Incoming::Control(c @ (Control::Error { .. } | Control::TakenOver { .. }))) => return Some(c),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Whether the peer has been silent for more than `timeout`: heartbeats count as speech,
    /// and a silence right after this process itself stalled (stopped, not scheduled) is not
    /// judged until the reader thread has had [`WAKE_GRACE`] to take in what arrived meanwhile.
    pub fn peer_silent(&self, timeout: Duration) -> bool {
        let woke = Duration::from_millis(self.woke.load(Ordering::Relaxed));
        self.silent_for() > timeout && self.origin.elapsed().saturating_sub(woke) > WAKE_GRACE
    }

    /// How long the peer has been silent (heartbeats count as speech).
    pub fn silent_for(&self) -> Duration {
        self.origin.elapsed().saturating_sub(Duration::from_millis(self.last_heard.load(Ordering::Relaxed)))
    }

    /// Stops the heartbeat and closes the connection.
    pub fn close(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.up.store(false, Ordering::Relaxed);
        self.chan.shutdown();
    }
}

impl<W: Write + Send + 'static> Drop for Link<W> {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    /// Two ends of a link over a socket pair, with heartbeats every `beat_ms`.
    fn pair(beat_ms: u64) -> (Link<Channel>, Link<Channel>) {
        let (a, b) = UnixStream::pair().unwrap();
        let end = |s: UnixStream| {
            let chan = Channel::paired(s).unwrap();
            let w = StreamWriter::new(chan.try_clone().unwrap()).unwrap();
            let peer_reader = chan.try_clone().unwrap();
            (chan, w, peer_reader)
        };
        let (ca, wa, ra) = end(a);
        let (cb, wb, rb) = end(b);
        // Each side's writer starts its stream (the header) at once, so the readers can start.
        let la = Link::new(StreamReader::new(ra).unwrap(), wa, ca, Arc::new(AtomicU64::new(beat_ms)));
        let lb = Link::new(StreamReader::new(rb).unwrap(), wb, cb, Arc::new(AtomicU64::new(beat_ms)));
        (la, lb)
    }

    #[test]
    fn messages_pass_and_heartbeats_keep_the_peer_heard() {
        let (mut a, b) = pair(20);
        b.send(&Control::CheckpointReply { seq: 7 }).unwrap();
        match a.recv(Duration::from_secs(2)) {
            Ok(Incoming::Control(Control::CheckpointReply { seq: 7 })) => {}
            other => panic!("{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(300));
        // Heartbeats are consumed by the link, never delivered, but they count as speech.
        assert!(matches!(a.recv(Duration::from_millis(50)), Err(Silence::Timeout)));
        assert!(a.silent_for() < Duration::from_millis(150), "heard recently: {:?}", a.silent_for());
    }

    #[test]
    fn silence_is_not_judged_right_after_this_side_stalled() {
        // Heartbeats every 10 s: after the headers the peer says nothing.
        let (mut a, _b) = pair(10_000);
        let limit = Duration::from_millis(150);
        // (Longer than the grace too: the link's start counts as a wake-up.)
        std::thread::sleep(WAKE_GRACE + Duration::from_millis(100));
        assert!(a.peer_silent(limit), "silent for {:?}", a.silent_for());
        // This side wakes from a stall (as the heartbeat thread or recv notice an overrun):
        // the peer's messages may still wait in the socket, so no verdict yet...
        a.woke.store(a.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
        assert!(!a.peer_silent(limit));
        // ...until the reader had its grace.
        assert!(matches!(a.recv(WAKE_GRACE + Duration::from_millis(20)), Err(Silence::Timeout)));
        assert!(a.peer_silent(limit));
    }

    #[test]
    fn an_overrun_wait_for_something_else_is_a_stall_too() {
        let (a, _b) = pair(10_000);
        let limit = Duration::from_millis(150);
        std::thread::sleep(WAKE_GRACE + Duration::from_millis(100));
        assert!(a.peer_silent(limit));
        // A wait that kept its time says nothing about this side.
        let asked = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        a.note_wait(asked, Duration::from_millis(100));
        assert!(a.peer_silent(limit));
        // One that overran (this process was stopped during it) holds the verdict back.
        let asked = Instant::now();
        std::thread::sleep(STALL_SLACK + Duration::from_millis(40));
        a.note_wait(asked, Duration::from_millis(20));
        assert!(!a.peer_silent(limit));
    }

    #[test]
    fn a_closed_peer_is_reported_as_closed_and_stays_so() {
        let (mut a, b) = pair(1000);
        b.close();
        drop(b);
        match a.recv(Duration::from_secs(2)) {
            Err(Silence::Closed(_)) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(a.recv(Duration::ZERO), Err(Silence::Closed(_))), "sticky");
    }

    #[test]
    fn garbage_is_reported_as_corrupt_not_as_a_closed_link() {
        let (s, peer) = UnixStream::pair().unwrap();
        let chan = Channel::paired(s).unwrap();
        let w = StreamWriter::new(chan.try_clone().unwrap()).unwrap();
        // The peer writes a valid stream header and a heartbeat, then a record with a flipped byte.
        let mut pw = StreamWriter::new(Vec::new()).unwrap();
        pw.record(Kind::Control, br#"{"type":"heartbeat"}"#).unwrap();
        let mut bytes = pw.finish().unwrap();
        let last = bytes.len() - 30;
        bytes[last] ^= 0xff;
        let reader_side = std::thread::spawn(move || {
            use std::io::Write as _;
            let mut p = peer;
            p.write_all(&bytes).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        });
        let mut link =
            Link::new(StreamReader::new(chan.try_clone().unwrap()).unwrap(), w, chan, Arc::new(AtomicU64::new(1000)));
        match link.recv(Duration::from_secs(2)) {
            Err(Silence::Corrupt(why)) => assert!(why.contains("checksum") || why.contains("corrupt"), "{why}"),
            other => panic!("{other:?}"),
        }
        reader_side.join().unwrap();
    }

    #[test]
    fn last_words_find_an_error_sent_before_closing() {
        let (mut a, b) = pair(1000);
        b.send(&Control::Heartbeat).unwrap();
        b.send(&Control::Error { message: "bye".into() }).unwrap();
        b.close();
        assert_eq!(a.last_words(Duration::from_secs(1)), Some(Control::Error { message: "bye".into() }));
        let (mut c, d) = pair(1000);
        d.close();
        assert_eq!(c.last_words(Duration::from_millis(200)), None, "nothing said");
    }

    #[test]
    fn queued_messages_leave_with_the_next_flush_in_order() {
        // Heartbeats every 10 s: none flushes the queue meanwhile.
        let (mut a, b) = pair(10_000);
        b.queue(&Control::VmstateSend { seq: 3 }).unwrap();
        b.with_writer_queued(|w| w.pages([(0x2000, &[7u8; 4096][..])])).unwrap();
        assert!(matches!(a.recv(Duration::from_millis(200)), Err(Silence::Timeout)), "nothing before the flush");
        let size = Control::VmstateSize { seq: 3, pages: 1, blocks: 0, rx_marks: vec![] };
        b.send_state_then(b"state", &size).unwrap();
        match a.recv(Duration::from_secs(2)) {
            Ok(Incoming::Control(Control::VmstateSend { seq: 3 })) => {}
            other => panic!("{other:?}"),
        }
        match a.recv(Duration::from_secs(2)) {
            Ok(Incoming::Pages(p)) => assert_eq!(p.len(), 4 + 8 + 4096),
            other => panic!("{other:?}"),
        }
        match a.recv(Duration::from_secs(2)) {
            Ok(Incoming::State(st)) => assert_eq!(st, b"state"),
            other => panic!("{other:?}"),
        }
        match a.recv(Duration::from_secs(2)) {
            Ok(Incoming::Control(c)) => assert_eq!(c, size),
            other => panic!("{other:?}"),
        }
    }
}
