//! The control API: JSON lines on a Unix socket in the QMP shape —
//! `{"execute": "stop", "arguments": {}}` → `{"return": {}}` or
//! `{"error": {"class": "GenericError", "desc": "..."}}` — and the `colo-vmm ctl` client.

pub mod client;
pub mod command;
pub mod dispatch;
pub mod protocol;
pub mod server;
