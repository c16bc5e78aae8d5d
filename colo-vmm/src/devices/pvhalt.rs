//! The paravirtual halt: a halted vCPU sleeps in epoll until a device has news for the guest
//! (a virtqueue's call eventfd), its deadline passes, or the VMM kicks it (pause, quit).
//! An idle VM therefore costs no CPU.
//!
//! Each vCPU has its own waiter (its own kick), and every waiter watches every device eventfd
//! with `EPOLLEXCLUSIVE`: a device's signal wakes one halted vCPU, as an interrupt is delivered
//! to one CPU, not all of them.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use colo_vmm_abi::HALT_FOREVER;

/// Why a halt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A device signalled.
    Device,
    /// The deadline passed.
    Timeout,
    /// The VMM kicked the vCPU.
    Kick,
}

const KICK: u64 = u64::MAX;

/// The set of things a halted vCPU waits for.
pub struct Waiter {
    epoll: Epoll,
    kick: EventFd,
    sources: Vec<RawFd>,
}

impl Waiter {
    /// A waiter with only the kick eventfd.
    pub fn new() -> io::Result<Waiter> {
        let epoll = Epoll::new()?;
        let kick = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(ControlOperation::Add, kick.as_raw_fd(), EpollEvent::new(EventSet::IN, KICK))?;
        Ok(Waiter { epoll, kick, sources: vec![] })
    }

    /// An eventfd the VMM writes to end a halt (cloned for other threads).
    pub fn kicker(&self) -> io::Result<EventFd> {
        self.kick.try_clone()
    }

    /// Adds a device eventfd (it must stay open while registered); of the vCPUs halted on it,
    /// one wakes.
    pub fn add_source(&mut self, fd: RawFd) -> io::Result<()> {
        let i = self.sources.len() as u64;
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN | EventSet::EXCLUSIVE, i))?;
        self.sources.push(fd);
        Ok(())
    }

    /// Sleeps until something happens or `timeout_us` passes. Drains whatever fired, so the
    /// next halt does not return at once for the same event; the guest re-checks its devices.
    pub fn wait(&self, timeout_us: u32) -> io::Result<Wake> {
        let timeout_ms = if timeout_us == HALT_FOREVER {
            -1
        } else {
            // Round up: waking a little late is harmless, early means a useless round trip.
            Duration::from_micros(u64::from(timeout_us)).as_millis().min(i32::MAX as u128) as i32
                + i32::from(!timeout_us.is_multiple_of(1000))
        };
        let mut events = [EpollEvent::default(); 8];
        let n = loop {
            match self.epoll.wait(timeout_ms, &mut events) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Ok(Wake::Timeout);
        }
        let mut wake = Wake::Device;
        for ev in &events[..n] {
            if ev.data() == KICK {
                let _ = self.kick.read();
                wake = Wake::Kick;
            } else if let Some(&fd) = self.sources.get(ev.data() as usize) {
                drain_eventfd(fd);
            }
        }
        Ok(wake)
    }
}

/// Resets an eventfd's counter (non-blocking descriptors only; errors mean "nothing to read").
fn drain_eventfd(fd: RawFd) {
    let mut buf = [0u8; 8];
    // SAFETY: reading 8 bytes into a local buffer from a descriptor we keep open.
    unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 8) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn wakes_on_device_kick_and_timeout() {
        let mut w = Waiter::new().unwrap();
        let dev = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        w.add_source(dev.as_raw_fd()).unwrap();
        let t = Instant::now();
        assert_eq!(w.wait(20_000).unwrap(), Wake::Timeout);
        assert!(t.elapsed() >= Duration::from_millis(20));
        dev.write(1).unwrap();
        assert_eq!(w.wait(HALT_FOREVER).unwrap(), Wake::Device);
        assert_eq!(w.wait(1000).unwrap(), Wake::Timeout, "the device event was drained");
        w.kicker().unwrap().write(1).unwrap();
        assert_eq!(w.wait(HALT_FOREVER).unwrap(), Wake::Kick);
    }

    #[test]
    fn a_device_signal_wakes_one_of_the_halted_waiters() {
        let dev = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let woke = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let mut w = Waiter::new().unwrap();
                w.add_source(dev.as_raw_fd()).unwrap();
                let woke = woke.clone();
                std::thread::spawn(move || {
                    if w.wait(1_500_000).unwrap() == Wake::Device {
                        woke.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        dev.write(1).unwrap();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(woke.load(std::sync::atomic::Ordering::SeqCst), 1, "one waiter took the signal");
    }
}
