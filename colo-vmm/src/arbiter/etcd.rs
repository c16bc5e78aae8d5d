//! A small client of etcd's v3 API through its JSON gateway (`POST /v3/...`, keys and values in
//! base64): leases, transactions and ranges are etcd's own, this only speaks HTTP to them.
//!
//! Several endpoints (the members of a cluster) may be given: a request goes to the one that
//! last answered and moves on to the next when it cannot be reached.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

/// Why a request to etcd failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered.
    #[error("etcd unreachable ({0})")]
    Unreachable(String),
    /// An endpoint answered with an error.
    #[error("etcd refused: {0}")]
    Refused(String),
    /// An answer that is not what the API returns.
    #[error("unexpected answer from etcd: {0}")]
    Malformed(String),
}

/// A key's value and the lease it is attached to (0: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
    /// The lease, 0 if none.
    pub lease: i64,
}

/// The client.
pub struct Etcd {
    agent: ureq::Agent,
    endpoints: Vec<String>,
    current: AtomicUsize,
}

/// etcd's JSON gateway prints 64-bit numbers as strings.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

fn unb64(v: &Value) -> Result<String, EtcdError> {
    let s = v.as_str().unwrap_or_default();
    let bytes = B64.decode(s).map_err(|e| EtcdError::Malformed(format!("base64: {e}")))?;
    String::from_utf8(bytes).map_err(|e| EtcdError::Malformed(format!("utf-8: {e}")))
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &str) -> String {
    let mut b = prefix.as_bytes().to_vec();
    while let Some(last) = b.pop() {
        if last < 0xff {
            b.push(last + 1);
            break;
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

#[derive(Deserialize)]
struct RangeReply {
    #[serde(default)]
    kvs: Vec<Value>,
}

impl Etcd {
    /// A client of `endpoints` (`http://HOST:PORT`), each request given `timeout`.
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> Etcd {
        let config = ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build();
        Etcd { agent: config.into(), endpoints, current: AtomicUsize::new(0) }
    }

    /// The endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn call<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, EtcdError> {
        let n = self.endpoints.len().max(1);
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::from("no endpoint");
        for k in 0..n {
            let i = (start + k) % n;
            let Some(ep) = self.endpoints.get(i) else { break };
            let url = format!("{}/v3/{path}", ep.trim_end_matches('/'));
            let response = match self.agent.post(&url).send_json(body) {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{ep}: {e}");
                    continue;
                }
            };
            self.current.store(i, Ordering::Relaxed);
            let status = response.status().as_u16();
            let mut response = response;
            let text =
                response.body_mut().read_to_string().map_err(|e| EtcdError::Unreachable(format!("{ep}: {e}")))?;
            if status != 200 {
                return Err(EtcdError::Refused(format!("{path}: HTTP {status}: {}", text.trim())));
            }
            return serde_json::from_str(&text).map_err(|e| EtcdError::Malformed(format!("{path}: {e}: {text}")));
        }
        Err(EtcdError::Unreachable(last))
    }

    /// A new lease of `ttl` seconds; its id.
    pub fn grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let v: Value = self.call("lease/grant", &json!({ "TTL": ttl }))?;
        match int(&v["ID"]) {
            0 => Err(EtcdError::Refused(format!("lease grant: {}", v["error"]))),
            id => Ok(id),
        }
    }

    /// Renews a lease; the seconds it has left (0: it expired or does not exist).
    pub fn keepalive(&self, lease: i64) -> Result<i64, EtcdError> {
        let v: Value = self.call("lease/keepalive", &json!({ "ID": lease.to_string() }))?;
        Ok(int(&v["result"]["TTL"]))
    }

    /// Ends a lease (its keys go with it).
    pub fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        let _: Value = self.call("lease/revoke", &json!({ "ID": lease.to_string() }))?;
        Ok(())
    }

    /// Seconds a lease has left (-1 or 0: gone).
    pub fn time_to_live(&self, lease: i64) -> Result<i64, EtcdError> {
        let v: Value = self.call("lease/timetolive", &json!({ "ID": lease.to_string() }))?;
        Ok(int(&v["TTL"]))
    }

    fn kvs(&self, body: Value) -> Result<Vec<Kv>, EtcdError> {
        let r: RangeReply = self.call("kv/range", &body)?;
        r.kvs
            .iter()
            .map(|kv| Ok(Kv { key: unb64(&kv["key"])?, value: unb64(&kv["value"])?, lease: int(&kv["lease"]) }))
            .collect()
    }

    /// A key's value, if it exists.
    pub fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        Ok(self.kvs(json!({ "key": b64(key) }))?.into_iter().next())
    }

    /// Every key starting with `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<Kv>, EtcdError> {
        self.kvs(json!({ "key": b64(prefix), "range_end": b64(&prefix_end(prefix)) }))
    }

    /// Sets `key` to `value` on `lease` (0: none).
    pub fn put(&self, key: &str, value: &str, lease: i64) -> Result<(), EtcdError> {
        let _: Value =
            self.call("kv/put", &json!({ "key": b64(key), "value": b64(value), "lease": lease.to_string() }))?;
        Ok(())
    }

    /// Deletes `key`.
    pub fn delete(&self, key: &str) -> Result<(), EtcdError> {
        let _: Value = self.call("kv/deleterange", &json!({ "key": b64(key) }))?;
        Ok(())
    }

    /// One transaction: `ops` if every one of `compares` holds; whether they did.
    pub fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<bool, EtcdError> {
        let compare: Vec<Value> = compares.iter().map(Compare::json).collect();
        let success: Vec<Value> = ops.iter().map(Op::json).collect();
        let v: Value = self.call("kv/txn", &json!({ "compare": compare, "success": success }))?;
        Ok(v["succeeded"].as_bool().unwrap_or(false))
    }

    /// Creates `key` = `value` on `lease` if it does not exist (one transaction); whether it did.
    pub fn create(&self, key: &str, value: &str, lease: i64) -> Result<bool, EtcdError> {
        self.txn(&[Compare::Absent(key)], &[Op::Put(key, value, lease)])
    }

    /// Sets `key` = `value` on `lease` if it holds `expected` now (one transaction); whether it
    /// did.
    pub fn replace(&self, key: &str, expected: &str, value: &str, lease: i64) -> Result<bool, EtcdError> {
        self.txn(&[Compare::Value(key, expected)], &[Op::Put(key, value, lease)])
    }

    /// Deletes `key` if it holds `expected` (one transaction); whether it did.
    pub fn delete_if(&self, key: &str, expected: &str) -> Result<bool, EtcdError> {
        self.txn(&[Compare::Value(key, expected)], &[Op::Delete(key)])
    }
}

