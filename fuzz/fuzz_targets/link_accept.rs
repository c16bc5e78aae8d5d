//! The link handshake fed garbage: the accepting side (the `--incoming` and `--peer-listen`
//! listeners) and the connecting side reading a garbage answer, with and without a link key.
//!
//! Invariants: nothing panics; with a key, no bytes the fuzzer can make are accepted as a link
//! (it does not hold the key); without one, only a well-formed plain hello for the right purpose
//! is; a refused connection gets no more than the handshake's own messages written to it.

#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use colo_fuzz::ScriptSocket;
use colo_proxy::link::{accept, connect, LinkKey};
use libfuzzer_sys::fuzz_target;

fn key() -> &'static LinkKey {
    static KEY: OnceLock<LinkKey> = OnceLock::new();
    KEY.get_or_init(|| LinkKey::derive(&[7u8; 32]))
}

const T: Duration = Duration::from_secs(1);

fuzz_target!(|data: &[u8]| {
    // Accepting, with a key: the fuzzer cannot authenticate.
    let s = ScriptSocket::new(data);
    assert!(accept(s.clone(), Some(key()), "frames", T).is_err(), "garbage authenticated");
    assert!(s.written().len() <= 2 + 48, "more than one handshake message answered garbage");

    // Accepting, plain: only the right hello.
    let s = ScriptSocket::new(data);
    let ok = accept(s.clone(), None, "frames", T).is_ok();
    assert_eq!(ok, data.starts_with(b"COLO-LINK/1 PLAIN frames\n"), "plain hello judged wrongly");
    if !ok {
        assert!(s.written().is_empty(), "a refused plain connection was answered");
    }

    // Connecting, with a key, to a peer that answers garbage.
    let s = ScriptSocket::new(data);
    assert!(connect(s, Some(key()), "checkpoint", T).is_err(), "a garbage answer authenticated");
    // Connecting, plain.
    let s = ScriptSocket::new(data);
    let ok = connect(s, None, "checkpoint", T).is_ok();
    assert_eq!(ok, data.starts_with(b"COLO-LINK/1 PLAIN checkpoint\n"), "plain answer judged wrongly");
});
