//! QEMU's chardev socket framing and the notify_dev text protocol on any byte stream.
//!
//! Invariants:
//! - nothing panics, and after the stream is drained at most one unfinished record is buffered;
//! - any split of the stream into reads gives the same records, errors and messages;
//! - after a fatal error nothing more is decoded until a reset;
//! - frames encoded and decoded come back as they were.

#![no_main]

use std::io::Read;

use arbitrary::Arbitrary;
use colo_proxy::framing::{self, Decoder, FrameError, MAX_FRAME_LEN, MAX_VNET_HDR_LEN};
use colo_proxy::notify_dev::{Inbound, NotifyCodec, Outbound};
use colo_proxy::Frame;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    vnet_hdr: bool,
    stream: Vec<u8>,
    /// Read sizes for the split stream (cycled).
    cuts: Vec<u16>,
    /// Frames to round-trip: (vnet header length, bytes).
    frames: Vec<(u8, Vec<u8>)>,
}

/// A reader returning the stream in pieces of the given sizes.
struct Pieces<'a> {
    rest: &'a [u8],
    cuts: &'a [u16],
    i: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = self.cuts.get(self.i % self.cuts.len().max(1)).map_or(self.rest.len(), |&c| usize::from(c) + 1);
        self.i += 1;
        let n = want.min(buf.len()).min(self.rest.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Ok(n)
    }
}

#[derive(Debug, PartialEq)]
enum Got {
    Frame(Frame),
    Error(FrameError),
}

fn drain(d: &mut Decoder, out: &mut Vec<Got>) {
    while let Some(r) = d.next_frame() {
        match r {
            Ok(f) => {
                assert!(f.data.len() <= MAX_FRAME_LEN && f.vnet_hdr_len <= MAX_VNET_HDR_LEN);
                assert!(f.data.len() >= f.vnet_hdr_len + 14, "a frame holds its headers");
                out.push(Got::Frame(f));
            }
            Err(e) => out.push(Got::Error(e)),
        }
    }
    assert!(d.buffered() < framing::header_len(d.vnet_hdr()) + MAX_FRAME_LEN, "one unfinished record at most");
}

fn drain_notify(c: &mut NotifyCodec, out: &mut Vec<Result<Inbound, FrameError>>) {
    while let Some(m) = c.next_message() {
        if let Ok(Inbound::Unknown(b)) = &m {
            assert!(b != b"COLO_CHECKPOINT" && b != b"COLO_USERSPACE_PROXY_INIT");
        }
        out.push(m);
    }
}

fuzz_target!(|input: Input| {
    let stream = &input.stream;
    // All at once.
    let mut whole = Vec::new();
    let mut d = Decoder::new(input.vnet_hdr);
    d.feed(stream);
    drain(&mut d, &mut whole);
    // In pieces, through read_from.
    let mut split = Vec::new();
    let mut d2 = Decoder::new(input.vnet_hdr);
    let mut r = Pieces { rest: stream, cuts: &input.cuts, i: 0 };
    loop {
        match d2.read_from(&mut r) {
            Ok(0) => break,
            Ok(_) => drain(&mut d2, &mut split),
            Err(e) => {
                assert!(d2.is_failed(), "read_from fails only on a failed decoder: {e}");
                break;
            }
        }
    }
    assert_eq!(whole, split, "the split of the stream changes nothing");
    if let Some(Got::Error(e)) = whole.last() {
        if e.is_fatal() {
            assert!(d.is_failed());
            d.feed(b"\0\0\0\x0e0123456789abcd");
            assert!(d.next_frame().is_none(), "nothing after a fatal error");
            d.reset();
            assert!(!d.is_failed());
        }
    }
    for (i, g) in whole.iter().enumerate() {
        if matches!(g, Got::Error(e) if e.is_fatal()) {
            assert_eq!(i, whole.len() - 1, "a fatal error ends the stream");
        }
    }

    // notify_dev on the same bytes, whole and split.
    let mut msgs = Vec::new();
    let mut c = NotifyCodec::new(input.vnet_hdr);
    c.feed(stream);
    drain_notify(&mut c, &mut msgs);
    let mut msgs2 = Vec::new();
    let mut c2 = NotifyCodec::new(input.vnet_hdr);
    for chunk in stream.chunks(input.cuts.first().map_or(7, |&c| usize::from(c % 64) + 1)) {
        c2.feed(chunk);
        drain_notify(&mut c2, &mut msgs2);
    }
    assert_eq!(msgs, msgs2);

    // Round trip.
    let mut encoded = Vec::new();
    let mut sent = Vec::new();
    for (hdr, bytes) in input.frames.iter().take(16) {
        let hdr = usize::from(*hdr) % (MAX_VNET_HDR_LEN + 1);
        let mut data = bytes.clone();
        data.resize(data.len().max(hdr + 14), 0);
        let f = if input.vnet_hdr { Frame::with_vnet_hdr(data, hdr) } else { Frame::new(data) };
        framing::encode(&f, input.vnet_hdr, &mut encoded);
        sent.push(Got::Frame(f));
    }
    Outbound::DoCheckpoint.encode(&mut Vec::new());
    let mut back = Vec::new();
    let mut d3 = Decoder::new(input.vnet_hdr);
    d3.feed(&encoded);
    drain(&mut d3, &mut back);
    assert_eq!(back, sent, "frames round-trip");
    assert_eq!(d3.buffered(), 0);
});
