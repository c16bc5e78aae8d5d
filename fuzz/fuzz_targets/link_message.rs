//! The frame link's message parser on any byte stream.
//!
//! Invariants: nothing panics or allocates beyond one maximal message; every message read is
//! written back as exactly the bytes it was read from.

#![no_main]

use colo_proxy::link::message::{MessageError, PeerMessage, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    loop {
        let before = r;
        match PeerMessage::read_from(&mut r) {
            Ok(Some(m)) => {
                let used = before.len() - r.len();
                assert_eq!(m.wire_len(), used, "wire_len counts what was read");
                let mut again = Vec::new();
                m.write_to(&mut again).unwrap();
                assert_eq!(again, before[..used], "a message is written as it was read");
                if let PeerMessage::Inbound { frame, .. } | PeerMessage::Outbound(frame) = &m {
                    assert!(frame.len() <= MAX_FRAME, "a frame longer than the link carries");
                }
            }
            Ok(None) => {
                assert!(before.is_empty(), "end of stream only at the end");
                break;
            }
            Err(MessageError::Io(_)) | Err(MessageError::Malformed(_)) => break,
        }
    }
});
