//! Messages and descriptors for the relay's tests.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vhost::vhost_user::message::FrontendReq;
use vmm_sys_util::eventfd::EventFd;

use super::message::{set_vring_enable, Message, VERSION_1};

/// `VHOST_USER_F_PROTOCOL_FEATURES` (virtio feature bit 30).
pub const PROTOCOL: u64 = 1 << 30;
/// The header's NEED_REPLY flag.
pub const NEED_REPLY: u32 = 0x8;
/// The header's REPLY flag.
pub const REPLY: u32 = 0x4;

/// The request code of `r`.
pub fn code(r: FrontendReq) -> u32 {
    r.into()
}

/// A descriptor of its own for `e` (a dup).
pub fn owned(e: &EventFd) -> OwnedFd {
    // SAFETY: dup of a valid descriptor; the result is owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(libc::dup(e.as_raw_fd())) }
}

/// A fresh descriptor (an eventfd).
pub fn new_fd() -> OwnedFd {
    owned(&EventFd::new(0).unwrap())
}

/// A version 1 request `r` with extra `flags`.
pub fn req(r: FrontendReq, flags: u32, payload: &[u8]) -> Message {
    Message::new(code(r), VERSION_1 | flags, payload)
}

/// A request `r` whose payload is the `u64` `v`.
pub fn u64_msg(r: FrontendReq, flags: u32, v: u64) -> Message {
    req(r, flags, &v.to_ne_bytes())
}

/// `SET_VRING_ENABLE` as a frontend sends it, with extra `flags`.
pub fn enable(index: u32, num: u32, flags: u32) -> Message {
    let m = set_vring_enable(index, num);
    Message::new(m.request(), m.flags() | flags, m.payload())
}
