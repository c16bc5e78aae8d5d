//! Requests, replies and errors of the control API.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::command::Command;

/// One request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// The command name.
    pub execute: String,
    /// Its arguments (an object; absent means none).
    #[serde(default)]
    pub arguments: serde_json::Map<String, Value>,
    /// Echoed in the reply, as in QMP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

/// An error reply's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct ApiError {
    /// QMP error class: `GenericError`, `CommandNotFound`, `InvalidParameter`, ...
    pub class: String,
    /// What went wrong, for people.
    pub desc: String,
}

impl ApiError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> ApiError {
        ApiError { class: "GenericError".into(), desc: desc.into() }
    }

    /// A `CommandNotFound` error.
    pub fn not_found(cmd: &str) -> ApiError {
        ApiError { class: "CommandNotFound".into(), desc: format!("the command {cmd} has not been found") }
    }

    /// An `InvalidParameter` error.
    pub fn invalid(desc: impl Into<String>) -> ApiError {
        ApiError { class: "InvalidParameter".into(), desc: desc.into() }
    }
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// Success.
    Return {
        /// The result (an object).
        #[serde(rename = "return")]
        value: Value,
        /// The request's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    /// Failure.
    Error {
        /// What went wrong.
        error: ApiError,
        /// The request's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
}

/// What serves requests.
pub trait Handler: Send + Sync {
    /// Executes one command.
    fn handle(&self, command: Command) -> Result<Value, ApiError>;
}

/// Parses and executes one request line.
pub fn serve_line(handler: &dyn Handler, line: &str) -> Reply {
    match serde_json::from_str::<Request>(line) {
        Ok(req) => match Command::parse(&req.execute, &req.arguments).and_then(|c| handler.handle(c)) {
            Ok(value) => Reply::Return { value, id: req.id },
            Err(error) => Reply::Error { error, id: req.id },
        },
        Err(e) => Reply::Error { error: ApiError::generic(format!("malformed request: {e}")), id: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers `query-status` and refuses the rest with their names.
    struct Echo;
    impl Handler for Echo {
        fn handle(&self, c: Command) -> Result<Value, ApiError> {
            match c {
                Command::QueryStatus {} => Ok(serde_json::json!({ "a": 1 })),
                other => Err(ApiError::generic(other.name())),
            }
        }
    }

    #[test]
    fn qmp_shapes() {
        let r = serve_line(&Echo, r#"{"execute":"query-status","arguments":{},"id":"x"}"#);
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"return":{"a":1},"id":"x"}"#);
        let r = serve_line(&Echo, r#"{"execute":"nope"}"#);
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"error":{"class":"CommandNotFound","desc":"the command nope has not been found"}}"#
        );
        let r = serve_line(&Echo, r#"{"execute":"stop","arguments":{"now":true}}"#);
        assert!(matches!(r, Reply::Error { ref error, .. } if error.class == "InvalidParameter"), "{r:?}");
        let r = serve_line(&Echo, "{bad");
        assert!(matches!(r, Reply::Error { ref error, .. } if error.class == "GenericError"));
        let back: Reply = serde_json::from_str(r#"{"return":{}}"#).unwrap();
        assert!(matches!(back, Reply::Return { .. }));
    }
}
