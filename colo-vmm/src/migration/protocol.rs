//! The control messages of a migration (JSON in `Kind::Control` records, see
//! [`crate::persist::message`]). A COLO start is a migration up to `state-complete`; from there
//! the checkpoint link's own messages (`crate::colo::message`) take over.

use serde::{Deserialize, Serialize};

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

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A control message of the migration.
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
        /// Disk blocks sent in it.
        #[serde(default, skip_serializing_if = "is_zero")]
        blocks: u64,
    },
    /// Source → destination: everything is sent; `pages` and `blocks` in total.
    StateComplete {
        /// Pages sent over the whole migration.
        pages: u64,
        /// Disk blocks sent over the whole migration.
        #[serde(default, skip_serializing_if = "is_zero")]
        blocks: u64,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::message::{recv, send};
    use crate::persist::stream::{StreamReader, StreamWriter};

    #[test]
    fn json_shapes_and_round_trip() {
        assert_eq!(serde_json::to_string(&Control::Go).unwrap(), r#"{"type":"go"}"#);
        assert_eq!(
            serde_json::to_string(&Control::StateComplete { pages: 3, blocks: 0 }).unwrap(),
            r#"{"type":"state-complete","pages":3}"#
        );
        assert_eq!(
            serde_json::from_str::<Control>(r#"{"type":"state-complete","pages":3,"blocks":2}"#).unwrap(),
            Control::StateComplete { pages: 3, blocks: 2 }
        );
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        send(&mut w, &Control::Error { message: "no".into() }).unwrap();
        let bytes = w.finish().unwrap();
        let mut r = StreamReader::new(&bytes[..]).unwrap();
        assert_eq!(recv::<Control, _>(&mut r).unwrap(), Control::Error { message: "no".into() });
        assert!(recv::<Control, _>(&mut r).is_err(), "end of stream");
    }
}
