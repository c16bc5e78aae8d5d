//! The control API's commands as one typed enum: a request's `execute` names the variant, its
//! `arguments` are the variant's fields (as Firecracker's `VmmAction`, and colo-proxy's control
//! messages). Parsing refuses unknown commands, unknown arguments and ill-typed values before
//! anything runs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::protocol::ApiError;
use crate::colo::params::ColoParamsUpdate;
use crate::migration::status::MigrationParamsUpdate;
use crate::migration::uri::MigrationUri;

/// A command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "execute", content = "arguments", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    /// Whether the VM runs, its uptime and memory.
    QueryStatus {},
    /// Pause the vCPU until `cont`.
    Stop {},
    /// Let the vCPU run again.
    Cont {},
    /// End the VMM.
    Quit {},
    /// Save the VM to a file.
    Snapshot {
        /// The file.
        path: PathBuf,
    },
    /// Live-migrate to a destination's `--incoming` (parameters as `migrate-set-parameters`,
    /// applied first).
    #[serde(rename_all = "kebab-case")]
    Migrate {
        /// Where.
        uri: MigrationUri,
        /// `downtime-limit`, ms.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downtime_limit: Option<u64>,
        /// `max-rounds`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_rounds: Option<u32>,
        /// `verify` (test mode).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        verify: Option<bool>,
    },
    /// Migration progress.
    QueryMigrate {},
    /// Change migration parameters.
    MigrateSetParameters(MigrationParamsUpdate),
    /// The migration parameters.
    QueryMigrateParameters {},
    /// On the primary: start COLO with the secondary at `uri`.
    #[serde(rename_all = "kebab-case")]
    ColoStart {
        /// The secondary's `--incoming`.
        uri: MigrationUri,
        /// Test only: verify every checkpoint page for page.
        #[serde(default)]
        verify: bool,
        /// Test only: hold every checkpoint open this long (ms) after its pages.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        test_checkpoint_delay: Option<u64>,
    },
    /// Change COLO parameters.
    SetParameters(ColoParamsUpdate),
    /// The COLO parameters.
    QueryParameters {},
    /// Role, mode, counters, the last failover.
    QueryColoStatus {},
    /// On the survivor: the peer is dead, fail over now.
    LostHeartbeat {},
    /// On the primary: checkpoint now.
    ColoCheckpoint {},
}

/// The names of every command, as requests spell them.
pub const NAMES: &[&str] = &[
    "query-status",
    "stop",
    "cont",
    "quit",
    "snapshot",
    "migrate",
    "query-migrate",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "colo-start",
    "set-parameters",
    "query-parameters",
    "query-colo-status",
    "lost-heartbeat",
    "colo-checkpoint",
];

impl Command {
    /// Reads a request's `execute` and `arguments`: `CommandNotFound` for an unknown name,
    /// `InvalidParameter` for arguments that do not fit.
    pub fn parse(execute: &str, arguments: &Map<String, Value>) -> Result<Command, ApiError> {
        if !NAMES.contains(&execute) {
            return Err(ApiError::not_found(execute));
        }
        let request = serde_json::json!({ "execute": execute, "arguments": arguments });
        Command::deserialize(request).map_err(|e| ApiError::invalid(format!("{execute}: {e}")))
    }

    /// Its name, as requests spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Command::QueryStatus {} => "query-status",
            Command::Stop {} => "stop",
            Command::Cont {} => "cont",
            Command::Quit {} => "quit",
            Command::Snapshot { .. } => "snapshot",
            Command::Migrate { .. } => "migrate",
            Command::QueryMigrate {} => "query-migrate",
            Command::MigrateSetParameters(_) => "migrate-set-parameters",
            Command::QueryMigrateParameters {} => "query-migrate-parameters",
            Command::ColoStart { .. } => "colo-start",
            Command::SetParameters(_) => "set-parameters",
            Command::QueryParameters {} => "query-parameters",
            Command::QueryColoStatus {} => "query-colo-status",
            Command::LostHeartbeat {} => "lost-heartbeat",
            Command::ColoCheckpoint {} => "colo-checkpoint",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(execute: &str, args: Value) -> Result<Command, ApiError> {
        Command::parse(execute, args.as_object().unwrap())
    }

    #[test]
    fn commands_parse_with_their_arguments() {
        assert_eq!(parse("stop", json!({})).unwrap(), Command::Stop {});
        assert_eq!(parse("snapshot", json!({"path": "/tmp/x"})).unwrap(), Command::Snapshot { path: "/tmp/x".into() });
        assert_eq!(
            parse("migrate", json!({"uri": "unix:/tmp/m", "verify": true, "downtime-limit": 30})).unwrap(),
            Command::Migrate {
                uri: MigrationUri::Unix("/tmp/m".into()),
                downtime_limit: Some(30),
                max_rounds: None,
                verify: Some(true)
            }
        );
        let Command::SetParameters(u) = parse("set-parameters", json!({"max-time": 5, "relax-time": 1})).unwrap()
        else {
            panic!()
        };
        assert_eq!((u.max_time, u.relax_time, u.min_time), (Some(5), Some(1), None));
        assert_eq!(
            parse("colo-start", json!({"uri": "tcp:127.0.0.1:4444", "test-checkpoint-delay": 300})).unwrap(),
            Command::ColoStart {
                uri: MigrationUri::Tcp("127.0.0.1:4444".into()),
                verify: false,
                test_checkpoint_delay: Some(300)
            }
        );
    }

    #[test]
    fn bad_requests_are_refused_with_the_right_class() {
        assert_eq!(parse("nope", json!({})).unwrap_err().class, "CommandNotFound");
        for (cmd, args, needle) in [
            ("stop", json!({"x": 1}), "unknown field `x`"),
            ("snapshot", json!({}), "path"),
            ("colo-start", json!({}), "uri"),
            ("colo-start", json!({"uri": "bogus:x"}), "tcp:HOST:PORT"),
            ("colo-start", json!({"uri": "unix:/x", "verify": "yes"}), "boolean"),
            ("migrate", json!({"uri": "unix:/x", "bogus": 1}), "bogus"),
            ("set-parameters", json!({"max-time": -5}), "-5"),
            ("set-parameters", json!({"bogus": 1}), "bogus"),
            ("migrate-set-parameters", json!({"max-rounds": "ten"}), "ten"),
        ] {
            let e = parse(cmd, args.clone()).unwrap_err();
            assert_eq!(e.class, "InvalidParameter", "{cmd} {args}: {e}");
            assert!(e.desc.contains(needle), "{cmd} {args}: {}", e.desc);
        }
    }

    #[test]
    fn every_name_is_a_command_and_every_command_has_its_name() {
        let samples = [json!({}), json!({"path": "/x"}), json!({"uri": "unix:/x"})];
        for name in NAMES {
            let c = samples
                .iter()
                .find_map(|a| parse(name, a.clone()).ok())
                .unwrap_or_else(|| panic!("{name} does not parse"));
            assert_eq!(c.name(), *name);
        }
    }
}
