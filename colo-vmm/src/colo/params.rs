//! COLO parameters (spec/colo.md), settable at run time with `set-parameters` and readable with
//! `query-parameters`. Changes take effect at once; an invalid value is refused and nothing
//! changes.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The parameters, with spec/colo.md's names and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ColoParams {
    /// Longest COLO interval (ms): a periodic checkpoint when nothing miscompares.
    pub max_time: u64,
    /// Shortest COLO interval (ms): an earlier miscompare is served when this has elapsed.
    pub min_time: u64,
    /// After a miscompare, how long (ms) the PVM keeps running after the checkpoint request.
    pub relax_time: u64,
    /// Go passive when the weighted mean COLO interval (ms) falls below this.
    pub passive_limit: u64,
    /// Interval between passive checkpoints (ms).
    pub passive_time: u64,
    /// Passive checkpoints before trying COLO again.
    pub passive_count: u32,
    /// Stream dirty RAM to the secondary between checkpoints once this much (bytes) is
    /// pending; 0 disables.
    pub ram_background_limit: u64,
    /// How often each side of the checkpoint link sends a heartbeat (ms).
    pub heartbeat_interval: u64,
    /// Silence on the checkpoint link (ms) after which the survivor fails over.
    pub heartbeat_timeout: u64,
}

impl Default for ColoParams {
    fn default() -> Self {
        ColoParams {
            max_time: 10_000,
            min_time: 100,
            relax_time: 0,
            passive_limit: 400,
            passive_time: 250,
            passive_count: 100,
            ram_background_limit: 10 << 20,
            heartbeat_interval: 100,
            heartbeat_timeout: 1000,
        }
    }
}

/// Milliseconds as a [`Duration`].
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl ColoParams {
    /// Applies `args` (parameter name → non-negative integer) to a copy, checks the result as a
    /// whole, and returns it; the caller stores it only on success.
    pub fn with(&self, args: &Map<String, Value>) -> Result<ColoParams, String> {
        let mut p = *self;
        for (name, v) in args {
            let n = v.as_u64().ok_or_else(|| format!("{name}: expected a non-negative integer, got {v}"))?;
            match name.as_str() {
                "max-time" => p.max_time = n,
                "min-time" => p.min_time = n,
                "relax-time" => p.relax_time = n,
                "passive-limit" => p.passive_limit = n,
                "passive-time" => p.passive_time = n,
                "passive-count" => p.passive_count = u32::try_from(n).map_err(|_| format!("{name}: too large"))?,
                "ram-background-limit" => p.ram_background_limit = n,
                "heartbeat-interval" => p.heartbeat_interval = n,
                "heartbeat-timeout" => p.heartbeat_timeout = n,
                other => return Err(format!("unknown parameter '{other}'")),
            }
        }
        p.validate()?;
        Ok(p)
    }

    /// Whether the values make sense together.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max-time", self.max_time),
            ("passive-time", self.passive_time),
            ("passive-count", u64::from(self.passive_count)),
            ("heartbeat-interval", self.heartbeat_interval),
            ("heartbeat-timeout", self.heartbeat_timeout),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        if self.min_time > self.max_time {
            return Err(format!("min-time ({}) must not exceed max-time ({})", self.min_time, self.max_time));
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(format!(
                "heartbeat-timeout ({}) must exceed heartbeat-interval ({})",
                self.heartbeat_timeout, self.heartbeat_interval
            ));
        }
        if self.ram_background_limit != 0 && self.ram_background_limit < 4096 {
            return Err("ram-background-limit must be 0 (off) or at least one page (4096)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn defaults_match_the_spec_and_serialize_with_its_names() {
        let v = serde_json::to_value(ColoParams::default()).unwrap();
        assert_eq!(v["max-time"], 10000);
        assert_eq!(v["min-time"], 100);
        assert_eq!(v["relax-time"], 0);
        assert_eq!(v["passive-limit"], 400);
        assert_eq!(v["passive-time"], 250);
        assert_eq!(v["passive-count"], 100);
        assert_eq!(v["ram-background-limit"], 10 << 20);
        ColoParams::default().validate().unwrap();
    }

    #[test]
    fn changes_apply_and_invalid_values_change_nothing() {
        let p = ColoParams::default();
        let q = p.with(&args(json!({"passive-limit": 600, "max-time": 5000}))).unwrap();
        assert_eq!((q.passive_limit, q.max_time), (600, 5000));
        for bad in [
            json!({"max-time": 0}),
            json!({"passive-time": -5}),
            json!({"passive-count": 0}),
            json!({"min-time": 20000}),
            json!({"heartbeat-timeout": 50}),
            json!({"bogus": 1}),
            json!({"max-time": "ten"}),
            json!({"ram-background-limit": 100}),
            json!({"passive-limit": 600, "max-time": 0}),
        ] {
            assert!(p.with(&args(bad.clone())).is_err(), "{bad} should be refused");
        }
        assert_eq!(p, ColoParams::default(), "a refused change leaves the parameters as they were");
    }
}
