//! The framed output towards `outdev`: released frames wait here until the socket takes them.
//!
//! Frames are kept as the engine released them, not copied: each record is written as its
//! framing header and the frame's own buffer (vectored writes, a burst in a few system calls),
//! so a checkpoint that releases a gigabyte of held frames does not need a second gigabyte to
//! queue them. Frame boundaries are known: if the peer goes away in the middle of a frame, that
//! frame is cut (counted as lost) and the next peer starts on a frame boundary.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use colo_proxy::framing;
use colo_proxy::Frame;

/// Records passed to one vectored write (two slices each).
const WRITE_BATCH: usize = 64;

/// Released frames waiting to be written.
#[derive(Debug, Default)]
pub struct OutQueue {
    frames: VecDeque<Frame>,
    /// Bytes of the front record (header and frame) already written.
    front_written: usize,
    /// Bytes not yet written.
    pending: usize,
    /// Frames queued so far, ever.
    pub queued: u64,
    /// Frames completely written so far, ever.
    pub written: u64,
    /// Frames cut by a disconnection.
    pub lost: u64,
    vnet_hdr: bool,
}

/// The framing header of `frame`: length, and the `vnet_hdr_len` field in vnet-header mode.
fn header(frame: &Frame, vnet_hdr: bool) -> ([u8; 8], usize) {
    let mut h = [0u8; 8];
    let len = u32::try_from(frame.data.len()).expect("frame of 4 GiB");
    h[..4].copy_from_slice(&len.to_be_bytes());
    if vnet_hdr {
        let vnet = u32::try_from(frame.vnet_hdr_len).expect("vnet header of 4 GiB");
        h[4..].copy_from_slice(&vnet.to_be_bytes());
    }
    (h, framing::header_len(vnet_hdr))
}

impl OutQueue {
    pub fn new(vnet_hdr: bool) -> OutQueue {
        OutQueue { vnet_hdr, ..OutQueue::default() }
    }

    /// Queues a frame (its buffer moves here; nothing is copied).
    pub fn push(&mut self, frame: Frame) {
        self.pending += framing::header_len(self.vnet_hdr) + frame.data.len();
        self.frames.push_back(frame);
        self.queued += 1;
    }

    /// Bytes waiting.
    pub fn pending_bytes(&self) -> usize {
        self.pending
    }

    /// Writes as much as the stream takes. `Ok` means everything was written or the stream
    /// would block; `Err` means the stream failed.
    pub fn write_to<W: Write>(&mut self, w: &mut W) -> io::Result<()> {
        while !self.frames.is_empty() {
            let headers: Vec<([u8; 8], usize)> =
                self.frames.iter().take(WRITE_BATCH).map(|f| header(f, self.vnet_hdr)).collect();
            let mut slices = Vec::with_capacity(2 * headers.len());
            let mut skip = self.front_written;
            for (f, (h, hlen)) in self.frames.iter().zip(&headers) {
                for part in [&h[..*hlen], &f.data[..]] {
                    let from = skip.min(part.len());
                    skip -= from;
                    if from < part.len() {
                        slices.push(IoSlice::new(&part[from..]));
                    }
                }
            }
            match w.write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Accounts for `n` bytes written from the front.
    fn advance(&mut self, mut n: usize) {
        self.pending -= n;
        while n > 0 {
            let front = self.frames.front().expect("written bytes belong to queued frames");
            let left = framing::header_len(self.vnet_hdr) + front.data.len() - self.front_written;
            if n < left {
                self.front_written += n;
                return;
            }
            n -= left;
            self.frames.pop_front();
            self.front_written = 0;
            self.written += 1;
        }
    }

    /// The peer went away: a partly written frame is lost; the rest waits for the next peer.
    pub fn peer_lost(&mut self) {
        if self.front_written > 0 {
            let front = self.frames.pop_front().expect("a partly written frame is queued");
            self.pending -= framing::header_len(self.vnet_hdr) + front.data.len() - self.front_written;
            self.front_written = 0;
            self.lost += 1;
            tracing::warn!("outdev went away in the middle of a frame; that frame is lost");
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
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.calls == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls -= 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.n - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
                if n == self.n {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn frame(fill: u8) -> Frame {
        Frame::new(vec![fill; 20])
    }

    fn encoded(frames: &[Frame], vnet: bool) -> Vec<u8> {
        let mut out = vec![];
        for f in frames {
            framing::encode(f, vnet, &mut out);
        }
        out
    }

    #[test]
    fn partial_writes_count_whole_frames() {
        let mut q = OutQueue::new(false);
        q.push(frame(1));
        q.push(frame(2));
        assert_eq!(q.pending_bytes(), 48);
        let mut w = Trickle { got: vec![], n: 10, calls: 3 };
        q.write_to(&mut w).unwrap();
        assert_eq!((q.queued, q.written), (2, 1), "24 bytes per frame: one complete after 30");
        assert_eq!(q.pending_bytes(), 18);
        w.calls = 10;
        q.write_to(&mut w).unwrap();
        assert_eq!(q.written, 2);
        assert_eq!(q.pending_bytes(), 0);
        assert_eq!(w.got, encoded(&[frame(1), frame(2)], false));
    }

    #[test]
    fn a_frame_cut_by_disconnection_is_lost_and_the_next_peer_starts_clean() {
        let mut q = OutQueue::new(true);
        q.push(frame(1));
        q.push(frame(2));
        let mut w = Trickle { got: vec![], n: 5, calls: 1 };
        q.write_to(&mut w).unwrap();
        q.peer_lost();
        assert_eq!(q.lost, 1);
        assert_eq!(q.pending_bytes(), 28);
        let mut w = Trickle { got: vec![], n: 1000, calls: 5 };
        q.write_to(&mut w).unwrap();
        assert_eq!(w.got, encoded(&[frame(2)], true));
        assert_eq!(q.written, 1);
    }

    #[test]
    fn many_frames_through_a_plain_writer_in_order() {
        // A writer without vectored writes (the default takes the first slice only).
        struct Plain(Vec<u8>);
        impl Write for Plain {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                let n = b.len().min(7);
                self.0.extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let frames: Vec<Frame> = (0..200u8).map(|i| Frame::with_vnet_hdr(vec![i; 12 + usize::from(i)], 12)).collect();
        let mut q = OutQueue::new(true);
        for f in &frames {
            q.push(f.clone());
        }
        let mut w = Plain(vec![]);
        q.write_to(&mut w).unwrap();
        assert_eq!(w.0, encoded(&frames, true));
        assert_eq!((q.written, q.pending_bytes()), (200, 0));
    }

    #[test]
    fn frames_are_written_from_their_own_buffers_not_copied() {
        /// Records where each written slice starts.
        struct Pointers(Vec<*const u8>);
        impl Write for Pointers {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.push(b.as_ptr());
                Ok(b.len())
            }
            fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                self.0.extend(bufs.iter().map(|b| b.as_ptr()));
                Ok(bufs.iter().map(|b| b.len()).sum())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let f = Frame::new(vec![7; 1500]);
        let buffer = f.data.as_ptr();
        let mut q = OutQueue::new(false);
        q.push(f);
        let mut w = Pointers(vec![]);
        q.write_to(&mut w).unwrap();
        assert!(w.0.contains(&buffer), "the frame's buffer itself was handed to the socket");
    }
}