/// A condition of a transaction.
#[derive(Debug, Clone, Copy)]
pub enum Compare<'a> {
    /// The key does not exist.
    Absent(&'a str),
    /// The key holds this value.
    Value(&'a str, &'a str),
}

impl Compare<'_> {
    fn json(&self) -> Value {
        match *self {
            Compare::Absent(key) => {
                json!({ "key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" })
            }
            Compare::Value(key, value) => {
                json!({ "key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(value) })
            }
        }
    }
}

/// An operation of a transaction.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    /// Sets the key to the value on the lease (0: none).
    Put(&'a str, &'a str, i64),
    /// Deletes the key.
    Delete(&'a str),
}

impl Op<'_> {
    fn json(&self) -> Value {
        match *self {
            Op::Put(key, value, lease) => {
                json!({ "request_put": { "key": b64(key), "value": b64(value), "lease": lease.to_string() } })
            }
            Op::Delete(key) => json!({ "request_delete_range": { "key": b64(key) } }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_after_its_last_byte() {
        assert_eq!(prefix_end("/colo/vm/standby/"), "/colo/vm/standby0");
        assert_eq!(int(&json!("7587899330346575365")), 7587899330346575365);
        assert_eq!(int(&json!(5)), 5);
        assert_eq!(int(&Value::Null), 0);
    }

    #[test]
    fn nothing_listening_is_unreachable_and_says_where() {
        let e = Etcd::new(vec!["http://127.0.0.1:9".into()], Duration::from_millis(300));
        match e.get("k") {
            Err(EtcdError::Unreachable(why)) => assert!(why.contains("127.0.0.1:9"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
