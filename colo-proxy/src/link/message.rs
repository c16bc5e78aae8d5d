//! The frame link's messages, inside the link's byte stream: a 4-byte little-endian length
//! (of what follows), a type byte, and the body.
//!
//! | type | name | body | direction |
//! |---|---|---|---|
//! | 1 | `inbound` | sequence number (u64 LE), Ethernet frame | primary → secondary: a frame from the LAN, mirrored |
//! | 2 | `outbound` | Ethernet frame | secondary → primary: the secondary VM's output (rewritten) |
//! | 3 | `ping` | number (u64 LE) | both ways |
//! | 4 | `pong` | the ping's number | both ways |
//! | 5 | `credit` | bytes (u64 LE) | primary → secondary: room for that many more `outbound` bytes |
//! | 6 | `loading` | the checkpoint's inbound mark (u64 LE) | secondary → primary: its VM loads a checkpoint; every later `outbound` frame comes from that state |

use std::io::{self, Read, Write};

/// Longest Ethernet frame carried (a 64 KiB IP packet with its headers and a VLAN tag or two).
pub const MAX_FRAME: usize = 65536 + 64;
/// Longest message body.
const MAX_BODY: usize = 8 + MAX_FRAME;

const INBOUND: u8 = 1;
const OUTBOUND: u8 = 2;
const PING: u8 = 3;
const PONG: u8 = 4;
const CREDIT: u8 = 5;
const LOADING: u8 = 6;

/// One message of the frame link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMessage {
    /// A frame from the LAN for the secondary VM, numbered in mirror order.
    Inbound {
        /// Its number: one more than the previous inbound frame's.
        seq: u64,
        /// The Ethernet frame.
        frame: Vec<u8>,
    },
    /// A frame the secondary VM sent, rewritten into the primary's sequence space.
    Outbound(Vec<u8>),
    /// Are you there?
    Ping(u64),
    /// Yes: the answer to the ping of that number.
    Pong(u64),
    /// Room for this many more bytes of `outbound` frames.
    Credit(u64),
    /// The secondary VM loads the checkpoint whose inbound mark this is: the `outbound` frames
    /// before this message came from its state before the checkpoint, the ones after from the
    /// checkpoint's.
    Loading(u64),
}

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// The stream failed or ended.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A length beyond any message, or a body that does not fit its type.
    #[error("malformed frame-link message: {0}")]
    Malformed(String),
}

impl PeerMessage {
    /// Bytes it takes on the link.
    pub fn wire_len(&self) -> usize {
        5 + match self {
            PeerMessage::Inbound { frame, .. } => 8 + frame.len(),
            PeerMessage::Outbound(frame) => frame.len(),
            PeerMessage::Ping(_) | PeerMessage::Pong(_) | PeerMessage::Credit(_) | PeerMessage::Loading(_) => 8,
        }
    }

    /// Writes the message to `w` (buffered by the caller).
    pub fn write_to<W: Write>(&self, w: &mut W) -> io::Result<()> {
        let (kind, head, body): (u8, Option<u64>, &[u8]) = match self {
            PeerMessage::Inbound { seq, frame } => (INBOUND, Some(*seq), frame),
            PeerMessage::Outbound(frame) => (OUTBOUND, None, frame),
            PeerMessage::Ping(n) => (PING, Some(*n), &[]),
            PeerMessage::Pong(n) => (PONG, Some(*n), &[]),
            PeerMessage::Credit(n) => (CREDIT, Some(*n), &[]),
            PeerMessage::Loading(mark) => (LOADING, Some(*mark), &[]),
        };
        let len = 1 + head.map_or(0, |_| 8) + body.len();
        w.write_all(&(len as u32).to_le_bytes())?;
        w.write_all(&[kind])?;
        if let Some(h) = head {
            w.write_all(&h.to_le_bytes())?;
        }
        w.write_all(body)
    }

