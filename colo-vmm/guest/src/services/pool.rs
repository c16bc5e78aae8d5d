//! A TCP server's sockets: up to a fixed number of connections, each with the service's
//! per-client state, and a listening socket for every free slot.
//!
//! Every free slot listens because smoltcp hands a SYN to a listening socket during the
//! interface poll, before the service can open another one: with fewer listeners, clients
//! connecting at the same moment would be refused. It also means a service's memory is
//! allocated at start and bounded: a closed connection's socket is freed and a new listener
//! of the same size takes its place.

use alloc::vec::Vec;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};

/// What a service wants done with a connection after serving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep it open.
    Open,
    /// Close it (gracefully: queued data goes out first).
    Close,
}

/// The sockets of one TCP service, with state `C` per client.
pub struct TcpPool<C> {
    port: u16,
    max_clients: usize,
    rx_size: usize,
    tx_size: usize,
    listeners: Vec<SocketHandle>,
    clients: Vec<(SocketHandle, C)>,
}

impl<C: Default> TcpPool<C> {
    /// Listens on `port` for up to `max_clients` clients, each socket with buffers of
    /// `rx_size` and `tx_size` bytes (all allocated now).
    pub fn new(
        sockets: &mut SocketSet<'static>,
        port: u16,
        max_clients: usize,
        rx_size: usize,
        tx_size: usize,
    ) -> Result<TcpPool<C>, &'static str> {
        let mut pool = TcpPool { port, max_clients, rx_size, tx_size, listeners: Vec::new(), clients: Vec::new() };
        pool.refill(sockets);
        if pool.listeners.len() < max_clients {
            return Err("out of memory for the sockets");
        }
        Ok(pool)
    }

    /// Accepts new connections, serves each connection with `serve`, and drops closed ones.
    /// Returns how many connections were accepted.
    pub fn poll(
        &mut self,
        sockets: &mut SocketSet<'static>,
        mut serve: impl FnMut(&mut tcp::Socket<'static>, &mut C) -> Flow,
    ) -> u64 {
        let mut accepted = 0;
        // A listener that got a SYN is a connection now.
        let mut i = 0;
        while i < self.listeners.len() {
            let handle = self.listeners[i];
            if sockets.get::<tcp::Socket>(handle).state() == State::Listen {
                i += 1;
            } else {
                self.listeners.swap_remove(i);
                self.clients.push((handle, C::default()));
                accepted += 1;
            }
        }
        self.clients.retain_mut(|(handle, client)| {
            let socket = sockets.get_mut::<tcp::Socket>(*handle);
            match socket.state() {
                // Finished (TIME-WAIT needs no buffers: a late segment just gets a reset), or
                // back to LISTEN after a reset in SYN-RECEIVED: the slot is free again.
                State::Closed | State::TimeWait | State::Listen => {
                    sockets.remove(*handle);
                    false
                }
                _ => {
                    if serve(socket, client) == Flow::Close {
                        socket.close();
                    }
                    true
                }
            }
        });
        self.refill(sockets);
        accepted
    }

    /// Whether a client is connected.
    pub fn has_clients(&self) -> bool {
        !self.clients.is_empty()
    }

    /// Whether any client's state satisfies `f`.
    pub fn any(&self, f: impl Fn(&C) -> bool) -> bool {
        self.clients.iter().any(|(_, c)| f(c))
    }

    /// Opens a listening socket in every free slot.
    fn refill(&mut self, sockets: &mut SocketSet<'static>) {
        let wanted = self.max_clients.saturating_sub(self.clients.len());
        while self.listeners.len() < wanted {
            let Some(mut socket) = new_socket(self.rx_size, self.tx_size) else {
                // Out of memory: try again on the next poll, when clients may have left.
                return;
            };
            if socket.listen(self.port).is_err() {
                return;
            }
            self.listeners.push(sockets.add(socket));
        }
    }
}

/// A TCP socket with the given buffer sizes, or `None` if the heap cannot hold them.
fn new_socket(rx_size: usize, tx_size: usize) -> Option<tcp::Socket<'static>> {
    let rx = try_buffer(rx_size)?;
    let tx = try_buffer(tx_size)?;
    let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
    // Request/response services: answer at once, do not wait to fill a segment.
    socket.set_nagle_enabled(false);
    Some(socket)
}

/// A zeroed buffer, without aborting when the heap is short.
fn try_buffer(size: usize) -> Option<Vec<u8>> {
    let mut buffer = Vec::new();
    buffer.try_reserve_exact(size).ok()?;
    buffer.resize(size, 0);
    Some(buffer)
}

/// Room left in a socket's transmit buffer.
pub fn send_room(socket: &tcp::Socket<'_>) -> usize {
    socket.send_capacity() - socket.send_queue()
}

/// Whether the client has closed its side and everything it sent has been read: time for
/// the service to close ours.
pub fn client_finished(socket: &tcp::Socket<'_>) -> bool {
    socket.state() == State::CloseWait && socket.recv_queue() == 0
}

/// Discards whatever the client sent (for services that only talk).
pub fn discard_input(socket: &mut tcp::Socket<'_>) {
    while socket.recv(|data| (data.len(), data.len())).is_ok_and(|n| n > 0) {}
}
