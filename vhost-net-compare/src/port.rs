//! One VM connection as the rest of the process sees it: its role, the inbound frames waiting
//! for its RX ring, the eventfds that wake its worker thread, and its counters.
//!
//! A port lives exactly as long as one vhost-user connection (a fresh one per connection), so a
//! reconnecting VM never receives frames queued for its predecessor, and a worker of a dead
//! connection can never be woken by the new one's events.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use colo_proxy::{Frame, Side};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::lock::lock;
use crate::stats::{add, PortStats};

/// Inbound frames kept per VM while its RX ring is full or not running; beyond this they are
/// dropped and counted (`rx_overflow`). About as much as a guest's RX ring holds.
pub const RX_PENDING_MAX: usize = 1024;

/// Data id of [`Port::rx_event`] in the worker's epoll (0..=2 are the two queues and the
/// daemon's own exit/vring-enabled slot).
pub const RX_PENDING_EVENT: u64 = 3;
/// Data id of [`Port::tx_retry`] in the worker's epoll.
pub const TX_RETRY_EVENT: u64 = 4;

/// Inbound frames waiting for the RX ring, each with its number on the frame link when it was
/// mirrored to a secondary (two hosts), so the primary can say which one its VM takes next.
#[derive(Debug, Default)]
struct Pending {
    frames: VecDeque<(Frame, Option<u64>)>,
    /// The number of a frame the worker took and is delivering (`Some` while one is out): it
    /// still counts against the bound, so the queue never admits a newer frame in its place
    /// (which would break "oldest kept").
    taken: Option<Option<u64>>,
}

/// A VM connection's shared state.
#[derive(Debug)]
pub struct Port {
    role: Side,
    pending: Mutex<Pending>,
    /// Written when frames were queued for RX; the worker then fills the RX ring.
    pub rx_event: EventFd,
    /// Written when TX may resume after backpressure, or when the worker yielded the thread
    /// with TX work left.
    pub tx_retry: EventFd,
    tx_blocked: AtomicBool,
    /// The RX ring was stopped (GET_VRING_BASE) and not set up again since.
    rx_stopped: AtomicBool,
    /// Counters.
    pub stats: PortStats,
}

impl Port {
    /// A port for the VM in `role`.
    pub fn new(role: Side) -> io::Result<Port> {
        Ok(Port {
            role,
            pending: Mutex::new(Pending::default()),
            rx_event: EventFd::new(EFD_NONBLOCK)?,
            tx_retry: EventFd::new(EFD_NONBLOCK)?,
            tx_blocked: AtomicBool::new(false),
            rx_stopped: AtomicBool::new(false),
            stats: PortStats::default(),
        })
    }

    /// Which VM this is.
    pub fn role(&self) -> Side {
        self.role
    }

    /// Queues an inbound frame (with a [`crate::device::VNET_HDR_LEN`] header) for the RX
    /// ring. Returns false if the queue was full and the frame was dropped (counted). Call
    /// [`Port::notify_rx`] after a batch.
    pub fn queue_rx(&self, frame: Frame) -> bool {
        self.queue_rx_numbered(frame, None)
    }

    /// [`Port::queue_rx`] for a frame numbered `seq` on the frame link.
    pub fn queue_rx_numbered(&self, frame: Frame, seq: Option<u64>) -> bool {
        let mut pending = lock(&self.pending);
        if pending.frames.len() + usize::from(pending.taken.is_some()) >= RX_PENDING_MAX {
            drop(pending);
            add(&self.stats.rx_overflow, 1);
            return false;
        }
        pending.frames.push_back((frame, seq));
        true
    }

    /// Wakes the worker to fill the RX ring.
    pub fn notify_rx(&self) {
        signal(&self.rx_event);
    }

    /// Takes the oldest pending inbound frame for delivery. Follow with [`Port::unget_rx`] (not
    /// delivered yet) or [`Port::finish_rx`] (delivered or dropped).
    pub fn next_rx(&self) -> Option<Frame> {
        let mut pending = lock(&self.pending);
        let (frame, seq) = pending.frames.pop_front()?;
        pending.taken = Some(seq);
        Some(frame)
    }

    /// Puts back the frame [`Port::next_rx`] returned: it could not be delivered yet.
    pub fn unget_rx(&self, frame: Frame) {
        let mut pending = lock(&self.pending);
        let seq = pending.taken.take().flatten();
        pending.frames.push_front((frame, seq));
    }

    /// The frame [`Port::next_rx`] returned has left (delivered or dropped).
    pub fn finish_rx(&self) {
        lock(&self.pending).taken = None;
    }

    /// Whether inbound frames are waiting.
    pub fn rx_pending(&self) -> bool {
        let pending = lock(&self.pending);
        !pending.frames.is_empty() || pending.taken.is_some()
    }

    /// The number of the oldest numbered frame not yet taken by the VM (the one being
    /// delivered counts as not taken).
    pub fn first_pending_seq(&self) -> Option<u64> {
        let pending = lock(&self.pending);
        pending.taken.flatten().or_else(|| pending.frames.iter().find_map(|(_, seq)| *seq))
    }

    /// Numbers the frames that wait without a number (queued before the frame link came up),
    /// in order, with numbers from `next`, and hands each to `mirror`.
    pub fn number_pending(&self, mut next: impl FnMut() -> u64, mut mirror: impl FnMut(u64, &Frame)) -> usize {
        let mut pending = lock(&self.pending);
        let mut n = 0;
        for (frame, seq) in pending.frames.iter_mut().filter(|(_, seq)| seq.is_none()) {
            let s = next();
            mirror(s, frame);
            *seq = Some(s);
            n += 1;
        }
        n
    }

