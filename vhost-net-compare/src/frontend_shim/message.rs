//! One vhost-user message as the relay carries it: the 12-byte header, the payload and the
//! file descriptors that came with them.
//!
//! The payloads the relay looks into are the vhost crate's own types ([`VhostUserVringState`],
//! [`VhostUserU64`]); the crate keeps its header type private, so the three header fields are
//! read here. Everything else is carried as bytes, unchanged.

use std::fmt;
use std::mem::size_of;
use std::os::fd::OwnedFd;

use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag, VhostUserU64, VhostUserVringState};
use vm_memory::ByteValued;

/// Length of the vhost-user message header: request, flags, payload size (`u32` each, host
/// byte order).
pub const HEADER_LEN: usize = 12;

/// The header flags of a version 1 message (bits 0..=1).
pub const VERSION_1: u32 = 0x1;

/// One vhost-user message as it travels: header and payload bytes, and the file descriptors
/// that came with them (closed when the message is dropped).
#[derive(Debug)]
pub struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    /// A message with `request`, `flags` and `payload` (no descriptors).
    pub fn new(request: u32, flags: u32, payload: &[u8]) -> Message {
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(&request.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        // Payloads built here are at most a few bytes; received ones are bounded by MAX_MSG_SIZE.
        bytes.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
        bytes.extend_from_slice(payload);
        Message { bytes, fds: Vec::new() }
    }

    /// A message as received: `bytes` holds a whole header and the payload it announces.
    pub(super) fn from_wire(bytes: Vec<u8>, fds: Vec<OwnedFd>) -> Message {
        debug_assert_eq!(Some(bytes.len() - HEADER_LEN), payload_size(&bytes).map(|s| s as usize));
        Message { bytes, fds }
    }

    /// The same message with `fds` attached.
    pub fn with_fds(mut self, fds: Vec<OwnedFd>) -> Message {
        self.fds = fds;
        self
    }

    fn header_field(&self, at: usize) -> u32 {
        u32::from_ne_bytes(self.bytes[at..at + 4].try_into().expect("a whole header"))
    }

    /// The request code.
    pub fn request(&self) -> u32 {
        self.header_field(0)
    }

    /// The header flags (version, REPLY, NEED_REPLY).
    pub fn flags(&self) -> u32 {
        self.header_field(4)
    }

    /// The payload (after the header).
    pub fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// Header and payload, as on the wire.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The attached file descriptors.
    pub fn fds(&self) -> &[OwnedFd] {
        &self.fds
    }

    /// The request is `request`.
    pub fn is(&self, request: FrontendReq) -> bool {
        self.request() == u32::from(request)
    }

    /// The header carries `flag`.
    pub fn has_flag(&self, flag: VhostUserHeaderFlag) -> bool {
        self.flags() & flag.bits() != 0
    }

    /// The payload as a `T`, if it is exactly one (no alignment needed: it is copied).
    pub fn body<T: ByteValued + Default>(&self) -> Option<T> {
        let payload = self.payload();
        if payload.len() != size_of::<T>() {
            return None;
        }
        let mut body = T::default();
        body.as_mut_slice().copy_from_slice(payload);
        Some(body)
    }
}

/// The payload size a header announces (`None` if `header` is shorter than a header).
pub fn payload_size(header: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(header.get(8..HEADER_LEN)?.try_into().ok()?))
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = FrontendReq::try_from(self.request()).map(|r| format!("{r:?}")).unwrap_or_else(|_| "?".into());
        write!(
            f,
            "{name} ({}) flags {:#x}, {} payload bytes, {} fds",
            self.request(),
            self.flags(),
            self.payload().len(),
            self.fds.len()
        )
    }
}

/// A `SET_VRING_ENABLE` request as the relay sends it (no reply wanted).
pub fn set_vring_enable(index: u32, num: u32) -> Message {
    let state = VhostUserVringState::new(index, num);
    Message::new(FrontendReq::SET_VRING_ENABLE.into(), VERSION_1, state.as_slice())
}

/// The `REPLY_ACK` reply "success" (a `u64` 0) to `request`.
pub fn ack(request: u32) -> Message {
    Message::new(request, VERSION_1 | VhostUserHeaderFlag::REPLY.bits(), VhostUserU64::new(0).as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_and_payload_are_where_the_protocol_puts_them() {
        let m = set_vring_enable(1, 0);
        assert_eq!(m.bytes().len(), HEADER_LEN + 8);
        assert_eq!(m.request(), 18, "SET_VRING_ENABLE");
        assert_eq!(m.flags(), VERSION_1);
        assert_eq!(payload_size(m.bytes()), Some(8));
        assert_eq!(m.payload(), [1u32.to_ne_bytes(), 0u32.to_ne_bytes()].concat());
        let state: VhostUserVringState = m.body().unwrap();
        assert_eq!(({ state.index }, { state.num }), (1, 0));
        assert!(m.body::<VhostUserU64>().is_some(), "8 bytes read as a u64 too");
        assert!(Message::new(18, VERSION_1, &[0; 4]).body::<VhostUserVringState>().is_none(), "wrong size");
        let a = ack(3);
        assert!(a.has_flag(VhostUserHeaderFlag::REPLY) && !a.has_flag(VhostUserHeaderFlag::NEED_REPLY));
        assert_eq!(a.body::<VhostUserU64>().map(|v| v.value), Some(0));
        assert_eq!(payload_size(&[0; 11]), None);
    }
}
