//! `colo-proxy compare`: one mio loop over the four QEMU-style ports and the control socket.
//!
//! Inputs are read only while the engine takes their frames: a full flow queue, or released
//! output piling up because `outdev` does not read, stops reading that input (backpressure
//! reaches the sender through the socket) instead of dropping frames. Reading resumes after the
//! next flush, mode change or write.
//!
//! Per frame the loop does no system call, no allocation and no clock read: a read takes
//! whatever the socket holds (up to 256 KiB, thousands of small frames) and stamps them all
//! with one time, frame buffers come from and go back to a [`FramePool`], and released frames
//! leave in large vectored writes (see [`OutQueue`]).

use std::io::{self, Read, Write};
use std::time::Instant;

use anyhow::Context;
use mio::{Events, Interest, Poll, Token};

use colo_proxy::capture::Capture;
use colo_proxy::clock::Clock;
use colo_proxy::compare::{Disposal, Engine, Miscompare, Push, Sink, Verdict};
use colo_proxy::control::Command;
use colo_proxy::control::{ConnId, ControlServer, Event, Request};
use colo_proxy::endpoint::{Port, Stream};
use colo_proxy::frame_pool::FramePool;
use colo_proxy::framing::Decoder;
use colo_proxy::metrics::CompareState;
use colo_proxy::notify_dev::{Inbound, NotifyCodec, Outbound};
use colo_proxy::{Frame, Side};

use crate::metrics::{earliest, LoopMetrics};
use crate::options::CompareArgs;
use crate::output::OutQueue;
use crate::signals::Signals;

const SIGNALS: Token = Token(0);
const PRIMARY_IN: Token = Token(10);
const SECONDARY_IN: Token = Token(12);
const OUTDEV: Token = Token(14);
const NOTIFY_DEV: Token = Token(16);
const CONTROL: Token = Token(100);

/// Stop reading inputs while this much released output waits for `outdev`.
const OUTPUT_HIGH_WATER: usize = 16 << 20;

/// Released output written to `outdev` during an engine call once this much is queued.
const STREAM_BATCH: usize = 256 << 10;

/// Most bytes read from notify_dev per wake-up: a peer that writes without pause cannot hold
/// the loop (frames, controllers and timers wait for it otherwise).
const NOTIFY_READ_BUDGET: usize = 64 << 10;

/// Most bytes of replies queued for notify_dev (about 2000 of them). A COLO frame sends one
/// `COLO_USERSPACE_PROXY_INIT` and reads the answer; a peer past this sends without reading,
/// and is disconnected so that memory stays bounded.
const NOTIFY_MAX_PENDING: usize = 64 << 10;

/// What a non-blocking read says about the peer.
enum ReadStep {
    /// Bytes arrived; read again.
    Data,
    /// Nothing more for now.
    Drained,
    /// The peer left (EOF) or the stream failed.
    Gone,
}

impl ReadStep {
    fn of(r: io::Result<usize>) -> ReadStep {
        match r {
            Ok(0) => ReadStep::Gone,
            Ok(_) => ReadStep::Data,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ReadStep::Drained,
            Err(e) => {
                tracing::debug!(error = %e, "read failed");
                ReadStep::Gone
            }
        }
    }
}

/// One input port and its decoder.
struct Input {
    side: Side,
    port: Port,
    decoder: Decoder,
    /// A decoded frame the engine has not taken yet (its queue was full).
    pending: Option<Frame>,
    /// Reading stopped before the socket was drained (backpressure).
    stalled: bool,
}

/// The notify_dev port.
struct Notify {
    port: Port,
    codec: NotifyCodec,
    out: Vec<u8>,
}

/// Where the engine's decisions go during one call.
struct Outlet<'a> {
    queue: &'a mut OutQueue,
    pool: &'a mut FramePool,
    /// Where released frames are written as they come, while it takes them.
    outdev: Option<&'a mut Stream>,
    capture: Option<&'a mut Capture>,
    events: &'a mut Vec<Miscompare>,
}

