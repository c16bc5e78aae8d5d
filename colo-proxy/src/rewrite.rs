//! The secondary's TCP sequence rewriter (QEMU's filter-rewriter, inside our process).
//!
//! The two VMs choose different initial sequence numbers (ISNs), so the secondary's byte stream
//! is numbered differently from the primary's. For each connection the rewriter learns
//! `offset = SVM ISN − PVM ISN` and then:
//! - secondary → out: `seq −= offset`, so the secondary's output can be compared with the
//!   primary's (and, after failover, released to clients that only know the primary's numbers);
//! - in → secondary: `ack += offset` (and SACK blocks), so the secondary sees acknowledgements
//!   of its own numbers.
//!
//! Learning: the PVM ISN comes from the primary's SYN or SYN+ACK, or (QEMU's way, for
//! client-initiated connections) from the client's first ACK, which acknowledges PVM ISN + 1;
//! the SVM ISN from the secondary's SYN or SYN+ACK. **Ours**: connections the guest opens are
//! learned from the two guests' SYNs, which QEMU never does. After a checkpoint the secondary's
//! TCP state equals the primary's, so every offset becomes 0.

use std::net::IpAddr;
use std::time::Duration;

use rustc_hash::FxHashMap;

use crate::classify::{Compared, TcpInfo};
use crate::clock::Timestamp;
use crate::flow::FlowKind;
use crate::frame::Frame;
use crate::wire::checksum;
use crate::wire::tcp::SeqNumber;
use crate::wire::{be16, be32, put_be16, put_be32};

/// How long a closed connection's mapping is kept for late retransmissions (TIME_WAIT).
const CLOSED_GRACE: Duration = Duration::from_secs(60);
/// How long a handshake may take before its half-learned entry is forgotten.
const LEARNING_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections tracked at most. A flood of SYNs from the LAN (each creates an entry that waits
/// out [`LEARNING_TIMEOUT`]) must not grow the table without bound: past this, a new connection
/// is not tracked. Its frames then pass unrewritten, which costs at worst one checkpoint (after
/// it every offset is 0, so the connection needs no rewriting).
pub const MAX_CONNECTIONS: usize = 65536;
/// TCP option kinds.
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_SACK: u8 = 5;

/// A connection seen from the guest: (VLAN, guest address and port, peer address and port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnKey {
    vlan: u16,
    guest: (IpAddr, u16),
    peer: (IpAddr, u16),
}

impl ConnKey {
    /// The key of a frame the guest sent.
    fn outbound(c: &Compared) -> ConnKey {
        ConnKey { vlan: c.key.vlan, guest: (c.key.src, c.key.src_port), peer: (c.key.dst, c.key.dst_port) }
    }

    /// The key of a frame sent to the guest.
    fn inbound(c: &Compared) -> ConnKey {
        ConnKey { vlan: c.key.vlan, guest: (c.key.dst, c.key.dst_port), peer: (c.key.src, c.key.src_port) }
    }
}

/// What the rewriter knows about one connection.
#[derive(Debug, Clone)]
struct Conn {
    pvm_isn: Option<SeqNumber>,
    svm_isn: Option<SeqNumber>,
    /// `SVM ISN − PVM ISN` once both are known.
    offset: Option<u32>,
    /// FIN seen from the guest and from the peer.
    fin: [bool; 2],
    last_seen: Timestamp,
}

impl Conn {
    fn new(now: Timestamp) -> Conn {
        Conn { pvm_isn: None, svm_isn: None, offset: None, fin: [false; 2], last_seen: now }
    }

    /// Sets the offset once both ISNs are known; returns whether it was learned now.
    fn learn(&mut self, key: &ConnKey) -> bool {
        if let (None, Some(p), Some(s)) = (self.offset, self.pvm_isn, self.svm_isn) {
            let offset = s.0.wrapping_sub(p.0);
            self.offset = Some(offset);
            tracing::debug!(guest = ?key.guest, peer = ?key.peer, offset, "tcp offset learned");
            return true;
        }
        false
    }

    fn closed(&self) -> bool {
        self.fin[0] && self.fin[1]
    }
}

/// Counters of the rewriter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewriterStats {
    /// Connections tracked now.
    pub connections: u64,
    /// Offsets learned.
    pub learned: u64,
    /// Frames whose sequence or acknowledgement numbers were changed.
    pub rewritten: u64,
    /// New connections not tracked because the table was full ([`MAX_CONNECTIONS`]).
    pub untracked: u64,
}

