//! The notify_dev text protocol between colo-compare and the COLO frame (QEMU/Xen compatible).
//!
//! Messages are ASCII without NUL, carried in the [`framing`](crate::framing) records of the
//! data ports, and matched by exact length and bytes (QEMU's `packet_matches_str`). The framing
//! is asymmetric, as in QEMU 7.2: inbound messages carry the `vnet_hdr_len` field when
//! vnet-header mode is on, outbound ones never do (`compare_chr_send(..., notify_event = true)`
//! skips it). A peer written against QEMU expects exactly that.

use std::io::{self, Read};

use crate::framing::{self, Decoder, FrameError};

/// Inbound: the COLO frame asks whether the compare is ready.
pub const PROXY_INIT: &[u8] = b"COLO_USERSPACE_PROXY_INIT";
/// Outbound: the reply to [`PROXY_INIT`].
pub const PROXY_INIT_REPLY: &[u8] = b"COLO_COMPARE_GET_XEN_INIT";
/// Inbound: a checkpoint has been taken; held primary frames are to be flushed.
pub const CHECKPOINT: &[u8] = b"COLO_CHECKPOINT";
/// Outbound: the outputs diverged, a checkpoint is requested.
pub const DO_CHECKPOINT: &[u8] = b"DO_CHECKPOINT";

/// Longest prefix of an unknown message quoted in the log.
const LOG_PREFIX: usize = 64;

/// A message received on notify_dev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// [`PROXY_INIT`]: answer with [`Outbound::ProxyInitReply`].
    ProxyInit,
    /// [`CHECKPOINT`]: flush.
    Checkpoint,
    /// Anything else, as received: logged and ignored.
    Unknown(Vec<u8>),
}

impl Inbound {
    /// Recognises a message by exact match: no trailing newline, NUL or whitespace is allowed.
    pub fn parse(payload: &[u8]) -> Inbound {
        match payload {
            PROXY_INIT => Inbound::ProxyInit,
            CHECKPOINT => Inbound::Checkpoint,
            other => Inbound::Unknown(other.to_vec()),
        }
    }
}

/// A message we send on notify_dev.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    /// [`PROXY_INIT_REPLY`].
    ProxyInitReply,
    /// [`DO_CHECKPOINT`].
    DoCheckpoint,
}

impl Outbound {
    /// The message text.
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Outbound::ProxyInitReply => PROXY_INIT_REPLY,
            Outbound::DoCheckpoint => DO_CHECKPOINT,
        }
    }

    /// Appends the framed message: length and text, never a `vnet_hdr_len` field.
    pub fn encode(self, out: &mut Vec<u8>) {
        framing::encode_raw(self.as_bytes(), None, out);
    }

    /// The framed message as a new buffer.
    pub fn to_bytes(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.as_bytes().len());
        self.encode(&mut out);
        out
    }
}

/// The inbound side of notify_dev: a [`Decoder`] whose records are parsed as [`Inbound`].
#[derive(Debug)]
pub struct NotifyCodec {
    decoder: Decoder,
}

impl NotifyCodec {
    /// A codec for a peer that does (`vnet_hdr = true`) or does not send the `vnet_hdr_len`
    /// field; this must match the data ports' vnet-header mode.
    pub fn new(vnet_hdr: bool) -> NotifyCodec {
        NotifyCodec { decoder: Decoder::new(vnet_hdr) }
    }

    /// See [`Decoder::read_from`].
    pub fn read_from<R: Read + ?Sized>(&mut self, r: &mut R) -> io::Result<usize> {
        self.decoder.read_from(r)
    }

    /// See [`Decoder::feed`].
    pub fn feed(&mut self, bytes: &[u8]) {
        self.decoder.feed(bytes);
    }

    /// See [`Decoder::reset`]; call it when the peer reconnects.
    pub fn reset(&mut self) {
        self.decoder.reset();
    }

    /// See [`Decoder::is_failed`].
    pub fn is_failed(&self) -> bool {
        self.decoder.is_failed()
    }

