//! vhost-net-compare's vhost-user relay (frontend_shim) between a frontend that sends any bytes
//! and a daemon that reads what is forwarded.
//!
//! Invariants:
//! - nothing panics, and the relay ends when the frontend hangs up or sends something unreadable;
//! - the daemon only ever receives whole, well-formed messages (header, then no more payload
//!   than the protocol allows), which are the frontend's own or the relay's `SET_VRING_ENABLE`;
//! - what the relay adds is bounded: at most a few injected requests, however many the
//!   frontend sent early;
//! - the frontend only receives the relay's `REPLY_ACK` answers.

#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::message::{FrontendReq, MAX_MSG_SIZE};
use vhost_net_compare::frontend_shim::enable_order::MAX_RINGS as MAX_DEFERRED_RINGS;
use vhost_net_compare::frontend_shim::{relay, HEADER_LEN};

/// Requests the relay may add: one deferred enable per ring it remembers.
const MAX_INJECTED: u64 = MAX_DEFERRED_RINGS as u64;

fn messages(bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        assert!(rest.len() >= HEADER_LEN, "a partial header was forwarded");
        let word = |i: usize| u32::from_ne_bytes(rest[i..i + 4].try_into().unwrap());
        let (req, flags, size) = (word(0), word(4), word(8) as usize);
        assert!(size <= MAX_MSG_SIZE, "a message of {size} payload bytes was forwarded");
        assert!(rest.len() >= HEADER_LEN + size, "a partial message was forwarded");
        out.push((req, flags, rest[HEADER_LEN..HEADER_LEN + size].to_vec()));
        rest = &rest[HEADER_LEN + size..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let (frontend, mut frontend_peer) = UnixStream::pair().unwrap();
    let (backend, mut daemon) = UnixStream::pair().unwrap();
    let relay = std::thread::spawn(move || relay(frontend, backend, &mut |_| {}));
    // The relay may hang up before taking everything (garbage ends it): a reset, not a failure.
    let _ = frontend_peer.write_all(data);
    let _ = frontend_peer.shutdown(Shutdown::Write);
    let mut forwarded = Vec::new();
    let _ = daemon.read_to_end(&mut forwarded);
    let summary = relay.join().expect("the relay does not panic");
    let mut answered = Vec::new();
    let _ = frontend_peer.read_to_end(&mut answered);

    let forwarded = messages(&forwarded);
    let enable: u32 = FrontendReq::SET_VRING_ENABLE.into();
    let injected = forwarded.len() as u64 - summary.to_backend;
    assert_eq!(injected, summary.injected, "every message the daemon got is counted");
    assert!(summary.injected <= MAX_INJECTED, "{} requests injected", summary.injected);
    assert!(forwarded.len() as u64 >= summary.to_backend);
    for (req, _, payload) in messages(&answered) {
        assert_eq!(req, enable, "the relay answers only SET_VRING_ENABLE");
        assert_eq!(payload, 0u64.to_ne_bytes(), "with success");
    }
});