/// The rewriter's connection table.
#[derive(Debug, Default)]
pub struct Rewriter {
    conns: FxHashMap<ConnKey, Conn>,
    learned: u64,
    rewritten: u64,
    untracked: u64,
}

impl Rewriter {
    /// An empty rewriter.
    pub fn new() -> Rewriter {
        Rewriter::default()
    }

    /// Counters.
    pub fn stats(&self) -> RewriterStats {
        RewriterStats {
            connections: self.conns.len() as u64,
            learned: self.learned,
            rewritten: self.rewritten,
            untracked: self.untracked,
        }
    }

    /// The offset learned for the connection of a frame the guest sent (`None` while learning or
    /// untracked).
    pub fn offset_of(&self, guest_frame: &Compared) -> Option<u32> {
        self.conns.get(&ConnKey::outbound(guest_frame)).and_then(|c| c.offset)
    }

    /// Learns from a frame the primary sent: its SYN or SYN+ACK carries the PVM ISN.
    pub fn observe_primary(&mut self, c: &Compared, now: Timestamp) {
        let Some(t) = tcp_of(c) else { return };
        if !t.flags.syn() {
            return;
        }
        let key = ConnKey::outbound(c);
        let Some(conn) = entry_for_syn(&mut self.conns, key, t.seq, |c| c.pvm_isn, now) else {
            self.untracked += 1;
            return;
        };
        conn.pvm_isn = Some(t.seq);
        self.learned += u64::from(conn.learn(&key));
    }

    /// Learns from, and rewrites, a frame the secondary sent: `seq −= offset`. `c` is updated to
    /// the rewritten sequence number.
    pub fn rewrite_secondary(&mut self, frame: &mut Frame, c: &mut Compared, now: Timestamp) {
        let Some(t) = tcp_of(c).copied() else { return };
        let key = ConnKey::outbound(c);
        if t.flags.syn() {
            match entry_for_syn(&mut self.conns, key, t.seq, |c| c.svm_isn, now) {
                Some(conn) => {
                    conn.svm_isn = Some(t.seq);
                    self.learned += u64::from(conn.learn(&key));
                }
                None => self.untracked += 1,
            }
        }
        let Some(conn) = self.conns.get_mut(&key) else { return };
        conn.last_seen = now;
        conn.fin[0] |= t.flags.fin();
        let offset = conn.offset.unwrap_or(0);
        if t.flags.rst() {
            self.conns.remove(&key);
        }
        if offset != 0 {
            let seq = SeqNumber(t.seq.0.wrapping_sub(offset));
            set_tcp_word(frame, &t, t.header_at + 4, seq.0);
            if let Some(t) = c.tcp.as_mut() {
                t.seq = seq;
            }
            self.rewritten += 1;
        }
    }

