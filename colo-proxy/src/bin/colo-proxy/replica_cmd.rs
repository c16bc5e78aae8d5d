//! `colo-proxy run --vm IF`: one VM's side of a protected pair on two hosts, on interfaces.
//!
//! The routing by role is the library's [`Replica`]; this is its transport on AF_PACKET
//! sockets (the uplink and the VM's interface), with the frame link to the peer host's proxy.
//! One mio loop owns everything; the frame link's reader and the listener run on their own
//! threads and hand their events over a bounded channel, waking the loop: a peer that sends
//! faster than the loop can route finds the frame link's reader waiting, and its own sends
//! held back by TCP, rather than this process's memory growing.
//!
//! Differences from vhost-net-compare's one-VM backend, both from AF_PACKET: a frame is in the
//! VM once written to its interface, so the primary's mark is always the next number (a
//! secondary's `resync` zeroes its rewriter's offsets and sends `loading`); and nothing can push back on a
//! VM, so a frame that finds a full compare queue (or no credit) is dropped and counted.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use colo_proxy::announce;
use colo_proxy::capture::Capture;
use colo_proxy::compare::{Disposal, Miscompare, Push, Stats};
use colo_proxy::control::{Command, ControlServer, Event, HelloReplica, Request};
use colo_proxy::link::{self, AuthPolicy, FrameLink, FrameLinkConfig, LinkConn, LinkKey, LinkListener, PeerEvent};
use colo_proxy::metrics::CompareState;
use colo_proxy::packet_socket::PacketSocket;
use colo_proxy::replica::{Replica, ReplicaOutput, Role};
use colo_proxy::wire::MacAddr;
use colo_proxy::{Frame, MonotonicClock};

use crate::metrics::{earliest, LoopMetrics};
use crate::options::RunArgs;
use crate::run_cmd::send;
use crate::signals::Signals;

const SIGNALS: Token = Token(0);
const UPLINK: Token = Token(1);
const VM: Token = Token(2);
const WAKER: Token = Token(3);
const CONTROL: Token = Token(100);

/// Frames read from one interface before the other gets a turn.
const BATCH: usize = 256;
/// How long connecting the frame link may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The lease when the controller gives none.
const DEFAULT_LEASE: Duration = Duration::from_millis(500);
/// Events from the link's reader and the listener waiting for the loop, at most.
const OUTSIDE_EVENTS: usize = 4096;

/// What the threads hand to the loop.
enum Outside {
    /// An event of the frame link of that generation.
    Peer(u64, PeerEvent),
    /// An authenticated link from `--peer-listen`.
    Link(LinkConn<TcpStream>),
}

/// The transport for one operation of the replica.
struct Out<'a> {
    uplink: &'a mut PacketSocket,
    vm: &'a mut PacketSocket,
    link: Option<&'a FrameLink>,
    lease: Duration,
    capture: Option<&'a mut Capture>,
    events: &'a mut Vec<Miscompare>,
    tx_errors: &'a mut u64,
}

impl ReplicaOutput for Out<'_> {
    fn to_lan(&mut self, frame: Frame) {
        send(self.uplink, &frame, self.tx_errors);
    }
    fn to_local(&mut self, frame: Frame, _seq: Option<u64>) {
        send(self.vm, &frame, self.tx_errors);
    }
    fn mirror(&mut self, seq: u64, frame: &Frame) -> bool {
        self.link.is_some_and(|l| l.send_inbound(seq, frame.ethernet()))
    }
    fn peer_has_room(&self, len: usize) -> bool {
        self.link.is_some_and(|l| l.has_credit(len))
    }
    fn to_peer(&mut self, frame: Frame) {
        if let Some(l) = self.link {
            l.send_outbound(frame.ethernet());
        }
    }
    fn loading_to_peer(&mut self, mark: u64) {
        if let Some(l) = self.link {
            l.send_loading(mark);
        }
    }

    fn grant(&mut self, bytes: usize) {
        if let Some(l) = self.link {
            l.grant(bytes);
        }
    }
    fn lease_fresh(&self) -> bool {
        self.link.is_some_and(|l| l.lease_fresh(self.lease))
    }
    fn record(&mut self, frame: &Frame, d: &Disposal) {
        if let Some(c) = self.capture.as_deref_mut() {
            c.record(frame, d);
        }
    }
    fn miscompare(&mut self, event: &Miscompare) {
        self.events.push(event.clone());
    }
}

