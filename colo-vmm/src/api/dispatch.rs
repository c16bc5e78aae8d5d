//! The API dispatcher: executes control API commands on a VMM (as Firecracker's
//! rpc_interface sits above its Vmm). The VM itself knows nothing of the API.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::protocol::{ApiError, Handler};
use crate::colo::status::{Role as ColoRole, State as ColoState};
use crate::migration::uri::MigrationUri;
use crate::vmm::Vmm;

/// What the API can ask of the VMM besides the VM itself: ending the process.
pub trait Lifecycle: Send + Sync {
    /// The `quit` command: end the VMM cleanly.
    fn quit(&self);
    /// A migration handed the VM to its destination: this process has nothing left to run.
    fn migrated(&self);
}

/// The control API's view of a VMM.
pub struct VmmApi {
    /// The VM.
    pub vmm: Arc<Vmm>,
    /// Who ends the process.
    pub lifecycle: Arc<dyn Lifecycle>,
}

impl VmmApi {
    /// Applies `downtime-limit` and `max-rounds` from `args` (other keys than `allowed` are
    /// refused); nothing changes if any value is invalid.
    fn set_migration_params(&self, args: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
        let mut p = *self.vmm.migration_params().lock().unwrap_or_else(|p| p.into_inner());
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
        *self.vmm.migration_params().lock().unwrap_or_else(|p| p.into_inner()) = p;
        Ok(())
    }
}

impl VmmApi {
    /// `stop` and `cont` belong to the checkpoint controller while COLO runs, and a VM that
    /// COLO stopped waits for a failover decision instead.
    fn not_in_colo(&self, command: &str) -> Result<(), ApiError> {
        match self.vmm.colo().status().state {
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
                Ok(self.vmm.status())
            }
            "stop" => {
                no_args()?;
                self.not_in_colo("stop")?;
                if !self.vmm.vcpu().pause() {
                    return Err(ApiError::generic("the guest is no longer running"));
                }
                Ok(json!({}))
            }
            "cont" => {
                no_args()?;
                self.not_in_colo("cont")?;
                self.vmm.vcpu().resume();
                Ok(json!({}))
            }
            "snapshot" => {
                let path = args
                    .get("path")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::invalid("snapshot needs path=FILE"))?;
                let stats = self.vmm.snapshot(Path::new(path)).map_err(|e| ApiError::generic(e.to_string()))?;
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
                let lifecycle = self.lifecycle.clone();
                self.vmm
                    .start_migration(uri, move |ok| {
                        if ok {
                            lifecycle.migrated();
                        }
                    })
                    .map_err(ApiError::generic)?;
                Ok(json!({}))
            }
            "query-migrate" => {
                no_args()?;
                serde_json::to_value(self.vmm.migration_status()).map_err(|e| ApiError::generic(e.to_string()))
            }
            "migrate-set-parameters" => {
                self.set_migration_params(args, &[])?;
                Ok(json!({}))
            }
            "query-migrate-parameters" => {
                no_args()?;
                let p = *self.vmm.migration_params().lock().unwrap_or_else(|p| p.into_inner());
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
                if let Some(k) = args.keys().find(|k| *k != "uri") {
                    return Err(ApiError::invalid(format!("colo-start takes no argument '{k}'")));
                }
                crate::colo::primary::start(&self.vmm, uri).map_err(ApiError::generic)?;
                Ok(json!({}))
            }
            "set-parameters" => {
                let p = self.vmm.colo().set_params(args).map_err(ApiError::invalid)?;
                tracing::info!(target: "colo", params = ?p, "COLO parameters changed");
                serde_json::to_value(p).map_err(|e| ApiError::generic(e.to_string()))
            }
            "query-parameters" => {
                no_args()?;
                serde_json::to_value(self.vmm.colo().params()).map_err(|e| ApiError::generic(e.to_string()))
            }
            "query-colo-status" => {
                no_args()?;
                serde_json::to_value(self.vmm.colo().status()).map_err(|e| ApiError::generic(e.to_string()))
            }
            "lost-heartbeat" => {
                no_args()?;
                let s = self.vmm.colo().status();
                if !matches!(s.state, ColoState::Running | ColoState::Stopped) {
                    return Err(ApiError::generic(format!("COLO is not running (state {:?})", s.state)));
                }
                self.vmm.colo().lost_heartbeat.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(json!({}))
            }
            "colo-checkpoint" => {
                no_args()?;
                let s = self.vmm.colo().status();
                if s.role != ColoRole::Primary || s.state != ColoState::Running {
                    return Err(ApiError::generic("checkpoints are taken by a running COLO primary"));
                }
                self.vmm.colo().user_checkpoint.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(json!({}))
            }
            other => Err(ApiError::not_found(other)),
        }
    }
}
