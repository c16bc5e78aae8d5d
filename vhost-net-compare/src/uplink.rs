//! The uplink thread: reads frames from the tap and hands them to the [`Router`].
//!
//! A dedicated thread rather than the tap fd on a VM worker's epoll: the tap is shared by both
//! VMs and outlives every VM connection, so no VM's daemon (which is rebuilt on each
//! reconnection) can own it; the tap is drained (and unroutable frames counted) even while no
//! VM is connected; and RX rings are still written only by their own workers, through the ports'
//! pending queues, in passthrough and COLO alike. The cost is one eventfd wake-up per batch.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{ETH_HLEN, MAX_ETH_FRAME, VNET_HDR_LEN};
use crate::ratelimit::RateLimit;
use crate::router::Router;
use crate::tap::Tap;

/// Frames read per wake-up before they are handed on together (one lock, one wake per VM).
pub const BATCH: usize = 64;

/// The running uplink thread.
pub struct Uplink {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Uplink {
    /// Starts reading `tap` into `hub`.
    pub fn spawn(tap: Arc<Tap>, hub: Arc<dyn Router>) -> io::Result<Uplink> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_rx = stop.try_clone()?;
        let thread =
            std::thread::Builder::new().name("uplink".into()).spawn(move || run(&tap, hub.as_ref(), &stop_rx))?;
        Ok(Uplink { stop, thread: Some(thread) })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(tap: &Tap, hub: &dyn Router, stop: &EventFd) {
    let mut buf = vec![0u8; VNET_HDR_LEN + MAX_ETH_FRAME];
    let mut errors = RateLimit::default();
    let mut runts = 0u64;
    loop {
        let mut fds = [
            libc::pollfd { fd: tap.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "uplink cannot poll the tap");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        if fds[1].revents != 0 {
            return;
        }
        let mut frames = Vec::with_capacity(BATCH);
        while frames.len() < BATCH {
            match tap.read(&mut buf) {
                Ok(Some(n)) if n >= VNET_HDR_LEN + ETH_HLEN => frames.push(buf[..n].to_vec()),
                Ok(Some(_)) => {
                    runts += 1;
                    tracing::debug!(runts, "frame from the tap too short; dropped");
                }
                Ok(None) => break,
                Err(e) => {
                    if let Some(suppressed) = errors.check() {
                        tracing::warn!(tap = tap.name(), error = %e, suppressed, "cannot read the tap");
                    }
                    // A persistent error (interface gone) must not spin.
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
        if !frames.is_empty() {
            hub.inbound(frames);
        }
    }
}
