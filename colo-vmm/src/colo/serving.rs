//! Serving under the arbiter (`--arbiter`): a replica releases its VM's output only while it
//! holds its VM's key in etcd, and a replica that serves without a secondary protects itself
//! again with a registered standby.
//!
//! A thread looks every 50 ms at what this replica is (booted alone, primary in COLO, a
//! secondary that took over...) and at its claim:
//!
//! - **Serving alone** (before COLO, after losing its secondary, after a takeover): only while
//!   the claim holds, and once etcd has recorded that it serves alone (its old secondary, left
//!   behind, may then never take over). A replica whose claim lapses — it could not renew for `arbiter-ttl` minus
//!   a margin — **fences** itself before etcd can expire its lease: its compare processes
//!   release nothing more (role `secondary`), its VM pauses. It serves again only once it holds
//!   the key again (re-acquired: nobody took it meanwhile).
//! - **Primary in COLO** with its secondary heard: it goes on even without the arbiter. Its
//!   backends release only under the frame link's lease, and its secondary can take over only
//!   with the key, so no second replica can serve; the status shows the arbiter's state.
//! - **Re-protection** (`auto-reprotect`): a replica serving alone and holding the key picks a
//!   registered standby and starts COLO with it, as `colo-start` would.
//!
//! A secondary's takeover waits for the key itself (see [`super::secondary`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::compare::CompareSet;
use super::primary::{self, TestOptions};
use super::shared::ColoShared;
use super::status::{Role, State};
use crate::migratable::Migratable;

/// How often the thread looks.
const TICK: Duration = Duration::from_millis(50);
/// Between two re-protection attempts.
const REPROTECT_EVERY: Duration = Duration::from_secs(2);
/// A standby that failed to start COLO is left alone this long.
const STANDBY_BACKOFF: Duration = Duration::from_secs(10);

/// What this replica is, as far as serving goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// A secondary in COLO, or a replica that stepped down: the rules are elsewhere.
    NotServing,
    /// The primary of a running (or starting) COLO pair.
    InColo,
    /// Serving without a secondary.
    Alone,
}

fn part(role: Role, state: State) -> Part {
    match (role, state) {
        (Role::Primary, State::Running | State::Starting) => Part::InColo,
        (Role::Primary, State::Stopped) => Part::NotServing,
        (Role::Secondary, State::FailedOver) => Part::Alone,
        (Role::Secondary, _) => Part::NotServing,
        (Role::Primary | Role::None, _) => Part::Alone,
    }
}

/// Starts the thread (with `--arbiter` only).
pub fn spawn<V: Migratable + 'static>(vm: Arc<V>, colo: Arc<ColoShared>) -> std::io::Result<()> {
    std::thread::Builder::new().name("colo-serving".into()).spawn(move || Serving::new(vm, colo).run())?;
    Ok(())
}

struct Serving<V: Migratable> {
    vm: Arc<V>,
    colo: Arc<ColoShared>,
    /// The compare processes were told to serve this VM alone since it last came to serve
    /// alone (at boot, after a failover or a takeover).
    serving_alone: bool,
    /// Fenced: nothing released, the VM paused by us.
    fenced: bool,
    last: Part,
    last_reprotect: Option<Instant>,
    failed_standbys: HashMap<String, Instant>,
}