/// Announcement rounds still to send after a takeover.
struct Announcing {
    started: Instant,
    next: usize,
    addresses: Vec<Ipv4Addr>,
}

struct ReplicaRun {
    poll: Poll,
    waker: Arc<Waker>,
    outside_tx: SyncSender<Outside>,
    outside: Receiver<Outside>,
    core: Replica<MonotonicClock>,
    uplink: PacketSocket,
    vm: PacketSocket,
    control: Option<ControlServer>,
    capture: Option<Capture>,
    events: Vec<Miscompare>,
    link: Option<FrameLink>,
    link_gen: u64,
    lease: Duration,
    key: Option<LinkKey>,
    nic: String,
    mac: Option<MacAddr>,
    peer_listen: Option<SocketAddr>,
    announcing: Option<Announcing>,
    tx_errors: u64,
    rx_errors: u64,
    dropped_full: u64,
    metrics: Option<LoopMetrics>,
}

macro_rules! out {
    ($s:expr) => {
        &mut Out {
            uplink: &mut $s.uplink,
            vm: &mut $s.vm,
            link: $s.link.as_ref(),
            lease: $s.lease,
            capture: $s.capture.as_mut(),
            events: &mut $s.events,
            tx_errors: &mut $s.tx_errors,
        }
    };
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let vm_name = args.vm.clone().expect("clap requires --primary/--secondary or --vm");
    if vm_name == args.uplink {
        anyhow::bail!("--uplink and --vm must be two different interfaces");
    }
    // First, so that a --metrics address that cannot be bound stops the start at once.
    let metrics = match args.engine.metrics {
        Some(addr) => Some(LoopMetrics::start(addr)?),
        None => None,
    };
    let key = match &args.link_key {
        Some(path) => Some(LinkKey::load(path)?),
        None => {
            tracing::warn!("no --link-key: frame links to the peer host are neither authenticated nor encrypted");
            None
        }
    };
    let mac = args.mac;
    let open = |role: &str, name: &str| PacketSocket::open(name).with_context(|| format!("--{role} {name}"));
    let (uplink, vm) = (open("uplink", &args.uplink)?, open("vm", &vm_name)?);
    let poll = Poll::new().context("creating the event loop")?;
    let mut signals = Signals::register(poll.registry(), SIGNALS)?;
    poll.registry().register(&mut SourceFd(&uplink.fd()), UPLINK, Interest::READABLE)?;
    poll.registry().register(&mut SourceFd(&vm.fd()), VM, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).context("creating the loop's waker")?);
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
    let (outside_tx, outside) = sync_channel(OUTSIDE_EVENTS);
    let _listener = match args.peer_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr).with_context(|| format!("--peer-listen {addr}"))?;
            let (tx, w) = (outside_tx.clone(), waker.clone());
            let on_link = move |conn| {
                if tx.send(Outside::Link(conn)).is_ok() {
                    let _ = w.wake();
                }
            };
            Some(LinkListener::spawn(l, AuthPolicy::new(key.clone(), "frames"), "peer-listen", on_link)?)
        }
        None => None,
    };
    let mut run = ReplicaRun {
        poll,
        waker,
        outside_tx,
        outside,
        core: Replica::new(args.engine.config(), MonotonicClock::new()),
        uplink,
        vm,
        control,
        capture,
        events: vec![],
        link: None,
        link_gen: 0,
        lease: DEFAULT_LEASE,
        key,
        nic: args.engine.nic.clone().unwrap_or_else(|| args.uplink.clone()),
        mac,
        peer_listen: args.peer_listen,
        announcing: None,
        tx_errors: 0,
        rx_errors: 0,
        dropped_full: 0,
        metrics,
    };
    tracing::info!(uplink = %args.uplink, vm = %vm_name, peer_listen = ?args.peer_listen,
        "colo-proxy run: one VM, its role set by its colo-vmm (none yet: nothing passes)");
    let mut events = Events::with_capacity(64);
    let mut busy = [false; 2];
    loop {
        let timeout = if busy.iter().any(|&b| b) { Some(Duration::ZERO) } else { run.next_wake() };
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
                VM => busy[1] = true,
                WAKER => run.outside_events(),
                t if run.control.as_ref().is_some_and(|c| c.owns(t)) => run.handle_control(ev),
                _ => {}
            }
        }
        for (i, b) in busy.iter_mut().enumerate() {
            if *b {
                *b = run.drain(i);
            }
        }
        run.core.poll_timers(out!(run));
        run.announce_due();
        run.report_events();
        if let Some(c) = run.capture.as_mut() {
            c.flush();
        }
        run.publish_metrics();
    }
}

