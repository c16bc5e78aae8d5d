//! The messages of docs/control.md: [`Command`]s to a compare process and [`Event`]s from it,
//! one JSON object per line, tagged by `"type"`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::duplicate_keys::first_duplicate;
use crate::compare::{Miscompare, Mode, Reason, Stats};
use crate::frame::Side;
use crate::replica::Role;

/// Longest line either side accepts, in bytes, not counting the terminating `\n`.
pub const MAX_LINE: usize = 65536;

/// A command from a controller to a compare process. Every command carries an `id`, echoed in
/// its reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Command {
    /// Flush (docs/compare.md), reset the rewriter's offsets, reply [`Event::Flushed`].
    Checkpoint {
        /// Echoed in the reply.
        id: u64,
    },
    /// Switch the compare mode, reply [`Event::ModeSet`].
    Mode {
        /// Echoed in the reply.
        id: u64,
        /// The mode to switch to.
        mode: Mode,
    },
    /// Reply [`Event::Stats`].
    QueryStats {
        /// Echoed in the reply.
        id: u64,
    },
    /// One-VM backends: take the VM's role, reply [`Event::RoleSet`] (as `primary`, once the
    /// frame link to `peer` is up).
    Role {
        /// Echoed in the reply.
        id: u64,
        /// The role.
        role: Role,
        /// As `primary`: the secondary backend's frame-link address (`HOST:PORT`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
        /// As `primary`: release output only while a ping sent less than this long ago was
        /// answered by the peer (ms; default 500).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease_ms: Option<u64>,
    },
    /// One-VM backends, as primary with the VM's RX ring stopped: reply [`Event::RxMark`].
    QueryRxMark {
        /// Echoed in the reply.
        id: u64,
    },
    /// One-VM backends, as secondary: the VM loaded a checkpoint; its offsets are 0 again and
    /// its inbound frames restart at `mark`. Reply [`Event::Resynced`].
    Resync {
        /// Echoed in the reply.
        id: u64,
        /// The primary's mark at the checkpoint's pause.
        mark: u64,
    },
}

/// The `type` names of [`Command`], for error messages.
const COMMAND_TYPES: &str = "checkpoint, mode, query-stats, role, query-rx-mark or resync";

impl Command {
    /// The command's `id`.
    pub fn id(&self) -> u64 {
        match *self {
            Command::Checkpoint { id }
            | Command::Mode { id, .. }
            | Command::QueryStats { id }
            | Command::Role { id, .. }
            | Command::QueryRxMark { id }
            | Command::Resync { id, .. } => id,
        }
    }

    /// Parses one line (without its `\n`). On failure the error carries the `id` when one could
    /// be read from the line, so that the `error` reply can be matched by the controller.
    pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
        // Through `Value` first: a line that is valid JSON but not a valid command may still tell
        // us its id.
        let value: Value = serde_json::from_slice(line)
            .map_err(|e| CommandError { id: None, message: format!("malformed JSON: {e}") })?;
        let id = value.get("id").and_then(Value::as_u64);
        let fail = |message: String| CommandError { id, message };
        let Some(object) = value.as_object() else {
            return Err(fail("expected a JSON object".to_string()));
        };
        if let Some(key) = first_duplicate(line) {
            // Which of two ids the controller waits for is unknown: answer without one.
            let id = if key == "id" { None } else { id };
            return Err(CommandError { id, message: format!("duplicate key `{key}`") });
        }
        let kind = match object.get("type") {
            Some(Value::String(kind)) => kind.clone(),
            Some(_) => return Err(fail("field `type` must be a string".to_string())),
            None => return Err(fail("missing field `type`".to_string())),
        };
        if !matches!(kind.as_str(), "checkpoint" | "mode" | "query-stats" | "role" | "query-rx-mark" | "resync") {
            return Err(fail(format!("unknown command type '{kind}' (expected {COMMAND_TYPES})")));
        }
        Command::deserialize(value).map_err(|e| fail(format!("bad '{kind}' command: {e}")))
    }

    /// The command as one line of JSON, without the `\n`.
    pub fn to_line(&self) -> String {
        to_json(self)
    }

    /// The `error` reply of a compare process that serves both VMs to a command for one-VM
    /// backends (`role`, `query-rx-mark`, `resync`).
    pub fn refused_by_pair(&self) -> Event {
        Event::Error {
            id: Some(self.id()),
            message: "this compare process serves both VMs (one host); roles, marks and resync are for one-VM \
                      backends (vhost-net-compare --vm-socket, colo-proxy run --vm)"
                .to_string(),
        }
    }
}

