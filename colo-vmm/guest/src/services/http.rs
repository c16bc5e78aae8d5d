//! The HTTP server on TCP port 80 (protocol: [`colo_guest::proto::http`]).
//!
//! Each connection parses one request head at a time, builds the response into its own
//! buffer, and sends it (and any generated `/bytes` body) as the transmit buffer drains
//! before it reads the next request.

use alloc::boxed::Box;

use smoltcp::iface::SocketSet;
use smoltcp::socket::tcp;

use colo_guest::proto::http::{fill_stream, respond, HeadReader, MAX_RESPONSE};
use colo_guest::stats::Stats;

use super::pool::{client_finished, Flow, TcpPool};

/// The HTTP port.
pub const PORT: u16 = 80;
const MAX_CLIENTS: usize = 16;
const RX_BUFFER: usize = 8 * 1024;
const TX_BUFFER: usize = 64 * 1024;

/// One connection's state (boxed: the head and response buffers are 6 KiB).
struct Connection {
    head: HeadReader,
    out: [u8; MAX_RESPONSE],
    out_len: usize,
    out_sent: usize,
    /// Bytes of generated body still to send, and how many were sent.
    stream_left: u64,
    stream_sent: u64,
    /// Close once the response is out.
    close: bool,
}

impl Default for Connection {
    fn default() -> Connection {
        Connection {
            head: HeadReader::default(),
            out: [0; MAX_RESPONSE],
            out_len: 0,
            out_sent: 0,
            stream_left: 0,
            stream_sent: 0,
            close: false,
        }
    }
}

/// The HTTP service.
pub struct Http {
    pool: TcpPool<Box<Connection>>,
}

impl Http {
    /// Listens on port 80.
    pub fn start(sockets: &mut SocketSet<'static>) -> Result<Http, &'static str> {
        Ok(Http { pool: TcpPool::new(sockets, PORT, MAX_CLIENTS, RX_BUFFER, TX_BUFFER)? })
    }

    /// Serves every connection as far as its buffers allow.
    pub fn poll(&mut self, sockets: &mut SocketSet<'static>, stats: &mut Stats) {
        // Responses show the counters as of this poll.
        let snapshot = *stats;
        let mut requests = 0;
        stats.tcp_accepted +=
            self.pool.poll(sockets, |socket, connection| serve(socket, connection, &snapshot, &mut requests));
        stats.http_requests += requests;
    }
}

fn serve(socket: &mut tcp::Socket<'_>, connection: &mut Connection, stats: &Stats, requests: &mut u64) -> Flow {
    loop {
        // Finish the current response first.
        if connection.out_sent < connection.out_len {
            let pending = &connection.out[connection.out_sent..connection.out_len];
            connection.out_sent += socket.send_slice(pending).unwrap_or(0);
            if connection.out_sent < connection.out_len {
                return Flow::Open;
            }
        }
        while connection.stream_left > 0 {
            let (left, offset) = (connection.stream_left, connection.stream_sent);
            let sent = socket
                .send(|buf| {
                    let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    fill_stream(offset, &mut buf[..n]);
                    (n, n)
                })
                .unwrap_or(0);
            if sent == 0 {
                return Flow::Open;
            }
            connection.stream_left -= sent as u64;
            connection.stream_sent += sent as u64;
        }
        if connection.close {
            return Flow::Close;
        }
        // Then the next request.
        let Connection { head, out, .. } = connection;
        let mut response = None;
        let taken = socket.recv(|data| {
            let (taken, request) = head.feed(data);
            if let Some(request) = request {
                response = Some(respond(request, stats, out));
            }
            (taken, taken)
        });
        match response {
            Some(response) => {
                *requests += 1;
                connection.out_len = response.len;
                connection.out_sent = 0;
                connection.stream_left = response.stream;
                connection.stream_sent = 0;
                connection.close = response.close;
            }
            None if matches!(taken, Ok(1..)) => {}
            None => break,
        }
    }
    if client_finished(socket) {
        Flow::Close
    } else {
        Flow::Open
    }
}