impl ReplicaRun {
    /// The engine's counters with the routing's (`query-stats`, metrics).
    fn stats(&self) -> Stats {
        let mut stats = self.core.stats();
        stats.replica = Some(self.core.counters());
        stats.dropped_overflow += self.dropped_full;
        stats
    }

    /// Leaves the counters for the metrics endpoint (the frame link is read live).
    fn publish_metrics(&mut self) {
        let Some(mut m) = self.metrics.take() else { return };
        m.offer(|| CompareState {
            nic: self.nic.clone(),
            mode: self.core.mode(),
            stats: self.stats(),
            role: Some(self.core.role()),
            hold: Some(self.core.engine().hold_histogram()),
            frame_link: self.link.as_ref().map(|l| l.watch(self.lease)),
        });
        self.metrics = Some(m);
    }

    /// When the loop must wake without I/O: the engine's next deadline or the next announcement.
    fn next_wake(&self) -> Option<Duration> {
        let engine = self.core.next_deadline().map(|t| {
            let clock = self.core.engine().clock();
            clock.instant(t).saturating_duration_since(Instant::now())
        });
        let announce = self.announcing.as_ref().map(|a| announce::SCHEDULE[a.next].saturating_sub(a.started.elapsed()));
        let metrics = self.metrics.as_ref().and_then(LoopMetrics::next_due);
        earliest(earliest(engine, announce), metrics)
    }

    /// Reads up to a batch from the uplink (0) or the VM (1); returns whether frames remain.
    fn drain(&mut self, i: usize) -> bool {
        for _ in 0..BATCH {
            let sock = if i == 0 { &mut self.uplink } else { &mut self.vm };
            let frame = match sock.recv() {
                Ok(Some(bytes)) => Frame::new(bytes.to_vec()),
                Ok(None) => return false,
                Err(e) => {
                    self.rx_errors += 1;
                    if self.rx_errors.is_power_of_two() {
                        tracing::warn!(interface = sock.name(), error = %e, "receive failed");
                    }
                    return false;
                }
            };
            if i == 0 {
                self.core.from_lan(frame, out!(self));
            } else {
                if self.mac.is_none() && frame.ethernet().len() >= 12 {
                    // The VM's own address, for the announcement after a takeover.
                    self.mac = MacAddr::from_prefix(&frame.ethernet()[6..]);
                }
                if let Push::Full(_) = self.core.from_local(frame, out!(self)) {
                    // AF_PACKET cannot push back on the VM.
                    self.dropped_full += 1;
                }
            }
        }
        true
    }