/// Why a line is not a valid [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    /// The line's `id`, when it had a readable one.
    pub id: Option<u64>,
    /// What is wrong, for the controller.
    pub message: String,
}

impl CommandError {
    /// The `error` reply for this line.
    pub fn to_event(&self) -> Event {
        Event::Error { id: self.id, message: self.message.clone() }
    }
}

/// What a one-VM backend adds to its `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReplica {
    /// The VM's role.
    pub role: Role,
    /// Where its frame link listens (`HOST:PORT`), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_listen: Option<String>,
}

/// Whether a VM connection came or went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerState {
    /// The VM connected.
    Connected,
    /// The VM disconnected.
    Disconnected,
}

/// A message from a compare process to its controllers: replies to [`Command`]s (carrying the
/// command's `id`) and unsolicited events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Event {
    /// Sent on every new connection.
    Hello {
        /// Which program (`colo-proxy`, `vhost-net-compare`).
        component: String,
        /// Its version.
        version: String,
        /// The NIC (or netdev) it compares.
        nic: String,
        /// The current compare mode.
        mode: Mode,
        /// One-VM backends: the VM's role and where the frame link listens.
        #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
        replica: Option<HelloReplica>,
    },
    /// The first inconsistency after a flush: a checkpoint request.
    Miscompare {
        /// The NIC it happened on.
        nic: String,
        /// What differed.
        reason: Reason,
        /// Protocol name (`tcp`, `udp`, `icmp`, ...).
        proto: String,
        /// The flow, e.g. `10.0.0.2:80>10.0.0.1:40000`.
        flow: String,
        /// Frames held now (both sides).
        held: u64,
        /// Inconsistencies since the last one reported.
        suppressed: u64,
    },
    /// Reply to [`Command::Checkpoint`], sent once the flush is done.
    Flushed {
        /// The command's id.
        id: u64,
        /// Primary frames released by the flush.
        released: u64,
        /// Secondary frames dropped by the flush.
        dropped: u64,
    },
    /// Reply to [`Command::Mode`].
    ModeSet {
        /// The command's id.
        id: u64,
        /// The mode now in force.
        mode: Mode,
    },
    /// Reply to [`Command::QueryStats`]: the counters sit beside `id` at the top level.
    Stats {
        /// The command's id.
        id: u64,
        /// The counters (boxed: they are far larger than any other event).
        #[serde(flatten)]
        stats: Box<Stats>,
    },
    /// Reply to [`Command::Role`].
    RoleSet {
        /// The command's id.
        id: u64,
        /// The role now in force.
        role: Role,
    },
    /// Reply to [`Command::QueryRxMark`].
    RxMark {
        /// The command's id.
        id: u64,
        /// The number of the first inbound frame the VM has not taken (the next number if it
        /// has taken all).
        mark: u64,
    },
    /// Reply to [`Command::Resync`].
    Resynced {
        /// The command's id.
        id: u64,
        /// Inbound frames now waiting for the VM.
        frames: u64,
    },
    /// A VM connection came or went (vhost-net-compare).
    Peer {
        /// Which VM.
        role: Side,
        /// Whether it came or went.
        state: PeerState,
    },
    /// A command could not be carried out, or a line was not a command.
    Error {
        /// The command's id, when one could be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// What went wrong.
        message: String,
    },
}

/// The `type` names of [`Event`] (a client skips events of other types: they come from a newer
/// compare process).
pub const EVENT_TYPES: &[&str] =
    &["hello", "miscompare", "flushed", "mode-set", "stats", "role-set", "rx-mark", "resynced", "peer", "error"];

impl Event {
    /// The `miscompare` event for an engine report on `nic`.
    pub fn miscompare(nic: &str, m: &Miscompare) -> Event {
        Event::Miscompare {
            nic: nic.to_string(),
            reason: m.reason,
            proto: m.key.proto_name().to_string(),
            flow: m.key.to_string(),
            held: m.held as u64,
            suppressed: m.suppressed,
        }
    }

    /// The `id` of the command this event replies to; `None` for unsolicited events and for
    /// errors about lines without a readable id.
    pub fn reply_to(&self) -> Option<u64> {
        match *self {
            Event::Flushed { id, .. }
            | Event::ModeSet { id, .. }
            | Event::Stats { id, .. }
            | Event::RoleSet { id, .. }
            | Event::RxMark { id, .. }
            | Event::Resynced { id, .. } => Some(id),
            Event::Error { id, .. } => id,
            Event::Hello { .. } | Event::Miscompare { .. } | Event::Peer { .. } => None,
        }
    }

