//! `colo-proxy run`: the whole COLO proxy on three network interfaces, in one mio loop.
//!
//! - uplink → both VM-side interfaces (the secondary's copy through the TCP rewriter; which VMs
//!   get a copy depends on the mode);
//! - primary and secondary interfaces → the compare engine;
//! - released primary frames → uplink.
//!
//! AF_PACKET cannot push back on a sender, so a full flow queue drops the frame (counted as
//! `dropped_overflow`) after requesting a checkpoint.

use std::io;
use std::time::Duration;

use anyhow::Context;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use colo_proxy::capture::Capture;
use colo_proxy::compare::{Disposal, Miscompare, Push, Sink, Verdict};
use colo_proxy::control::{Command, ControlServer, Event, Request};
use colo_proxy::metrics::CompareState;
use colo_proxy::packet_socket::PacketSocket;
use colo_proxy::proxy::Proxy;
use colo_proxy::{Frame, MonotonicClock, Side};

use crate::metrics::{earliest, LoopMetrics};
use crate::options::RunArgs;
use crate::signals::Signals;

const SIGNALS: Token = Token(0);
const UPLINK: Token = Token(1);
const PRIMARY: Token = Token(2);
const SECONDARY: Token = Token(3);
const CONTROL: Token = Token(100);

/// Frames read from one interface before the others get a turn.
const BATCH: usize = 256;

/// Where the engine's decisions go: released frames straight out of the uplink.
struct Outlet<'a> {
    uplink: &'a mut PacketSocket,
    capture: Option<&'a mut Capture>,
    events: &'a mut Vec<Miscompare>,
    tx_errors: &'a mut u64,
}

impl Sink for Outlet<'_> {
    fn frame(&mut self, frame: Frame, d: Disposal) {
        if let Some(c) = self.capture.as_deref_mut() {
            c.record(&frame, &d);
        }
        if d.verdict == Verdict::Released {
            send(self.uplink, &frame, self.tx_errors);
        }
    }
    fn miscompare(&mut self, event: &Miscompare) {
        self.events.push(event.clone());
    }
}

pub(crate) fn send(sock: &mut PacketSocket, frame: &Frame, errors: &mut u64) {
    if let Err(e) = sock.send(frame.ethernet()) {
        *errors += 1;
        if errors.is_power_of_two() {
            tracing::warn!(interface = sock.name(), error = %e, total = *errors, "send failed");
        }
    }
}

struct Run {
    poll: Poll,
    proxy: Proxy<MonotonicClock>,
    /// uplink, primary, secondary
    ifaces: [PacketSocket; 3],
    control: Option<ControlServer>,
    capture: Option<Capture>,
    events: Vec<Miscompare>,
    nic: String,
    tx_errors: u64,
    rx_errors: u64,
    metrics: Option<LoopMetrics>,
}

macro_rules! outlet {
    ($s:expr) => {
        &mut Outlet {
            uplink: &mut $s.ifaces[0],
            capture: $s.capture.as_mut(),
            events: &mut $s.events,
            tx_errors: &mut $s.tx_errors,
        }
    };
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let (Some(primary), Some(secondary)) = (&args.primary, &args.secondary) else {
        return crate::replica_cmd::run(args);
    };
    let names = [&args.uplink, primary, secondary];
    if names[0] == names[1] || names[0] == names[2] || names[1] == names[2] {
        anyhow::bail!("--uplink, --primary and --secondary must be three different interfaces");
    }
    // First, so that a --metrics address that cannot be bound stops the start at once.
    let metrics = match args.engine.metrics {
        Some(addr) => Some(LoopMetrics::start(addr)?),
        None => None,
    };
    let open = |role: &str, name: &str| PacketSocket::open(name).with_context(|| format!("--{role} {name}"));
    let ifaces = [open("uplink", &args.uplink)?, open("primary", primary)?, open("secondary", secondary)?];
    let poll = Poll::new().context("creating the event loop")?;
    let mut signals = Signals::register(poll.registry(), SIGNALS)?;
    for (iface, token) in ifaces.iter().zip([UPLINK, PRIMARY, SECONDARY]) {
        poll.registry().register(&mut SourceFd(&iface.fd()), token, Interest::READABLE)?;
    }
    let control = match &args.engine.control_socket {
        Some(path) => {
            let mut c = ControlServer::bind(path).with_context(|| format!("control socket {}", path.display()))?;
            c.register(poll.registry(), CONTROL)?;
            Some(c)
        }
        None => None,
    };
    let capture = match &args.engine.capture {
        Some(path) => Some(Capture::create(path).with_context(|| format!("capture file {}", path.display()))?),
        None => None,
    };
    let mut run = Run {
        poll,
        proxy: Proxy::new(args.engine.config(), MonotonicClock::new()),
        ifaces,
        control,
        capture,
        events: vec![],
        nic: args.engine.nic.clone().unwrap_or_else(|| args.uplink.clone()),
        tx_errors: 0,
        rx_errors: 0,
        metrics,
    };
    run.proxy.set_mode(args.engine.mode(), outlet!(run));
    tracing::info!(
        uplink = %args.uplink, primary = %primary, secondary = %secondary,
        mode = args.engine.mode().name(), "colo-proxy run: proxying"
    );
    let mut events = Events::with_capacity(64);
    // Interfaces whose socket still had frames after a batch.
    let mut busy = [false; 3];
    loop {
        let timeout = if busy.iter().any(|&b| b) {
            Some(Duration::ZERO)
        } else {
            run.proxy.next_deadline().map(|t| {
                let clock = run.proxy.engine().clock();
                clock.instant(t).saturating_duration_since(std::time::Instant::now())
            })
        };
        let timeout = earliest(timeout, run.metrics.as_ref().and_then(LoopMetrics::next_due));
        match run.poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("polling"),
        }
        for ev in events.iter() {
            match ev.token() {
                SIGNALS if signals.received() => {
                    run.shutdown();
                    return Ok(());
                }
                UPLINK => busy[0] = true,
                PRIMARY => busy[1] = true,
                SECONDARY => busy[2] = true,
                t if run.control.as_ref().is_some_and(|c| c.owns(t)) => run.handle_control(ev),
                _ => {}
            }
        }
        for (i, b) in busy.iter_mut().enumerate() {
            if *b {
                *b = run.drain(i);
            }
        }
        run.proxy.poll_timers(outlet!(run));
        run.report_events();
        if let Some(c) = run.capture.as_mut() {
            c.flush();
        }
        run.publish_metrics();
    }
}

