//! vhost-net-compare: a vhost-user net backend that is either a plain passthrough between one VM
//! and a tap (one VM socket), or the COLO proxy on the fast path (two VM sockets): every frame
//! from the tap is mirrored into both guests' RX rings, both guests' TX frames are compared by
//! the colo-proxy engine, and the primary's released frames leave through the tap.
//!
//! Threads (started by [`service`]):
//! - per VM connection, a vhost-user daemon: its request thread (the vhost-user protocol) and one
//!   worker thread that owns both vrings ([`backend`]: RX in [`rx`], TX in [`tx`]);
//! - one uplink thread reading the tap ([`uplink`]) and handing frames to the VMs through
//!   per-VM queues ([`port`]) and eventfds, so RX rings are written only by their worker;
//! - one control thread ([`control`]): the control socket, its commands and the engine's timers
//!   (without a control socket, a `timers` thread);
//! - one accept thread per VM socket ([`server`]), which builds a fresh daemon per connection,
//!   and per connection a relay thread ([`frontend_shim`]) between the frontend and the daemon's
//!   private socket, which fixes QEMU 7.2's order of vhost-user requests (control messages
//!   only: frames never pass through it).
//!
//! The state the VMs share — the compare engine, the capture file, the tap writer in COLO mode —
//! sits behind one mutex in [`colo`]; [`hub`] routes frames between the tap and the VMs.
//! [`metrics`] shows the counters to Prometheus (`--metrics`).

#![warn(missing_docs)]

pub mod backend;
pub mod chain;
pub mod cli;
pub mod colo;
pub mod control;
pub mod device;
pub mod exit_event;
pub mod frontend_shim;
pub mod hub;
pub mod lock;
pub mod metrics;
pub mod port;
pub mod ratelimit;
pub mod replica;
pub mod router;
pub mod rx;
pub mod secondary_cut;
pub mod server;
pub mod service;
pub mod stats;
pub mod tap;
pub mod tx;
pub mod uplink;

#[cfg(test)]
mod testutil;