    /// Parses one line (without its `\n`).
    pub fn parse(line: &[u8]) -> Result<Event, serde_json::Error> {
        serde_json::from_slice(line)
    }

    /// The event as one line of JSON, without the `\n`.
    pub fn to_line(&self) -> String {
        to_json(self)
    }
}

fn to_json<T: Serialize>(message: &T) -> String {
    // Serializing these types cannot fail: every map key is a string and every value a string,
    // an integer or a unit enum.
    serde_json::to_string(message).expect("control messages always serialize")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::compare::MiscompareCounts;
    use crate::flow::{FlowKey, FlowKind};

    fn value(line: &str) -> Value {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn commands_have_the_spec_shapes() {
        assert_eq!(Command::Checkpoint { id: 1 }.to_line(), r#"{"type":"checkpoint","id":1}"#);
        assert_eq!(
            Command::Mode { id: 3, mode: Mode::PrimaryOnly }.to_line(),
            r#"{"type":"mode","id":3,"mode":"primary-only"}"#
        );
        assert_eq!(Command::QueryStats { id: 9 }.to_line(), r#"{"type":"query-stats","id":9}"#);
        for (mode, name) in [
            (Mode::Colo, "colo"),
            (Mode::Passive, "passive"),
            (Mode::PrimaryOnly, "primary-only"),
            (Mode::SecondaryOnly, "secondary-only"),
        ] {
            let line = Command::Mode { id: 1, mode }.to_line();
            assert_eq!(value(&line)["mode"], name);
            assert_eq!(Command::parse(line.as_bytes()), Ok(Command::Mode { id: 1, mode }));
        }
    }

    #[test]
    fn one_vm_backend_messages_have_their_shapes() {
        let role =
            Command::Role { id: 4, role: Role::Primary, peer: Some("10.99.0.2:4445".into()), lease_ms: Some(500) };
        assert_eq!(role.to_line(), r#"{"type":"role","id":4,"role":"primary","peer":"10.99.0.2:4445","lease_ms":500}"#);
        assert_eq!(Command::parse(role.to_line().as_bytes()), Ok(role));
        assert_eq!(
            Command::parse(br#"{"type":"role","id":5,"role":"secondary"}"#),
            Ok(Command::Role { id: 5, role: Role::Secondary, peer: None, lease_ms: None })
        );
        assert!(Command::parse(br#"{"type":"role","id":5,"role":"boss"}"#).is_err());
        assert_eq!(Command::parse(br#"{"type":"query-rx-mark","id":6}"#), Ok(Command::QueryRxMark { id: 6 }));
        assert_eq!(Command::parse(br#"{"type":"resync","id":7,"mark":99}"#), Ok(Command::Resync { id: 7, mark: 99 }));
        let hello = Event::Hello {
            component: "vhost-net-compare".into(),
            version: "0.1.0".into(),
            nic: "net0".into(),
            mode: Mode::PrimaryOnly,
            replica: Some(HelloReplica { role: Role::Secondary, peer_listen: Some("10.99.0.2:4445".into()) }),
        };
        let line = hello.to_line();
        assert_eq!(
            line,
            r#"{"type":"hello","component":"vhost-net-compare","version":"0.1.0","nic":"net0","mode":"primary-only","role":"secondary","peer_listen":"10.99.0.2:4445"}"#
        );
        assert_eq!(Event::parse(line.as_bytes()).unwrap(), hello);
        for e in [
            Event::RoleSet { id: 1, role: Role::Alone },
            Event::RxMark { id: 2, mark: 3 },
            Event::Resynced { id: 4, frames: 5 },
        ] {
            assert_eq!(Event::parse(e.to_line().as_bytes()).unwrap(), e);
            assert!(EVENT_TYPES.contains(&value(&e.to_line())["type"].as_str().unwrap()), "{e:?}");
            assert!(e.reply_to().is_some());
        }
        assert!(matches!(Command::QueryRxMark { id: 8 }.refused_by_pair(), Event::Error { id: Some(8), .. }));
    }

    #[test]
    fn commands_parse_with_any_field_order_and_extra_fields() {
        let c = Command::parse(br#" {"id": 18446744073709551615, "type": "query-stats", "by": "test"} "#);
        assert_eq!(c, Ok(Command::QueryStats { id: u64::MAX }));
        assert_eq!(Command::parse(b"{\"type\":\"checkpoint\",\"id\":2}\r"), Ok(Command::Checkpoint { id: 2 }));
        assert_eq!(Command::Mode { id: 3, mode: Mode::Passive }.id(), 3);
    }

    #[test]
    fn hello_miscompare_and_replies_have_the_spec_shapes() {
        let hello = Event::Hello {
            component: "colo-proxy".into(),
            version: "0.1.0".into(),
            nic: "eth0".into(),
            mode: Mode::Colo,
            replica: None,
        };
        assert_eq!(
            hello.to_line(),
            r#"{"type":"hello","component":"colo-proxy","version":"0.1.0","nic":"eth0","mode":"colo"}"#
        );
        let m = Event::Miscompare {
            nic: "eth0".into(),
            reason: Reason::Payload,
            proto: "tcp".into(),
            flow: "10.0.0.2:80>10.0.0.1:40000".into(),
            held: 3,
            suppressed: 0,
        };
        assert_eq!(
            m.to_line(),
            r#"{"type":"miscompare","nic":"eth0","reason":"payload","proto":"tcp","flow":"10.0.0.2:80>10.0.0.1:40000","held":3,"suppressed":0}"#
        );
        assert_eq!(
            Event::Flushed { id: 4, released: 10, dropped: 12 }.to_line(),
            r#"{"type":"flushed","id":4,"released":10,"dropped":12}"#
        );
        assert_eq!(
            Event::ModeSet { id: 3, mode: Mode::SecondaryOnly }.to_line(),
            r#"{"type":"mode-set","id":3,"mode":"secondary-only"}"#
        );
        assert_eq!(
            Event::Peer { role: Side::Secondary, state: PeerState::Disconnected }.to_line(),
            r#"{"type":"peer","role":"secondary","state":"disconnected"}"#
        );
        assert_eq!(
            Event::Peer { role: Side::Primary, state: PeerState::Connected }.to_line(),
            r#"{"type":"peer","role":"primary","state":"connected"}"#
        );
        assert_eq!(
            Event::Error { id: Some(5), message: "no".into() }.to_line(),
            r#"{"type":"error","id":5,"message":"no"}"#
        );
        assert_eq!(Event::Error { id: None, message: "no".into() }.to_line(), r#"{"type":"error","message":"no"}"#);
    }

    #[test]
    fn every_reason_has_its_spec_name() {
        for (reason, name) in [
            (Reason::Payload, "payload"),
            (Reason::Size, "size"),
            (Reason::Ack, "ack"),
            (Reason::Timeout, "timeout"),
            (Reason::QueueFull, "queue-full"),
        ] {
            let line = Event::Miscompare {
                nic: "n".into(),
                reason,
                proto: "udp".into(),
                flow: "f".into(),
                held: 0,
                suppressed: 0,
            }
            .to_line();
            assert_eq!(value(&line)["reason"], name);
            assert_eq!(name, reason.name());
        }
    }

    #[test]
    fn stats_counters_are_flattened_beside_the_id() {
        let stats = Stats {
            frames_primary: 1,
            frames_secondary: 2,
            released: 3,
            dropped_secondary: 4,
            dropped_overflow: 5,
            passed_uncompared: 6,
            miscompares: MiscompareCounts { payload: 7, size: 8, ack: 9, timeout: 10, queue_full: 11 },
            flushes: 12,
            flows: 13,
            held_primary: 14,
            held_secondary: 15,
            max_hold_us: 16,
            hold_p50_us: 17,
            hold_p99_us: 18,
            ..Stats::default()
        };
        let event = Event::Stats { id: 42, stats: Box::new(stats.clone()) };
        let v = value(&event.to_line());
        assert_eq!(v["type"], "stats");
        assert_eq!(v["id"], 42);
        for (field, n) in [
            ("frames_primary", 1),
            ("frames_secondary", 2),
            ("released", 3),
            ("dropped_secondary", 4),
            ("dropped_overflow", 5),
            ("passed_uncompared", 6),
            ("flushes", 12),
            ("flows", 13),
            ("held_primary", 14),
            ("held_secondary", 15),
            ("max_hold_us", 16),
            ("hold_p50_us", 17),
            ("hold_p99_us", 18),
        ] {
            assert_eq!(v[field], n, "{field}");
        }
        assert_eq!(v["miscompares"], json!({"payload": 7, "size": 8, "ack": 9, "timeout": 10, "queue-full": 11}));
        assert_eq!(Event::parse(event.to_line().as_bytes()).unwrap(), event);
    }

    #[test]
    fn events_round_trip() {
        let events = [
            Event::Hello {
                component: "c".into(),
                version: "v".into(),
                nic: "n".into(),
                mode: Mode::Passive,
                replica: None,
            },
            Event::Flushed { id: 1, released: 2, dropped: 3 },
            Event::ModeSet { id: 1, mode: Mode::Colo },
            Event::Peer { role: Side::Primary, state: PeerState::Connected },
            Event::Error { id: None, message: "m".into() },
            Event::Error { id: Some(u64::MAX), message: "m".into() },
        ];
        for e in events {
            assert_eq!(Event::parse(e.to_line().as_bytes()).unwrap(), e);
        }
    }

    #[test]
    fn reply_to_names_the_command() {
        assert_eq!(Event::Flushed { id: 1, released: 0, dropped: 0 }.reply_to(), Some(1));
        assert_eq!(Event::ModeSet { id: 2, mode: Mode::Colo }.reply_to(), Some(2));
        assert_eq!(Event::Stats { id: 3, stats: Box::default() }.reply_to(), Some(3));
        assert_eq!(Event::Error { id: Some(4), message: String::new() }.reply_to(), Some(4));
        assert_eq!(Event::Error { id: None, message: String::new() }.reply_to(), None);
        assert_eq!(Event::Peer { role: Side::Primary, state: PeerState::Connected }.reply_to(), None);
    }

    #[test]
    fn miscompare_event_from_an_engine_report() {
        let key = FlowKey {
            vlan: FlowKey::UNTAGGED,
            protocol: 6,
            kind: FlowKind::Tcp,
            src: "10.0.0.2".parse().unwrap(),
            dst: "10.0.0.1".parse().unwrap(),
            src_port: 80,
            dst_port: 40000,
        };
        let m = Miscompare { reason: Reason::Ack, key, held: 5, suppressed: 2 };
        assert_eq!(
            Event::miscompare("eth0", &m).to_line(),
            r#"{"type":"miscompare","nic":"eth0","reason":"ack","proto":"tcp","flow":"10.0.0.2:80>10.0.0.1:40000","held":5,"suppressed":2}"#
        );
    }

    #[test]
    fn malformed_json_is_an_error_without_id() {
        let e = Command::parse(br#"{"type":"checkpoint","id":1"#).unwrap_err();
        assert_eq!(e.id, None);
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        let e = Command::parse(b"\xff\xfe").unwrap_err();
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        assert_eq!(
            e.to_event().to_line(),
            format!(r#"{{"type":"error","message":{}}}"#, serde_json::to_string(&e.message).unwrap())
        );
    }

    #[test]
    fn unknown_type_salvages_the_id() {
        let e = Command::parse(br#"{"type":"reboot","id":7}"#).unwrap_err();
        assert_eq!(e.id, Some(7));
        assert_eq!(
            e.message,
            "unknown command type 'reboot' (expected checkpoint, mode, query-stats, role, query-rx-mark or resync)"
        );
        assert_eq!(e.to_event(), Event::Error { id: Some(7), message: e.message.clone() });
        // An event type is not a command either.
        let e = Command::parse(br#"{"type":"hello","id":8}"#).unwrap_err();
        assert_eq!(e.id, Some(8));
        assert!(e.message.contains("'hello'"));
    }

    #[test]
    fn missing_or_bad_fields_are_errors() {
        let e = Command::parse(br#"{"type":"mode","id":3}"#).unwrap_err();
        assert_eq!(e.id, Some(3));
        assert_eq!(e.message, "bad 'mode' command: missing field `mode`");
        let e = Command::parse(br#"{"type":"checkpoint"}"#).unwrap_err();
        assert_eq!(e.id, None);
        assert_eq!(e.message, "bad 'checkpoint' command: missing field `id`");
        let e = Command::parse(br#"{"type":"mode","id":4,"mode":"turbo"}"#).unwrap_err();
        assert_eq!(e.id, Some(4));
        assert!(e.message.contains("unknown variant `turbo`"), "{}", e.message);
        let e = Command::parse(br#"{"id":5}"#).unwrap_err();
        assert_eq!((e.id, e.message.as_str()), (Some(5), "missing field `type`"));
        let e = Command::parse(br#"{"type":1,"id":6}"#).unwrap_err();
        assert_eq!((e.id, e.message.as_str()), (Some(6), "field `type` must be a string"));
        let e = Command::parse(br#"[1,2]"#).unwrap_err();
        assert_eq!((e.id, e.message.as_str()), (None, "expected a JSON object"));
        let e = Command::parse(br#"{"type":"checkpoint","id":-1}"#).unwrap_err();
        assert_eq!(e.id, None);
        assert!(e.message.starts_with("bad 'checkpoint' command: invalid value"), "{}", e.message);
    }
}
