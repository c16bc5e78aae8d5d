//! What the fuzz targets share: frames built from fuzz input, and frames tagged with an
//! identity the engine never looks at.
//!
//! Arbitrary bytes are almost never a parsable IP frame, so the targets that exercise the compare
//! engine, the rewriter and the replica mostly build their frames from a [`FrameSpec`]: valid
//! headers (lengths and checksums right) with fuzz-chosen ports, sequence numbers, flags and
//! payloads from a small set of flows, so that the two sides' frames meet in the same flows.
//! A [`FrameSpec::Raw`] still lets any bytes through.

use arbitrary::Arbitrary;
use colo_proxy::builder::{self, CLIENT_IP, VM_IP};
use colo_proxy::wire::ipv4::protocol;
use colo_proxy::Frame;

/// Length of the virtio-net header the tagged frames carry: the engine skips it (the rewriter
/// reads only its first byte), so it can hold an identity.
pub const TAG_LEN: usize = 12;

/// Most payload bytes in a built frame: enough for segments to overlap, small enough to be fast.
const MAX_PAYLOAD: usize = 96;

/// A frame, described.
#[derive(Debug, Clone, Arbitrary)]
pub enum FrameSpec {
    /// TCP over IPv4, from the VM (or to it, `inbound`).
    Tcp4 { flow: u8, inbound: bool, seq: Seq, ack: Option<Seq>, flags: u8, payload: Payload },
    /// TCP over IPv6.
    Tcp6 { flow: u8, seq: Seq, ack: Option<Seq>, flags: u8, payload: Payload },
    /// TCP with options (SACK blocks and anything else), which the rewriter walks.
    TcpOptions { flow: u8, inbound: bool, seq: Seq, ack: Option<Seq>, flags: u8, options: Vec<u8>, payload: Payload },
    /// UDP over IPv4.
    Udp4 { flow: u8, inbound: bool, payload: Payload },
    /// UDP over IPv6.
    Udp6 { flow: u8, payload: Payload },
    /// An ICMP echo reply.
    Icmp4 { ident: u8, seq: u16, payload: Payload },
    /// ICMPv6 of any type (neighbour discovery is not compared).
    Icmp6 { msg_type: u8, body: Payload },
    /// Another IP protocol (GRE, ESP, ...).
    Other { proto: u8, payload: Payload },
    /// An IPv4 fragment.
    Fragment { flow: u8, offset: u16, more: bool, payload: Payload },
    /// ARP.
    Arp,
    /// A VLAN tag around another frame.
    Vlan { vid: u16, inner: Box<FrameSpec> },
    /// A built frame with some bytes overwritten (headers made inconsistent).
    Damaged { inner: Box<FrameSpec>, at: u16, bytes: Vec<u8> },
    /// Any bytes.
    Raw(Vec<u8>),
}

/// A sequence number near one of a few bases (so segments of a flow meet), or anywhere.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Seq {
    /// Close to the flow's base (which sits just below the 2^32 wrap).
    Near(u8),
    /// Anywhere.
    Any(u32),
}

impl Seq {
    fn value(self) -> u32 {
        match self {
            Seq::Near(n) => 0xffff_ff80u32.wrapping_add(u32::from(n)),
            Seq::Any(v) => v,
        }
    }
}

/// A payload: a few distinct fill bytes repeated (so that the two sides often agree), or bytes.
#[derive(Debug, Clone, Arbitrary)]
pub enum Payload {
    /// `len` bytes of `fill`.
    Fill { fill: u8, len: u8 },
    /// These bytes.
    Bytes(Vec<u8>),
}

impl Payload {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Payload::Fill { fill, len } => vec![fill % 3; usize::from(*len) % MAX_PAYLOAD],
            Payload::Bytes(b) => b[..b.len().min(MAX_PAYLOAD)].to_vec(),
        }
    }
}

fn ports(flow: u8) -> (u16, u16) {
    (80 + u16::from(flow % 3), 40000 + u16::from(flow / 3 % 2))
}

