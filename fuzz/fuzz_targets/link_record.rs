//! An established, keyed link (a real Noise handshake over a socket pair) whose byte stream the
//! fuzzer damages: records sealed by the real peer, with raw bytes spliced in between them, read
//! by the frame link's reader (`FrameLink`, as the backends run it).
//!
//! Invariants:
//! - nothing panics;
//! - the reader hands on exactly the frames sealed before the first spliced bytes, in order, and
//!   nothing after them: spliced bytes end the link, they are never taken for a message;
//! - the link ends (`Closed`) whatever the stream;
//! - credit granted by the peer never lets this side send more than its window;
//! - the link's threads end with it.

#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::channel;
use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use colo_proxy::link::{accept, connect, FrameLink, FrameLinkConfig, LinkKey, PeerEvent, PeerMessage};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Piece {
    /// A message the peer seals and sends.
    Message(Msg),
    /// Bytes written to the socket as they are, between records.
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum Msg {
    Inbound(u64, Vec<u8>),
    Outbound(Vec<u8>),
    Ping(u64),
    Pong(u64),
    Credit(u64),
    Loading(u64),
}

fn key() -> &'static LinkKey {
    static KEY: OnceLock<LinkKey> = OnceLock::new();
    KEY.get_or_init(|| LinkKey::derive(&[9u8; 32]))
}

const WINDOW: u64 = 4096;

/// Threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fuzz_target!(|pieces: Vec<Piece>| {
    let threads_before = threads();
    let (a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || connect(a, Some(key()), "frames", Duration::from_secs(5)).unwrap());
    let ours = accept(b, Some(key()), "frames", Duration::from_secs(5)).unwrap();
    let mut peer = t.join().unwrap();

    let (tx, rx) = channel();
    let config = FrameLinkConfig { ping_interval: Duration::from_secs(60), window: WINDOW, queue_bytes: 1 << 20 };
    let link = FrameLink::start(ours, config, move |e| {
        let _ = tx.send(e);
    })
    .unwrap();

    // The frames the reader must hand on: those sealed before the first raw bytes.
    let mut expected = Vec::new();
    let mut spliced = false;
    let mut budget = 256 * 1024;
    for piece in pieces.iter().take(64) {
        match piece {
            Piece::Message(m) => {
                let msg = match m {
                    Msg::Inbound(seq, f) => PeerMessage::Inbound { seq: *seq, frame: f.clone() },
                    Msg::Outbound(f) => PeerMessage::Outbound(f.clone()),
                    Msg::Ping(n) => PeerMessage::Ping(*n),
                    Msg::Pong(n) => PeerMessage::Pong(*n),
                    Msg::Credit(n) => PeerMessage::Credit(*n),
                    Msg::Loading(mark) => PeerMessage::Loading(*mark),
                };
                budget -= msg.wire_len().min(budget);
                if budget == 0 {
                    break;
                }
                if !spliced {
                    match &msg {
                        PeerMessage::Inbound { seq, frame } => {
                            expected.push(PeerEvent::Inbound { seq: *seq, frame: frame.clone() })
                        }
                        PeerMessage::Outbound(f) => expected.push(PeerEvent::Outbound(f.clone())),
                        PeerMessage::Loading(mark) => expected.push(PeerEvent::Loading(*mark)),
                        _ => {}
                    }
                }
                msg.write_to(&mut peer.writer).unwrap();
                peer.writer.flush().unwrap();
            }
            Piece::Raw(bytes) if !bytes.is_empty() => {
                spliced = true;
                budget -= bytes.len().min(budget);
                let _ = peer.control.write_all(bytes);
            }
            Piece::Raw(_) => {}
        }
    }
    // The peer hangs up; the reader must report the end.
    drop(peer);

    let mut got = Vec::new();
    let closed = loop {
        match rx.recv_timeout(Duration::from_secs(20)).expect("the link reports its end") {
            e @ (PeerEvent::Inbound { .. } | PeerEvent::Outbound(_) | PeerEvent::Loading(_)) => got.push(e),
            PeerEvent::Room | PeerEvent::Renewed => {
                assert!(!link.has_credit(WINDOW as usize + 1), "credit beyond the window");
            }
            PeerEvent::Closed(why) => break why,
        }
    };
    assert!(!link.has_credit(WINDOW as usize + 1), "credit beyond the window");
    assert!(got.len() <= expected.len(), "more frames than were sealed");
    assert_eq!(got[..], expected[..got.len()], "frames out of order or changed");
    if !spliced {
        assert_eq!(got.len(), expected.len(), "a frame was lost ({closed})");
    }
    // Both of the link's threads end with it (else every link would cost two threads; and a
    // thread still ending when the input is done shows up as a leak of its thread-local
    // destructors' list).
    drop(link);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while threads() > threads_before {
        assert!(std::time::Instant::now() < deadline, "the link's threads outlived it");
        std::thread::sleep(Duration::from_millis(1));
    }
});