impl Sink for Outlet<'_> {
    fn frame(&mut self, frame: Frame, d: Disposal) {
        if let Some(c) = self.capture.as_deref_mut() {
            c.record(&frame, &d);
        }
        if d.verdict != Verdict::Released {
            self.pool.recycle(frame.data);
            return;
        }
        self.queue.push(frame, self.pool);
        // A checkpoint may release every held frame at once: hand them to outdev as they come
        // rather than after the flush, a batch at a time.
        if self.queue.pending_bytes() >= STREAM_BATCH {
            if let Some(s) = self.outdev.as_deref_mut() {
                if self.queue.write_to(s, self.pool).is_err() {
                    // Left to the next write_output, which disconnects the peer.
                    self.outdev = None;
                }
            }
        }
    }
    fn miscompare(&mut self, event: &Miscompare) {
        self.events.push(event.clone());
    }
}

/// A `checkpoint` command whose `flushed` reply waits until the released frames are written.
struct PendingFlush {
    conn: ConnId,
    id: u64,
    /// Frames queued for output when the flush finished.
    target: u64,
    released: u64,
    dropped: u64,
}

struct Proxy {
    poll: Poll,
    engine: Engine,
    inputs: [Input; 2],
    outdev: Port,
    queue: OutQueue,
    /// Buffers of frames written or dropped, for the frames read next.
    pool: FramePool,
    notify: Option<Notify>,
    control: Option<ControlServer>,
    capture: Option<Capture>,
    events: Vec<Miscompare>,
    flushes: Vec<PendingFlush>,
    nic: String,
    metrics: Option<LoopMetrics>,
}

macro_rules! outlet {
    ($s:expr) => {
        &mut Outlet {
            queue: &mut $s.queue,
            pool: &mut $s.pool,
            outdev: $s.outdev.stream(),
            capture: $s.capture.as_mut(),
            events: &mut $s.events,
        }
    };
}

pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    // First, so that a --metrics address that cannot be bound stops the start at once.
    let metrics = match args.engine.metrics {
        Some(addr) => Some(LoopMetrics::start(addr)?),
        None => None,
    };
    let poll = Poll::new().context("creating the event loop")?;
    let mut signals = Signals::register(poll.registry(), SIGNALS)?;
    let registry = poll.registry();
    let open = |name, ep, token| Port::open(name, ep, registry, token).map_err(anyhow::Error::from);
    let primary = open("primary-in", args.primary_in.clone(), PRIMARY_IN)?;
    let secondary = open("secondary-in", args.secondary_in.clone(), SECONDARY_IN)?;
    let outdev = open("outdev", args.outdev.clone(), OUTDEV)?;
    let notify = match args.notify_dev.clone() {
        Some(ep) => Some(Notify {
            port: open("notify-dev", ep, NOTIFY_DEV)?,
            codec: NotifyCodec::new(args.vnet_hdr),
            out: vec![],
        }),
        None => None,
    };
    let control = match &args.engine.control_socket {
        Some(path) => {
            let mut c = ControlServer::bind(path).with_context(|| format!("control socket {}", path.display()))?;
            c.register(registry, CONTROL)?;
            Some(c)
        }
        None => None,
    };
    let capture = match &args.engine.capture {
        Some(path) => Some(Capture::create(path).with_context(|| format!("capture file {}", path.display()))?),
        None => None,
    };
    let input = |side, port| Input { side, port, decoder: Decoder::new(args.vnet_hdr), pending: None, stalled: true };
    let mut proxy = Proxy {
        engine: Engine::with_config(args.engine.config()),
        inputs: [input(Side::Primary, primary), input(Side::Secondary, secondary)],
        outdev,
        queue: OutQueue::new(args.vnet_hdr),
        pool: FramePool::new(),
        notify,
        control,
        capture,
        events: vec![],
        flushes: vec![],
        nic: args.engine.nic.clone().unwrap_or_else(|| "net0".to_string()),
        metrics,
        poll,
    };
    proxy.engine.set_mode(args.engine.mode(), outlet!(proxy));
    tracing::info!(
        primary_in = %args.primary_in, secondary_in = %args.secondary_in, outdev = %args.outdev,
        vnet_hdr = args.vnet_hdr, mode = args.engine.mode().name(), "colo-proxy compare running"
    );
    let mut events = Events::with_capacity(256);
    loop {
        let timeout = proxy.next_timeout();
        match proxy.poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("polling"),
        }
        for ev in events.iter() {
            let token = ev.token();
            if token == SIGNALS {
                if signals.received() {
                    proxy.shutdown();
                    return Ok(());
                }
            } else if proxy.control.as_ref().is_some_and(|c| c.owns(token)) {
                proxy.handle_control(ev);
            } else {
                proxy.handle_port(token);
            }
        }
        proxy.engine.poll_timeouts(outlet!(proxy));
        proxy.reconnect();
        proxy.settle();
        proxy.publish_metrics();
    }
}

