//! One VM per backend (`--vm-socket`), its role set at run time by the VM's own colo-vmm: the
//! two-host layout. The routing by role is colo-proxy's [`Replica`]; this module is its
//! transport: the VM's rings (through the [`Port`]), the tap, and the frame link to the peer
//! host's backend.
//!
//! - As **primary** the backend connects to the secondary's backend (`role` with `peer`),
//!   mirrors every frame from the tap to it, numbered, and compares its own VM's output with
//!   what the secondary's VM sent back; it releases only under the link's lease.
//! - As **secondary** it accepts the primary's link on `--peer-listen`, feeds the mirrored
//!   frames to its VM through the rewriter, sends its VM's output back (within the link's
//!   credit: without credit the frames stay on the VM's TX ring), and sends nothing to its tap.
//! - As **alone** it is a passthrough; coming from secondary (a takeover), it announces the VM
//!   on the LAN.
//!
//! Checkpoints across hosts: the primary's colo-vmm asks for the **mark** (`query-rx-mark`, the
//! number of the first inbound frame its paused VM has not taken) and carries it in the
//! checkpoint; the secondary's colo-vmm hands it to its backend (`resync`) when it holds the
//! whole checkpoint and its VM is about to load it, and the VM's inbound queue becomes the
//! frames from the mark on — the two-host form of [`crate::hub::Hub::secondary_rx_restarting`].
//! The backend also sends `loading` to the primary's, which pairs it with its flush, so the
//! secondary's output before the checkpoint is never compared with the primary's after it.
//!
//! Lock order: a vring lock (a worker), then `inner`, then the port table, then a port's
//! pending queue. The link's reader thread and the listener take `inner` only.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use colo_proxy::capture::Capture;
use colo_proxy::compare::{Config, Disposal, Miscompare, Mode, Push};
use colo_proxy::control::{Command, ControlHandle, Event, PeerState};
use colo_proxy::link::{self, FrameLink, FrameLinkConfig, FrameLinkWatch, LinkConn, LinkKey, PeerEvent};
use colo_proxy::replica::{Replica, ReplicaOutput, Role};
use colo_proxy::{announce, Frame, MonotonicClock, Side};

use crate::device::{MacAddr, VNET_HDR_LEN};
use crate::lock::lock;
use crate::port::Port;
use crate::ratelimit::RateLimit;
use crate::router::{Router, Transmit};
use crate::tap::Tap;

/// How long connecting the frame link to the secondary may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The lease when the controller gives none (ms).
pub const DEFAULT_LEASE_MS: u64 = 500;
/// Shortest and longest lease a controller may ask for (ms).
pub const LEASE_MS_RANGE: std::ops::RangeInclusive<u64> = 20..=60_000;

/// The role, readable without the lock (for the `hello` built on the control socket's thread).
#[derive(Debug)]
pub struct SharedRole(AtomicU8);

impl Default for SharedRole {
    /// No role yet.
    fn default() -> SharedRole {
        SharedRole(AtomicU8::new(0))
    }
}

impl SharedRole {
    /// The role.
    pub fn get(&self) -> Role {
        match self.0.load(Ordering::SeqCst) {
            1 => Role::Alone,
            2 => Role::Primary,
            3 => Role::Secondary,
            _ => Role::Unset,
        }
    }

    fn set(&self, role: Role) {
        let code = match role {
            Role::Unset => 0,
            Role::Alone => 1,
            Role::Primary => 2,
            Role::Secondary => 3,
        };
        self.0.store(code, Ordering::SeqCst);
    }
}

/// What the backend knows at start.
pub struct ReplicaSetup {
    /// The tap.
    pub tap: Arc<Tap>,
    /// The NIC's name in control events.
    pub nic: String,
    /// The VM's MAC (for the announcement).
    pub mac: MacAddr,
    /// The compare engine's configuration (as primary).
    pub config: Config,
    /// The link key (`None`: plain links).
    pub key: Option<LinkKey>,
    /// The capture of miscompared frames (as primary).
    pub capture: Option<Capture>,
    /// The control socket, for events.
    pub control: Option<ControlHandle>,
    /// The role as the control socket's `hello` shows it.
    pub role: Arc<SharedRole>,
}

/// The state behind the lock.
struct Inner {
    core: Replica<MonotonicClock>,
    link: Option<FrameLink>,
    /// Bumped whenever the link is replaced, so events of an old link are ignored.
    link_gen: u64,
    lease: Duration,
    capture: Option<Capture>,
    captured: u64,
    tap_errors: u64,
    tap_error_log: RateLimit,
}