impl<V: Migratable + 'static> Serving<V> {
    fn new(vm: Arc<V>, colo: Arc<ColoShared>) -> Self {
        Serving {
            vm,
            colo,
            serving_alone: false,
            fenced: false,
            last: Part::NotServing,
            last_reprotect: None,
            failed_standbys: HashMap::new(),
        }
    }

    fn run(mut self) {
        loop {
            self.tick();
            std::thread::sleep(TICK);
        }
    }

    fn tick(&mut self) {
        let Some(claim) = self.colo.arbiter().cloned() else { return };
        let st = self.colo.status();
        let now = part(st.role, st.state);
        if now != self.last {
            // Whatever held before, the compare processes must be told again what to do.
            self.serving_alone = false;
            self.last = now;
        }
        match now {
            Part::NotServing => {}
            Part::InColo => {
                if !claim.holds() {
                    // Re-take it if it is free (it expired while etcd was away).
                    let _ = claim.acquire();
                }
            }
            Part::Alone => {
                let holds = claim.holds() || claim.acquire().unwrap_or(false);
                // Before it releases anything alone, the pair record says so: a secondary
                // left behind must never take over (see `arbiter::claim`).
                let recorded = match holds && (self.fenced || !self.serving_alone) {
                    true => claim.serve_alone().unwrap_or(false),
                    false => holds,
                };
                if recorded {
                    if self.fenced || !self.serving_alone {
                        self.serve_alone();
                    }
                    self.reprotect(&claim);
                } else if !self.fenced {
                    let why = match claim.status() {
                        s if !s.reachable => format!("the arbiter is unreachable ({})", s.error.unwrap_or_default()),
                        s if s.held => "the arbiter did not record that it serves alone".to_string(),
                        s if s.holder.is_none() => format!(
                            "the pair record ({}) names another replica as the one whose VM the clients saw; \
                             if that VM is gone for good, delete /colo/<vm>/pair in etcd",
                            s.pair.unwrap_or_default()
                        ),
                        s => format!("the arbiter's key is held by {}", s.holder.unwrap_or_default()),
                    };
                    self.fence(&why);
                }
            }
        }
    }

    fn compare(&self) -> Option<std::sync::MutexGuard<'_, Option<CompareSet>>> {
        if self.colo.compare_sockets.is_empty() {
            return None;
        }
        let mut c = self.colo.compare();
        if c.is_none() {
            *c = CompareSet::connect(&self.colo.compare_sockets, Duration::from_secs(2))
                .map_err(|e| tracing::warn!(target: "colo", error = %e, "cannot reach the compare processes"))
                .ok();
        }
        Some(c)
    }

    /// Holding the key: the compare processes serve this VM, and it runs.
    fn serve_alone(&mut self) {
        if let Some(mut c) = self.compare() {
            let Some(set) = c.as_mut() else { return };
            if let Err(e) = set.serve_alone() {
                tracing::warn!(target: "colo", error = %e, "cannot make the compare processes serve this VM");
                *c = None;
                return;
            }
        }
        if self.fenced {
            if let Err(e) = self.vm.resume() {
                tracing::error!(target: "colo", error = %e, "restarting the VM after the fence");
            }
            tracing::warn!(target: "colo", "holding the arbiter's key again: serving");
        } else {
            tracing::info!(target: "colo", "holding the arbiter's key: serving");
        }
        self.fenced = false;
        self.serving_alone = true;
        self.colo.update(|s| s.fenced = None);
    }

    /// Not holding the key (and no secondary whose link guards the output): release nothing
    /// more and pause the VM, before etcd can expire the lease.
    fn fence(&mut self, why: &str) {
        if let Some(mut c) = self.compare() {
            if let Some(set) = c.as_mut() {
                if let Err(e) = set.serve_as_secondary() {
                    tracing::error!(target: "colo", error = %e, "cannot stop the compare processes releasing");
                    *c = None;
                }
            }
        }
        if let Err(e) = self.vm.pause() {
            tracing::error!(target: "colo", error = %e, "pausing the VM for the fence");
        }
        let reason = format!(
            "not holding the arbiter's key: {why}; nothing is released and the VM is paused until it is held again"
        );
        tracing::error!(target: "colo", "{reason}");
        self.fenced = true;
        self.serving_alone = false;
        self.colo.update(|s| s.fenced = Some(reason));
    }

    /// Serving alone with the key: start COLO with a registered standby (`auto-reprotect`).
    fn reprotect(&mut self, claim: &crate::arbiter::claim::Claim) {
        if !self.colo.params().auto_reprotect || self.colo.compare_sockets.is_empty() {
            return;
        }
        if self.last_reprotect.is_some_and(|t| t.elapsed() < REPROTECT_EVERY) {
            return;
        }
        self.last_reprotect = Some(Instant::now());
        self.failed_standbys.retain(|_, at| at.elapsed() < STANDBY_BACKOFF);
        let standbys = match claim.standbys() {
            Ok(s) => s,
            Err(e) => {
                self.colo.update(|s| s.reprotect = Some(format!("cannot list the standbys: {e}")));
                return;
            }
        };
        let Some((name, uri)) = standbys.into_iter().find(|(n, _)| !self.failed_standbys.contains_key(n)) else {
            self.colo.update(|s| s.reprotect = Some("no standby registered: unprotected".into()));
            return;
        };
        let parsed = match uri.parse() {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(target: "colo", standby = %name, uri = %uri, error = %e, "a standby registered a bad URI");
                self.failed_standbys.insert(name, Instant::now());
                return;
            }
        };
        tracing::info!(target: "colo", standby = %name, uri = %uri, "re-protection: starting COLO with a registered standby");
        self.colo.update(|s| s.reprotect = Some(format!("starting COLO with standby {name} at {uri}")));
        if let Err(e) = primary::start(&self.vm, &self.colo, parsed, TestOptions::default()) {
            tracing::warn!(target: "colo", standby = %name, error = %e, "re-protection did not start");
            self.colo.update(|s| s.reprotect = Some(format!("standby {name}: {e}")));
            self.failed_standbys.insert(name, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_serves_follows_role_and_state() {
        assert_eq!(part(Role::None, State::Inactive), Part::Alone, "booted, no COLO yet");
        assert_eq!(part(Role::Primary, State::Running), Part::InColo);
        assert_eq!(part(Role::Primary, State::Starting), Part::InColo);
        assert_eq!(part(Role::Primary, State::FailedOver), Part::Alone, "lost its secondary");
        assert_eq!(part(Role::Primary, State::Stopped), Part::NotServing, "stepped down");
        assert_eq!(part(Role::Secondary, State::Running), Part::NotServing);
        assert_eq!(part(Role::Secondary, State::Stopped), Part::NotServing, "waits for a decision");
        assert_eq!(part(Role::Secondary, State::FailedOver), Part::Alone, "took over");
    }
}