    /// Events from the link's reader and the listener.
    fn outside_events(&mut self) {
        while let Ok(ev) = self.outside.try_recv() {
            match ev {
                Outside::Link(conn) => self.accept_link(conn),
                Outside::Peer(gen, _) if gen != self.link_gen => {}
                Outside::Peer(_, PeerEvent::Inbound { seq, frame }) => {
                    self.core.from_peer_inbound(seq, Frame::new(frame), out!(self));
                }
                Outside::Peer(_, PeerEvent::Outbound(frame)) => {
                    self.core.from_peer_outbound(Frame::new(frame), out!(self));
                }
                Outside::Peer(_, PeerEvent::Loading(mark)) => {
                    self.core.from_peer_loading(mark, out!(self));
                }
                // Credit arrived: AF_PACKET keeps no frames back, nothing waits for it.
                Outside::Peer(_, PeerEvent::Room) => {}
                Outside::Peer(_, PeerEvent::Renewed) => {
                    self.core.release_gated(out!(self));
                }
                Outside::Peer(_, PeerEvent::Closed(why)) => {
                    self.link = None;
                    tracing::warn!(nic = %self.nic, role = self.core.role().name(), reason = %why, "frame link closed");
                }
            }
        }
    }

    fn accept_link(&mut self, conn: LinkConn<TcpStream>) {
        if self.core.role() != Role::Secondary {
            tracing::warn!(peer = %conn.peer, role = self.core.role().name(), "refused a frame link: this VM is not a secondary");
            return;
        }
        let peer = conn.peer.clone();
        match self.start_link(conn, FrameLinkConfig::default()) {
            Ok(()) => tracing::info!(%peer, "frame link from the primary is up"),
            Err(e) => tracing::error!(%peer, error = %e, "frame link from the primary failed"),
        }
    }

    fn start_link(&mut self, conn: LinkConn<TcpStream>, config: FrameLinkConfig) -> anyhow::Result<()> {
        self.drop_link();
        let (tx, waker, gen) = (self.outside_tx.clone(), self.waker.clone(), self.link_gen);
        let link = FrameLink::start(conn, config, move |event| {
            if tx.send(Outside::Peer(gen, event)).is_ok() {
                let _ = waker.wake();
            }
        })?;
        self.link = Some(link);
        Ok(())
    }

    fn drop_link(&mut self) {
        self.link_gen += 1;
        if let Some(old) = self.link.take() {
            old.close();
        }
    }

    fn set_role(&mut self, role: Role, peer: Option<String>, lease_ms: Option<u64>) -> anyhow::Result<()> {
        let lease = Duration::from_millis(lease_ms.unwrap_or(DEFAULT_LEASE.as_millis() as u64));
        anyhow::ensure!(
            (20..=60_000).contains(&lease.as_millis()),
            "lease_ms {} is out of range (20..=60000 ms)",
            lease.as_millis()
        );
        anyhow::ensure!(
            role == Role::Primary || peer.is_none(),
            "role {} takes no peer (only a primary connects to its secondary)",
            role.name()
        );
        let conn = match role {
            Role::Primary => {
                let peer = peer.context("role primary needs `peer`: the secondary's --peer-listen address")?;
                let addr: SocketAddr = peer.parse().with_context(|| format!("peer '{peer}' is not HOST:PORT"))?;
                let sock = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
                    .with_context(|| format!("cannot connect the frame link to {addr}"))?;
                let _ = sock.set_nodelay(true);
                Some(
                    link::connect(sock, self.key.as_ref(), "frames", CONNECT_TIMEOUT)
                        .with_context(|| format!("frame link to {addr}"))?,
                )
            }
            _ => None,
        };
        if role != Role::Primary {
            self.drop_link();
        }
        self.lease = lease;
        let before = self.core.role();
        let change = self.core.set_role(role, out!(self));
        if let Some(conn) = conn {
            let config =
                FrameLinkConfig { ping_interval: (lease / 5).max(Duration::from_millis(5)), ..Default::default() };
            self.start_link(conn, config)?;
        }
        if let Some(addresses) = change.announce {
            self.announcing = Some(Announcing { started: Instant::now(), next: 0, addresses });
            self.announce_due();
        }
        tracing::info!(from = before.name(), to = role.name(), "role set");
        Ok(())
    }