    /// Records whether the RX ring is stopped (a frontend paused it, e.g. for a checkpoint).
    pub fn set_rx_stopped(&self, stopped: bool) {
        self.rx_stopped.store(stopped, Ordering::SeqCst);
    }

    /// Whether the RX ring is stopped.
    pub fn rx_stopped(&self) -> bool {
        self.rx_stopped.load(Ordering::SeqCst)
    }

    /// A copy of the inbound frames waiting (oldest first).
    pub fn pending_copy(&self) -> VecDeque<Frame> {
        lock(&self.pending).frames.iter().map(|(f, _)| f.clone()).collect()
    }

    /// Replaces the inbound frames waiting with `frames`; returns how many were waiting. Only
    /// while the RX ring is stopped (no frame taken).
    pub fn replace_pending(&self, frames: VecDeque<Frame>) -> usize {
        self.replace_pending_numbered(frames.into_iter().map(|f| (f, None)))
    }

    /// [`Port::replace_pending`] with numbered frames.
    pub fn replace_pending_numbered(&self, frames: impl IntoIterator<Item = (Frame, Option<u64>)>) -> usize {
        let mut pending = lock(&self.pending);
        let old = std::mem::replace(&mut pending.frames, frames.into_iter().take(RX_PENDING_MAX).collect());
        pending.taken = None;
        old.len()
    }

    /// Marks TX as waiting for room in the compare queues. Must be called while holding the
    /// lock under which room is made, so that a release cannot slip in between the refusal and
    /// this mark.
    pub fn block_tx(&self) {
        self.tx_blocked.store(true, Ordering::SeqCst);
        add(&self.stats.tx_backpressure, 1);
    }

    /// Resumes TX if it was waiting for room.
    pub fn unblock_tx(&self) {
        if self.tx_blocked.swap(false, Ordering::SeqCst) {
            signal(&self.tx_retry);
        }
    }

    /// Whether TX waits for room.
    pub fn tx_blocked(&self) -> bool {
        self.tx_blocked.load(Ordering::SeqCst)
    }

    /// Asks the worker to continue TX later (after it yielded to other work).
    pub fn retry_tx(&self) {
        signal(&self.tx_retry);
    }
}

/// Writes an eventfd. It only fails when its counter would overflow, i.e. it is already
/// signalled, which is all a wake-up needs.
fn signal(fd: &EventFd) {
    if let Err(e) = fd.write(1) {
        if e.kind() != io::ErrorKind::WouldBlock {
            tracing::warn!(error = %e, "cannot signal eventfd");
        }
    }
}

/// Reads (resets) an eventfd the worker was woken by. Spurious wake-ups read nothing.
pub fn consume(fd: &EventFd) {
    let _ = fd.read();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_queue_is_bounded_and_counted() {
        let p = Port::new(Side::Primary).unwrap();
        for i in 0..RX_PENDING_MAX {
            assert!(p.queue_rx(Frame::new(vec![i as u8])));
        }
        assert!(!p.queue_rx(Frame::new(vec![0])));
        assert_eq!(p.stats.snapshot().rx_overflow, 1);
        let first = p.next_rx().unwrap();
        assert_eq!(first.data, vec![0]);
        assert!(!p.queue_rx(Frame::new(vec![1])), "the frame being delivered still counts");
        p.unget_rx(first);
        assert_eq!(p.next_rx().unwrap().data, vec![0]);
        p.finish_rx();
        assert!(p.queue_rx(Frame::new(vec![2])), "room once it has left");
        assert_eq!(p.stats.snapshot().rx_overflow, 2);
    }

    #[test]
    fn numbers_follow_the_frames_through_taking_and_putting_back() {
        let p = Port::new(Side::Primary).unwrap();
        p.queue_rx(Frame::new(vec![1]));
        p.queue_rx(Frame::new(vec![2]));
        assert_eq!(p.first_pending_seq(), None);
        let mut next = 10;
        let mut mirrored = vec![];
        let n = p.number_pending(
            || {
                next += 1;
                next - 1
            },
            |seq, f| mirrored.push((seq, f.data[0])),
        );
        assert_eq!((n, mirrored), (2, vec![(10, 1), (11, 2)]));
        p.queue_rx_numbered(Frame::new(vec![3]), Some(12));
        assert_eq!(p.first_pending_seq(), Some(10));
        let f = p.next_rx().unwrap();
        assert_eq!(p.first_pending_seq(), Some(10), "being delivered: not taken yet");
        p.unget_rx(f);
        assert_eq!(p.first_pending_seq(), Some(10));
        p.next_rx().unwrap();
        p.finish_rx();
        assert_eq!(p.first_pending_seq(), Some(11));
        assert_eq!(p.replace_pending_numbered([(Frame::new(vec![9]), Some(40))]), 2);
        assert_eq!(p.first_pending_seq(), Some(40));
    }

    #[test]
    fn unblocking_signals_only_a_blocked_port() {
        let p = Port::new(Side::Secondary).unwrap();
        p.unblock_tx();
        assert!(p.tx_retry.read().is_err(), "not signalled");
        p.block_tx();
        assert!(p.tx_blocked());
        p.unblock_tx();
        assert_eq!(p.tx_retry.read().unwrap(), 1);
        assert!(!p.tx_blocked());
    }
}