impl Proxy {
    /// Leaves the counters for the metrics endpoint.
    fn publish_metrics(&mut self) {
        if let Some(m) = &mut self.metrics {
            m.offer(|| CompareState {
                nic: self.nic.clone(),
                mode: self.engine.mode(),
                stats: self.engine.stats(),
                role: None,
                hold: Some(self.engine.hold_histogram()),
                frame_link: None,
            });
        }
    }

    fn next_timeout(&self) -> Option<std::time::Duration> {
        let now = Instant::now();
        let engine = self.engine.next_deadline().map(|t| self.engine.clock().instant(t));
        let retries = self.ports().filter_map(|p| p.next_retry());
        let next = engine.into_iter().chain(retries).min().map(|at| at.saturating_duration_since(now));
        earliest(next, self.metrics.as_ref().and_then(LoopMetrics::next_due))
    }

    fn ports(&self) -> impl Iterator<Item = &Port> {
        let notify = self.notify.as_ref().map(|n| &n.port);
        [&self.inputs[0].port, &self.inputs[1].port, &self.outdev].into_iter().chain(notify)
    }

    fn handle_port(&mut self, token: Token) {
        let registry = self.poll.registry();
        for i in 0..2 {
            if self.inputs[i].port.owns(token) {
                if self.inputs[i].port.handle_event(registry, token) {
                    self.inputs[i].decoder.reset();
                }
                self.pump(i);
                return;
            }
        }
        if self.outdev.owns(token) {
            self.outdev.handle_event(registry, token);
            self.service_outdev();
            return;
        }
        if self.notify.as_ref().is_some_and(|n| n.port.owns(token)) {
            self.service_notify(token);
        }
    }

    /// Reads frames from input `i` into the engine until the socket is drained or the engine
    /// (or the output) cannot take more.
    fn pump(&mut self, i: usize) {
        let side = self.inputs[i].side;
        // Frames are stamped with the time of the read that brought them.
        let mut now = self.engine.clock().now();
        loop {
            if self.queue.pending_bytes() > OUTPUT_HIGH_WATER {
                self.inputs[i].stalled = true;
                return;
            }
            if let Some(f) = self.inputs[i].pending.take() {
                if let Push::Full(f) = self.engine.push_at(side, f, now, outlet!(self)) {
                    self.inputs[i].pending = Some(f);
                    self.inputs[i].stalled = true;
                    return;
                }
            }
            let pool = &mut self.pool;
            match self.inputs[i].decoder.next_frame_with(|b| pool.copy_of(b)) {
                Some(Ok(f)) => {
                    self.inputs[i].pending = Some(f);
                    continue;
                }
                Some(Err(e)) if e.is_fatal() => {
                    self.engine.count_rejected_input();
                    tracing::error!(port = self.inputs[i].port.name(), error = %e, "protocol error; closing the stream");
                    self.drop_input_peer(i);
                    return;
                }
                Some(Err(e)) => {
                    let total = self.engine.count_rejected_input();
                    if total.is_power_of_two() {
                        tracing::warn!(port = self.inputs[i].port.name(), error = %e, total, "frame rejected");
                    }
                    continue;
                }
                None => {}
            }
            let input = &mut self.inputs[i];
            let Some(stream) = input.port.stream() else {
                input.stalled = false;
                return;
            };
            match input.decoder.read_from(stream) {
                Ok(0) => {
                    if input.decoder.buffered() > 0 {
                        tracing::warn!(
                            port = input.port.name(),
                            bytes = input.decoder.buffered(),
                            "peer left in the middle of a frame"
                        );
                    }
                    self.drop_input_peer(i);
                    return;
                }
                Ok(_) => now = self.engine.clock().now(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    input.stalled = false;
                    return;
                }
                Err(e) => {
                    tracing::warn!(port = input.port.name(), error = %e, "read failed");
                    self.drop_input_peer(i);
                    return;
                }
            }
        }
    }

