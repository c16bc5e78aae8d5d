//! The API socket: a Unix listener (mode 0600) with a thread per connection. Commands are few and
//! quick; a thread per controller keeps a slow one from blocking the others.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::protocol::{serve_line, Handler};

/// Longest request line accepted.
const MAX_LINE: usize = 1 << 20;

/// A running API server; the socket file is removed on drop.
pub struct ApiServer {
    path: PathBuf,
}

impl ApiServer {
    /// Binds `path` and serves requests with `handler` on background threads.
    pub fn start(path: &Path, handler: Arc<dyn Handler>) -> std::io::Result<ApiServer> {
        colo_proxy::endpoint::remove_stale_socket(path)?;
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        std::thread::Builder::new().name("api".into()).spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let h = handler.clone();
                        let _ = std::thread::Builder::new().name("api-conn".into()).spawn(move || serve(stream, h));
                    }
                    Err(e) => tracing::warn!(error = %e, "api accept failed"),
                }
            }
        })?;
        Ok(ApiServer { path: path.to_path_buf() })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream, handler: Arc<dyn Handler>) {
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
        let reply = serve_line(handler.as_ref(), line.trim_end());
        let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| "{}".into());
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}
