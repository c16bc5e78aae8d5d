//! Control messages in the state stream: JSON objects carried in [`Kind::Control`] records. The
//! migration handshake (`migration::protocol`) and the checkpoint transaction (`colo::message`)
//! each have their own message type; both travel this way.

use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::stream::{Kind, StreamError, StreamReader, StreamWriter};

/// Sends a control message and flushes.
pub fn send<M: Serialize, W: Write>(w: &mut StreamWriter<W>, msg: &M) -> Result<(), StreamError> {
    write(w, msg)?;
    w.flush()?;
    Ok(())
}

/// Writes a control message without flushing: it leaves with whatever the next flush sends.
pub fn write<M: Serialize, W: Write>(w: &mut StreamWriter<W>, msg: &M) -> Result<(), StreamError> {
    w.record(Kind::Control, &serde_json::to_vec(msg).expect("control messages serialize"))?;
    Ok(())
}

/// Reads the next record, which must be a control message.
pub fn recv<M: DeserializeOwned, R: Read>(r: &mut StreamReader<R>) -> Result<M, StreamError> {
    match r.next_record()? {
        Some(rec) if rec.kind == Kind::Control => parse(&rec.payload),
        Some(rec) => Err(StreamError::Corrupt(format!("expected a control message, got a {:?} record", rec.kind))),
        None => Err(StreamError::Truncated("the peer ended the stream")),
    }
}

/// Parses a control payload.
pub fn parse<M: DeserializeOwned>(payload: &[u8]) -> Result<M, StreamError> {
    serde_json::from_slice(payload).map_err(|e| StreamError::Corrupt(format!("bad control message: {e}")))
}
