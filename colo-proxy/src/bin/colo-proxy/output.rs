//! The framed output towards `outdev`: released frames wait here until the socket takes them.
//!
//! A record is its framing header and the frame. Small frames are copied, header and all, into
//! one contiguous buffer as they are queued (their own buffers go back to the frame pool at
//! once), so a burst of them leaves in one slice of one vectored write instead of two slices
//! each; a large frame is not copied: its header is in that buffer and its bytes are written
//! from its own buffer, so a checkpoint that releases a gigabyte of held frames does not need
//! a second gigabyte to queue them. Frame boundaries are known: if the peer goes away in the
//! middle of a frame, that frame is cut (counted as lost) and the next peer starts on a frame
//! boundary.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use colo_proxy::frame_pool::FramePool;
use colo_proxy::framing;
use colo_proxy::Frame;

/// Frames up to this many bytes are copied into the contiguous buffer: a copy this small costs
/// less than a slice of its own in the write (and a buffer freed at once is hot for reuse).
const INLINE_MAX: usize = 512;

/// Most slices passed to one vectored write (Linux's IOV_MAX is 1024).
const WRITE_SLICES: usize = 256;

/// The contiguous buffer is compacted (written bytes dropped from its front) once this many
/// bytes of it are written and still queued bytes follow.
const COMPACT_AT: usize = 256 << 10;

/// A queued record. Its header (and, for `Inline`, its frame) lies in [`OutQueue::inline`]
/// after the preceding records' inline bytes.
#[derive(Debug)]
enum Record {
    /// Header and frame, `len` bytes, all in the contiguous buffer.
    Inline { len: usize },
    /// Header (`header` bytes) in the contiguous buffer, the frame in its own buffer.
    Owned { header: usize, frame: Frame },
}

impl Record {
    /// Bytes of the record in the contiguous buffer, and in all.
    fn lens(&self) -> (usize, usize) {
        match self {
            Record::Inline { len } => (*len, *len),
            Record::Owned { header, frame } => (*header, header + frame.data.len()),
        }
    }
}

/// Released frames waiting to be written.
#[derive(Debug, Default)]
pub struct OutQueue {
    records: VecDeque<Record>,
    /// Inline bytes of the queued records, in order; `inline[..inline_start]` is written.
    inline: Vec<u8>,
    inline_start: usize,
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

    /// Queues a frame: a small one is copied and its buffer recycled into `pool`; a large one's
    /// buffer moves here.
    pub fn push(&mut self, frame: Frame, pool: &mut FramePool) {
        let (h, hlen) = header(&frame, self.vnet_hdr);
        self.inline.extend_from_slice(&h[..hlen]);
        let len = hlen + frame.data.len();
        if frame.data.len() <= INLINE_MAX {
            self.inline.extend_from_slice(&frame.data);
            pool.recycle(frame.data);
            self.records.push_back(Record::Inline { len });
        } else {
            self.records.push_back(Record::Owned { header: hlen, frame });
        }
        self.pending += len;
        self.queued += 1;
    }

    /// Bytes waiting.
    pub fn pending_bytes(&self) -> usize {
        self.pending
    }

