//! The framed output towards `outdev`: released frames wait here until the socket takes them.
//!
//! Frames are encoded back to back into one buffer, so a burst leaves in a few large writes.
//! Frame boundaries are remembered: if the peer goes away in the middle of a frame, that frame
//! is cut (counted as lost) and the next peer starts on a frame boundary.

use std::collections::VecDeque;
use std::io::{self, Write};

use colo_proxy::framing;
use colo_proxy::Frame;

/// Released frames waiting to be written.
#[derive(Debug, Default)]
pub struct OutQueue {
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    start: usize,
    /// Where the first queued (not completely written) frame starts in `buf`.
    front_start: usize,
    /// End offset in `buf` of each queued frame.
    ends: VecDeque<usize>,
    /// Frames queued so far, ever.
    pub queued: u64,
    /// Frames completely written so far, ever.
    pub written: u64,
    /// Frames cut by a disconnection.
    pub lost: u64,
    vnet_hdr: bool,
}

impl OutQueue {
    pub fn new(vnet_hdr: bool) -> OutQueue {
        OutQueue { vnet_hdr, ..OutQueue::default() }
    }

    /// Queues a frame.
    pub fn push(&mut self, frame: &Frame) {
        framing::encode(frame, self.vnet_hdr, &mut self.buf);
        self.ends.push_back(self.buf.len());
        self.queued += 1;
    }

    /// Bytes waiting.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Writes as much as the stream takes. `Ok` means everything was written or the stream
    /// would block; `Err` means the stream failed.
    pub fn write_to<W: Write>(&mut self, w: &mut W) -> io::Result<()> {
        while self.start < self.buf.len() {
            match w.write(&self.buf[self.start..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.start += n;
                    while let Some(&end) = self.ends.front().filter(|&&e| e <= self.start) {
                        self.ends.pop_front();
                        self.front_start = end;
                        self.written += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.compact();
        Ok(())
    }

    /// The peer went away: a partly written frame is lost; the rest waits for the next peer.
    pub fn peer_lost(&mut self) {
        if self.start > self.front_start {
            let end = self.ends.pop_front().expect("a partly written frame is queued");
            self.start = end;
            self.front_start = end;
            self.lost += 1;
            tracing::warn!("outdev went away in the middle of a frame; that frame is lost");
        }
        self.compact();
    }

    fn compact(&mut self) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.front_start = 0;
            self.ends.clear();
        } else if self.front_start > (1 << 20) && self.front_start * 2 > self.buf.len() {
            // Drop the written prefix once it dominates the buffer.
            let cut = self.front_start;
            self.buf.drain(..cut);
            for e in self.ends.iter_mut() {
                *e -= cut;
            }
            self.start -= cut;
            self.front_start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `n` bytes per call, then would block after `calls` calls.
    struct Trickle {
        got: Vec<u8>,
        n: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.calls == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls -= 1;
            let n = b.len().min(self.n);
            self.got.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn frame(fill: u8) -> Frame {
        Frame::new(vec![fill; 20])
    }

    #[test]
    fn partial_writes_count_whole_frames() {
        let mut q = OutQueue::new(false);
        q.push(&frame(1));
        q.push(&frame(2));
        let mut w = Trickle { got: vec![], n: 10, calls: 3 };
        q.write_to(&mut w).unwrap();
        assert_eq!((q.queued, q.written), (2, 1), "24 bytes per frame: one complete after 30");
        w.calls = 10;
        q.write_to(&mut w).unwrap();
        assert_eq!(q.written, 2);
        assert_eq!(q.pending_bytes(), 0);
        let mut expect = vec![];
        framing::encode(&frame(1), false, &mut expect);
        framing::encode(&frame(2), false, &mut expect);
        assert_eq!(w.got, expect);
    }

    #[test]
    fn a_frame_cut_by_disconnection_is_lost_and_the_next_peer_starts_clean() {
        let mut q = OutQueue::new(true);
        q.push(&frame(1));
        q.push(&frame(2));
        let mut w = Trickle { got: vec![], n: 5, calls: 1 };
        q.write_to(&mut w).unwrap();
        q.peer_lost();
        assert_eq!(q.lost, 1);
        let mut w = Trickle { got: vec![], n: 1000, calls: 5 };
        q.write_to(&mut w).unwrap();
        let mut expect = vec![];
        framing::encode(&frame(2), true, &mut expect);
        assert_eq!(w.got, expect);
        assert_eq!(q.written, 1);
    }
}
