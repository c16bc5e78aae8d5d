//! A secondary's takeover under the arbiter: it serves only once it holds its VM's key.
//!
//! - The primary's process is known to be gone (the checkpoint link ended with a reset or EOF
//!   from its host) or the operator declared it lost (`lost-heartbeat`): the key is taken from
//!   it at once, in one transaction (`replace` if it still names the primary) — the takeover
//!   stays as fast as without an arbiter.
//! - The primary fell silent: it may be alive behind a cut link, still holding and renewing
//!   the key. The secondary waits until etcd has expired the primary's lease (the key is free),
//!   and takes it then — only if the pair record still names it as the secondary. A primary
//!   that went on alone has recorded so first: the secondary never serves, never announces,
//!   and gives up — its VM is out of date, so the process exits with status 75 (EX_TEMPFAIL)
//!   for its service manager to start it again as a standby. (It also gives up after three
//!   TTLs of a primary that keeps renewing the key.)
//! - etcd unreachable: the takeover waits for it, and the status says so.

use std::time::{Duration, Instant};

use super::shared::ColoShared;
use crate::arbiter::claim::Claim;

/// Between two attempts.
const RETRY: Duration = Duration::from_millis(100);
/// Exit status of a secondary superseded by a primary that kept the key.
pub const EXIT_SUPERSEDED: i32 = 75;

/// Waits until this replica holds the VM's key (see the module). `gone`: the primary's process
/// is known to be gone; `primary`: the primary's replica name, as the key named it at COLO start.
pub fn wait_for_key(claim: &Claim, colo: &ColoShared, gone: bool, primary: Option<&str>) {
    let started = Instant::now();
    let mut logged = None::<String>;
    loop {
        let attempt = match (gone, primary) {
            (true, Some(p)) => claim.take_from(p),
            _ => claim.acquire(),
        };
        let waiting = match attempt {
            Ok(true) => {
                tracing::info!(target: "colo", waited_ms = started.elapsed().as_millis() as u64, "holding the arbiter's key: taking over");
                colo.update(|s| s.waiting = None);
                return;
            }
            Ok(false) => {
                // The primary went on alone (the pair record no longer names this replica):
                // this VM is out of date for good.
                if claim.eligible().ok() == Some(false) {
                    superseded(colo, primary.unwrap_or("the primary"));
                }
                let holder = claim.holder().ok().flatten();
                if holder.is_some() && holder.as_deref() == primary && started.elapsed() > claim.ttl() * 3 {
                    superseded(colo, primary.unwrap_or("the primary"));
                }
                format!(
                    "the arbiter's key: held by {} (a takeover waits until its lease expires)",
                    holder.as_deref().unwrap_or("nobody")
                )
            }
            Err(e) => format!("the arbiter, to take over: {e}"),
        };
        if logged.as_deref() != Some(waiting.as_str()) {
            tracing::warn!(target: "colo", "failover waits for {waiting}");
            logged = Some(waiting.clone());
        }
        colo.update(|s| s.waiting = Some(waiting));
        std::thread::sleep(RETRY);
    }
}

/// The primary kept the key for longer than any lease lives without renewal: it is alive and
/// serving, and this secondary's VM is out of date for good.
fn superseded(colo: &ColoShared, primary: &str) -> ! {
    let why = format!(
        "superseded: {primary} kept the arbiter's key (it is alive and serving); this secondary's VM is out of date — \
         exiting with status {EXIT_SUPERSEDED} so that it starts again as a standby"
    );
    tracing::error!(target: "colo", "{why}");
    colo.update(|s| s.error = Some(why));
    std::process::exit(EXIT_SUPERSEDED);
}
