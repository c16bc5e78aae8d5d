//! The API socket: a Unix listener (mode 0600 before it can be reached) with a thread per
//! connection, at most [`MAX_CONNECTIONS`] at once. Commands are few and quick; a thread per
//! controller keeps a slow one from blocking the others, and the cap keeps a client that opens
//! connections without end from taking every thread and descriptor.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::protocol::{serve_line, ApiError, Handler, Reply};

/// Longest request line accepted.
const MAX_LINE: usize = 1 << 20;

/// Most connections served at once; more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 64;

/// How long dropping the server waits for replies still being written.
const REPLY_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A running API server; the socket file is removed on drop, after the replies in flight
/// (`quit`'s own, typically) have been written.
pub struct ApiServer {
    path: PathBuf,
    busy: Arc<AtomicUsize>,
}

/// Counts a connection for as long as it is served.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ApiServer {
    /// Binds `path` and serves requests with `handler` on background threads.
    pub fn start(path: &Path, handler: Arc<dyn Handler>) -> std::io::Result<ApiServer> {
        let listener = crate::unix_socket::bind_private(path)?;
        let open = Arc::new(AtomicUsize::new(0));
        let busy = Arc::new(AtomicUsize::new(0));
        let in_flight = busy.clone();
        std::thread::Builder::new().name("api".into()).spawn(move || {
            let mut refused = 0u64;
            for conn in listener.incoming() {
                let stream = match conn {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "api accept failed");
                        continue;
                    }
                };
                if open.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
                    open.fetch_sub(1, Ordering::Relaxed);
                    refused += 1;
                    if refused.is_power_of_two() {
                        tracing::warn!(max = MAX_CONNECTIONS, refused, "API connection refused: too many");
                    }
                    refuse(stream);
                    continue;
                }
                let (slot, h, busy) = (Slot(open.clone()), handler.clone(), in_flight.clone());
                let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
                    let _slot = slot;
                    serve(stream, h, &busy)
                });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start an API connection thread");
                }
            }
        })?;
        Ok(ApiServer { path: path.to_path_buf(), busy })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let deadline = std::time::Instant::now() + REPLY_GRACE;
        while self.busy.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

/// Tells a connection over the limit why it is closed (without waiting for it to read).
fn refuse(mut stream: UnixStream) {
    let error = ApiError::generic(format!("too many API connections (at most {MAX_CONNECTIONS}); try again later"));
    let mut text = serde_json::to_string(&Reply::Error { error, id: None }).unwrap_or_default();
    text.push('\n');
    let _ = stream.set_nonblocking(true);
    let _ = stream.write_all(text.as_bytes());
}

fn serve(stream: UnixStream, handler: Arc<dyn Handler>, busy: &AtomicUsize) {
    let Ok(mut out) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match Read::take(&mut reader, MAX_LINE as u64).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        busy.fetch_add(1, Ordering::AcqRel);
        let reply = serve_line(handler.as_ref(), line.trim_end());
        let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| "{}".into());
        text.push('\n');
        let written = out.write_all(text.as_bytes());
        busy.fetch_sub(1, Ordering::AcqRel);
        if written.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::client::ApiClient;
    use crate::api::command::Command;
    use serde_json::Value;
    use std::os::unix::fs::PermissionsExt;

    struct Status;
    impl Handler for Status {
        fn handle(&self, _: Command) -> Result<Value, ApiError> {
            Ok(serde_json::json!({ "status": "running" }))
        }
    }

    fn ok(c: &mut ApiClient) -> bool {
        matches!(c.execute("query-status", Default::default()), Ok(Reply::Return { .. }))
    }

    #[test]
    fn connections_beyond_the_cap_are_refused_with_an_error_and_the_api_keeps_serving() {
        // Issue 12, item 6: every connection got a thread, without limit.
        let dir = crate::unix_socket::tests::scratch("api");
        let path = dir.join("api.sock");
        let _server = crate::unix_socket::tests::with_open_umask(|| ApiServer::start(&path, Arc::new(Status))).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let mut held: Vec<ApiClient> = (0..MAX_CONNECTIONS).map(|_| ApiClient::connect(&path).unwrap()).collect();
        for c in &mut held {
            assert!(ok(c), "each connection within the cap is served");
        }
        // One more: told why, before it even asks.
        let extra = UnixStream::connect(&path).unwrap();
        extra.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let mut line = String::new();
        BufReader::new(extra).read_line(&mut line).unwrap();
        let reply: Reply = serde_json::from_str(&line).unwrap();
        assert!(
            matches!(&reply, Reply::Error { error, .. } if error.desc.contains("too many API connections")),
            "{line}"
        );
        // A controller that leaves frees its place.
        drop(held.pop());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let mut again = ApiClient::connect(&path).unwrap();
            if ok(&mut again) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "a place never came free");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(ok(&mut held[0]), "the others are served all along");
        drop(held);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