    /// Learns from, and rewrites, a frame on its way to the secondary: `ack += offset`, and the
    /// edges of SACK blocks likewise.
    pub fn rewrite_inbound(&mut self, frame: &mut Frame, c: &Compared, now: Timestamp) {
        let Some(t) = tcp_of(c).copied() else { return };
        let key = ConnKey::inbound(c);
        if t.flags.syn() && !t.flags.ack() {
            // A peer opens a connection. It replaces an earlier one on the same ports; a
            // retransmitted SYN during the handshake keeps what was learned.
            match self.conns.get(&key) {
                Some(c) if c.offset.is_none() => {}
                Some(_) => {
                    self.conns.insert(key, Conn::new(now));
                }
                None if self.conns.len() >= MAX_CONNECTIONS => self.untracked += 1,
                None => {
                    self.conns.insert(key, Conn::new(now));
                }
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else { return };
        conn.last_seen = now;
        conn.fin[1] |= t.flags.fin();
        if let (None, None, Some(_), Some(ack)) = (conn.offset, conn.pvm_isn, conn.svm_isn, t.ack) {
            // The peer's first ACK acknowledges the primary's SYN+ACK: PVM ISN + 1.
            conn.pvm_isn = Some(SeqNumber(ack.0.wrapping_sub(1)));
            self.learned += u64::from(conn.learn(&key));
        }
        let offset = conn.offset.unwrap_or(0);
        if t.flags.rst() {
            self.conns.remove(&key);
        }
        if offset == 0 {
            return;
        }
        if let Some(ack) = t.ack {
            set_tcp_word(frame, &t, t.header_at + 8, ack.0.wrapping_add(offset));
        }
        shift_sack_blocks(frame, &t, offset);
        self.rewritten += 1;
    }

    /// Whether some connection's numbers are translated (a non-zero offset): the VM whose
    /// traffic passes this rewriter took over from a primary with other sequence numbers.
    pub fn translating(&self) -> bool {
        self.conns.values().any(|c| c.offset.is_some_and(|o| o != 0))
    }

    /// After a checkpoint the secondary's TCP state is the primary's: every offset is 0.
    pub fn checkpoint(&mut self) {
        for conn in self.conns.values_mut() {
            conn.offset = Some(0);
            conn.pvm_isn = None;
            conn.svm_isn = None;
        }
    }

    /// Forgets connections closed (FIN both ways) longer than the grace period ago, and
    /// handshakes that never completed.
    pub fn expire(&mut self, now: Timestamp) {
        self.conns.retain(|_, c| {
            let idle = now.since(c.last_seen);
            !(c.closed() && idle >= CLOSED_GRACE || c.offset.is_none() && idle >= LEARNING_TIMEOUT)
        });
    }
}

/// The entry a SYN from one guest (ISN `seq`) belongs to: created if missing, replaced if it
/// belongs to an earlier connection on the same ports (offset known and this guest's ISN
/// differs; a retransmitted SYN has the same ISN). `None` if it would be new and the table is
/// full.
fn entry_for_syn(
    conns: &mut FxHashMap<ConnKey, Conn>,
    key: ConnKey,
    seq: SeqNumber,
    isn: impl Fn(&Conn) -> Option<SeqNumber>,
    now: Timestamp,
) -> Option<&mut Conn> {
    if conns.get(&key).is_some_and(|c| c.offset.is_some() && isn(c) != Some(seq)) {
        conns.remove(&key);
    }
    if !conns.contains_key(&key) && conns.len() >= MAX_CONNECTIONS {
        return None;
    }
    let conn = conns.entry(key).or_insert_with(|| Conn::new(now));
    conn.last_seen = now;
    Some(conn)
}

fn tcp_of(c: &Compared) -> Option<&TcpInfo> {
    match c.key.kind {
        FlowKind::Tcp => c.tcp.as_ref(),
        _ => None,
    }
}

/// Replaces the 32-bit word at `at` (an offset in the Ethernet frame, inside the TCP header) and
/// updates the TCP checksum incrementally — unless the checksum is left to the device
/// (NEEDS_CSUM): the field then holds only the pseudo-header sum, which does not cover the
/// TCP header.
fn set_tcp_word(frame: &mut Frame, t: &TcpInfo, at: usize, new: u32) {
    let needs_csum = frame.needs_csum();
    let eth = frame.ethernet_mut();
    let old = be32(eth, at);
    put_be32(eth, at, new);
    if !needs_csum {
        // SACK blocks may sit at odd offsets (options need no alignment).
        let csum_at = t.header_at + 16;
        let c = checksum::update_u32_at(be16(eth, csum_at), old, new, at - t.header_at);
        put_be16(eth, csum_at, c);
    }
}

/// Adds `offset` to both edges of every SACK block (RFC 2018): they name the guest's sequence
/// numbers, which differ on the secondary. Malformed options end the walk.
fn shift_sack_blocks(frame: &mut Frame, t: &TcpInfo, offset: u32) {
    let mut at = t.header_at + 20;
    let end = t.payload_at;
    while at < end {
        let kind = frame.ethernet()[at];
        match kind {
            OPT_END => return,
            OPT_NOP => at += 1,
            _ => {
                if at + 2 > end {
                    return;
                }
                let len = usize::from(frame.ethernet()[at + 1]);
                if len < 2 || at + len > end {
                    return;
                }
                if kind == OPT_SACK {
                    let mut edge = at + 2;
                    while edge + 4 <= at + len {
                        let v = be32(frame.ethernet(), edge);
                        set_tcp_word(frame, t, edge, v.wrapping_add(offset));
                        edge += 4;
                    }
                }
                at += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::*;
    use crate::classify::{classify, Class};
    use crate::wire::tcp::Flags;
    use std::net::Ipv4Addr;

    const T0: Timestamp = Timestamp(0);

    fn meta(f: &Frame) -> Compared {
        match classify(f.ethernet()) {
            Class::Compared(c) => c,
            other => panic!("not compared: {other:?}"),
        }
    }

    /// A frame from the guest (port 80) to the client (port 40000).
    fn out(seq: u32, ack: Option<u32>, flags: u8, payload: &[u8]) -> Frame {
        Frame::new(tcp4(80, 40000, seq, ack, flags, payload))
    }

    /// A frame from the client to the guest.
    fn inb(seq: u32, ack: Option<u32>, flags: u8, payload: &[u8]) -> Frame {
        Frame::new(tcp4_to(CLIENT_IP, VM_IP, 40000, 80, seq, ack, flags, payload))
    }

    fn seq_of(f: &Frame) -> u32 {
        meta(f).tcp.unwrap().seq.0
    }

    fn ack_of(f: &Frame) -> u32 {
        meta(f).tcp.unwrap().ack.unwrap().0
    }

    fn secondary(rw: &mut Rewriter, mut f: Frame) -> Frame {
        let mut c = meta(&f);
        rw.rewrite_secondary(&mut f, &mut c, T0);
        assert_eq!(c.tcp.unwrap().seq.0, seq_of(&f), "metadata follows the rewrite");
        assert!(l4_checksum_ok(f.ethernet()), "checksum stays valid");
        f
    }

    fn inbound(rw: &mut Rewriter, mut f: Frame) -> Frame {
        let c = meta(&f);
        rw.rewrite_inbound(&mut f, &c, T0);
        assert!(l4_checksum_ok(f.ethernet()), "checksum stays valid");
        f
    }

    #[test]
    fn client_initiated_learned_from_both_syn_acks() {
        let mut rw = Rewriter::new();
        inbound(&mut rw, inb(100, None, Flags::SYN, b""));
        let s_synack = secondary(&mut rw, out(5000, Some(101), Flags::SYN, b""));
        assert_eq!(seq_of(&s_synack), 5000, "PVM ISN not known yet");
        rw.observe_primary(&meta(&out(1000, Some(101), Flags::SYN, b"")), T0);
        assert_eq!(rw.stats().learned, 1);
        let f = inbound(&mut rw, inb(101, Some(1001), 0, b""));
        assert_eq!(ack_of(&f), 5001);
        let data = secondary(&mut rw, out(5001, Some(101), Flags::PSH, b"hello"));
        assert_eq!(seq_of(&data), 1001);
        assert_eq!(rw.offset_of(&meta(&data)), Some(4000));
    }

    #[test]
    fn client_initiated_learned_from_the_clients_first_ack() {
        // QEMU's way: the primary's SYN+ACK is never seen.
        let mut rw = Rewriter::new();
        inbound(&mut rw, inb(100, None, Flags::SYN, b""));
        secondary(&mut rw, out(5000, Some(101), Flags::SYN, b""));
        let f = inbound(&mut rw, inb(101, Some(1001), 0, b"req"));
        assert_eq!(ack_of(&f), 5001, "the learning ACK itself is mapped");
        assert_eq!(seq_of(&secondary(&mut rw, out(5001, Some(104), 0, b"resp"))), 1001);
    }

    #[test]
    fn guest_initiated_learned_from_both_syns() {
        let mut rw = Rewriter::new();
        let p_syn = out(1000, None, Flags::SYN, b"");
        rw.observe_primary(&meta(&p_syn), T0);
        let s_syn = secondary(&mut rw, out(7000, None, Flags::SYN, b""));
        assert_eq!(seq_of(&s_syn), 1000, "the secondary's SYN is mapped onto the primary's");
        let synack = inbound(&mut rw, inb(300, Some(1001), Flags::SYN, b""));
        assert_eq!(ack_of(&synack), 7001);
        // The secondary's SYN first works as well.
        let mut rw = Rewriter::new();
        secondary(&mut rw, out(7000, None, Flags::SYN, b""));
        rw.observe_primary(&meta(&p_syn), T0);
        assert_eq!(seq_of(&secondary(&mut rw, out(7001, Some(301), 0, b"x"))), 1001);
    }

    #[test]
    fn offsets_wrap() {
        let mut rw = Rewriter::new();
        rw.observe_primary(&meta(&out(0xffff_fff0, None, Flags::SYN, b"")), T0);
        secondary(&mut rw, out(0x10, None, Flags::SYN, b""));
        assert_eq!(seq_of(&secondary(&mut rw, out(0x11, Some(1), 0, b"a"))), 0xffff_fff1);
        assert_eq!(ack_of(&inbound(&mut rw, inb(1, Some(0xffff_fff2), 0, b""))), 0x12);
    }

    #[test]
    fn checkpoint_resets_offsets_to_zero() {
        let mut rw = Rewriter::new();
        rw.observe_primary(&meta(&out(1000, None, Flags::SYN, b"")), T0);
        secondary(&mut rw, out(7000, None, Flags::SYN, b""));
        rw.checkpoint();
        assert_eq!(seq_of(&secondary(&mut rw, out(1500, Some(1), 0, b"x"))), 1500);
        assert_eq!(ack_of(&inbound(&mut rw, inb(1, Some(1501), 0, b""))), 1501);
        assert_eq!(rw.stats().connections, 1, "the connection stays tracked");
    }

    #[test]
    fn sack_blocks_are_shifted() {
        let mut rw = Rewriter::new();
        rw.observe_primary(&meta(&out(1000, None, Flags::SYN, b"")), T0);
        secondary(&mut rw, out(7000, None, Flags::SYN, b""));
        // A client ACK with options NOP, NOP, SACK (one block): a 32-byte header.
        let mut l4 = tcp_segment(40000, 80, 1, Some(1001), 0, b"");
        l4[12] = 8 << 4;
        l4.extend_from_slice(&[OPT_NOP, OPT_NOP, OPT_SACK, 10]);
        l4.extend_from_slice(&1101u32.to_be_bytes());
        l4.extend_from_slice(&1201u32.to_be_bytes());
        let f = Frame::new(ipv4_frame(CLIENT_IP, VM_IP, 6, 1, l4, Some(16)));
        let f = inbound(&mut rw, f);
        let eth = f.ethernet();
        assert_eq!(be32(eth, 14 + 20 + 24), 7101);
        assert_eq!(be32(eth, 14 + 20 + 28), 7201);
        assert_eq!(ack_of(&f), 7001);
    }

    #[test]
    fn sack_blocks_at_odd_offsets_keep_the_checksum_valid() {
        // Found by fuzzing: options need no alignment, and a SACK block after an odd number of
        // option bytes was shifted with an update that assumed an even offset.
        let mut rw = Rewriter::new();
        rw.observe_primary(&meta(&out(1000, None, Flags::SYN, b"")), T0);
        secondary(&mut rw, out(7000, None, Flags::SYN, b""));
        // Options NOP, SACK (one block), NOP, NOP, NOP: the block's edges at odd offsets.
        let mut l4 = tcp_segment(40000, 80, 1, Some(1001), 0, b"");
        l4[12] = 8 << 4;
        l4.extend_from_slice(&[OPT_NOP, OPT_SACK, 10]);
        l4.extend_from_slice(&1101u32.to_be_bytes());
        l4.extend_from_slice(&1201u32.to_be_bytes());
        l4.extend_from_slice(&[OPT_NOP; 3]);
        let f = inbound(&mut rw, Frame::new(ipv4_frame(CLIENT_IP, VM_IP, 6, 1, l4, Some(16))));
        assert_eq!(be32(f.ethernet(), 14 + 20 + 23), 7101);
        assert_eq!(be32(f.ethernet(), 14 + 20 + 27), 7201);
    }

    #[test]
    fn needs_csum_frames_keep_their_partial_checksum() {
        let mut rw = Rewriter::new();
        rw.observe_primary(&meta(&out(1000, None, Flags::SYN, b"")), T0);
        secondary(&mut rw, out(7000, None, Flags::SYN, b""));
        let plain = out(7001, Some(1), 0, b"x");
        let mut data = vec![1u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]; // NEEDS_CSUM
        data.extend_from_slice(&plain.data);
        let mut f = Frame::with_vnet_hdr(data, 12);
        let csum_before = be16(f.ethernet(), 14 + 20 + 16);
        let mut c = meta(&f);
        rw.rewrite_secondary(&mut f, &mut c, T0);
        assert_eq!(seq_of(&f), 1001);
        assert_eq!(be16(f.ethernet(), 14 + 20 + 16), csum_before);
    }

    #[test]
    fn rst_removes_the_mapping_after_rewriting_its_frame() {
        let mut rw = Rewriter::new();
        rw.observe_primary(&meta(&out(1000, None, Flags::SYN, b"")), T0);
        secondary(&mut rw, out(7000, None, Flags::SYN, b""));
        let rst = secondary(&mut rw, out(7001, None, Flags::RST, b""));
        assert_eq!(seq_of(&rst), 1001);
        assert_eq!(rw.stats().connections, 0);
    }

    #[test]
    fn closed_connections_expire_after_the_grace_period() {
        let mut rw = Rewriter::new();
        rw.observe_primary(&meta(&out(1000, None, Flags::SYN, b"")), T0);
        secondary(&mut rw, out(7000, None, Flags::SYN, b""));
        secondary(&mut rw, out(7001, Some(1), Flags::FIN, b""));
        inbound(&mut rw, inb(1, Some(1002), Flags::FIN, b""));
        rw.expire(T0.plus(Duration::from_secs(59)));
        assert_eq!(rw.stats().connections, 1);
        rw.expire(T0.plus(CLOSED_GRACE));
        assert_eq!(rw.stats().connections, 0);
    }

    #[test]
    fn a_new_connection_on_the_same_ports_replaces_the_old_mapping() {
        let mut rw = Rewriter::new();
        rw.observe_primary(&meta(&out(1000, None, Flags::SYN, b"")), T0);
        secondary(&mut rw, out(7000, None, Flags::SYN, b""));
        // The client reuses the ports.
        inbound(&mut rw, inb(900, None, Flags::SYN, b""));
        secondary(&mut rw, out(9000, Some(901), Flags::SYN, b""));
        rw.observe_primary(&meta(&out(2000, Some(901), Flags::SYN, b"")), T0);
        assert_eq!(seq_of(&secondary(&mut rw, out(9001, Some(901), 0, b"x"))), 2001);
    }

    #[test]
    fn ipv6_connections_are_rewritten() {
        let mut rw = Rewriter::new();
        let p = Frame::new(tcp6(80, 40000, 1000, None, Flags::SYN, b""));
        rw.observe_primary(&meta(&p), T0);
        secondary(&mut rw, Frame::new(tcp6(80, 40000, 3000, None, Flags::SYN, b"")));
        let f = secondary(&mut rw, Frame::new(tcp6(80, 40000, 3001, Some(5), 0, b"v6")));
        assert_eq!(seq_of(&f), 1001);
    }

    #[test]
    fn a_syn_flood_fills_the_table_to_its_bound_and_no_further() {
        // Every SYN from the LAN made an entry that waits out the learning timeout: a flood of
        // them grew the table without bound.
        let mut rw = Rewriter::new();
        let syn = |port: u32| {
            let (hi, lo) = ((port >> 16) as u8, port as u16);
            Frame::new(tcp4_to(Ipv4Addr::new(10, 1, hi, 1), VM_IP, lo, 80, 100, None, Flags::SYN, b""))
        };
        for port in 0..MAX_CONNECTIONS as u32 + 100 {
            inbound(&mut rw, syn(port));
        }
        assert_eq!(rw.stats().connections, MAX_CONNECTIONS as u64);
        assert_eq!(rw.stats().untracked, 100);
        // A new connection of the guest's own is not tracked either, and passes unchanged.
        rw.observe_primary(&meta(&out(1000, None, Flags::SYN, b"")), T0);
        let s = secondary(&mut rw, out(7000, None, Flags::SYN, b""));
        assert_eq!(seq_of(&s), 7000);
        assert_eq!(rw.stats().untracked, 102);
        // Once the half-open entries expire, connections are tracked again.
        rw.expire(T0.plus(LEARNING_TIMEOUT));
        assert_eq!(rw.stats().connections, 0);
        rw.observe_primary(&meta(&out(1000, None, Flags::SYN, b"")), T0.plus(LEARNING_TIMEOUT));
        assert_eq!(seq_of(&secondary(&mut rw, out(7000, None, Flags::SYN, b""))), 1000);
    }

    #[test]
    fn untracked_and_non_tcp_frames_pass_unchanged() {
        let mut rw = Rewriter::new();
        let f = out(5, Some(6), 0, b"no handshake seen");
        assert_eq!(secondary(&mut rw, f.clone()), f);
        let mut u = Frame::new(udp4(1, 2, b"udp"));
        let before = u.clone();
        let c = meta(&u);
        rw.rewrite_inbound(&mut u, &c, T0);
        assert_eq!(u, before);
    }
}