    fn drop_input_peer(&mut self, i: usize) {
        let input = &mut self.inputs[i];
        input.decoder.reset();
        // A new peer may already be there (server endpoints); read it at the next settle.
        input.stalled = input.port.disconnect(self.poll.registry());
    }

    fn service_outdev(&mut self) {
        // outdev is write-only; whatever the peer sends is discarded, EOF means it left.
        let mut scratch = [0u8; 4096];
        let mut gone = false;
        if let Some(s) = self.outdev.stream() {
            loop {
                match ReadStep::of(s.read(&mut scratch)) {
                    ReadStep::Data => {}
                    ReadStep::Drained => break,
                    ReadStep::Gone => {
                        gone = true;
                        break;
                    }
                }
            }
        }
        if gone {
            self.queue.peer_lost(&mut self.pool);
            self.outdev.disconnect(self.poll.registry());
        }
        self.write_output();
    }

    fn write_output(&mut self) {
        if let Some(s) = self.outdev.stream() {
            if let Err(e) = self.queue.write_to(s, &mut self.pool) {
                tracing::warn!(error = %e, "outdev write failed");
                self.queue.peer_lost(&mut self.pool);
                self.outdev.disconnect(self.poll.registry());
            }
        }
    }

    fn service_notify(&mut self, token: Token) {
        let registry = self.poll.registry();
        let Some(n) = self.notify.as_mut() else { return };
        if n.port.handle_event(registry, token) {
            n.codec.reset();
        }
        let mut messages = vec![];
        let mut gone = false;
        let mut budget = NOTIFY_READ_BUDGET;
        let token = n.port.stream_token();
        if let Some(s) = n.port.stream() {
            loop {
                while let Some(m) = n.codec.next_message() {
                    match m {
                        Ok(m) => messages.push(m),
                        Err(e) if e.is_fatal() => gone = true,
                        Err(e) => tracing::warn!(error = %e, "notify_dev: bad message"),
                    }
                }
                if gone {
                    break;
                }
                if budget == 0 {
                    // More may be waiting: re-arming the (edge-triggered) registration reports
                    // the stream readable again at the next poll if it still is, after the
                    // other sources have had their turn.
                    if let Err(e) = registry.reregister(s, token, Interest::READABLE | Interest::WRITABLE) {
                        tracing::warn!(error = %e, "notify_dev: cannot re-arm");
                        gone = true;
                    }
                    break;
                }
                let r = n.codec.read_from(s);
                if let Ok(k) = r {
                    budget = budget.saturating_sub(k);
                }
                match ReadStep::of(r) {
                    ReadStep::Data => {}
                    ReadStep::Drained => break,
                    ReadStep::Gone => {
                        gone = true;
                        break;
                    }
                }
            }
        }
        for m in messages {
            match m {
                Inbound::Checkpoint => {
                    let s = self.engine.flush(outlet!(self));
                    tracing::debug!(released = s.released, dropped = s.dropped, "COLO_CHECKPOINT: flushed");
                }
                Inbound::ProxyInit => {
                    if let Some(n) = self.notify.as_mut() {
                        if n.out.len() <= NOTIFY_MAX_PENDING {
                            Outbound::ProxyInitReply.encode(&mut n.out);
                        }
                    }
                }
                Inbound::Unknown(_) => {}
            }
        }
        let n = self.notify.as_mut().expect("checked above");
        if gone {
            n.codec.reset();
            n.out.clear();
            n.port.disconnect(self.poll.registry());
        }
        self.write_notify();
        // What the socket did not take now waits for the peer to read; one that sends without
        // reading is dropped before its replies pile up.
        let n = self.notify.as_mut().expect("checked above");
        if n.out.len() > NOTIFY_MAX_PENDING {
            tracing::warn!(
                pending = n.out.len(),
                "notify_dev peer sends without reading its replies; disconnecting it"
            );
            n.codec.reset();
            n.out.clear();
            n.port.disconnect(self.poll.registry());
        }
    }