    /// Reads the next message; `Ok(None)` at a clean end of the stream.
    pub fn read_from<R: Read>(r: &mut R) -> Result<Option<PeerMessage>, MessageError> {
        let mut head = [0u8; 5];
        match r.read(&mut head[..1])? {
            0 => return Ok(None),
            _ => r.read_exact(&mut head[1..])?,
        }
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len - 1 > MAX_BODY {
            return Err(MessageError::Malformed(format!("length {len}")));
        }
        let kind = head[4];
        let mut body = vec![0u8; len - 1];
        r.read_exact(&mut body)?;
        let number = |body: &[u8]| -> Result<u64, MessageError> {
            let b: [u8; 8] = body
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| MessageError::Malformed(format!("type {kind} with a {}-byte body", body.len())))?;
            Ok(u64::from_le_bytes(b))
        };
        let fixed = |body: &[u8]| -> Result<u64, MessageError> {
            if body.len() != 8 {
                return Err(MessageError::Malformed(format!("type {kind} with a {}-byte body", body.len())));
            }
            number(body)
        };
        Ok(Some(match kind {
            INBOUND => {
                let seq = number(&body)?;
                body.drain(..8);
                if body.len() > MAX_FRAME {
                    return Err(MessageError::Malformed(format!("a {}-byte frame", body.len())));
                }
                PeerMessage::Inbound { seq, frame: body }
            }
            OUTBOUND => {
                // The length bound leaves room for an inbound frame's number, which an outbound
                // message does not have: its frame has the same limit as an inbound one.
                if body.len() > MAX_FRAME {
                    return Err(MessageError::Malformed(format!("a {}-byte frame", body.len())));
                }
                PeerMessage::Outbound(body)
            }
            PING => PeerMessage::Ping(fixed(&body)?),
            PONG => PeerMessage::Pong(fixed(&body)?),
            CREDIT => PeerMessage::Credit(fixed(&body)?),
            LOADING => PeerMessage::Loading(fixed(&body)?),
            other => return Err(MessageError::Malformed(format!("unknown type {other}"))),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_reads_back_as_written() {
        let msgs = vec![
            PeerMessage::Inbound { seq: u64::MAX - 1, frame: vec![1, 2, 3] },
            PeerMessage::Outbound(vec![9; 1514]),
            PeerMessage::Ping(7),
            PeerMessage::Pong(7),
            PeerMessage::Credit(1 << 40),
            PeerMessage::Loading(42),
            PeerMessage::Outbound(vec![]),
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            m.write_to(&mut buf).unwrap();
        }
        assert_eq!(buf.len(), msgs.iter().map(PeerMessage::wire_len).sum::<usize>());
        let mut r = &buf[..];
        for m in &msgs {
            assert_eq!(PeerMessage::read_from(&mut r).unwrap().as_ref(), Some(m));
        }
        assert!(PeerMessage::read_from(&mut r).unwrap().is_none());
    }

    #[test]
    fn bad_lengths_types_and_bodies_are_errors_not_allocations() {
        let bad: Vec<Vec<u8>> = vec![
            vec![0, 0, 0, 0, 1],                                // zero length
            vec![0xff, 0xff, 0xff, 0x7f, 1],                    // 2 GiB
            vec![2, 0, 0, 0, 9, 0],                             // unknown type
            vec![5, 0, 0, 0, LOADING, 0, 0, 0, 0],              // short loading
            vec![3, 0, 0, 0, PING, 0, 0],                       // short ping
            vec![10, 0, 0, 0, PONG, 0, 0, 0, 0, 0, 0, 0, 0, 0], // long pong
            vec![4, 0, 0, 0, INBOUND, 0, 0, 0],                 // inbound without its number
        ];
        for b in bad {
            let r = PeerMessage::read_from(&mut &b[..]);
            assert!(matches!(r, Err(MessageError::Malformed(_))), "{b:?}: {r:?}");
        }
        // An outbound frame as long as the longest inbound message's number and frame.
        let mut long = Vec::new();
        PeerMessage::Outbound(vec![0; MAX_FRAME + 8]).write_to(&mut long).unwrap();
        assert!(matches!(PeerMessage::read_from(&mut &long[..]), Err(MessageError::Malformed(_))));
        let mut longest = Vec::new();
        PeerMessage::Outbound(vec![0; MAX_FRAME]).write_to(&mut longest).unwrap();
        assert!(matches!(PeerMessage::read_from(&mut &longest[..]), Ok(Some(PeerMessage::Outbound(_)))));
        // Cut short: an I/O error (the stream ended inside a message).
        let mut buf = Vec::new();
        PeerMessage::Outbound(vec![1; 100]).write_to(&mut buf).unwrap();
        assert!(matches!(PeerMessage::read_from(&mut &buf[..50]), Err(MessageError::Io(_))));
    }
}
