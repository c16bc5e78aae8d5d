//! QEMU's chardev socket framing, as spoken by filter-mirror, filter-redirector, colo-compare and
//! `-netdev socket` (net/net.c `net_fill_rstate`).
//!
//! Each record is a big-endian u32 `len`; if both ends run in virtio-net header mode, a
//! big-endian u32 `vnet_hdr_len` follows; then `len` bytes, which include the vnet header. There
//! is no other delimiter, so one bad length desynchronises the rest of the stream for good.
//!
//! [`Decoder`] reassembles records from arbitrary read boundaries with one copy per frame (from
//! its read buffer into the frame's own `Vec`), and no per-byte work: headers are parsed once per
//! record. [`encode`] and [`encode_raw`] append records to an output buffer.

use std::io::{self, Read};

use crate::frame::Frame;
use crate::wire::ethernet;

/// Largest `len` accepted: QEMU's `NET_BUFSIZE` (4096 + 65536), the size of its reassembly buffer.
pub const MAX_FRAME_LEN: usize = 4096 + 65536;

/// Largest virtio-net header supported: `virtio_net_hdr_v1_hash`, the biggest layout QEMU uses.
pub const MAX_VNET_HDR_LEN: usize = 20;

/// Bytes of record header: `len`, plus `vnet_hdr_len` in vnet-header mode.
pub const fn header_len(vnet_hdr: bool) -> usize {
    if vnet_hdr {
        8
    } else {
        4
    }
}

/// Read buffer size. Several maximal records fit, so a large read can carry many small frames,
/// and compaction (moving the unfinished tail to the front) is rare.
const BUF_CAPACITY: usize = 256 * 1024;

/// Free space guaranteed before each read: a whole maximal record, so an unfinished record can
/// always complete in place without the buffer growing.
const READ_ROOM: usize = 8 + MAX_FRAME_LEN;

/// Why a record was rejected.
///
/// Only [`FrameError::Oversized`] is fatal ([`FrameError::is_fatal`]): its length cannot be
/// trusted, so nothing after it can be found and the caller must close the stream. The others
/// leave the framing intact: the record has been consumed and the next one decodes normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// `len` is above [`MAX_FRAME_LEN`]. QEMU stops reading such a stream ("serious error:
    /// oversized packet received"); usually the two ends disagree on vnet-header mode.
    #[error(
        "frame length {len} exceeds the maximum of {MAX_FRAME_LEN} bytes \
         (do both ends agree on vnet-header mode?); the stream must be closed"
    )]
    Oversized {
        /// The length field as received.
        len: u32,
    },
    /// `len` is 0. QEMU crashes on this; we drop the record.
    #[error("zero-length frame")]
    ZeroLength,
    /// `vnet_hdr_len` is above [`MAX_VNET_HDR_LEN`].
    #[error("unsupported virtio-net header length {vnet_hdr_len} (at most {MAX_VNET_HDR_LEN}) in a {len}-byte frame")]
    VnetHdrTooLong {
        /// The vnet header length field as received.
        vnet_hdr_len: u32,
        /// The frame length field.
        len: u32,
    },
    /// The record cannot hold the vnet header and an Ethernet header.
    #[error(
        "frame of {len} bytes is too short for a {vnet_hdr_len}-byte virtio-net header \
         and a 14-byte Ethernet header"
    )]
    TooShort {
        /// The frame length field.
        len: u32,
        /// The vnet header length field (0 outside vnet-header mode).
        vnet_hdr_len: u32,
    },
}

impl FrameError {
    /// Whether the stream is unusable after this error and must be closed.
    pub fn is_fatal(&self) -> bool {
        matches!(self, FrameError::Oversized { .. })
    }
}

/// A decoded record, still in the read buffer: its payload is `buf[payload..payload + len]`.
struct Record {
    payload: usize,
    len: usize,
    vnet_hdr_len: u32,
}

/// Reassembles records from a byte stream.
///
/// Fill it with [`Decoder::read_from`] or [`Decoder::feed`], then call [`Decoder::next_frame`]
/// (or [`Decoder::next_payload`]) until it returns `None`. Any split of the stream into reads
/// yields the same records.
///
/// After a fatal error the decoder has failed: it discards its buffer, `next_*` return `None`,
/// `feed` ignores its input and `read_from` fails with [`io::ErrorKind::InvalidData`], until
/// [`Decoder::reset`].
#[derive(Debug)]
pub struct Decoder {
    vnet_hdr: bool,
    /// Read buffer; `buf.len()` is its capacity, bytes `start..end` are pending.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The oversized length that made the decoder fail.
    failed: Option<u32>,
}

