//! `colo-vmm ctl`: sends one command and prints the reply.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

use super::protocol::{Reply, Request};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to {path}: {error}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The exchange failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The reply was not JSON of the expected shape.
    #[error("bad reply: {0}")]
    BadReply(String),
    /// An argument was not `key=value`.
    #[error("argument '{0}' is not key=value")]
    BadArgument(String),
}

/// Turns `key=value` words into an arguments object: integers become numbers, `true`/`false`
/// booleans, anything else a string.
pub fn parse_arguments(words: &[String]) -> Result<Map<String, Value>, ClientError> {
    let mut m = Map::new();
    for w in words {
        let (k, v) =
            w.split_once('=').filter(|(k, _)| !k.is_empty()).ok_or_else(|| ClientError::BadArgument(w.clone()))?;
        let value = if let Ok(i) = v.parse::<i64>() {
            Value::from(i)
        } else if let Ok(b) = v.parse::<bool>() {
            Value::from(b)
        } else {
            Value::from(v)
        };
        m.insert(k.to_string(), value);
    }
    Ok(m)
}

/// A connection to the API.
pub struct ApiClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ApiClient {
    /// Connects.
    pub fn connect(path: &Path) -> Result<ApiClient, ClientError> {
        let s = UnixStream::connect(path)
            .map_err(|error| ClientError::Connect { path: path.display().to_string(), error })?;
        s.set_read_timeout(Some(Duration::from_secs(600)))?;
        Ok(ApiClient { writer: s.try_clone()?, reader: BufReader::new(s) })
    }

    /// Executes one command and returns its reply.
    pub fn execute(&mut self, command: &str, arguments: Map<String, Value>) -> Result<Reply, ClientError> {
        let req = Request { execute: command.to_string(), arguments, id: None };
        let mut line = serde_json::to_string(&req).map_err(|e| ClientError::BadReply(e.to_string()))?;
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(ClientError::BadReply("the VMM closed the connection".into()));
        }
        serde_json::from_str(&reply).map_err(|e| ClientError::BadReply(format!("{e}: {}", reply.trim_end())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_typed() {
        let words: Vec<String> = ["path=/tmp/x", "limit=300", "force=true"].iter().map(|s| s.to_string()).collect();
        let m = parse_arguments(&words).unwrap();
        assert_eq!(m["path"], "/tmp/x");
        assert_eq!(m["limit"], 300);
        assert_eq!(m["force"], true);
        assert!(parse_arguments(&["novalue".to_string()]).is_err());
        assert!(parse_arguments(&["=x".to_string()]).is_err());
    }
}
