//! The guest's workloads, chosen by `app=`: network services (echo, http, counter, top) on
//! smoltcp sockets, which together with the stack make the network task, and local loads
//! (burn: CPU, on every vCPU; dirty: memory), each a task of its own (see `sched.rs`).

pub mod burn;
pub mod counter;
pub mod dirty;
pub mod diskdirty;
pub mod echo;
pub mod http;
pub mod kv;
mod pool;
pub mod top;

use core::sync::atomic::Ordering;

use smoltcp::iface::SocketSet;
use smoltcp::time::Instant;

use colo_guest::cmdline::Config;
use colo_guest::stats::Stats;

use self::counter::Counter;
use self::echo::Echo;
use self::http::Http;
use self::kv::Kv;
use self::top::Top;
use crate::heap;
use crate::net::Net;
use crate::sched::{earliest, System};
use crate::time;

/// The running network services.
#[derive(Default)]
pub struct NetServices {
    echo: Option<Echo>,
    http: Option<Http>,
    counter: Option<Counter>,
    top: Option<Top>,
    kv: Option<Kv>,
}

impl NetServices {
    /// Starts the network services `config` asks for, each printing its `listening` line
    /// (`kv` only with a disk).
    pub fn start(
        config: &Config,
        sockets: &mut SocketSet<'static>,
        disk: Option<&'static kv::Disk>,
    ) -> Result<NetServices, &'static str> {
        let mut s = NetServices::default();
        if config.apps.echo {
            s.echo = Some(Echo::start(sockets)?);
            status!("listening echo tcp/{}", echo::PORT);
            status!("listening echo udp/{}", echo::PORT);
        }
        if config.apps.http {
            s.http = Some(Http::start(sockets)?);
            status!("listening http tcp/{}", http::PORT);
        }
        if config.apps.counter {
            s.counter = Some(Counter::start(sockets)?);
            status!("listening counter tcp/{}", counter::PORT);
        }
        if config.apps.top {
            s.top = Some(Top::start(sockets, config.top_ms)?);
            status!("listening top tcp/{}", top::PORT);
        }
        match (config.apps.kv, disk) {
            (true, Some(disk)) => {
                s.kv = Some(Kv::start(sockets, disk)?);
                status!("listening kv tcp/{}", kv::PORT);
            }
            (true, None) => status!("no disk: kv off"),
            _ => {}
        }
        Ok(s)
    }

    /// Serves the network services' sockets.
    pub fn poll(&mut self, now: Instant, sockets: &mut SocketSet<'static>, stats: &mut Stats) {
        if let Some(echo) = &mut self.echo {
            echo.poll(sockets, stats);
        }
        if let Some(counter) = &mut self.counter {
            counter.poll(sockets, stats);
        }
        if let Some(top) = &mut self.top {
            top.poll(now, sockets, stats);
        }
        if let Some(kv) = &mut self.kv {
            kv.poll(sockets, stats);
        }
        // Last, so /stats shows this pass's counters.
        if let Some(http) = &mut self.http {
            http.poll(sockets, stats);
        }
    }

    /// The earliest time a service needs to run again without outside events (`now` while a
    /// `kv` client's `fill` or `read` goes on).
    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        let busy = self.kv.as_ref().is_some_and(Kv::busy).then_some(now);
        earliest(self.top.as_ref().and_then(Top::deadline), busy)
    }
}

/// The network task: the stack, the device, the services on its sockets, and the counters
/// `/stats` shows (refreshed on every pass from the other tasks' shared counters).
pub struct NetCore {
    net: Net,
    services: NetServices,
    stats: Stats,
}

// SAFETY: the device's rings and buffers are guest memory carved for it alone and reached only
// through this value, which the scheduler hands to one vCPU at a time.
unsafe impl Send for NetCore {}

impl NetCore {
    /// The task over a running network and its services.
    pub fn new(net: Net, services: NetServices) -> NetCore {
        NetCore { net, services, stats: Stats::default() }
    }

    /// One pass: every received frame, the services, what they send. Returns when the task
    /// next needs to run without a device signal.
    pub fn poll(&mut self, now: Instant, system: &System) -> Option<Instant> {
        let stats = &mut self.stats;
        stats.uptime_ms = now.total_millis() as u64;
        let (heap_used, heap_free) = heap::usage();
        (stats.heap_used, stats.heap_free) = (heap_used as u64, heap_free as u64);
        let counters = &system.counters;
        stats.dirty_pages = counters.dirty_pages.load(Ordering::SeqCst);
        stats.dirty_blocks = counters.dirty_blocks.load(Ordering::SeqCst);
        stats.burn_iterations = counters.burn_total();
        stats.cpus = system.cpus as u64;
        for (i, c) in counters.cpu.iter().enumerate().take(system.cpus) {
            stats.cpu_runs[i] = c.runs.load(Ordering::SeqCst);
            stats.cpu_burn[i] = c.burn.load(Ordering::SeqCst);
        }
        self.net.poll(now);
        (stats.rx_frames, stats.tx_frames, stats.rx_errors) = self.net.frame_counts();
        self.services.poll(now, &mut self.net.sockets, stats);
        self.net.transmit(now);
        let now = time::now();
        earliest(self.net.deadline(now), self.services.deadline(now))
    }

    /// Whether received frames wait (see [`Net::has_work`]).
    pub fn has_work(&mut self) -> bool {
        self.net.has_work()
    }
}
