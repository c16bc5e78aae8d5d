//! colo-vmm's control API requests (QMP-shaped JSON lines), the `colo-vmm ctl` argument words,
//! migration URIs and the COLO parameters, as the API parses them.
//!
//! Invariants:
//! - nothing panics;
//! - every line gets a reply that serializes, echoing the request's `id`;
//! - a command that parses reads back the same from its own serialization;
//! - `set-parameters` is all or nothing: refused, nothing changes; accepted, the parameters are
//!   valid together;
//! - a URI that parses is printed back as the same URI.

#![no_main]

use arbitrary::Arbitrary;
use colo_vmm::api::client::parse_arguments;
use colo_vmm::api::command::Command;
use colo_vmm::api::protocol::{serve_line, ApiError, Handler, Reply, Request};
use colo_vmm::colo::shared::ColoShared;
use colo_vmm::migration::uri::MigrationUri;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

/// The API's parsing without a VM behind it.
struct Parser {
    colo: ColoShared,
}

impl Handler for Parser {
    fn handle(&self, command: Command) -> Result<Value, ApiError> {
        let v = serde_json::to_value(&command).expect("commands serialize");
        let args = v.get("arguments").and_then(Value::as_object).cloned().unwrap_or_default();
        assert_eq!(Command::parse(command.name(), &args).expect("a command's own arguments parse"), command);
        match command {
            Command::Migrate { uri, .. } | Command::ColoStart { uri, .. } => {
                assert_eq!(uri.to_string().parse::<MigrationUri>().unwrap(), uri);
                Ok(json!({}))
            }
            Command::SetParameters(update) => {
                let before = self.colo.params();
                match self.colo.set_params(&update) {
                    Ok(p) => {
                        p.validate().expect("accepted parameters are valid");
                        assert_eq!(self.colo.params(), p);
                        serde_json::to_value(p).map_err(|e| ApiError::generic(e.to_string()))
                    }
                    Err(e) => {
                        assert_eq!(self.colo.params(), before, "a refused change changed something");
                        Err(ApiError::invalid(e.to_string()))
                    }
                }
            }
            other => Err(ApiError::generic(format!("{} needs a VM", other.name()))),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    lines: Vec<String>,
    words: Vec<String>,
    heartbeat: (u64, u64),
}

fuzz_target!(|input: Input| {
    let parser = Parser { colo: ColoShared::new(Vec::new()) };
    for line in input.lines.iter().take(16) {
        let reply = serve_line(&parser, line);
        let text = serde_json::to_string(&reply).expect("replies serialize");
        let back: Reply = serde_json::from_str(&text).expect("replies parse");
        assert_eq!(back, reply);
        if let Ok(req) = serde_json::from_str::<Request>(line) {
            let id = match &reply {
                Reply::Return { id, .. } | Reply::Error { id, .. } => id,
            };
            assert_eq!(id, &req.id, "the reply echoes the id");
        }
    }
    // `colo-vmm ctl` words, then as a set-parameters request.
    if let Ok(args) = parse_arguments(&input.words) {
        assert!(input.words.iter().all(|w| w.split_once('=').is_some_and(|(k, _)| args.contains_key(k))));
        for command in ["set-parameters", "colo-start"] {
            let _ = Command::parse(command, &args).and_then(|c| parser.handle(c));
        }
    } else {
        assert!(input.words.iter().any(|w| w.split_once('=').is_none_or(|(k, _)| k.is_empty())));
    }
    // The primary's heartbeat parameters, as a secondary takes them.
    let before = parser.colo.params();
    if parser.colo.set_heartbeat(input.heartbeat.0, input.heartbeat.1).is_err() {
        assert_eq!(parser.colo.params(), before);
    }
});