impl Decoder {
    /// A decoder for a stream with (`vnet_hdr = true`) or without the `vnet_hdr_len` field.
    pub fn new(vnet_hdr: bool) -> Decoder {
        Decoder { vnet_hdr, buf: vec![0; BUF_CAPACITY], start: 0, end: 0, failed: None }
    }

    /// Whether records carry the `vnet_hdr_len` field.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Bytes received but not yet decoded: nonzero at end of stream means a truncated record.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Whether a fatal error has made the decoder unusable until [`Decoder::reset`].
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Forgets every buffered byte and any failure, for a new connection. A half-received
    /// record from the old peer must not prefix the new peer's stream (QEMU keeps it, and then
    /// misreads the new stream).
    pub fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
        self.failed = None;
    }

    /// Does one `read` from `r` into the buffer and returns its result: `Ok(0)` is end of
    /// stream; errors such as [`io::ErrorKind::WouldBlock`] pass through (`Interrupted` is
    /// retried).
    pub fn read_from<R: Read + ?Sized>(&mut self, r: &mut R) -> io::Result<usize> {
        if let Some(len) = self.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, FrameError::Oversized { len }));
        }
        self.make_room(READ_ROOM);
        loop {
            match r.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Appends `bytes` received by other means.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        self.make_room(bytes.len());
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// The next frame, an error for a rejected record, or `None` when more bytes are needed.
    ///
    /// Frames must hold the vnet header and a 14-byte Ethernet header; the vnet header length
    /// comes from the record (0 outside vnet-header mode).
    pub fn next_frame(&mut self) -> Option<Result<Frame, FrameError>> {
        self.next_frame_with(<[u8]>::to_vec)
    }

    /// [`Decoder::next_frame`], with the frame's buffer made by `copy` from the record's bytes
    /// (e.g. [`crate::frame_pool::FramePool::copy_of`], so that buffers are recycled).
    pub fn next_frame_with(&mut self, copy: impl FnOnce(&[u8]) -> Vec<u8>) -> Option<Result<Frame, FrameError>> {
        let rec = match self.next_record()? {
            Ok(rec) => rec,
            Err(e) => return Some(Err(e)),
        };
        // `len` is at most MAX_FRAME_LEN, so it fits a u32.
        let len = rec.len as u32;
        if rec.vnet_hdr_len as usize > MAX_VNET_HDR_LEN {
            return Some(Err(FrameError::VnetHdrTooLong { vnet_hdr_len: rec.vnet_hdr_len, len }));
        }
        let vnet_hdr_len = rec.vnet_hdr_len as usize;
        if rec.len < vnet_hdr_len + ethernet::HEADER_LEN {
            return Some(Err(FrameError::TooShort { len, vnet_hdr_len: rec.vnet_hdr_len }));
        }
        let data = copy(&self.buf[rec.payload..rec.payload + rec.len]);
        Some(Ok(Frame { data, vnet_hdr_len }))
    }

    /// The next record's `len` bytes without any frame checks (the `vnet_hdr_len` field, if
    /// any, is skipped), for text messages such as notify_dev's. Errors are only
    /// [`FrameError::Oversized`] and [`FrameError::ZeroLength`].
    pub fn next_payload(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        Some(self.next_record()?.map(|rec| self.buf[rec.payload..rec.payload + rec.len].to_vec()))
    }

    /// Splits off the next whole record. The record's bytes stay valid in `buf` until the next
    /// `read_from` or `feed`.
    fn next_record(&mut self) -> Option<Result<Record, FrameError>> {
        if self.failed.is_some() {
            return None;
        }
        let pending = &self.buf[self.start..self.end];
        if pending.len() < 4 {
            return None;
        }
        let len = u32::from_be_bytes([pending[0], pending[1], pending[2], pending[3]]);
        // Checked before waiting for the payload: an absurd length would otherwise just stall
        // the stream until the peer gave up.
        if len as usize > MAX_FRAME_LEN {
            self.failed = Some(len);
            self.start = 0;
            self.end = 0;
            return Some(Err(FrameError::Oversized { len }));
        }
        let hdr = header_len(self.vnet_hdr);
        let len = len as usize;
        if pending.len() < hdr + len {
            return None;
        }
        let vnet_hdr_len =
            if self.vnet_hdr { u32::from_be_bytes([pending[4], pending[5], pending[6], pending[7]]) } else { 0 };
        let payload = self.start + hdr;
        self.start = payload + len;
        if len == 0 {
            return Some(Err(FrameError::ZeroLength));
        }
        Some(Ok(Record { payload, len, vnet_hdr_len }))
    }

    /// Makes at least `room` bytes free after `end`: moves pending bytes to the front when that
    /// is needed (rare, and they are at most one unfinished record when the caller drains the
    /// decoder between reads), grows the buffer only if that is not enough.
    fn make_room(&mut self, room: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end >= room {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < room {
            self.buf.resize(self.end + room, 0);
        }
    }
}

/// Appends `frame` as one record. In vnet-header mode the `vnet_hdr_len` field is
/// `frame.vnet_hdr_len`; otherwise the whole of `frame.data` (a vnet header included, if the
/// frame has one) is the payload, since both ends must agree on the mode.
///
/// # Panics
///
/// If the frame is 4 GiB or longer. Frames over [`MAX_FRAME_LEN`] are encoded, but QEMU will
/// close the stream on them.
pub fn encode(frame: &Frame, vnet_hdr: bool, out: &mut Vec<u8>) {
    let vnet_hdr_len = vnet_hdr.then(|| u32::try_from(frame.vnet_hdr_len).expect("vnet header of 4 GiB"));
    encode_raw(&frame.data, vnet_hdr_len, out);
}

/// Appends one record holding `payload`, with a `vnet_hdr_len` field if `vnet_hdr_len` is
/// `Some`. notify_dev's outbound messages use `None` even in vnet-header mode.
///
/// # Panics
///
/// If `payload` is 4 GiB or longer.
pub fn encode_raw(payload: &[u8], vnet_hdr_len: Option<u32>, out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).expect("frame of 4 GiB");
    out.reserve(8 + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    if let Some(v) = vnet_hdr_len {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A 60-byte Ethernet frame behind a `vnet`-byte header, tagged with `tag`.
    fn frame(vnet: usize, tag: u8) -> Frame {
        let mut data = vec![0xee; vnet];
        data.extend((0..60u8).map(|i| i ^ tag));
        Frame::with_vnet_hdr(data, vnet)
    }

    fn decode_all(dec: &mut Decoder) -> Vec<Result<Frame, FrameError>> {
        std::iter::from_fn(|| dec.next_frame()).collect()
    }

    #[test]
    fn round_trip_plain() {
        let f = frame(0, 1);
        let mut out = Vec::new();
        encode(&f, false, &mut out);
        assert_eq!(&out[..4], &[0, 0, 0, 60]);
        assert_eq!(&out[4..], &f.data[..]);
        let mut dec = Decoder::new(false);
        dec.feed(&out);
        assert_eq!(decode_all(&mut dec), vec![Ok(f)]);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn round_trip_vnet() {
        for vnet in [0, 10, 12, 20] {
            let f = frame(vnet, 2);
            let mut out = Vec::new();
            encode(&f, true, &mut out);
            assert_eq!(&out[..4], &((60 + vnet) as u32).to_be_bytes());
            assert_eq!(&out[4..8], &(vnet as u32).to_be_bytes());
            let mut dec = Decoder::new(true);
            dec.feed(&out);
            let got = decode_all(&mut dec);
            assert_eq!(got, vec![Ok(f.clone())]);
            assert_eq!(got[0].as_ref().unwrap().ethernet(), f.ethernet());
        }
    }

    #[test]
    fn plain_mode_carries_vnet_header_as_payload() {
        let f = frame(12, 3);
        let mut out = Vec::new();
        encode(&f, false, &mut out);
        let mut dec = Decoder::new(false);
        dec.feed(&out);
        assert_eq!(decode_all(&mut dec), vec![Ok(Frame::new(f.data))]);
    }

    #[test]
    fn byte_at_a_time() {
        let frames: Vec<Frame> = (0..5).map(|i| frame(12, i)).collect();
        let mut out = Vec::new();
        frames.iter().for_each(|f| encode(f, true, &mut out));
        let mut dec = Decoder::new(true);
        let mut got = Vec::new();
        for b in &out {
            dec.feed(std::slice::from_ref(b));
            got.extend(decode_all(&mut dec));
        }
        assert_eq!(got, frames.into_iter().map(Ok).collect::<Vec<_>>());
    }

    #[test]
    fn many_frames_in_one_read() {
        // More than the buffer holds, so reads wrap around and compaction is exercised.
        let frames: Vec<Frame> = (0..10_000).map(|i| frame(0, i as u8)).collect();
        let mut out = Vec::new();
        frames.iter().for_each(|f| encode(f, false, &mut out));
        let mut dec = Decoder::new(false);
        let mut reader = &out[..];
        let mut got = Vec::new();
        while dec.read_from(&mut reader).unwrap() > 0 {
            got.extend(decode_all(&mut dec));
        }
        assert_eq!(dec.buffered(), 0);
        assert_eq!(got, frames.into_iter().map(Ok).collect::<Vec<_>>());
    }

    #[test]
    fn maximal_frame_is_accepted() {
        let f = Frame::new(vec![7; MAX_FRAME_LEN]);
        let mut out = Vec::new();
        encode(&f, false, &mut out);
        encode(&f, false, &mut out);
        let mut dec = Decoder::new(false);
        let mut reader = &out[..];
        let mut got = Vec::new();
        while dec.read_from(&mut reader).unwrap() > 0 {
            got.extend(decode_all(&mut dec));
        }
        assert_eq!(got, vec![Ok(f.clone()), Ok(f)]);
    }

    #[test]
    fn oversized_is_fatal() {
        let mut out = Vec::new();
        encode(&frame(0, 0), false, &mut out);
        out.extend_from_slice(&((MAX_FRAME_LEN + 1) as u32).to_be_bytes());
        let mut dec = Decoder::new(false);
        dec.feed(&out);
        assert!(dec.next_frame().unwrap().is_ok());
        // Reported as soon as the length is seen, without waiting for the payload.
        let err = dec.next_frame().unwrap().unwrap_err();
        assert_eq!(err, FrameError::Oversized { len: MAX_FRAME_LEN as u32 + 1 });
        assert!(err.is_fatal());
        assert!(err.to_string().contains("must be closed"));
        assert!(dec.is_failed());
        assert_eq!(dec.next_frame(), None);
        dec.feed(&out);
        assert_eq!(dec.next_frame(), None);
        let e = dec.read_from(&mut &out[..]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn per_frame_errors_keep_the_stream() {
        let good = frame(12, 9);
        let mut out = Vec::new();
        encode_raw(&[], Some(0), &mut out);
        encode_raw(&[0; 60 + 21], Some(21), &mut out);
        encode_raw(&[0; 12 + 13], Some(12), &mut out);
        encode_raw(&[0; 8], Some(12), &mut out);
        encode(&good, true, &mut out);
        let mut dec = Decoder::new(true);
        dec.feed(&out);
        let got = decode_all(&mut dec);
        assert_eq!(
            got,
            vec![
                Err(FrameError::ZeroLength),
                Err(FrameError::VnetHdrTooLong { vnet_hdr_len: 21, len: 81 }),
                Err(FrameError::TooShort { len: 25, vnet_hdr_len: 12 }),
                Err(FrameError::TooShort { len: 8, vnet_hdr_len: 12 }),
                Ok(good),
            ]
        );
        assert!(got[..4].iter().all(|r| !r.as_ref().unwrap_err().is_fatal()));
        assert!(!dec.is_failed());
    }

    #[test]
    fn short_frame_without_vnet() {
        let mut out = Vec::new();
        encode_raw(&[1; 13], None, &mut out);
        encode_raw(&[], None, &mut out);
        encode(&frame(0, 4), false, &mut out);
        let mut dec = Decoder::new(false);
        dec.feed(&out);
        assert_eq!(
            decode_all(&mut dec),
            vec![Err(FrameError::TooShort { len: 13, vnet_hdr_len: 0 }), Err(FrameError::ZeroLength), Ok(frame(0, 4))]
        );
    }

    #[test]
    fn payload_skips_frame_checks() {
        let mut out = Vec::new();
        encode_raw(b"DO_CHECKPOINT", Some(0), &mut out);
        encode_raw(b"", Some(0), &mut out);
        let mut dec = Decoder::new(true);
        dec.feed(&out);
        assert_eq!(dec.next_payload(), Some(Ok(b"DO_CHECKPOINT".to_vec())));
        assert_eq!(dec.next_payload(), Some(Err(FrameError::ZeroLength)));
        assert_eq!(dec.next_payload(), None);
    }

    #[test]
    fn reset_drops_partial_state() {
        let mut out = Vec::new();
        encode(&frame(0, 5), false, &mut out);
        let mut dec = Decoder::new(false);
        dec.feed(&out[..30]);
        assert_eq!(dec.next_frame(), None);
        assert_eq!(dec.buffered(), 30);
        dec.reset();
        assert_eq!(dec.buffered(), 0);
        dec.feed(&out);
        assert_eq!(decode_all(&mut dec), vec![Ok(frame(0, 5))]);

        // A failed decoder works again after reset.
        dec.feed(&u32::MAX.to_be_bytes());
        assert!(dec.next_frame().unwrap().unwrap_err().is_fatal());
        dec.reset();
        assert!(!dec.is_failed());
        dec.feed(&out);
        assert_eq!(decode_all(&mut dec), vec![Ok(frame(0, 5))]);
    }

    #[test]
    fn would_block_passes_through() {
        struct Blocked;
        impl Read for Blocked {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        let mut dec = Decoder::new(false);
        assert_eq!(dec.read_from(&mut Blocked).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn undrained_reads_grow_the_buffer() {
        // A caller that reads without decoding must not see a zero-length read (false EOF).
        let f = Frame::new(vec![1; MAX_FRAME_LEN]);
        let mut out = Vec::new();
        for _ in 0..6 {
            encode(&f, false, &mut out);
        }
        let mut dec = Decoder::new(false);
        let mut reader = &out[..];
        let mut total = 0;
        loop {
            let n = dec.read_from(&mut reader).unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, out.len());
        assert_eq!(decode_all(&mut dec).len(), 6);
    }

    /// A reader that returns the stream in chunks of the given sizes, cycling through them.
    struct Chunked<'a> {
        data: &'a [u8],
        sizes: Vec<usize>,
        next: usize,
    }

    impl Read for Chunked<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let want = self.sizes[self.next % self.sizes.len()];
            self.next += 1;
            let n = want.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        (0..=MAX_VNET_HDR_LEN, proptest::collection::vec(any::<u8>(), 14..300))
            .prop_map(|(vnet, eth)| Frame::with_vnet_hdr([vec![0xaa; vnet], eth].concat(), vnet))
    }

    proptest! {
        #[test]
        fn any_split_decodes_identically(
            vnet_mode in any::<bool>(),
            frames in proptest::collection::vec(arb_frame(), 0..40),
            splits in proptest::collection::vec(1usize..200, 1..20),
        ) {
            let frames: Vec<Frame> = if vnet_mode {
                frames
            } else {
                frames.into_iter().map(|f| Frame::new(f.data)).collect()
            };
            let mut out = Vec::new();
            frames.iter().for_each(|f| encode(f, vnet_mode, &mut out));

            // Through `feed`, in the given chunk sizes.
            let mut dec = Decoder::new(vnet_mode);
            let mut got = Vec::new();
            let mut rest = &out[..];
            for size in splits.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let n = (*size).min(rest.len());
                dec.feed(&rest[..n]);
                rest = &rest[n..];
                got.extend(decode_all(&mut dec));
            }
            prop_assert_eq!(&got, &frames.iter().cloned().map(Ok).collect::<Vec<_>>());
            prop_assert_eq!(dec.buffered(), 0);

            // Through `read_from`, in the same chunk sizes.
            let mut dec = Decoder::new(vnet_mode);
            let mut reader = Chunked { data: &out, sizes: splits, next: 0 };
            let mut got = Vec::new();
            while dec.read_from(&mut reader).unwrap() > 0 {
                got.extend(decode_all(&mut dec));
            }
            prop_assert_eq!(&got, &frames.iter().cloned().map(Ok).collect::<Vec<_>>());
        }
    }
}