/// The router of a one-VM backend.
pub struct ReplicaRouter {
    tap: Arc<Tap>,
    nic: String,
    mac: MacAddr,
    key: Option<LinkKey>,
    control: Option<ControlHandle>,
    role: Arc<SharedRole>,
    inner: Mutex<Inner>,
    port: Mutex<Option<Arc<Port>>>,
    me: Weak<ReplicaRouter>,
    unrouted: AtomicU64,
}

/// The transport as the replica sees it, for one operation under the lock.
struct Out<'a> {
    tap: &'a Tap,
    link: Option<&'a FrameLink>,
    lease: Duration,
    port: Option<&'a Arc<Port>>,
    capture: Option<&'a mut Capture>,
    tap_errors: &'a mut u64,
    tap_error_log: &'a mut RateLimit,
    unrouted: &'a AtomicU64,
    miscompares: Vec<Miscompare>,
    queued_rx: bool,
}

impl ReplicaOutput for Out<'_> {
    fn to_lan(&mut self, frame: Frame) {
        if let Err(e) = self.tap.write(&frame.data) {
            *self.tap_errors += 1;
            if let Some(suppressed) = self.tap_error_log.check() {
                tracing::warn!(tap = self.tap.name(), error = %e, suppressed, "cannot write a frame to the tap");
            }
        }
    }

    fn to_local(&mut self, frame: Frame, seq: Option<u64>) {
        match self.port {
            Some(port) => {
                port.queue_rx_numbered(frame, seq);
                self.queued_rx = true;
            }
            None => {
                self.unrouted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn mirror(&mut self, seq: u64, frame: &Frame) -> bool {
        self.link.is_some_and(|l| l.send_inbound(seq, frame.ethernet()))
    }

    fn peer_has_room(&self, len: usize) -> bool {
        self.link.is_some_and(|l| l.has_credit(len))
    }

    fn to_peer(&mut self, frame: Frame) {
        if let Some(l) = self.link {
            // Credit was checked under the same lock; the queue is larger than the window.
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
        self.miscompares.push(event.clone());
    }
}

/// A frame from the link as the VM (and the engine) get it: behind a zeroed vnet header.
fn from_wire(ethernet: Vec<u8>) -> Frame {
    let mut data = vec![0u8; VNET_HDR_LEN];
    data.extend_from_slice(&ethernet);
    Frame::with_vnet_hdr(data, VNET_HDR_LEN)
}

impl ReplicaRouter {
    /// A router with no role yet: nothing passes until the VM's colo-vmm sets one.
    pub fn new(setup: ReplicaSetup) -> Arc<ReplicaRouter> {
        let ReplicaSetup { tap, nic, mac, config, key, capture, control, role } = setup;
        Arc::new_cyclic(|me| ReplicaRouter {
            tap,
            nic,
            mac,
            key,
            control,
            role,
            inner: Mutex::new(Inner {
                core: Replica::new(config, MonotonicClock::new()),
                link: None,
                link_gen: 0,
                lease: Duration::from_millis(DEFAULT_LEASE_MS),
                capture,
                captured: 0,
                tap_errors: 0,
                tap_error_log: RateLimit::default(),
            }),
            port: Mutex::new(None),
            me: me.clone(),
            unrouted: AtomicU64::new(0),
        })
    }

    /// Runs `op` on the replica with the transport, then carries out the consequences: events
    /// for the controllers, a wake-up for the VM's RX, room for blocked TX.
    fn run<R>(&self, inner: &mut Inner, op: impl FnOnce(&mut Replica<MonotonicClock>, &mut Out<'_>) -> R) -> R {
        let port = lock(&self.port).clone();
        let before = inner.core.engine().held();
        let Inner { core, link, lease, capture, tap_errors, tap_error_log, .. } = inner;
        let mut out = Out {
            tap: &self.tap,
            link: link.as_ref(),
            lease: *lease,
            port: port.as_ref(),
            capture: capture.as_mut(),
            tap_errors,
            tap_error_log,
            unrouted: &self.unrouted,
            miscompares: Vec::new(),
            queued_rx: false,
        };
        let result = op(core, &mut out);
        let (miscompares, queued_rx) = (std::mem::take(&mut out.miscompares), out.queued_rx);
        for m in &miscompares {
            self.broadcast(Event::miscompare(&self.nic, m));
        }
        if let Some(port) = &port {
            if queued_rx {
                port.notify_rx();
            }
        }
        // Room in the primary's queue: TX waiting for it may go on.
        let after = inner.core.engine().held();
        if after[0] < before[0] {
            if let Some(p) = &port {
                p.unblock_tx();
            }
        }
        self.flush_capture_locked(inner);
        result
    }

    fn broadcast(&self, event: Event) {
        if let Some(c) = &self.control {
            c.broadcast(event);
        }
    }

    fn flush_capture_locked(&self, inner: &mut Inner) {
        if let Some(c) = inner.capture.as_mut() {
            if c.frames() != inner.captured {
                inner.captured = c.frames();
                c.flush();
            }
        }
    }

    /// Replaces the frame link (or removes it); events of the old one are ignored from now.
    fn replace_link(
        &self,
        inner: &mut Inner,
        conn: Option<LinkConn<TcpStream>>,
        config: FrameLinkConfig,
    ) -> Result<(), String> {
        inner.link_gen += 1;
        if let Some(old) = inner.link.take() {
            old.close();
        }
        let Some(conn) = conn else { return Ok(()) };
        let (me, gen) = (self.me.clone(), inner.link_gen);
        let link = FrameLink::start(conn, config, move |event| {
            if let Some(router) = me.upgrade() {
                router.peer_event(gen, event);
            }
        })
        .map_err(|e| format!("cannot start the frame link: {e}"))?;
        inner.link = Some(link);
        Ok(())
    }

    /// What the frame link's reader hands over.
    fn peer_event(&self, gen: u64, event: PeerEvent) {
        let mut inner = lock(&self.inner);
        if gen != inner.link_gen {
            return;
        }
        match event {
            PeerEvent::Inbound { seq, frame } => {
                self.run(&mut inner, |core, out| core.from_peer_inbound(seq, from_wire(frame), out));
            }
            PeerEvent::Outbound(frame) => {
                self.run(&mut inner, |core, out| core.from_peer_outbound(from_wire(frame), out));
            }
            PeerEvent::Loading(mark) => {
                self.run(&mut inner, |core, out| core.from_peer_loading(mark, out));
            }
            PeerEvent::Room => {
                if let Some(p) = lock(&self.port).as_ref() {
                    p.unblock_tx();
                }
            }
            PeerEvent::Renewed => {
                let n = self.run(&mut inner, |core, out| core.release_gated(out));
                if n > 0 {
                    tracing::info!(nic = %self.nic, frames = n, "frame link lease renewed: released the frames that waited");
                }
            }
            PeerEvent::Closed(why) => {
                let role = inner.core.role();
                inner.link = None;
                tracing::warn!(nic = %self.nic, role = role.name(), reason = %why, "frame link closed");
            }
        }
    }

    /// An authenticated link arrived on `--peer-listen`: taken only as secondary.
    pub fn accept_link(&self, conn: LinkConn<TcpStream>) {
        let mut inner = lock(&self.inner);
        let role = inner.core.role();
        if role != Role::Secondary {
            tracing::warn!(nic = %self.nic, peer = %conn.peer, role = role.name(), "refused a frame link: this VM is not a secondary");
            return;
        }
        let peer = conn.peer.clone();
        match self.replace_link(&mut inner, Some(conn), FrameLinkConfig::default()) {
            Ok(()) => {
                // The SVM may have run (and been refused credit) before the link existed: the
                // new link's window is room it must hear of.
                if let Some(p) = lock(&self.port).as_ref() {
                    p.unblock_tx();
                }
                tracing::info!(nic = %self.nic, %peer, "frame link from the primary is up")
            }
            Err(e) => tracing::error!(nic = %self.nic, %peer, error = %e, "frame link from the primary failed"),
        }
    }

    /// The `role` command.
    fn set_role(&self, role: Role, peer: Option<String>, lease_ms: Option<u64>) -> Result<(), String> {
        let lease = lease_ms.unwrap_or(DEFAULT_LEASE_MS);
        if !LEASE_MS_RANGE.contains(&lease) {
            return Err(format!(
                "lease_ms {lease} is out of range ({}..={} ms)",
                LEASE_MS_RANGE.start(),
                LEASE_MS_RANGE.end()
            ));
        }
        let lease = Duration::from_millis(lease);
        if role != Role::Primary && peer.is_some() {
            return Err(format!("role {} takes no peer (only a primary connects to its secondary)", role.name()));
        }
        let conn = match role {
            Role::Primary => {
                let peer = peer.ok_or("role primary needs `peer`: the secondary backend's --peer-listen address")?;
                Some(self.connect(&peer)?)
            }
            _ => None,
        };
        let mut inner = lock(&self.inner);
        let before = inner.core.role();
        if role != Role::Primary {
            self.replace_link(&mut inner, None, FrameLinkConfig::default())?;
        }
        inner.lease = lease;
        let change = self.run(&mut inner, |core, out| core.set_role(role, out));
        // A VM blocked for credit from a peer that is gone (or for room in an engine that no
        // longer holds anything) would wait for a grant that never comes: let it try again.
        if let Some(p) = lock(&self.port).as_ref() {
            p.unblock_tx();
        }
        if let Some(conn) = conn {
            let config =
                FrameLinkConfig { ping_interval: (lease / 5).max(Duration::from_millis(5)), ..Default::default() };
            self.replace_link(&mut inner, Some(conn), config)?;
            // Frames that reached the VM's queue before the link existed must reach the
            // secondary too, numbered in the same order.
            let Inner { core, link, .. } = &mut *inner;
            if let (Some(port), Some(link)) = (lock(&self.port).clone(), link.as_ref()) {
                let n = port.number_pending(
                    || core.take_seq(),
                    |seq, f| {
                        link.send_inbound(seq, f.ethernet());
                    },
                );
                if n > 0 {
                    tracing::debug!(nic = %self.nic, frames = n, "mirrored the frames waiting for the VM");
                }
            }
        }
        self.role.set(role);
        if change.dropped > 0 {
            tracing::info!(nic = %self.nic, frames = change.dropped, "stepped down: dropped the frames held for release");
        }
        if let Some(addresses) = change.announce {
            self.announce(addresses);
        }
        tracing::info!(nic = %self.nic, from = before.name(), to = role.name(), lease_ms = lease.as_millis() as u64, "role set");
        Ok(())
    }

    /// Connects and authenticates the frame link to the secondary's backend.
    fn connect(&self, peer: &str) -> Result<LinkConn<TcpStream>, String> {
        let addr: SocketAddr = peer
            .to_socket_addrs()
            .map_err(|e| format!("peer '{peer}': {e}"))?
            .next()
            .ok_or_else(|| format!("peer '{peer}' resolves to no address"))?;
        let sock = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .map_err(|e| format!("cannot connect the frame link to {addr}: {e}"))?;
        let _ = sock.set_nodelay(true);
        link::connect(sock, self.key.as_ref(), "frames", CONNECT_TIMEOUT)
            .map_err(|e| format!("frame link to {addr}: {e}"))
    }

    /// Announces the VM on the LAN in a few rounds (a thread of its own: the rounds span half
    /// a second).
    fn announce(&self, addresses: Vec<std::net::Ipv4Addr>) {
        let (tap, mac, nic) = (self.tap.clone(), self.mac, self.nic.clone());
        let started = Instant::now();
        let spawned = std::thread::Builder::new().name("announce".into()).spawn(move || {
            for at in announce::SCHEDULE {
                std::thread::sleep(at.saturating_sub(started.elapsed()));
                for frame in announce::round(mac, &addresses) {
                    let mut data = vec![0u8; VNET_HDR_LEN];
                    data.extend_from_slice(&frame);
                    if let Err(e) = tap.write(&data) {
                        tracing::warn!(tap = tap.name(), error = %e, "cannot announce the VM");
                    }
                }
            }
            tracing::info!(%nic, rounds = announce::SCHEDULE.len(), ?addresses, "announced the VM on the LAN");
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the announcement");
        }
    }

    fn execute_command(&self, command: Command, reply: &mut dyn FnMut(Event)) {
        let error = |id: u64, message: String| Event::Error { id: Some(id), message };
        let event = match command {
            Command::Role { id, role, peer, lease_ms } => match self.set_role(role, peer, lease_ms) {
                Ok(()) => Event::RoleSet { id, role },
                Err(e) => error(id, e),
            },
            Command::QueryRxMark { id } => {
                let inner = lock(&self.inner);
                if inner.core.role() != Role::Primary {
                    error(id, format!("query-rx-mark needs the role primary (this VM is {})", inner.core.role().name()))
                } else {
                    let mark =
                        lock(&self.port).as_ref().and_then(|p| p.first_pending_seq()).unwrap_or(inner.core.next_seq());
                    Event::RxMark { id, mark }
                }
            }
            Command::Resync { id, mark } => {
                let mut inner = lock(&self.inner);
                if inner.core.role() != Role::Secondary {
                    let message = format!("resync needs the role secondary (this VM is {})", inner.core.role().name());
                    drop(inner);
                    return reply(error(id, message));
                }
                let frames = self.run(&mut inner, |core, out| core.resync(mark, out));
                let n = frames.len() as u64;
                if let Some(port) = lock(&self.port).as_ref() {
                    port.replace_pending_numbered(frames.into_iter().map(|(seq, f)| (f, Some(seq))));
                    if n > 0 {
                        port.notify_rx();
                    }
                }
                tracing::debug!(nic = %self.nic, mark, frames = n, "resync: the VM's inbound queue restarts at the primary's mark");
                Event::Resynced { id, frames: n }
            }
            Command::Checkpoint { id } => {
                let mut inner = lock(&self.inner);
                let s = self.run(&mut inner, |core, out| core.checkpoint(out));
                // Replied under the lock: a miscompare from later traffic follows the `flushed`.
                reply(Event::Flushed { id, released: s.released, dropped: s.dropped });
                return;
            }
            Command::Mode { id, mode } => {
                let mut inner = lock(&self.inner);
                let event = match self.run(&mut inner, |core, out| core.set_mode(mode, out)) {
                    Ok(()) => {
                        // A blocked VM may now pass without queueing at all.
                        if let Some(p) = lock(&self.port).as_ref() {
                            p.unblock_tx();
                        }
                        Event::ModeSet { id, mode }
                    }
                    Err(e) => error(id, e),
                };
                reply(event);
                return;
            }
            Command::QueryStats { id } => {
                let inner = lock(&self.inner);
                let mut stats = inner.core.stats();
                stats.replica = Some(inner.core.counters());
                stats.inbound_dropped += self.unrouted.load(Ordering::Relaxed);
                Event::Stats { id, stats: Box::new(stats) }
            }
        };
        reply(event);
    }
}

impl Router for ReplicaRouter {
    fn attach(&self, port: Arc<Port>) {
        *lock(&self.port) = Some(port);
        self.broadcast(Event::Peer { role: Side::Primary, state: PeerState::Connected });
    }

    fn detach(&self, port: &Arc<Port>) {
        {
            let mut slot = lock(&self.port);
            if slot.as_ref().is_some_and(|p| Arc::ptr_eq(p, port)) {
                *slot = None;
            }
        }
        self.broadcast(Event::Peer { role: Side::Primary, state: PeerState::Disconnected });
    }

    fn transmit(&self, port: &Port, frame: Frame) -> Transmit {
        let mut inner = lock(&self.inner);
        match self.run(&mut inner, |core, out| core.from_local(frame, out)) {
            Push::Accepted => Transmit::Sent,
            Push::Full(_) => {
                // Under the lock that room and credit are given under: no wake-up is lost.
                port.block_tx();
                Transmit::Full
            }
        }
    }

    fn count_rejected(&self) {
        lock(&self.inner).core.count_rejected_input();
    }

    fn rx_restarting(&self, _port: &Arc<Port>) {
        // Across hosts the secondary's queue is reset explicitly (`resync`), when its VM has
        // loaded a checkpoint; a restart alone says nothing about which.
    }

    fn inbound(&self, frames: Vec<Vec<u8>>) {
        let mut inner = lock(&self.inner);
        self.run(&mut inner, |core, out| {
            for data in frames {
                core.from_lan(crate::hub::inbound_frame(data), out);
            }
        });
    }

    fn execute(&self, command: Command, reply: &mut dyn FnMut(Event)) {
        self.execute_command(command, reply);
    }

    fn has_timers(&self) -> bool {
        true
    }

    fn poll_timers(&self) -> Option<Instant> {
        let mut inner = lock(&self.inner);
        self.run(&mut inner, |core, out| core.poll_timers(out));
        inner.core.next_deadline().map(|t| inner.core.engine().clock().instant(t))
    }

    fn mode(&self) -> Mode {
        lock(&self.inner).core.mode()
    }

    fn flush_capture(&self) {
        let mut inner = lock(&self.inner);
        self.flush_capture_locked(&mut inner);
    }

    fn unrouted(&self) -> u64 {
        self.unrouted.load(Ordering::Relaxed)
    }

    fn tap_errors(&self) -> u64 {
        lock(&self.inner).tap_errors
    }

    fn ports(&self) -> Vec<Arc<Port>> {
        lock(&self.port).iter().cloned().collect()
    }

    fn replica_state(&self) -> Option<(Role, Option<FrameLinkWatch>)> {
        let inner = lock(&self.inner);
        Some((inner.core.role(), inner.link.as_ref().map(|l| l.watch(inner.lease))))
    }

    fn hold_histogram(&self) -> Option<prometheus::Histogram> {
        Some(lock(&self.inner).core.engine().hold_histogram())
    }
}
