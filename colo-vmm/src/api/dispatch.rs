//! The API dispatcher: executes control API commands on a VMM (as Firecracker's
//! rpc_interface sits above its Vmm). The VM itself knows nothing of the API.

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use super::protocol::{ApiError, Handler};
use crate::colo::shared::ColoShared;
use crate::colo::status::{Role as ColoRole, State as ColoState};
use crate::migration::status::{MigrationParams, MigrationState, MigrationStatus, StatusHandle};
use crate::migration::uri::MigrationUri;
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
        })
    }

    /// Applies `downtime-limit` and `max-rounds` from `args` (other keys than `allowed` are
    /// refused); nothing changes if any value is invalid.
    fn set_migration_params(&self, args: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
        let mut p = *lock(&self.migration_params);
        for (k, v) in args {
            let n = || v.as_u64().ok_or_else(|| ApiError::invalid(format!("{k} must be a non-negative integer")));
            match k.as_str() {
                "downtime-limit" => p.downtime_limit = n()?,
                "max-rounds" => {
                    p.max_rounds = u32::try_from(n()?).map_err(|_| ApiError::invalid("max-rounds is too large"))?
                }
                "verify" => p.verify = v.as_bool().ok_or_else(|| ApiError::invalid("verify must be true or false"))?,
                other if allowed.contains(&other) => {}
                other => return Err(ApiError::invalid(format!("unknown parameter '{other}'"))),
            }
        }
        *lock(&self.migration_params) = p;
        Ok(())
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

impl Handler for VmmApi {
    fn handle(&self, command: &str, args: &Map<String, Value>) -> Result<Value, ApiError> {
        let no_args = || {
            if let Some(k) = args.keys().next() {
                return Err(ApiError::invalid(format!("{command} takes no argument '{k}'")));
            }
            Ok(())
        };
        match command {
            "query-status" => {
                no_args()?;
                Ok(self.status())
            }
            "stop" => {
                no_args()?;
                self.not_in_colo("stop")?;
                self.vmm.stop().map_err(|e| ApiError::generic(e.to_string()))?;
                Ok(json!({}))
            }
            "cont" => {
                no_args()?;
                self.not_in_colo("cont")?;
                self.vmm.cont();
                Ok(json!({}))
            }
            "snapshot" => {
                let path = args
                    .get("path")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::invalid("snapshot needs path=FILE"))?;
                let stats = crate::persist::snapshot::save(&*self.vmm, Path::new(path))
                    .map_err(|e| ApiError::generic(e.to_string()))?;
                Ok(json!({ "pages": stats.pages, "bytes": stats.bytes }))
            }
            "migrate" => {
                let uri: MigrationUri = args
                    .get("uri")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::invalid("migrate needs uri=tcp:HOST:PORT or uri=unix:PATH"))?
                    .parse()
                    .map_err(ApiError::invalid)?;
                self.set_migration_params(args, &["uri"])?;
                if matches!(self.colo.status().state, ColoState::Starting | ColoState::Running) {
                    return Err(ApiError::generic("COLO is running: end it (lost-heartbeat) before migrating"));
                }
                let lifecycle = self.lifecycle.clone();
                let params = *lock(&self.migration_params);
                let done = move |ok| {
                    if ok {
                        lifecycle.migrated();
                    }
                };
                crate::migration::source::start(self.vmm.clone(), uri, params, self.migration.clone(), done)
                    .map_err(ApiError::generic)?;
                Ok(json!({}))
            }
            "query-migrate" => {
                no_args()?;
                serde_json::to_value(self.migration_status()).map_err(|e| ApiError::generic(e.to_string()))
            }
            "migrate-set-parameters" => {
                self.set_migration_params(args, &[])?;
                Ok(json!({}))
            }
            "query-migrate-parameters" => {
                no_args()?;
                let p = *lock(&self.migration_params);
                serde_json::to_value(p).map_err(|e| ApiError::generic(e.to_string()))
            }
            "quit" => {
                no_args()?;
                self.lifecycle.quit();
                Ok(json!({}))
            }
            "colo-start" => {
                let uri: MigrationUri = args
                    .get("uri")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "colo-start needs uri=tcp:HOST:PORT or uri=unix:PATH (the secondary's --incoming)",
                        )
                    })?
                    .parse()
                    .map_err(ApiError::invalid)?;
                let mut test = crate::colo::primary::TestOptions::default();
                for (k, v) in args {
                    match k.as_str() {
                        "uri" => {}
                        "verify" => {
                            test.verify =
                                v.as_bool().ok_or_else(|| ApiError::invalid("verify must be true or false"))?
                        }
                        "test-checkpoint-delay" => {
                            let ms = v.as_u64().filter(|&ms| ms <= MAX_TEST_DELAY_MS).ok_or_else(|| {
                                ApiError::invalid(format!("test-checkpoint-delay must be 0 to {MAX_TEST_DELAY_MS} ms"))
                            })?;
                            test.checkpoint_delay = Some(std::time::Duration::from_millis(ms));
                        }
                        other => return Err(ApiError::invalid(format!("colo-start takes no argument '{other}'"))),
                    }
                }
                if self.migration_status().status == MigrationState::Active {
                    return Err(ApiError::generic("a migration is running"));
                }
                crate::colo::primary::start(&self.vmm, &self.colo, uri, test).map_err(ApiError::generic)?;
                Ok(json!({}))
            }
            "set-parameters" => {
                let p = self.colo.set_params(args).map_err(ApiError::invalid)?;
                tracing::info!(target: "colo", params = ?p, "COLO parameters changed");
                serde_json::to_value(p).map_err(|e| ApiError::generic(e.to_string()))
            }
            "query-parameters" => {
                no_args()?;
                serde_json::to_value(self.colo.params()).map_err(|e| ApiError::generic(e.to_string()))
            }
            "query-colo-status" => {
                no_args()?;
                serde_json::to_value(self.colo.status()).map_err(|e| ApiError::generic(e.to_string()))
            }
            "lost-heartbeat" => {
                no_args()?;
                let s = self.colo.status();
                if !matches!(s.state, ColoState::Running | ColoState::Stopped) {
                    return Err(ApiError::generic(format!("COLO is not running (state {:?})", s.state)));
                }
                self.colo.lost_heartbeat.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(json!({}))
            }
            "colo-checkpoint" => {
                no_args()?;
                let s = self.colo.status();
                if s.role != ColoRole::Primary || s.state != ColoState::Running {
                    return Err(ApiError::generic("checkpoints are taken by a running COLO primary"));
                }
                self.colo.user_checkpoint.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(json!({}))
            }
            other => Err(ApiError::not_found(other)),
        }
    }
}
