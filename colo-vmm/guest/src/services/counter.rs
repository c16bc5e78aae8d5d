//! The counter service on TCP port 9000 (protocol: [`colo_guest::proto::counter`]). The value
//! is shared by all clients and lives in guest memory, where checkpoints carry it.
//!
//! A line is taken from a client only when its reply fits the transmit buffer, so a reply is
//! never dropped or half-sent, and a client that does not read stops being served rather
//! than growing a queue.

use smoltcp::iface::SocketSet;
use smoltcp::socket::tcp;

use colo_guest::proto::counter::{respond, MAX_LINE, MAX_REPLY};
use colo_guest::proto::line::LineReader;
use colo_guest::stats::Stats;

use super::pool::{client_finished, send_room, Flow, TcpPool};

/// The counter port.
pub const PORT: u16 = 9000;
const MAX_CLIENTS: usize = 16;
const BUFFER: usize = 4096;

/// The counter service.
pub struct Counter {
    pool: TcpPool<LineReader<MAX_LINE>>,
    value: u64,
}

impl Counter {
    /// Listens on port 9000, with the counter at 0.
    pub fn start(sockets: &mut SocketSet<'static>) -> Result<Counter, &'static str> {
        Ok(Counter { pool: TcpPool::new(sockets, PORT, MAX_CLIENTS, BUFFER, BUFFER)?, value: 0 })
    }

    /// Answers every complete line whose reply fits.
    pub fn poll(&mut self, sockets: &mut SocketSet<'static>, stats: &mut Stats) {
        let value = &mut self.value;
        stats.tcp_accepted += self.pool.poll(sockets, |socket, reader| serve(socket, reader, value));
        stats.counter = self.value;
    }
}

fn serve(socket: &mut tcp::Socket<'_>, reader: &mut LineReader<MAX_LINE>, value: &mut u64) -> Flow {
    while send_room(socket) >= MAX_REPLY {
        let mut reply = [0u8; MAX_REPLY];
        let mut reply_len = 0;
        let taken = socket.recv(|data| {
            let (taken, line) = reader.feed(data);
            if let Some(line) = line {
                reply_len = respond(line, value, &mut reply);
            }
            (taken, taken)
        });
        if reply_len > 0 {
            // The reply fits (checked above), so it is sent whole.
            let _ = socket.send_slice(&reply[..reply_len]);
        }
        if !matches!(taken, Ok(1..)) {
            break;
        }
    }
    if client_finished(socket) {
        Flow::Close
    } else {
        Flow::Open
    }
}
