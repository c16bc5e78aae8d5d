//! The API dispatcher: executes control API commands on a VMM (as Firecracker's
//! rpc_interface sits above its Vmm). The VM itself knows nothing of the API.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::command::Command;
use super::protocol::{ApiError, Handler};
use crate::colo::primary::TestOptions;
use crate::colo::shared::ColoShared;
use crate::colo::status::{Role as ColoRole, State as ColoState};
use crate::migration::status::{MigrationParams, MigrationParamsUpdate, MigrationState, MigrationStatus, StatusHandle};
use crate::vmm::Vmm;

/// Longest test-only hold of a checkpoint (`colo-start test-checkpoint-delay=MS`).
const MAX_TEST_DELAY_MS: u64 = 60_000;

/// What the API can ask of the VMM besides the VM itself: ending the process.
pub trait Lifecycle: Send + Sync {
    /// The `quit` command: end the VMM cleanly.
    fn quit(&self);
    /// A migration handed the VM to its destination: this process has nothing left to run.
    fn migrated(&self);
}

/// The control API's view of a VMM: the VM, and the state of what drives it (migration, COLO).
pub struct VmmApi {
    vmm: Arc<Vmm>,
    colo: Arc<ColoShared>,
    migration: StatusHandle,
    migration_params: Mutex<MigrationParams>,
    lifecycle: Arc<dyn Lifecycle>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmmApi {
    /// The API of `vmm`, whose COLO state is `colo`; `lifecycle` ends the process.
    pub fn new(vmm: Arc<Vmm>, colo: Arc<ColoShared>, lifecycle: Arc<dyn Lifecycle>) -> VmmApi {
        VmmApi {
            vmm,
            colo,
            migration: Arc::new(Mutex::new(MigrationStatus::default())),
            migration_params: Mutex::new(MigrationParams::default()),
            lifecycle,
        }
    }

    fn migration_status(&self) -> MigrationStatus {
        lock(&self.migration).clone()
    }

    fn status(&self) -> Value {
        let paused = self.vmm.is_paused();
        let migrated = self.migration_status().status == MigrationState::Completed;
        json!({
            "status": if migrated { "postmigrate" } else if paused { "paused" } else { "running" },
            "running": !paused,
            "uptime-ms": self.vmm.uptime().as_millis() as u64,
            "memory-mib": self.vmm.ram().size() >> 20,
            "cpus": self.vmm.vcpus().len(),
            "disk": self.vmm.disk_status(),
        })
    }
}

impl VmmApi {
    /// `stop` and `cont` belong to the checkpoint controller while COLO runs, and a VM that
    /// COLO stopped waits for a failover decision instead.
    fn not_in_colo(&self, command: &str) -> Result<(), ApiError> {
        match self.colo.status().state {
            ColoState::Starting | ColoState::Running => {
                Err(ApiError::generic(format!("{command}: COLO runs this VM (end it with lost-heartbeat first)")))
            }
            ColoState::Stopped => Err(ApiError::generic(format!(
                "{command}: COLO stopped this VM; on a secondary, lost-heartbeat makes it take over"
            ))),
            ColoState::Inactive | ColoState::FailedOver => Ok(()),
        }
    }
}

/// A reply's value.
fn value<T: serde::Serialize>(v: T) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|e| ApiError::generic(e.to_string()))
}

impl Handler for VmmApi {
    fn handle(&self, command: Command) -> Result<Value, ApiError> {
        let name = command.name();
        match command {
            Command::QueryStatus {} => Ok(self.status()),
            Command::Stop {} => {
                self.not_in_colo(name)?;
                self.vmm.stop().map_err(|e| ApiError::generic(e.to_string()))?;
                Ok(json!({}))
            }
            Command::Cont {} => {
                self.not_in_colo(name)?;
                self.vmm.cont();
                Ok(json!({}))
            }
            Command::Snapshot { path } => {
                let stats =
                    crate::persist::snapshot::save(&*self.vmm, &path).map_err(|e| ApiError::generic(e.to_string()))?;
                Ok(json!({ "pages": stats.pages, "blocks": stats.blocks, "bytes": stats.bytes }))
            }
            Command::Migrate { uri, downtime_limit, max_rounds, verify } => {
                let params = {
                    let mut p = lock(&self.migration_params);
                    *p = p.apply(&MigrationParamsUpdate { downtime_limit, max_rounds, verify });
                    *p
                };
                if matches!(self.colo.status().state, ColoState::Starting | ColoState::Running) {
                    return Err(ApiError::generic("COLO is running: end it (lost-heartbeat) before migrating"));
                }
                let lifecycle = self.lifecycle.clone();
                let done = move |ok| {
                    if ok {
                        lifecycle.migrated();
                    }
                };
                crate::migration::source::start(self.vmm.clone(), uri, params, self.migration.clone(), done)
                    .map_err(|e| ApiError::generic(e.to_string()))?;
                Ok(json!({}))
            }
            Command::QueryMigrate {} => value(self.migration_status()),
            Command::MigrateSetParameters(update) => {
                let mut p = lock(&self.migration_params);
                *p = p.apply(&update);
                Ok(json!({}))
            }
            Command::QueryMigrateParameters {} => value(*lock(&self.migration_params)),
            Command::Quit {} => {
                self.lifecycle.quit();
                Ok(json!({}))
            }
            Command::ColoStart { uri, verify, test_checkpoint_delay } => {
                let checkpoint_delay = match test_checkpoint_delay {
                    Some(ms) if ms > MAX_TEST_DELAY_MS => {
                        let e = format!("test-checkpoint-delay must be 0 to {MAX_TEST_DELAY_MS} ms");
                        return Err(ApiError::invalid(e));
                    }
                    d => d.map(Duration::from_millis),
                };
                if self.migration_status().status == MigrationState::Active {
                    return Err(ApiError::generic("a migration is running"));
                }
                let test = TestOptions { verify, checkpoint_delay };
                crate::colo::primary::start(&self.vmm, &self.colo, uri, test)
                    .map_err(|e| ApiError::generic(e.to_string()))?;
                Ok(json!({}))
            }
            Command::SetParameters(update) => {
                let p = self.colo.set_params(&update).map_err(|e| ApiError::invalid(e.to_string()))?;
                tracing::info!(target: "colo", params = ?p, "COLO parameters changed");
                value(p)
            }
            Command::QueryParameters {} => value(self.colo.params()),
            Command::QueryColoStatus {} => value(self.colo.status()),
            Command::LostHeartbeat {} => {
                let s = self.colo.status();
                if !matches!(s.state, ColoState::Running | ColoState::Stopped) {
                    return Err(ApiError::generic(format!("COLO is not running (state {:?})", s.state)));
                }
                self.colo.lost_heartbeat.store(true, Ordering::Relaxed);
                Ok(json!({}))
            }
            Command::ColoCheckpoint {} => {
                let s = self.colo.status();
                if s.role != ColoRole::Primary || s.state != ColoState::Running {
                    return Err(ApiError::generic("checkpoints are taken by a running COLO primary"));
                }
                self.colo.user_checkpoint.store(true, Ordering::Relaxed);
                Ok(json!({}))
            }
        }
    }
}