    /// Writes as much as the stream takes; written frames' buffers go to `pool`. `Ok` means
    /// everything was written or the stream would block; `Err` means the stream failed.
    pub fn write_to<W: Write>(&mut self, w: &mut W, pool: &mut FramePool) -> io::Result<()> {
        while !self.records.is_empty() {
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
            let mut n = 0;
            // The run of inline bytes not yet in a slice.
            let mut run = self.inline_start;
            let mut end = self.inline_start;
            let mut skip = self.front_written;
            for r in &self.records {
                if n + 2 > WRITE_SLICES {
                    break;
                }
                let (inline_len, _) = r.lens();
                end += inline_len - skip.min(inline_len);
                if let Record::Owned { header, frame } = r {
                    if end > run {
                        slices[n] = IoSlice::new(&self.inline[run..end]);
                        n += 1;
                        run = end;
                    }
                    slices[n] = IoSlice::new(&frame.data[skip.saturating_sub(*header)..]);
                    n += 1;
                }
                skip = 0;
            }
            if end > run {
                slices[n] = IoSlice::new(&self.inline[run..end]);
                n += 1;
            }
            match w.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => self.advance(k, pool),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Accounts for `n` bytes written from the front.
    fn advance(&mut self, mut n: usize, pool: &mut FramePool) {
        self.pending -= n;
        while n > 0 {
            let front = self.records.front().expect("written bytes belong to queued frames");
            let (inline_len, len) = front.lens();
            let take = n.min(len - self.front_written);
            self.inline_start += (self.front_written + take).min(inline_len) - self.front_written.min(inline_len);
            if self.front_written + take < len {
                self.front_written += take;
                break;
            }
            n -= take;
            self.pop_front(pool);
            self.written += 1;
        }
        self.compact();
    }

    /// Removes the front record (its inline bytes are already skipped).
    fn pop_front(&mut self, pool: &mut FramePool) {
        if let Some(Record::Owned { frame, .. }) = self.records.pop_front() {
            pool.recycle(frame.data);
        }
        self.front_written = 0;
    }

    /// Drops written bytes from the contiguous buffer: all of it once everything is written,
    /// else the front once it is large (amortised: at most as many bytes move as were written).
    fn compact(&mut self) {
        if self.records.is_empty() {
            self.inline.clear();
            self.inline_start = 0;
        } else if self.inline_start >= COMPACT_AT && self.inline_start * 2 >= self.inline.len() {
            self.inline.drain(..self.inline_start);
            self.inline_start = 0;
        }
    }

    /// The peer went away: a partly written frame is lost; the rest waits for the next peer.
    pub fn peer_lost(&mut self, pool: &mut FramePool) {
        if self.front_written > 0 {
            let (inline_len, len) = self.records.front().expect("a partly written frame is queued").lens();
            self.pending -= len - self.front_written;
            self.inline_start += inline_len - self.front_written.min(inline_len);
            self.pop_front(pool);
            self.lost += 1;
            self.compact();
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
        let mut pool = FramePool::new();
        let mut q = OutQueue::new(false);
        q.push(frame(1), &mut pool);
        q.push(frame(2), &mut pool);
        assert_eq!(q.pending_bytes(), 48);
        let mut w = Trickle { got: vec![], n: 10, calls: 3 };
        q.write_to(&mut w, &mut pool).unwrap();
        assert_eq!((q.queued, q.written), (2, 1), "24 bytes per frame: one complete after 30");
        assert_eq!(q.pending_bytes(), 18);
        w.calls = 10;
        q.write_to(&mut w, &mut pool).unwrap();
        assert_eq!(q.written, 2);
        assert_eq!(q.pending_bytes(), 0);
        assert_eq!(w.got, encoded(&[frame(1), frame(2)], false));
    }

    #[test]
    fn a_frame_cut_by_disconnection_is_lost_and_the_next_peer_starts_clean() {
        let mut pool = FramePool::new();
        let mut q = OutQueue::new(true);
        q.push(frame(1), &mut pool);
        q.push(frame(2), &mut pool);
        let mut w = Trickle { got: vec![], n: 5, calls: 1 };
        q.write_to(&mut w, &mut pool).unwrap();
        q.peer_lost(&mut pool);
        assert_eq!(q.lost, 1);
        assert_eq!(q.pending_bytes(), 28);
        let mut w = Trickle { got: vec![], n: 1000, calls: 5 };
        q.write_to(&mut w, &mut pool).unwrap();
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
        let mut pool = FramePool::new();
        let mut q = OutQueue::new(true);
        for f in &frames {
            q.push(f.clone(), &mut pool);
        }
        let mut w = Plain(vec![]);
        q.write_to(&mut w, &mut pool).unwrap();
        assert_eq!(w.0, encoded(&frames, true));
        assert_eq!((q.written, q.pending_bytes()), (200, 0));
    }

    /// Records each slice handed to a (vectored) write, and takes everything.
    #[derive(Default)]
    struct Slices {
        calls: usize,
        slices: Vec<(*const u8, usize)>,
        got: Vec<u8>,
    }

    impl Write for Slices {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(b)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            for b in bufs {
                self.slices.push((b.as_ptr(), b.len()));
                self.got.extend_from_slice(b);
            }
            Ok(bufs.iter().map(|b| b.len()).sum())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn large_frames_are_written_from_their_own_buffers_not_copied() {
        let mut pool = FramePool::new();
        let f = Frame::new(pool.copy_of(&[7; 1500]));
        let buffer = f.data.as_ptr();
        let mut q = OutQueue::new(false);
        q.push(f, &mut pool);
        let mut w = Slices::default();
        q.write_to(&mut w, &mut pool).unwrap();
        assert!(w.slices.contains(&(buffer, 1500)), "the frame's buffer itself was handed to the socket");
        assert_eq!(pool.kept(), 1, "its (pool-made) buffer was recycled once written");
    }

    #[test]
    fn a_burst_of_small_frames_leaves_in_one_slice_of_one_write() {
        let frames: Vec<Frame> = (0..1000u32).map(|i| Frame::new(vec![i as u8; 64])).collect();
        let mut pool = FramePool::new();
        let mut q = OutQueue::new(false);
        for f in &frames {
            q.push(f.clone(), &mut pool);
        }
        assert_eq!(pool.kept(), 1000, "each copied frame's buffer (64 bytes, a pool class) went back at once");
        let mut w = Slices::default();
        q.write_to(&mut w, &mut pool).unwrap();
        assert_eq!((w.calls, w.slices.len()), (1, 1));
        assert_eq!(w.got, encoded(&frames, false));
        assert_eq!((q.written, q.pending_bytes()), (1000, 0));
    }

    #[test]
    fn small_and_large_frames_interleave_in_order() {
        let sizes = [60, 1400, 1400, 70, 80, 9000, 60];
        let frames: Vec<Frame> =
            sizes.iter().enumerate().map(|(i, &n)| Frame::with_vnet_hdr(vec![i as u8; n], 12)).collect();
        let mut pool = FramePool::new();
        let mut q = OutQueue::new(true);
        for f in &frames {
            q.push(f.clone(), &mut pool);
        }
        let mut w = Slices::default();
        q.write_to(&mut w, &mut pool).unwrap();
        assert_eq!(w.got, encoded(&frames, true));
        // Runs of headers and small frames between the three large frames' own buffers.
        let lens: Vec<usize> = w.slices.iter().map(|s| s.1).collect();
        assert_eq!(lens, vec![8 + 60 + 8, 1400, 8, 1400, 8 + 70 + 8 + 80 + 8, 9000, 8 + 60]);
    }

    proptest::proptest! {
        /// Any mix of frame sizes, any write sizes and disconnections: each peer receives whole
        /// records in order, each frame is written once or counted lost (the one cut), and
        /// the byte count stays exact.
        #[test]
        fn any_write_pattern_keeps_records_whole(
            sizes in proptest::collection::vec(14usize..2000, 1..60),
            chunks in proptest::collection::vec(1usize..3000, 1..30),
            cut_after in proptest::collection::vec(proptest::bool::ANY, 1..30),
        ) {
            let frames: Vec<Frame> =
                sizes.iter().enumerate().map(|(i, &n)| Frame::new(vec![i as u8; n])).collect();
            let mut pool = FramePool::new();
            let mut q = OutQueue::new(false);
            for f in &frames {
                q.push(f.clone(), &mut pool);
            }
            let mut delivered = Vec::new();
            let mut w = Trickle { got: vec![], n: 1, calls: 0 };
            let mut round = 0;
            while q.pending_bytes() > 0 {
                w.n = chunks[round % chunks.len()];
                w.calls = 1;
                q.write_to(&mut w, &mut pool).unwrap();
                if cut_after[round % cut_after.len()] {
                    q.peer_lost(&mut pool);
                    delivered.push(std::mem::take(&mut w.got));
                }
                round += 1;
            }
            delivered.push(std::mem::take(&mut w.got));
            // Each peer's bytes are whole records of frames, in order, skipping only cut ones.
            let mut next = 0;
            let mut total = 0;
            for bytes in &delivered {
                let mut dec = framing::Decoder::new(false);
                dec.feed(bytes);
                while let Some(f) = dec.next_frame() {
                    let f = f.unwrap();
                    let at = (next..frames.len()).find(|&i| frames[i] == f).expect("a queued frame, in order");
                    next = at + 1;
                    total += 1;
                }
                // A cut record leaves a partial tail at most.
                proptest::prop_assert!(dec.buffered() < 4 + 2000);
            }
            proptest::prop_assert_eq!(total, q.written);
            proptest::prop_assert_eq!(q.written + q.lost, frames.len() as u64);
            proptest::prop_assert_eq!(q.queued, frames.len() as u64);
        }
    }
}
