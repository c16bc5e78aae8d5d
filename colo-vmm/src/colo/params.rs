//! COLO parameters (docs/colo.md), settable at run time with `set-parameters` and readable with
//! `query-parameters`. Changes take effect at once; an invalid value is refused and nothing
//! changes.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The parameters, with docs/colo.md's names and defaults.
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
    /// With an arbiter: the TTL (ms) of the lease behind the serving replica's key. etcd's
    /// leases count whole seconds (rounded up here) and cannot be shorter than its election
    /// timeout allows: 1000 at least.
    pub arbiter_ttl: u64,
    /// With an arbiter: a replica serving without a secondary starts COLO with a registered
    /// standby by itself.
    pub auto_reprotect: bool,
    /// The PVM resumes once its output is committed, while the secondary still loads the
    /// checkpoint (its `vmstate-loaded` is awaited before the next one), so the load is not
    /// part of the pause. On by default; off keeps QEMU's order (resume after the load).
    pub resume_before_load: bool,
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
            arbiter_ttl: 2000,
            auto_reprotect: true,
            resume_before_load: true,
        }
    }
}

/// Milliseconds as a [`Duration`].
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// `set-parameters`: the parameters to change, each optional (Firecracker's
/// `MachineConfigUpdate` shape); [`ColoParams::apply`] makes the new set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ColoParamsUpdate {
    /// `max-time`, ms.
    pub max_time: Option<u64>,
    /// `min-time`, ms.
    pub min_time: Option<u64>,
    /// `relax-time`, ms.
    pub relax_time: Option<u64>,
    /// `passive-limit`, ms.
    pub passive_limit: Option<u64>,
    /// `passive-time`, ms.
    pub passive_time: Option<u64>,
    /// `passive-count`.
    pub passive_count: Option<u32>,
    /// `ram-background-limit`, bytes.
    pub ram_background_limit: Option<u64>,
    /// `heartbeat-interval`, ms.
    pub heartbeat_interval: Option<u64>,
    /// `heartbeat-timeout`, ms.
    pub heartbeat_timeout: Option<u64>,
    /// `arbiter-ttl`, ms.
    pub arbiter_ttl: Option<u64>,
    /// `auto-reprotect`.
    pub auto_reprotect: Option<bool>,
    /// `resume-before-load`.
    pub resume_before_load: Option<bool>,
}

/// Why a set of parameters is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    /// A value must not be 0.
    #[error("{0} must be greater than 0")]
    Zero(&'static str),
    /// A value is beyond its bound.
    #[error("{name} ({value}) must not exceed {max}")]
    TooLarge {
        /// The parameter.
        name: &'static str,
        /// Its value.
        value: u64,
        /// Its bound.
        max: u64,
    },
    /// `min-time` above `max-time`.
    #[error("min-time ({min}) must not exceed max-time ({max})")]
    MinAboveMax {
        /// min-time.
        min: u64,
        /// max-time.
        max: u64,
    },
    /// The heartbeat timeout does not exceed the interval.
    #[error("heartbeat-timeout ({timeout}) must exceed heartbeat-interval ({interval})")]
    HeartbeatTimeout {
        /// heartbeat-timeout.
        timeout: u64,
        /// heartbeat-interval.
        interval: u64,
    },
    /// A background limit below one page.
    #[error("ram-background-limit must be 0 (off) or at least one page (4096)")]
    BackgroundLimit,
    /// The arbiter could not move the key to a lease of the new TTL.
    #[error("arbiter-ttl: {0}")]
    Arbiter(String),
    /// An arbiter lease shorter than etcd can keep.
    #[error("arbiter-ttl ({0}) must be at least {min} ms: etcd's leases count whole seconds", min = bounds::ARBITER_TTL_MIN_MS)]
    ArbiterTtl(u64),
}

/// Upper bounds: beyond them a value is a mistake, never a wish (a `relax-time` of 2^64-1 ms
/// would keep the SVM paused for ever in the middle of a checkpoint).
pub mod bounds {
    /// One hour, ms: the longest interval of any kind.
    pub const INTERVAL_MS: u64 = 3_600_000;
    /// `relax-time`, ms: the SVM waits paused meanwhile.
    pub const RELAX_MS: u64 = 10_000;
    /// `passive-count`.
    pub const PASSIVE_COUNT: u64 = 1_000_000;
    /// `ram-background-limit`, bytes.
    pub const BACKGROUND_BYTES: u64 = 16 << 30;
    /// `heartbeat-interval`, ms.
    pub const HEARTBEAT_INTERVAL_MS: u64 = 60_000;
    /// `heartbeat-timeout`, ms.
    pub const HEARTBEAT_TIMEOUT_MS: u64 = 600_000;
    /// `arbiter-ttl`, ms: etcd's shortest lease (a second) ...
    pub const ARBITER_TTL_MIN_MS: u64 = 1000;
    /// ... and a minute, beyond which a dead replica blocks its failover too long.
    pub const ARBITER_TTL_MAX_MS: u64 = 60_000;
}

