//! The control messages of a migration (JSON in [`Kind::Control`] records).

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::persist::stream::{Kind, StreamError, StreamReader, StreamWriter};

/// Why the source connects: a migration, or the start of COLO (the same transfer, then the
/// destination runs as a secondary instead of taking over).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Purpose {
    /// Live migration.
    Migrate,
    /// COLO start.
    Colo,
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Control {
    /// Source → destination, first: what this stream is for.
    Hello {
        /// Migration or COLO.
        purpose: Purpose,
    },
    /// Source → destination: a pre-copy round ended.
    Round {
        /// Its number (0 = the full copy).
        round: u32,
        /// Pages sent in it.
        pages: u64,
    },
    /// Source → destination: everything is sent; `pages` in total.
    StateComplete {
        /// Pages sent over the whole migration.
        pages: u64,
    },
    /// Destination → source: everything received, verified and loaded.
    Ready,
    /// Source → destination: the backends are released; take over.
    Go,
    /// Destination → source: the VM runs on the destination.
    Running,
    /// Either way: giving up, and why.
    Error {
        /// What went wrong.
        message: String,
    },
    /// Secondary → primary: COLO started, the secondary runs.
    CheckpointReady,
    /// Primary → secondary: a checkpoint begins (spec/colo.md step 1).
    CheckpointRequest {
        /// Its number.
        seq: u64,
        /// A passive checkpoint: the secondary stays paused after loading it.
        passive: bool,
        /// What triggered it (for the secondary's counters): `periodic`, `passive`, `user` or
        /// `miscompare:REASON`.
        #[serde(default)]
        trigger: String,
    },
    /// Secondary → primary: the SVM is paused.
    CheckpointReply {
        /// The checkpoint.
        seq: u64,
    },
    /// Primary → secondary: the checkpoint's pages follow (step 3).
    VmstateSend {
        /// The checkpoint.
        seq: u64,
    },
    /// Primary → secondary: pages and device state are complete (step 3, end).
    VmstateSize {
        /// The checkpoint.
        seq: u64,
        /// Pages sent since `vmstate-send` (background pages not included).
        pages: u64,
    },
    /// Secondary → primary: everything is in the RAM cache (step 4).
    VmstateReceived {
        /// The checkpoint.
        seq: u64,
    },
    /// Secondary → primary: the SVM holds the checkpoint (step 6).
    VmstateLoaded {
        /// The checkpoint.
        seq: u64,
    },
    /// Secondary → primary, at failover: the secondary took over (it lost the primary's
    /// heartbeat, or was told `lost-heartbeat`). A primary still alive to read this must not
    /// serve any more.
    TakenOver {
        /// Why the secondary failed over.
        reason: String,
    },
    /// Either way, on an idle link: alive.
    Heartbeat,
    /// Primary → secondary, when COLO starts and whenever they change: the heartbeat
    /// parameters set on the primary, which both sides use (the user configures the pair on
    /// the primary; a secondary beating slower than the primary's timeout would be dropped).
    HeartbeatParameters {
        /// `heartbeat-interval`, ms.
        interval_ms: u64,
        /// `heartbeat-timeout`, ms.
        timeout_ms: u64,
    },
}

/// Sends a control message.
pub fn send<W: Write>(w: &mut StreamWriter<W>, msg: &Control) -> Result<(), StreamError> {
    w.record(Kind::Control, &serde_json::to_vec(msg).expect("control messages serialize"))?;
    w.flush()?;
    Ok(())
}

/// Reads the next record, which must be a control message.
pub fn recv<R: Read>(r: &mut StreamReader<R>) -> Result<Control, StreamError> {
    match r.next_record()? {
        Some(rec) if rec.kind == Kind::Control => parse(&rec.payload),
        Some(rec) => Err(StreamError::Corrupt(format!("expected a control message, got a {:?} record", rec.kind))),
        None => Err(StreamError::Truncated("the peer ended the stream")),
    }
}

/// Parses a control payload.
pub fn parse(payload: &[u8]) -> Result<Control, StreamError> {
    serde_json::from_slice(payload).map_err(|e| StreamError::Corrupt(format!("bad control message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shapes_and_round_trip() {
        assert_eq!(serde_json::to_string(&Control::Go).unwrap(), r#"{"type":"go"}"#);
        assert_eq!(
            serde_json::to_string(&Control::StateComplete { pages: 3 }).unwrap(),
            r#"{"type":"state-complete","pages":3}"#
        );
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        send(&mut w, &Control::Error { message: "no".into() }).unwrap();
        let bytes = w.finish().unwrap();
        let mut r = StreamReader::new(&bytes[..]).unwrap();
        assert_eq!(recv(&mut r).unwrap(), Control::Error { message: "no".into() });
        assert!(recv(&mut r).is_err(), "end of stream");
    }
}
