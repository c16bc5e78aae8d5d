//! The `top` service on TCP port 9100 (line format: [`colo_guest::proto::top`]): every
//! `top_ms` each client gets a line of timing-dependent values, like `top` refreshing. What
//! clients send is discarded. A client whose transmit buffer cannot take a line misses it.
//!
//! Lines are made only while a client is connected, so an idle guest is not woken for them.

use smoltcp::iface::SocketSet;
use smoltcp::time::{Duration, Instant};

use colo_guest::proto::top::{TopLine, MAX_LINE};
use colo_guest::stats::Stats;

use super::pool::{client_finished, discard_input, send_room, Flow, TcpPool};
use crate::time;

/// The top port.
pub const PORT: u16 = 9100;
const MAX_CLIENTS: usize = 16;
const RX_BUFFER: usize = 1024;
const TX_BUFFER: usize = 4096;

/// The top service.
pub struct Top {
    pool: TcpPool<()>,
    period: Duration,
    /// When the next line is due; `None` while no client is connected.
    next: Option<Instant>,
    seq: u64,
    /// Burn iterations when the last line was made.
    burn_at_last_line: u64,
}

impl Top {
    /// Listens on port 9100; lines every `period_ms`.
    pub fn start(sockets: &mut SocketSet<'static>, period_ms: u32) -> Result<Top, &'static str> {
        Ok(Top {
            pool: TcpPool::new(sockets, PORT, MAX_CLIENTS, RX_BUFFER, TX_BUFFER)?,
            period: Duration::from_millis(u64::from(period_ms)),
            next: None,
            seq: 0,
            burn_at_last_line: 0,
        })
    }

    /// Sends a line to every client if one is due.
    pub fn poll(&mut self, now: Instant, sockets: &mut SocketSet<'static>, stats: &mut Stats) {
        let mut line = [0u8; MAX_LINE];
        let mut line_len = 0;
        if self.next.is_some_and(|next| now >= next) {
            line_len = TopLine {
                seq: self.seq,
                tsc: time::rdtsc(),
                up_ms: now.total_millis() as u64,
                burn: stats.burn_iterations - self.burn_at_last_line,
                dirty: stats.dirty_pages,
            }
            .write(&mut line);
            self.seq += 1;
            self.burn_at_last_line = stats.burn_iterations;
            stats.top_lines += 1;
        }
        let line = &line[..line_len];
        stats.tcp_accepted += self.pool.poll(sockets, |socket, ()| {
            discard_input(socket);
            if !line.is_empty() && socket.may_send() && send_room(socket) >= line.len() {
                let _ = socket.send_slice(line);
            }
            if client_finished(socket) {
                Flow::Close
            } else {
                Flow::Open
            }
        });
        self.next = match (self.pool.has_clients(), self.next) {
            (false, _) => None,
            // The first client: its first line comes one period from now and counts the
            // burn iterations from now.
            (true, None) => {
                self.burn_at_last_line = stats.burn_iterations;
                Some(now + self.period)
            }
            // Next period; after a long stall (the VM was stopped), restart from now rather
            // than sending the missed lines in a burst.
            (true, Some(next)) if now >= next => {
                let following = next + self.period;
                Some(if following <= now { now + self.period } else { following })
            }
            (true, next) => next,
        };
    }

    /// When the next line is due.
    pub fn deadline(&self) -> Option<Instant> {
        self.next
    }
}