impl ColoParams {
    /// Applies `u` to a copy, checks the result as a whole, and returns it; the caller stores it
    /// only on success.
    pub fn apply(&self, u: &ColoParamsUpdate) -> Result<ColoParams, ParamsError> {
        let mut p = *self;
        let set = |field: &mut u64, v: Option<u64>| {
            if let Some(v) = v {
                *field = v;
            }
        };
        set(&mut p.max_time, u.max_time);
        set(&mut p.min_time, u.min_time);
        set(&mut p.relax_time, u.relax_time);
        set(&mut p.passive_limit, u.passive_limit);
        set(&mut p.passive_time, u.passive_time);
        if let Some(v) = u.passive_count {
            p.passive_count = v;
        }
        set(&mut p.ram_background_limit, u.ram_background_limit);
        set(&mut p.heartbeat_interval, u.heartbeat_interval);
        set(&mut p.heartbeat_timeout, u.heartbeat_timeout);
        set(&mut p.arbiter_ttl, u.arbiter_ttl);
        if let Some(v) = u.auto_reprotect {
            p.auto_reprotect = v;
        }
        if let Some(v) = u.resume_before_load {
            p.resume_before_load = v;
        }
        p.validate()?;
        Ok(p)
    }

    /// Whether the values make sense together and stay within their [`bounds`].
    pub fn validate(&self) -> Result<(), ParamsError> {
        let checks = [
            ("max-time", self.max_time, 1, bounds::INTERVAL_MS),
            ("min-time", self.min_time, 0, bounds::INTERVAL_MS),
            ("relax-time", self.relax_time, 0, bounds::RELAX_MS),
            ("passive-limit", self.passive_limit, 0, bounds::INTERVAL_MS),
            ("passive-time", self.passive_time, 1, bounds::INTERVAL_MS),
            ("passive-count", u64::from(self.passive_count), 1, bounds::PASSIVE_COUNT),
            ("ram-background-limit", self.ram_background_limit, 0, bounds::BACKGROUND_BYTES),
            ("heartbeat-interval", self.heartbeat_interval, 1, bounds::HEARTBEAT_INTERVAL_MS),
            ("heartbeat-timeout", self.heartbeat_timeout, 1, bounds::HEARTBEAT_TIMEOUT_MS),
            ("arbiter-ttl", self.arbiter_ttl, 1, bounds::ARBITER_TTL_MAX_MS),
        ];
        for (name, value, min, max) in checks {
            if value < min {
                return Err(ParamsError::Zero(name));
            }
            if value > max {
                return Err(ParamsError::TooLarge { name, value, max });
            }
        }
        if self.min_time > self.max_time {
            return Err(ParamsError::MinAboveMax { min: self.min_time, max: self.max_time });
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(ParamsError::HeartbeatTimeout {
                timeout: self.heartbeat_timeout,
                interval: self.heartbeat_interval,
            });
        }
        if self.ram_background_limit != 0 && self.ram_background_limit < 4096 {
            return Err(ParamsError::BackgroundLimit);
        }
        if self.arbiter_ttl < bounds::ARBITER_TTL_MIN_MS {
            return Err(ParamsError::ArbiterTtl(self.arbiter_ttl));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn update(v: Value) -> Result<ColoParamsUpdate, serde_json::Error> {
        serde_json::from_value(v)
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
        let q = p.apply(&update(json!({"passive-limit": 600, "max-time": 5000})).unwrap()).unwrap();
        assert_eq!((q.passive_limit, q.max_time), (600, 5000));
        for bad in [
            json!({"passive-time": -5}),
            json!({"bogus": 1}),
            json!({"max-time": "ten"}),
            json!({"passive-count": 5_000_000_000u64}),
        ] {
            assert!(update(bad.clone()).is_err(), "{bad} should not parse");
        }
        for bad in [
            json!({"max-time": 0}),
            json!({"passive-count": 0}),
            json!({"min-time": 20000}),
            json!({"heartbeat-timeout": 50}),
            json!({"ram-background-limit": 100}),
            json!({"passive-limit": 600, "max-time": 0}),
        ] {
            assert!(p.apply(&update(bad.clone()).unwrap()).is_err(), "{bad} should be refused");
        }
        assert_eq!(p, ColoParams::default(), "a refused change leaves the parameters as they were");
    }

    #[test]
    fn every_parameter_has_an_upper_bound() {
        // Issue 12, item 6: relax-time = 2^64-1 slept for ever in the middle of a checkpoint.
        let p = ColoParams::default();
        for name in [
            "max-time",
            "min-time",
            "relax-time",
            "passive-limit",
            "passive-time",
            "passive-count",
            "ram-background-limit",
            "heartbeat-interval",
            "heartbeat-timeout",
        ] {
            let huge = if name == "passive-count" { u64::from(u32::MAX) } else { u64::MAX };
            let u = update(json!({ name: huge })).unwrap();
            assert!(
                matches!(p.apply(&u), Err(ParamsError::TooLarge { .. } | ParamsError::MinAboveMax { .. })),
                "{name} = {huge}: {:?}",
                p.apply(&u)
            );
        }
        assert!(p.apply(&update(json!({"relax-time": 10_001})).unwrap()).is_err());
        assert_eq!(p.apply(&update(json!({"relax-time": 10_000})).unwrap()).unwrap().relax_time, 10_000);
        // What the tests and benchmarks set stays allowed.
        let u = update(json!({"max-time": 100, "passive-limit": 1_000_000, "passive-count": 1_000_000})).unwrap();
        p.apply(&u).unwrap();
        p.apply(&update(json!({"heartbeat-timeout": 60_000})).unwrap()).unwrap();
    }
}
