//! COLO state shared between the control API and the controller threads of one VMM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use super::compare::CompareSet;
use super::link::LinkWatch;
use super::params::{ColoParams, ColoParamsUpdate, ParamsError};
use super::status::ColoStatus;
use crate::arbiter::claim::Claim;

/// The shared state.
pub struct ColoShared {
    params: Mutex<ColoParams>,
    /// The heartbeat interval, read by the link's heartbeat thread at each beat.
    pub heartbeat_ms: Arc<AtomicU64>,
    status: Mutex<ColoStatus>,
    /// `lost-heartbeat`: fail over now.
    pub lost_heartbeat: AtomicBool,
    /// A user asked for a checkpoint.
    pub user_checkpoint: AtomicBool,
    /// The compare processes' control sockets (`--compare-socket`).
    pub compare_sockets: Vec<PathBuf>,
    /// The primary's connection to them (made at start, to set `primary-only`).
    pub compare: Mutex<Option<CompareSet>>,
    /// With `--arbiter`: this replica's claim on the VM's key in etcd.
    pub arbiter: OnceLock<Arc<Claim>>,
    /// The checkpoint link of the current (or last) COLO run, for the metrics endpoint.
    link: Mutex<Option<LinkWatch>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ColoShared {
    /// Defaults, with these compare processes.
    pub fn new(compare_sockets: Vec<PathBuf>) -> ColoShared {
        let p = ColoParams::default();
        ColoShared {
            heartbeat_ms: Arc::new(AtomicU64::new(p.heartbeat_interval)),
            params: Mutex::new(p),
            status: Mutex::new(ColoStatus::default()),
            lost_heartbeat: AtomicBool::new(false),
            user_checkpoint: AtomicBool::new(false),
            compare_sockets,
            compare: Mutex::new(None),
            arbiter: OnceLock::new(),
            link: Mutex::new(None),
        }
    }

    /// The current parameters.
    pub fn params(&self) -> ColoParams {
        *lock(&self.params)
    }

    /// `set-parameters`: all or nothing.
    pub fn set_params(&self, update: &ColoParamsUpdate) -> Result<ColoParams, ParamsError> {
        let mut p = lock(&self.params);
        let new = p.apply(update)?;
        if let (Some(c), Some(ttl)) = (self.arbiter(), update.arbiter_ttl) {
            c.set_ttl(Duration::from_millis(ttl)).map_err(|e| ParamsError::Arbiter(e.to_string()))?;
        }
        *p = new;
        self.heartbeat_ms.store(new.heartbeat_interval, Ordering::Relaxed);
        Ok(new)
    }

    /// The primary's heartbeat parameters, on the secondary. Refused (nothing changes) when
    /// they are out of bounds or the timeout is not above the interval.
    pub fn set_heartbeat(&self, interval_ms: u64, timeout_ms: u64) -> Result<(), ParamsError> {
        let update = ColoParamsUpdate {
            heartbeat_interval: Some(interval_ms),
            heartbeat_timeout: Some(timeout_ms),
            ..Default::default()
        };
        self.set_params(&update).map(|_| ())
    }

    /// A copy of the status (with the arbiter's, asked now).
    pub fn status(&self) -> ColoStatus {
        let mut s = lock(&self.status).clone();
        s.arbiter = self.arbiter().map(|c| c.status());
        s
    }

    /// A copy of the status without its recent history (with the arbiter's, asked now).
    pub fn summary(&self) -> ColoStatus {
        let mut s = lock(&self.status).summary();
        s.arbiter = self.arbiter().map(|c| c.status());
        s
    }

    /// The arbiter's claim, with `--arbiter`.
    pub fn arbiter(&self) -> Option<&Arc<Claim>> {
        self.arbiter.get()
    }

    /// Changes the status.
    pub fn update(&self, f: impl FnOnce(&mut ColoStatus)) {
        f(&mut lock(&self.status));
    }

    /// Shows this checkpoint link (it replaces the last one) on the metrics endpoint.
    pub fn watch_link(&self, link: LinkWatch) {
        *lock(&self.link) = Some(link);
    }

    /// The checkpoint link of the current (or last) COLO run, if there was one.
    pub fn link(&self) -> Option<LinkWatch> {
        lock(&self.link).clone()
    }

    /// The compare connection (primary).
    pub fn compare(&self) -> MutexGuard<'_, Option<CompareSet>> {
        lock(&self.compare)
    }
}
