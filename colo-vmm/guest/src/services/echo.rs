//! Echo (RFC 862) on port 7: TCP returns every byte it receives, UDP every datagram to its
//! sender. Input is read only as fast as the reply fits, so a client that does not read
//! stalls itself (TCP flow control), not the guest.

use alloc::vec;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::storage::PacketMetadata;

use colo_guest::stats::Stats;

use super::pool::{client_finished, send_room, Flow, TcpPool};

/// The echo port.
pub const PORT: u16 = 7;
const MAX_CLIENTS: usize = 16;
const TCP_BUFFER: usize = 64 * 1024;
/// UDP buffers: room for this many datagrams and bytes each way. Transmit is as large as
/// receive, so any datagram received fits once the transmit buffer drains.
const UDP_PACKETS: usize = 256;
const UDP_BYTES: usize = 256 * 1024;
/// Bytes copied per step (on the stack).
const CHUNK: usize = 2048;

/// The echo service.
pub struct Echo {
    tcp: TcpPool<()>,
    udp: SocketHandle,
}

impl Echo {
    /// Listens on TCP and UDP port 7.
    pub fn start(sockets: &mut SocketSet<'static>) -> Result<Echo, &'static str> {
        let tcp = TcpPool::new(sockets, PORT, MAX_CLIENTS, TCP_BUFFER, TCP_BUFFER)?;
        let buffer = || udp::PacketBuffer::new(vec![PacketMetadata::EMPTY; UDP_PACKETS], vec![0u8; UDP_BYTES]);
        let mut socket = udp::Socket::new(buffer(), buffer());
        socket.bind(PORT).map_err(|_| "cannot bind UDP port 7")?;
        Ok(Echo { tcp, udp: sockets.add(socket) })
    }

    /// Echoes what arrived.
    pub fn poll(&mut self, sockets: &mut SocketSet<'static>, stats: &mut Stats) {
        let bytes = &mut stats.echo_tcp_bytes;
        let accepted = self.tcp.poll(sockets, |socket, ()| echo_tcp(socket, bytes));
        stats.tcp_accepted += accepted;
        stats.echo_udp_datagrams += echo_udp(sockets.get_mut::<udp::Socket>(self.udp));
    }
}

/// Copies a connection's input to its output, as far as the output has room.
fn echo_tcp(socket: &mut tcp::Socket<'_>, bytes: &mut u64) -> Flow {
    let mut chunk = [0u8; CHUNK];
    loop {
        let room = send_room(socket).min(CHUNK);
        if room == 0 {
            break;
        }
        let n = match socket.recv_slice(&mut chunk[..room]) {
            Ok(n) if n > 0 => n,
            _ => break,
        };
        // `room` bytes fit, so this sends all `n`.
        let _ = socket.send_slice(&chunk[..n]);
        *bytes += n as u64;
    }
    if client_finished(socket) {
        Flow::Close
    } else {
        Flow::Open
    }
}

/// Sends every received datagram back to its sender; returns how many.
fn echo_udp(socket: &mut udp::Socket<'_>) -> u64 {
    let mut echoed = 0;
    let mut datagram = [0u8; CHUNK];
    while let Ok((data, meta)) = socket.peek() {
        let (len, meta) = (data.len(), *meta);
        // Longer datagrams are not echoed (smoltcp receives at most an MTU's worth: IP
        // fragmentation is not enabled).
        if len > CHUNK {
            let _ = socket.recv();
            continue;
        }
        datagram[..len].copy_from_slice(data);
        // Answer from the address the datagram was sent to.
        let reply = udp::UdpMetadata { endpoint: meta.endpoint, local_address: meta.local_address, meta: meta.meta };
        match socket.send_slice(&datagram[..len], reply) {
            Ok(()) => {
                let _ = socket.recv();
                echoed += 1;
            }
            // Keep the datagram until the transmit buffer drains.
            Err(udp::SendError::BufferFull) => break,
            // No route back: drop it.
            Err(udp::SendError::Unaddressable) => {
                let _ = socket.recv();
            }
        }
    }
    echoed
}
