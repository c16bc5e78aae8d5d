//! Migration parameters and the progress `query-migrate` reports.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Tunables (`migrate-set-parameters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParams {
    /// Pause the VM for the last round once the remaining dirty pages take at most this long
    /// to send (ms).
    pub downtime_limit: u64,
    /// Pause after this many pre-copy rounds even if the dirty set never gets that small.
    pub max_rounds: u32,
    /// Test mode: at the pause the source hashes every page and the destination refuses to run
    /// unless its memory matches page for page (proves the dirty tracking missed nothing).
    pub verify: bool,
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams { downtime_limit: 300, max_rounds: 30, verify: false }
    }
}

/// `migrate-set-parameters` (and `migrate`'s own): the parameters to change, each optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MigrationParamsUpdate {
    /// `downtime-limit`, ms.
    pub downtime_limit: Option<u64>,
    /// `max-rounds`.
    pub max_rounds: Option<u32>,
    /// `verify`.
    pub verify: Option<bool>,
}

impl MigrationParams {
    /// These parameters with `u`'s changes (every value of the right type is valid).
    pub fn apply(&self, u: &MigrationParamsUpdate) -> MigrationParams {
        MigrationParams {
            downtime_limit: u.downtime_limit.unwrap_or(self.downtime_limit),
            max_rounds: u.max_rounds.unwrap_or(self.max_rounds),
            verify: u.verify.unwrap_or(self.verify),
        }
    }
}

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationState {
    /// None started.
    #[default]
    None,
    /// Copying.
    Active,
    /// The destination runs the VM.
    Completed,
    /// It failed; the VM runs here.
    Failed,
}

/// Progress, as `query-migrate` reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStatus {
    /// State.
    pub status: MigrationState,
    /// Pre-copy rounds done.
    pub rounds: u32,
    /// Pages sent so far.
    pub pages_sent: u64,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Pages of guest RAM.
    pub total_pages: u64,
    /// Pages dirtied per second in the last round.
    pub dirty_rate: u64,
    /// Pages still dirty at the last count.
    pub remaining_pages: u64,
    /// How long the final pause would take now (ms).
    pub expected_downtime_ms: u64,
    /// The real pause: from pausing here to running there (ms), when completed.
    pub downtime_ms: u64,
    /// Pages sent during the pause (the last round).
    pub final_pages: u64,
    /// Disk blocks sent so far.
    #[serde(default)]
    pub blocks_sent: u64,
    /// Disk blocks sent during the pause.
    #[serde(default)]
    pub final_blocks: u64,
    /// Time since the migration started (ms).
    pub total_time_ms: u64,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Shared progress.
pub type StatusHandle = Arc<Mutex<MigrationStatus>>;

/// Updates the shared status.
pub fn update(h: &StatusHandle, f: impl FnOnce(&mut MigrationStatus)) {
    f(&mut h.lock().unwrap_or_else(|p| p.into_inner()));
}
