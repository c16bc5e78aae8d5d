//! The worker threads' exit events, and the descriptor vhost-user-backend leaks with each.
//!
//! The daemon stops a worker through the eventfd pair [`VhostUserBackend::exit_event`] returns.
//! vhost-user-backend 0.24 registers the consumer half in the worker's epoll with `into_raw_fd`
//! and never closes it: one descriptor lost per VM connection (every migration, COLO start and
//! failover), until the process runs out and stops accepting VMs.
//!
//! [`ExitEvents`] lends the library each consumer and closes it once the backend, and with it
//! the daemon and its workers, is gone. It closes a descriptor only if it still refers to the
//! eventfd it lent (checked with `kcmp` against a duplicate kept for that purpose), so a library
//! version that closes the consumer itself never makes it close someone else's descriptor.
//!
//! [`VhostUserBackend::exit_event`]: vhost_user_backend::VhostUserBackend::exit_event

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

/// `kcmp` type: compare two descriptors' open files.
const KCMP_FILE: libc::c_int = 0;

/// The exit events handed to one daemon's workers.
#[derive(Debug, Default)]
pub struct ExitEvents {
    /// Each lent consumer's descriptor, with a duplicate of it to recognise it by.
    lent: Mutex<Vec<(RawFd, OwnedFd)>>,
}

impl ExitEvents {
    /// No events lent yet.
    pub fn new() -> ExitEvents {
        ExitEvents::default()
    }

    /// A new pair for a worker (non-blocking, close-on-exec); its consumer is closed when
    /// `self` is dropped, if the library has not closed it.
    pub fn lend(&self) -> io::Result<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        // SAFETY: `consumer` owns this descriptor and is alive for the borrow.
        let witness = unsafe { BorrowedFd::borrow_raw(consumer.as_raw_fd()) }.try_clone_to_owned()?;
        self.lent.lock().unwrap_or_else(|e| e.into_inner()).push((consumer.as_raw_fd(), witness));
        Ok((consumer, notifier))
    }

    /// Descriptors lent and not yet reclaimed.
    pub fn lent(&self) -> usize {
        self.lent.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for ExitEvents {
    fn drop(&mut self) {
        let lent = std::mem::take(self.lent.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (fd, witness) in lent {
            match same_file(fd, &witness) {
                Ok(true) => {
                    // SAFETY: `fd` refers to the eventfd lent to the library (kcmp says so, and
                    // `witness` keeps that file alive, so the number cannot have been reused
                    // for it); the library dropped every reference to the number with the
                    // daemon, so this is the only owner.
                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                }
                // The library closed it (and the number may be someone else's now).
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(fd, error = %e, "cannot tell whether the worker's exit event is still open; leaving it")
                }
            }
        }
    }
}

/// Whether `fd` is open on the same open file as `witness`.
fn same_file(fd: RawFd, witness: &OwnedFd) -> io::Result<bool> {
    let pid = std::process::id() as libc::pid_t;
    // SAFETY: kcmp only compares the two descriptors' files; no memory is passed.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, fd, witness.as_raw_fd()) };
    match r {
        0 => Ok(true),
        1..=3 => Ok(false),
        _ => {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBADF) {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::IntoRawFd;

    use super::*;

    /// Whether `fd` still refers to the same file as `witness` (the test's own duplicate).
    fn still_lent(fd: RawFd, witness: &OwnedFd) -> bool {
        same_file(fd, witness).unwrap()
    }

    #[test]
    fn a_consumer_the_library_leaks_is_closed_with_the_events() {
        let events = ExitEvents::new();
        let (consumer, notifier) = events.lend().unwrap();
        // SAFETY: the consumer's descriptor is alive for the borrow.
        let mine = unsafe { BorrowedFd::borrow_raw(consumer.as_raw_fd()) }.try_clone_to_owned().unwrap();
        // What vhost-user-backend 0.24 does with it.
        let leaked = consumer.into_raw_fd();
        notifier.notify().unwrap();
        drop(notifier);
        assert_eq!(events.lent(), 1);
        assert!(still_lent(leaked, &mine));
        drop(events);
        assert!(!still_lent(leaked, &mine), "the leaked descriptor is closed");
    }

    #[test]
    fn a_consumer_the_library_closed_is_not_closed_again() {
        let events = ExitEvents::new();
        let (consumer, _notifier) = events.lend().unwrap();
        let number = consumer.into_raw_fd();
        // A library that closes the consumer, and the number going to someone else's file at
        // once: dup2 does both atomically (so no other test's descriptor is touched).
        let other = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: `number` is this test's (taken from the consumer); the result is checked.
        assert_eq!(unsafe { libc::dup2(other.as_raw_fd(), number) }, number);
        drop(events);
        // SAFETY: plain fcntl on a number; only its result is read.
        assert!(unsafe { libc::fcntl(number, libc::F_GETFD) } >= 0, "still open");
        // SAFETY: the test made this descriptor with dup2 above and owns it.
        drop(unsafe { OwnedFd::from_raw_fd(number) });
    }
}