    /// Sends the announcement rounds that are due.
    fn announce_due(&mut self) {
        let Some(a) = self.announcing.as_mut() else { return };
        let Some(mac) = self.mac else {
            tracing::warn!("cannot announce the VM: its MAC is unknown (give --mac)");
            self.announcing = None;
            return;
        };
        while a.next < announce::SCHEDULE.len() && a.started.elapsed() >= announce::SCHEDULE[a.next] {
            for f in announce::round(mac, &a.addresses) {
                send(&mut self.uplink, &Frame::new(f), &mut self.tx_errors);
            }
            a.next += 1;
        }
        if a.next == announce::SCHEDULE.len() {
            tracing::info!(rounds = a.next, addresses = ?a.addresses, "announced the VM on the LAN");
            self.announcing = None;
        }
    }

    fn hello(&self) -> Event {
        Event::Hello {
            component: "colo-proxy".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            nic: self.nic.clone(),
            mode: self.core.mode(),
            replica: Some(HelloReplica {
                role: self.core.role(),
                peer_listen: self.peer_listen.map(|a| a.to_string()),
            }),
        }
    }

    fn handle_control(&mut self, ev: &mio::event::Event) {
        let hello = self.hello();
        let mut requests = vec![];
        if let Some(c) = self.control.as_mut() {
            c.handle_event(self.poll.registry(), ev, &hello, &mut requests);
        }
        for Request { conn, command } in requests {
            let reply = self.execute(command);
            self.report_events();
            if let Some(c) = self.control.as_mut() {
                c.reply(self.poll.registry(), conn, &reply);
            }
        }
    }

    fn execute(&mut self, command: Command) -> Event {
        let error = |id: u64, message: String| Event::Error { id: Some(id), message };
        match command {
            Command::Role { id, role, peer, lease_ms } => match self.set_role(role, peer, lease_ms) {
                Ok(()) => Event::RoleSet { id, role },
                Err(e) => error(id, format!("{e:#}")),
            },
            // A frame is in the VM once written to its interface.
            Command::QueryRxMark { id } if self.core.role() == Role::Primary => {
                Event::RxMark { id, mark: self.core.next_seq() }
            }
            Command::Resync { id, mark } if self.core.role() == Role::Secondary => {
                let frames = self.core.resync(mark, out!(self)).len() as u64;
                Event::Resynced { id, frames }
            }
            Command::QueryRxMark { id } | Command::Resync { id, .. } => error(
                id,
                format!(
                    "this VM is {}: query-rx-mark is for primaries, resync for secondaries",
                    self.core.role().name()
                ),
            ),
            Command::Checkpoint { id } => {
                let s = self.core.checkpoint(out!(self));
                Event::Flushed { id, released: s.released, dropped: s.dropped }
            }
            Command::Mode { id, mode } => match self.core.set_mode(mode, out!(self)) {
                Ok(()) => Event::ModeSet { id, mode },
                Err(e) => error(id, e),
            },
            Command::QueryStats { id } => Event::Stats { id, stats: Box::new(self.stats()) },
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
        self.drop_link();
        let s = self.core.stats();
        let r = self.core.counters();
        tracing::info!(
            role = self.core.role().name(),
            frames_primary = s.frames_primary,
            frames_secondary = s.frames_secondary,
            released = s.released,
            miscompares = s.miscompares.total(),
            mirrored = r.mirrored,
            gated = r.gated,
            dropped_full = self.dropped_full,
            tx_errors = self.tx_errors,
            "shutting down"
        );
    }
}
