//! The vhost-user backend of one VM connection ([`VhostUserBackendMut`]).
//!
//! The daemon runs one worker thread for both queues; it calls [`NetBackend::handle_event`]
//! for kicks on the RX and TX queues, once for each queue when it starts (vhost-user-backend
//! 0.24), and for the port's own eventfds: frames waiting for RX, and TX to retry after
//! backpressure or a yielded turn. Every ring access happens under that vring's lock and only
//! while the ring is enabled and started: custom events keep arriving while the frontend has a
//! ring stopped (GET_VRING_BASE) or disabled, and the ring must not be touched then.
//!
//! Nothing a guest does makes `handle_event` fail: an error there would end the worker thread
//! and with it the VM's networking. Guest faults are counted and logged (rate-limited).

use std::io;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::chain::BadChain;
use crate::device::{self, NetConfig, MAX_QUEUE_SIZE, NUM_QUEUES, RX_QUEUE, TX_QUEUE};
use crate::exit_event::ExitEvents;
use crate::port::{self, Port, RX_PENDING_EVENT, TX_RETRY_EVENT};
use crate::ratelimit::RateLimit;
use crate::router::Router;
use crate::stats::add;
use crate::{rx, tx};

/// Guest memory as the backend maps it: with the replaceable dirty-log bitmap, so every write
/// through vm-memory marks its pages in the log the frontend hands over (SET_LOG_BASE).
pub type Mem = GuestMemoryMmap<BitmapMmapRegion>;
/// The memory handle shared with the daemon (replaced on SET_MEM_TABLE).
pub type MemAtomic = GuestMemoryAtomic<Mem>;
/// A vring of this backend.
pub type Vring = VringRwLock<MemAtomic>;

/// One VM connection's device.
pub struct NetBackend {
    hub: Arc<dyn Router>,
    port: Arc<Port>,
    mem: MemAtomic,
    config: NetConfig,
    acked: u64,
    refused_log: RateLimit,
    ring_error_log: RateLimit,
    /// The workers' exit events; closed when the daemon has dropped this backend.
    exit_events: ExitEvents,
}

impl NetBackend {
    /// A device for `port`, routing through `hub`, initially seeing `mem` (the daemon's memory
    /// handle, so both always agree).
    pub fn new(hub: Arc<dyn Router>, port: Arc<Port>, mem: MemAtomic, config: NetConfig) -> NetBackend {
        NetBackend {
            hub,
            port,
            mem,
            config,
            acked: 0,
            refused_log: RateLimit::default(),
            ring_error_log: RateLimit::default(),
            exit_events: ExitEvents::new(),
        }
    }

    fn rx(&mut self, vring: &Vring) {
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return; // frames stay pending until the ring runs
        }
        let mem = self.mem.memory();
        if !state.get_queue().is_valid(&*mem) {
            self.ring_error("rx", &"ring addresses outside guest memory or misaligned");
            return;
        }
        let (hdr_len, mrg) = (device::header_len(self.acked), device::mrg_rxbuf(self.acked));
        let (hub, port, log) = (&self.hub, &self.port, &mut self.refused_log);
        let result = rx::process(state.get_queue_mut(), &mem, hdr_len, mrg, port, |why| {
            port.stats.rx_refused(why);
            refused(hub.as_ref(), port, log, "rx", why);
        });
        match result {
            Ok(out) => {
                if out.used {
                    notify_guest(&mut state);
                }
            }
            Err(e) => {
                drop(state);
                self.ring_error("rx", &e);
            }
        }
    }

    fn tx(&mut self, vring: &Vring) {
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return;
        }
        let mem = self.mem.memory();
        if !state.get_queue().is_valid(&*mem) {
            self.ring_error("tx", &"ring addresses outside guest memory or misaligned");
            return;
        }
        let hdr_len = device::header_len(self.acked);
        let (hub, port, log) = (&self.hub, &self.port, &mut self.refused_log);
        let result = tx::process(
            state.get_queue_mut(),
            &mem,
            hdr_len,
            port,
            |frame| hub.transmit(port, frame),
            |why| {
                port.stats.tx_refused(why);
                refused(hub.as_ref(), port, log, "tx", why);
            },
        );
        match result {
            Ok(out) => {
                if out.used {
                    notify_guest(&mut state);
                }
                if out.budget_exhausted {
                    self.port.retry_tx();
                }
            }
            Err(e) => {
                drop(state);
                self.ring_error("tx", &e);
            }
        }
    }

    fn ring_error(&mut self, queue: &str, e: &dyn std::fmt::Display) {
        add(&self.port.stats.ring_errors, 1);
        if let Some(suppressed) = self.ring_error_log.check() {
            tracing::warn!(vm = self.port.role().name(), queue, error = %e, suppressed, "guest ring unusable");
        }
    }
}

/// Counts and (rate-limited) logs a refused chain.
fn refused(hub: &dyn Router, port: &Port, log: &mut RateLimit, queue: &str, why: &BadChain) {
    hub.count_rejected();
    if let Some(suppressed) = log.check() {
        tracing::warn!(vm = port.role().name(), queue, reason = %why, suppressed, "refused a descriptor chain");
    }
}

/// Interrupts the guest if its event index (or the absence of one) asks for it.
fn notify_guest(state: &mut vhost_user_backend::VringState<MemAtomic>) {
    // An unreadable used_event means a broken ring: interrupt, the guest will sort it out.
    if state.needs_notification().unwrap_or(true) {
        if let Err(e) = state.signal_used_queue() {
            tracing::warn!(error = %e, "cannot signal the guest");
        }
    }
}

impl VhostUserBackendMut for NetBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        device::features()
    }

    fn acked_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        device::protocol_features()
    }

    fn reset_device(&mut self) {
        self.acked = 0;
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The vrings apply it themselves (needs_notification / enable_notification).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        device::read_config(&self.config, offset, size)
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // The MAC is only writable with CTRL_MAC_ADDR (not offered); status is read-only.
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "the virtio-net config space is read-only"))
    }

    fn update_memory(&mut self, mem: MemAtomic) -> io::Result<()> {
        // A restart of the receive ring is told by the relay (its SET_VRING_KICK, see
        // `frontend_shim::started_ring`), not by the memory table: a frontend restarting the
        // rings over the same memory does not send one.
        self.mem = mem;
        Ok(())
    }

    fn stop_vring(&mut self, queue_index: u32) -> io::Result<()> {
        if queue_index as usize == RX_QUEUE {
            self.port.set_rx_stopped(true);
            self.hub.rx_stopped(&self.port);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker owns both rings: RX injection and TX compare of one VM never contend for
        // a vring, and two VMs plus the uplink already use the machine's cores.
        vec![(1 << RX_QUEUE) | (1 << TX_QUEUE)]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without an exit event the daemon could never stop its worker when the connection is
        // dropped, and dropping the daemon would wait forever. The library leaks the consumer;
        // `exit_events` closes it with this backend.
        match self.exit_events.lend() {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!(error = %e, "cannot create the worker's exit event");
                None
            }
        }
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        let [rx_ring, tx_ring] = vrings else {
            tracing::error!(rings = vrings.len(), "worker has an unexpected number of vrings");
            return Ok(());
        };
        match u64::from(device_event) {
            0 => self.rx(rx_ring),
            1 => self.tx(tx_ring),
            RX_PENDING_EVENT => {
                port::consume(&self.port.rx_event);
                self.rx(rx_ring);
            }
            TX_RETRY_EVENT => {
                port::consume(&self.port.tx_retry);
                self.tx(tx_ring);
            }
            other => tracing::debug!(event = other, "unexpected worker event"),
        }
        Ok(())
    }
}
