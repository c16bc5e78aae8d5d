//! The control socket of docs/control.md, between compare processes and checkpoint controllers.
//!
//! Every compare process (colo-proxy, vhost-net-compare) listens on a Unix stream socket (mode
//! 0600); controllers (colo-vmm on either host, tools, tests) connect to it, several at once.
//! Messages are JSON objects, one per `\n`-terminated line of at most [`MAX_LINE`] bytes, each
//! with a `type`:
//!
//! - to the compare process, [`Command`]s carrying an `id`: `checkpoint` (flush, reply
//!   `flushed`), `mode` (switch mode, reply `mode-set`), `query-stats` (reply `stats`);
//! - from it, [`Event`]s: `hello` on every new connection, `miscompare` (the first inconsistency
//!   after each flush, to every controller), `peer` (a VM connection came or went), the replies
//!   above with the command's `id` (to the controller that sent it only), and `error` for a bad
//!   command or line (with its `id` when one could be read; the connection stays open). A line
//!   that gives a key twice is refused, not read as its last occurrence.
//!
//! Ordering guarantees, which the compare process keeps by the order in which it calls
//! [`ControlServer::reply`] and [`ControlServer::broadcast`] (each connection's output is one
//! FIFO):
//!
//! - `flushed` is sent only after every frame the flush released has been handed to the output;
//! - after `mode-set` with `passive`, no primary frame is released until the next `checkpoint`;
//! - a controller treats a checkpoint as committed only once every connected compare process has
//!   replied `flushed`.
//!
//! [`ControlServer`] lives inside the caller's mio loop (the proxy is single-threaded);
//! [`ControlServer::spawn`] runs one on its own thread for processes without such a loop.
//! [`ControlClient`] is a small blocking client for controllers, tools and tests.

mod client;
mod duplicate_keys;
pub mod lines;
mod message;
mod server;
mod socket;
mod threaded;

#[cfg(test)]
mod testutil;

pub use client::{ClientError, ControlClient, DEFAULT_TIMEOUT, HELLO_TIMEOUT};
pub use message::{Command, CommandError, Event, HelloReplica, PeerState, MAX_LINE};
pub use server::{
    ConnId, ControlServer, Request, MAX_BAD_LINES, MAX_CONNECTIONS, MAX_PENDING, MAX_UNANSWERED, READ_BUDGET,
    TOKEN_SPAN,
};
pub use socket::SocketFile;
pub use threaded::{ControlHandle, Executor};