impl FrameSpec {
    /// The Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        self.build_depth(0)
    }

    fn build_depth(&self, depth: u32) -> Vec<u8> {
        if depth > 3 {
            return builder::arp_request();
        }
        match self {
            FrameSpec::Tcp4 { flow, inbound, seq, ack, flags, payload } => {
                let (vm, client) = ports(*flow);
                let (seq, ack, p) = (seq.value(), ack.map(Seq::value), payload.bytes());
                if *inbound {
                    builder::tcp4_to(CLIENT_IP, VM_IP, client, vm, seq, ack, *flags, &p)
                } else {
                    builder::tcp4(vm, client, seq, ack, *flags, &p)
                }
            }
            FrameSpec::Tcp6 { flow, seq, ack, flags, payload } => {
                let (vm, client) = ports(*flow);
                builder::tcp6(vm, client, seq.value(), ack.map(Seq::value), *flags, &payload.bytes())
            }
            FrameSpec::TcpOptions { flow, inbound, seq, ack, flags, options, payload } => {
                let (vm, client) = ports(*flow);
                let (src, dst, sport, dport) =
                    if *inbound { (CLIENT_IP, VM_IP, client, vm) } else { (VM_IP, CLIENT_IP, vm, client) };
                let mut options = options[..options.len().min(40)].to_vec();
                options.resize(options.len().div_ceil(4) * 4, 0);
                let mut l4 = builder::tcp_segment(sport, dport, seq.value(), ack.map(Seq::value), *flags, &[]);
                l4[12] = ((5 + options.len() / 4) as u8) << 4;
                l4.extend_from_slice(&options);
                l4.extend_from_slice(&payload.bytes());
                builder::ipv4_frame(src, dst, protocol::TCP, 1, l4, Some(16))
            }
            FrameSpec::Udp4 { flow, inbound, payload } => {
                let (vm, client) = ports(*flow);
                if *inbound {
                    builder::udp4_to(CLIENT_IP, VM_IP, client, vm, &payload.bytes())
                } else {
                    builder::udp4(vm, client, &payload.bytes())
                }
            }
            FrameSpec::Udp6 { flow, payload } => {
                let (vm, client) = ports(*flow);
                builder::udp6(vm, client, &payload.bytes())
            }
            FrameSpec::Icmp4 { ident, seq, payload } => {
                builder::icmp4_echo_reply(u16::from(*ident % 4), *seq, &payload.bytes())
            }
            FrameSpec::Icmp6 { msg_type, body } => builder::icmp6(*msg_type, &body.bytes()),
            FrameSpec::Other { proto, payload } => builder::ip4_other(*proto, 7, &payload.bytes()),
            FrameSpec::Fragment { flow, offset, more, payload } => {
                let (vm, client) = ports(*flow);
                let mut f = builder::udp4(vm, client, &payload.bytes());
                let word = (offset & 0x1fff) | if *more { 0x2000 } else { 0 };
                f[14 + 6..14 + 8].copy_from_slice(&word.to_be_bytes());
                f
            }
            FrameSpec::Arp => builder::arp_request(),
            FrameSpec::Vlan { vid, inner } => {
                let inner = inner.build_depth(depth + 1);
                if inner.len() < 14 {
                    return inner;
                }
                builder::vlan_tagged(&inner, vid & 0x0fff)
            }
            FrameSpec::Damaged { inner, at, bytes } => {
                let mut f = inner.build_depth(depth + 1);
                let at = usize::from(*at) % f.len().max(1);
                for (i, b) in bytes.iter().take(8).enumerate() {
                    if let Some(slot) = f.get_mut(at + i) {
                        *slot = *b;
                    }
                }
                f
            }
            FrameSpec::Raw(bytes) => bytes[..bytes.len().min(1600)].to_vec(),
        }
    }
}

/// `ethernet` behind a virtio-net header that carries `id` (bytes 4..12) and, if `needs_csum`,
/// the NEEDS_CSUM flag (byte 0), which tells the rewriter to leave the checksum alone.
pub fn tagged(ethernet: &[u8], id: u64, needs_csum: bool) -> Frame {
    let mut data = vec![0u8; TAG_LEN];
    data[0] = u8::from(needs_csum);
    data[4..12].copy_from_slice(&id.to_le_bytes());
    data.extend_from_slice(ethernet);
    Frame::with_vnet_hdr(data, TAG_LEN)
}

/// The identity [`tagged`] put in `frame`.
pub fn tag_of(frame: &Frame) -> u64 {
    assert_eq!(frame.vnet_hdr_len, TAG_LEN, "the engine keeps the virtio-net header");
    u64::from_le_bytes(frame.data[4..12].try_into().expect("8 bytes"))
}

/// A link socket whose peer is a script: reads return the script's bytes (then end of stream),
/// writes are kept. Deadlines are irrelevant: the script never makes a reader wait.
#[derive(Clone, Default)]
pub struct ScriptSocket {
    inner: std::sync::Arc<std::sync::Mutex<ScriptState>>,
}

#[derive(Default)]
struct ScriptState {
    input: Vec<u8>,
    at: usize,
    written: Vec<u8>,
    shut: bool,
}

impl ScriptSocket {
    /// A socket that will read `input`.
    pub fn new(input: &[u8]) -> ScriptSocket {
        let s = ScriptSocket::default();
        s.inner.lock().unwrap().input = input.to_vec();
        s
    }

    /// Everything written to it.
    pub fn written(&self) -> Vec<u8> {
        self.inner.lock().unwrap().written.clone()
    }
}

impl std::io::Read for ScriptSocket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut s = self.inner.lock().unwrap();
        if s.shut {
            return Ok(0);
        }
        // Short reads, as sockets give: at most 7 bytes at a time.
        let n = buf.len().min(s.input.len() - s.at).min(7);
        let at = s.at;
        buf[..n].copy_from_slice(&s.input[at..at + n]);
        s.at += n;
        Ok(n)
    }
}

impl std::io::Write for ScriptSocket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = self.inner.lock().unwrap();
        if s.shut {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        s.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl colo_proxy::link::LinkSocket for ScriptSocket {
    fn try_clone_socket(&self) -> std::io::Result<Self> {
        Ok(self.clone())
    }
    fn set_read_deadline(&self, _: Option<std::time::Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn set_write_deadline(&self, _: Option<std::time::Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn shutdown_both(&self) {
        self.inner.lock().unwrap().shut = true;
    }
    fn peer_name(&self) -> String {
        "the fuzzer".into()
    }
}
