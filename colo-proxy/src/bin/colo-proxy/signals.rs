//! SIGINT and SIGTERM as a mio event: the signal handler writes to a socket pair whose other
//! end is registered with the poll, so a signal can never be missed between checks.

use std::io::Read;

use anyhow::Context;
use mio::net::UnixStream;
use mio::{Interest, Registry, Token};

/// The read end of the signal pipe.
pub struct Signals {
    rx: UnixStream,
}

impl Signals {
    /// Installs the handlers and registers the pipe under `token`.
    pub fn register(registry: &Registry, token: Token) -> anyhow::Result<Signals> {
        let (mut rx, tx) = UnixStream::pair().context("creating the signal pipe")?;
        let tx = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(tx));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::low_level::pipe::register(sig, tx.try_clone()?).context("installing signal handler")?;
        }
        registry.register(&mut rx, token, Interest::READABLE)?;
        Ok(Signals { rx })
    }

    /// Whether a signal arrived (drains the pipe).
    pub fn received(&mut self) -> bool {
        let mut buf = [0u8; 64];
        let mut got = false;
        while let Ok(n) = self.rx.read(&mut buf) {
            if n == 0 {
                break;
            }
            got = true;
        }
        got
    }
}
