//! The guest's workloads, chosen by `app=`: network services (echo, http, counter, top) on
//! smoltcp sockets, and local loads (burn: CPU, dirty: memory).

pub mod burn;
pub mod counter;
pub mod dirty;
pub mod echo;
pub mod http;
mod pool;
pub mod top;

use smoltcp::iface::SocketSet;
use smoltcp::time::Instant;

use colo_guest::cmdline::Config;
use colo_guest::stats::Stats;

use self::burn::Burn;
use self::counter::Counter;
use self::dirty::Dirty;
use self::echo::Echo;
use self::http::Http;
use self::top::Top;

/// The running services.
#[derive(Default)]
pub struct Services {
    echo: Option<Echo>,
    http: Option<Http>,
    counter: Option<Counter>,
    top: Option<Top>,
    burn: Option<Burn>,
    dirty: Option<Dirty>,
}

impl Services {
    /// Starts the network services `config` asks for, each printing its `listening` line.
    pub fn start_network(&mut self, config: &Config, sockets: &mut SocketSet<'static>) -> Result<(), &'static str> {
        if config.apps.echo {
            self.echo = Some(Echo::start(sockets)?);
            status!("listening echo tcp/{}", echo::PORT);
            status!("listening echo udp/{}", echo::PORT);
        }
        if config.apps.http {
            self.http = Some(Http::start(sockets)?);
            status!("listening http tcp/{}", http::PORT);
        }
        if config.apps.counter {
            self.counter = Some(Counter::start(sockets)?);
            status!("listening counter tcp/{}", counter::PORT);
        }
        if config.apps.top {
            self.top = Some(Top::start(sockets, config.top_ms)?);
            status!("listening top tcp/{}", top::PORT);
        }
        Ok(())
    }

    /// Starts the CPU burner.
    pub fn start_burn(&mut self) {
        self.burn = Some(Burn::new());
        status!("running burn");
    }

    /// Starts the memory dirtier.
    pub fn start_dirty(&mut self, dirty: Dirty, rate: u64, region_mib: u32) {
        self.dirty = Some(dirty);
        status!("running dirty pages_per_sec={rate} region_mib={region_mib}");
    }

    /// Serves the network services' sockets.
    pub fn poll_network(&mut self, now: Instant, sockets: &mut SocketSet<'static>, stats: &mut Stats) {
        if let Some(echo) = &mut self.echo {
            echo.poll(sockets, stats);
        }
        if let Some(counter) = &mut self.counter {
            counter.poll(sockets, stats);
        }
        if let Some(top) = &mut self.top {
            top.poll(now, sockets, stats);
        }
        // Last, so /stats shows this pass's counters.
        if let Some(http) = &mut self.http {
            http.poll(sockets, stats);
        }
    }

    /// Runs the local loads that are due (the dirtier) and updates their counters.
    pub fn poll_local(&mut self, now: Instant, stats: &mut Stats) {
        if let Some(dirty) = &mut self.dirty {
            dirty.poll(now);
            stats.dirty_pages = dirty.written();
        }
        if let Some(burn) = &self.burn {
            stats.burn_iterations = burn.iterations();
        }
    }

    /// Whether the CPU burner runs (then the guest never halts).
    pub fn burning(&self) -> bool {
        self.burn.is_some()
    }

    /// Runs one burn slice, ending early when `interrupted` says there is work.
    pub fn burn(&mut self, interrupted: impl FnMut() -> bool) {
        if let Some(burn) = &mut self.burn {
            burn.run(interrupted);
        }
    }

    /// The earliest time a service needs to run again without outside events.
    pub fn deadline(&self) -> Option<Instant> {
        let top = self.top.as_ref().and_then(Top::deadline);
        let dirty = self.dirty.as_ref().and_then(Dirty::deadline);
        earliest(top, dirty)
    }
}

/// The earlier of two optional instants.
pub fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}