    /// The next message, a framing error (only [`FrameError::is_fatal`] ones need action), or
    /// `None` when more bytes are needed. [`Inbound::Unknown`] messages have already been logged
    /// as warnings here; the caller only ignores (or counts) them.
    pub fn next_message(&mut self) -> Option<Result<Inbound, FrameError>> {
        Some(self.decoder.next_payload()?.map(|payload| {
            let msg = Inbound::parse(&payload);
            if let Inbound::Unknown(bytes) = &msg {
                let shown = &bytes[..bytes.len().min(LOG_PREFIX)];
                tracing::warn!(
                    len = bytes.len(),
                    text = %shown.escape_ascii(),
                    "notify_dev: unsupported message ignored"
                );
            }
            msg
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_exact() {
        assert_eq!(Inbound::parse(b"COLO_USERSPACE_PROXY_INIT"), Inbound::ProxyInit);
        assert_eq!(Inbound::parse(b"COLO_CHECKPOINT"), Inbound::Checkpoint);
        for other in [&b"COLO_CHECKPOINT\n"[..], b"COLO_CHECKPOINT\0", b"COLO_CHECKPOIN", b"colo_checkpoint", b""] {
            assert_eq!(Inbound::parse(other), Inbound::Unknown(other.to_vec()));
        }
        // Outbound messages are not inbound ones.
        assert_eq!(Inbound::parse(DO_CHECKPOINT), Inbound::Unknown(DO_CHECKPOINT.to_vec()));
    }

    #[test]
    fn outbound_bytes_never_carry_vnet_field() {
        assert_eq!(Outbound::DoCheckpoint.to_bytes(), b"\x00\x00\x00\x0dDO_CHECKPOINT");
        assert_eq!(Outbound::ProxyInitReply.to_bytes(), b"\x00\x00\x00\x19COLO_COMPARE_GET_XEN_INIT");
        let mut out = b"x".to_vec();
        Outbound::DoCheckpoint.encode(&mut out);
        assert_eq!(out, b"x\x00\x00\x00\x0dDO_CHECKPOINT");
    }

    #[test]
    fn inbound_vnet_mode() {
        let mut codec = NotifyCodec::new(true);
        codec.feed(b"\x00\x00\x00\x0f\x00\x00\x00\x00COLO_CHECKPOINT");
        codec.feed(b"\x00\x00\x00\x19\x00\x00\x00\x00COLO_USERSPACE_PROXY_INIT");
        assert_eq!(codec.next_message(), Some(Ok(Inbound::Checkpoint)));
        assert_eq!(codec.next_message(), Some(Ok(Inbound::ProxyInit)));
        assert_eq!(codec.next_message(), None);
    }

    #[test]
    fn inbound_plain_mode_byte_at_a_time() {
        let stream = b"\x00\x00\x00\x0fCOLO_CHECKPOINT\x00\x00\x00\x05hello\x00\x00\x00\x0fCOLO_CHECKPOINT";
        let mut codec = NotifyCodec::new(false);
        let mut got = Vec::new();
        for b in stream {
            codec.feed(std::slice::from_ref(b));
            got.extend(std::iter::from_fn(|| codec.next_message()));
        }
        assert_eq!(
            got,
            vec![Ok(Inbound::Checkpoint), Ok(Inbound::Unknown(b"hello".to_vec())), Ok(Inbound::Checkpoint)]
        );
    }

    #[test]
    fn inbound_errors() {
        let mut codec = NotifyCodec::new(false);
        // A zero-length record is skipped; the stream goes on.
        codec.feed(b"\x00\x00\x00\x00\x00\x00\x00\x0fCOLO_CHECKPOINT");
        assert_eq!(codec.next_message(), Some(Err(FrameError::ZeroLength)));
        assert_eq!(codec.next_message(), Some(Ok(Inbound::Checkpoint)));
        // Text sent without framing reads as a huge length: fatal.
        codec.feed(b"COLO_CHECKPOINT");
        let err = codec.next_message().unwrap().unwrap_err();
        assert!(err.is_fatal());
        assert!(codec.is_failed());
        codec.reset();
        codec.feed(b"\x00\x00\x00\x0fCOLO_CHECKPOINT");
        assert_eq!(codec.next_message(), Some(Ok(Inbound::Checkpoint)));
    }

    #[test]
    fn read_from_reader() {
        let mut codec = NotifyCodec::new(true);
        let mut stream = &b"\x00\x00\x00\x0f\x00\x00\x00\x00COLO_CHECKPOINT"[..];
        assert_eq!(codec.read_from(&mut stream).unwrap(), 23);
        assert_eq!(codec.next_message(), Some(Ok(Inbound::Checkpoint)));
        assert_eq!(codec.read_from(&mut stream).unwrap(), 0);
    }
}