    fn write_notify(&mut self) {
        let Some(n) = self.notify.as_mut() else { return };
        let Some(s) = n.port.stream() else {
            // Checkpoint requests are only meaningful to a connected peer.
            n.out.clear();
            return;
        };
        while !n.out.is_empty() {
            match s.write(&n.out) {
                Ok(k) => {
                    n.out.drain(..k);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    n.out.clear();
                    n.codec.reset();
                    n.port.disconnect(self.poll.registry());
                    return;
                }
            }
        }
    }

    fn handle_control(&mut self, ev: &mio::event::Event) {
        let hello = self.hello();
        let mut requests = vec![];
        if let Some(c) = self.control.as_mut() {
            c.handle_event(self.poll.registry(), ev, &hello, &mut requests);
        }
        for Request { conn, command } in requests {
            match command {
                Command::Checkpoint { id } => {
                    let s = self.engine.flush(outlet!(self));
                    self.flushes.push(PendingFlush {
                        conn,
                        id,
                        target: self.queue.queued,
                        released: s.released,
                        dropped: s.dropped,
                    });
                }
                Command::Mode { id, mode } => {
                    self.engine.set_mode(mode, outlet!(self));
                    self.reply(conn, &Event::ModeSet { id, mode });
                }
                Command::QueryStats { id } => {
                    let stats = self.engine.stats();
                    self.reply(conn, &Event::Stats { id, stats: Box::new(stats) });
                }
                other => self.reply(conn, &other.refused_by_pair()),
            }
        }
    }

    fn hello(&self) -> Event {
        Event::Hello {
            component: "colo-proxy".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            nic: self.nic.clone(),
            mode: self.engine.mode(),
            replica: None,
        }
    }

    fn reply(&mut self, conn: ConnId, event: &Event) {
        if let Some(c) = self.control.as_mut() {
            c.reply(self.poll.registry(), conn, event);
        }
    }

    fn reconnect(&mut self) {
        let now = Instant::now();
        let registry = self.poll.registry();
        for i in 0..2 {
            if self.inputs[i].port.poll_reconnect(registry, now) {
                self.inputs[i].decoder.reset();
                self.inputs[i].stalled = true;
            }
        }
        self.outdev.poll_reconnect(registry, now);
        if let Some(n) = self.notify.as_mut() {
            if n.port.poll_reconnect(registry, now) {
                n.codec.reset();
            }
        }
    }

    /// After a batch of events: report inconsistencies, write output, answer flushes whose
    /// frames are out, and resume inputs that waited.
    fn settle(&mut self) {
        for _ in 0..4 {
            self.report_events();
            self.write_output();
            self.write_notify();
            self.answer_flushes();
            let stalled: Vec<usize> = (0..2).filter(|&i| self.inputs[i].stalled).collect();
            if stalled.is_empty() {
                break;
            }
            let before = self.queue.queued;
            for i in stalled {
                self.pump(i);
            }
            if self.queue.queued == before && self.events.is_empty() {
                break;
            }
        }
        if let Some(c) = self.capture.as_mut() {
            c.flush();
        }
    }

    fn report_events(&mut self) {
        for m in std::mem::take(&mut self.events) {
            if let Some(n) = self.notify.as_mut() {
                if n.port.is_connected() {
                    Outbound::DoCheckpoint.encode(&mut n.out);
                }
            }
            let ev = Event::miscompare(&self.nic, &m);
            if let Some(c) = self.control.as_mut() {
                c.broadcast(self.poll.registry(), &ev);
            }
        }
    }

    fn answer_flushes(&mut self) {
        let done = self.queue.written + self.queue.lost;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.flushes).into_iter().partition(|f| done >= f.target);
        self.flushes = waiting;
        for f in ready {
            self.reply(f.conn, &Event::Flushed { id: f.id, released: f.released, dropped: f.dropped });
        }
    }

    fn shutdown(&mut self) {
        self.write_output();
        let s = self.engine.stats();
        tracing::info!(
            frames_primary = s.frames_primary,
            frames_secondary = s.frames_secondary,
            released = s.released,
            miscompares = s.miscompares.total(),
            flushes = s.flushes,
            held_primary = s.held_primary,
            unwritten = self.queue.pending_bytes(),
            "shutting down"
        );
    }
}
