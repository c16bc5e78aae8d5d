//! The messages of the checkpoint link (docs/colo.md), JSON in `Kind::Control` records (see
//! [`crate::persist::message`]): the checkpoint transaction, heartbeats, and what each side says
//! when COLO ends. They follow the initial transfer's migration messages on the same stream.

use serde::{Deserialize, Serialize};

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A control message of the checkpoint link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Control {
    /// Secondary → primary: COLO started, the secondary runs.
    CheckpointReady {
        /// Two hosts: where the frame link of each of the secondary's backends listens, in
        /// `--compare-socket` order (`None` for a backend of both VMs).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        frame_links: Vec<Option<String>>,
        /// With an arbiter: the secondary's replica name, which the primary records in the
        /// pair record as the one that may take over.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replica: Option<String>,
    },
    /// Primary → secondary: a checkpoint begins (docs/colo.md step 1).
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
        /// Disk blocks sent since `vmstate-send` (background blocks not included).
        #[serde(default, skip_serializing_if = "is_zero")]
        blocks: u64,
        /// Two hosts: each one-VM backend's mark at the pause (the first inbound frame the PVM
        /// had not taken), in `--compare-socket` order; the secondary's backends restart its
        /// VM's inbound frames there.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        rx_marks: Vec<Option<u64>>,
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
    /// Primary → secondary: the interval's output is committed (step 5, after
    /// `vmstate-received`): the compare processes have released or dropped everything of the
    /// interval. Only now do the SVM's vCPUs resume, so that nothing the SVM computes from the
    /// checkpoint's state on can meet that flush, whatever backend compares its output.
    Committed {
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
    /// Either way: giving up, and why (the same message as the migration's `error`).
    Error {
        /// What went wrong.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shapes() {
        assert_eq!(serde_json::to_string(&Control::Heartbeat).unwrap(), r#"{"type":"heartbeat"}"#);
        assert_eq!(
            serde_json::to_string(&Control::VmstateSize { seq: 3, pages: 9, blocks: 0, rx_marks: vec![] }).unwrap(),
            r#"{"type":"vmstate-size","seq":3,"pages":9}"#
        );
        // Both protocols say `error` alike: a destination refusing a COLO start uses the
        // migration's.
        let e = crate::migration::protocol::Control::Error { message: "no".into() };
        let back: Control = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, Control::Error { message: "no".into() });
    }
}