impl Run {
    /// Leaves the counters for the metrics endpoint.
    fn publish_metrics(&mut self) {
        if let Some(m) = &mut self.metrics {
            m.offer(|| CompareState {
                nic: self.nic.clone(),
                mode: self.proxy.mode(),
                stats: self.proxy.stats(),
                role: None,
                hold: Some(self.proxy.engine().hold_histogram()),
                frame_link: None,
            });
        }
    }

    /// Reads up to a batch from interface `i`; returns whether frames remain.
    fn drain(&mut self, i: usize) -> bool {
        for _ in 0..BATCH {
            let frame = match self.ifaces[i].recv() {
                Ok(Some(bytes)) => Frame::new(bytes.to_vec()),
                Ok(None) => return false,
                Err(e) => {
                    self.rx_errors += 1;
                    if self.rx_errors.is_power_of_two() {
                        tracing::warn!(interface = self.ifaces[i].name(), error = %e, "receive failed");
                    }
                    return false;
                }
            };
            match i {
                0 => {
                    let m = self.proxy.inbound(frame);
                    if let Some(f) = m.primary {
                        send(&mut self.ifaces[1], &f, &mut self.tx_errors);
                    }
                    if let Some(f) = m.secondary {
                        send(&mut self.ifaces[2], &f, &mut self.tx_errors);
                    }
                }
                _ => {
                    let side = if i == 1 { Side::Primary } else { Side::Secondary };
                    let pushed = match side {
                        Side::Primary => self.proxy.from_primary(frame, outlet!(self)),
                        Side::Secondary => self.proxy.from_secondary(frame, outlet!(self)),
                    };
                    if let Push::Full(f) = pushed {
                        self.proxy.discard_overflow(side, f, outlet!(self));
                    }
                }
            }
        }
        true
    }

    fn handle_control(&mut self, ev: &mio::event::Event) {
        let hello = Event::Hello {
            component: "colo-proxy".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            nic: self.nic.clone(),
            mode: self.proxy.mode(),
            replica: None,
        };
        let mut requests = vec![];
        if let Some(c) = self.control.as_mut() {
            c.handle_event(self.poll.registry(), ev, &hello, &mut requests);
        }
        for Request { conn, command } in requests {
            // Frames are sent synchronously, so a flush is complete when it returns.
            let reply = match command {
                Command::Checkpoint { id } => {
                    let s = self.proxy.checkpoint(outlet!(self));
                    Event::Flushed { id, released: s.released, dropped: s.dropped }
                }
                Command::Mode { id, mode } => {
                    self.proxy.set_mode(mode, outlet!(self));
                    Event::ModeSet { id, mode }
                }
                Command::QueryStats { id } => Event::Stats { id, stats: Box::new(self.proxy.stats()) },
                other => other.refused_by_pair(),
            };
            self.report_events();
            if let Some(c) = self.control.as_mut() {
                c.reply(self.poll.registry(), conn, &reply);
            }
        }
    }

    fn report_events(&mut self) {
        for m in std::mem::take(&mut self.events) {
            let ev = Event::miscompare(&self.nic, &m);
            if let Some(c) = self.control.as_mut() {
                c.broadcast(self.poll.registry(), &ev);
            }
        }
    }

    fn shutdown(&mut self) {
        let s = self.proxy.stats();
        let r = self.proxy.rewriter_stats();
        tracing::info!(
            frames_primary = s.frames_primary,
            frames_secondary = s.frames_secondary,
            released = s.released,
            miscompares = s.miscompares.total(),
            dropped_overflow = s.dropped_overflow,
            flushes = s.flushes,
            tcp_offsets_learned = r.learned,
            tx_errors = self.tx_errors,
            "shutting down"
        );
    }
}
