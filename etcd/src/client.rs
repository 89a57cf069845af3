//! The etcd v3 calls mirrorblk makes (leases, reads, writes, transactions),
//! through etcd's JSON gateway (`/v3/...`), which every etcd since 3.4
//! serves on its client port. Keys and values travel base64-encoded and
//! 64-bit integers as decimal strings, as the gateway's protobuf-JSON
//! mapping has it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::http::{post, Endpoint, HttpError};

/// An etcd lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// Why a call to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered.
    #[error("etcd unreachable: {0}")]
    Unreachable(HttpError),
    /// etcd answered with an error status.
    #[error("etcd at {endpoint} refused {call}: HTTP {status}: {message}")]
    Refused {
        /// The endpoint.
        endpoint: String,
        /// The call, e.g. `/v3/kv/txn`.
        call: &'static str,
        /// HTTP status.
        status: u16,
        /// etcd's message.
        message: String,
    },
    /// The answer does not have the shape etcd's API documents.
    #[error("etcd's answer to {call} is not what its API documents: {why}")]
    Unexpected {
        /// The call.
        call: &'static str,
        /// What is wrong.
        why: String,
    },
    /// No endpoints were given.
    #[error("no etcd endpoints given")]
    NoEndpoints,
    /// An endpoint is malformed.
    #[error(transparent)]
    Endpoint(HttpError),
}

/// A key and its value, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value bytes.
    pub value: Vec<u8>,
    /// The revision that created the key (a new key, a higher number).
    pub create_revision: i64,
    /// The revision of its last change.
    pub mod_revision: i64,
    /// The lease it is attached to (0: none).
    pub lease: i64,
}

/// One condition of a transaction.
#[derive(Debug, Clone)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists with exactly this value.
    Value(String, Vec<u8>),
    /// The key exists and is attached to this lease.
    Lease(String, LeaseId),
}

/// One operation of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Writes `key` (attached to `lease` if given).
    Put {
        /// The key.
        key: String,
        /// Its new value.
        value: Vec<u8>,
        /// Its lease.
        lease: Option<LeaseId>,
    },
    /// Reads `key`.
    Get(String),
}

/// A transaction's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether every condition held (the success branch ran).
    pub succeeded: bool,
    /// The keys read by the branch that ran, one list per `Op::Get`.
    pub reads: Vec<Vec<KeyValue>>,
}

/// A blocking etcd client over one or more endpoints of one cluster.
pub struct Client {
    endpoints: Vec<Endpoint>,
    /// The endpoint that answered last (tried first).
    current: AtomicUsize,
    timeout: Duration,
}

impl Client {
    /// A client of the cluster at `endpoints` (`http://HOST:PORT` each);
    /// `timeout` bounds each call on each endpoint.
    pub fn new<S: AsRef<str>>(endpoints: &[S], timeout: Duration) -> Result<Client, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let endpoints = endpoints
            .iter()
            .map(|e| e.as_ref().parse())
            .collect::<Result<Vec<Endpoint>, _>>()
            .map_err(EtcdError::Endpoint)?;
        Ok(Client {
            endpoints,
            current: AtomicUsize::new(0),
            timeout,
        })
    }

    /// The endpoints, as given.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| e.to_string()).collect()
    }

    /// Calls `path` with `body` on the last endpoint that answered, then the
    /// others in turn; the first answer wins.
    fn call(&self, call: &'static str, body: Value) -> Result<Value, EtcdError> {
        let body = body.to_string();
        let n = self.endpoints.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for i in 0..n {
            let ep = &self.endpoints[(start + i) % n];
            match post(ep, call, body.as_bytes(), self.timeout) {
                Ok((status, answer)) => {
                    self.current.store((start + i) % n, Ordering::Relaxed);
                    return decode_answer(ep, call, status, &answer);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(EtcdError::Unreachable(last.expect("at least one endpoint")))
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1).
    pub fn grant(&self, ttl: Duration) -> Result<(LeaseId, Duration), EtcdError> {
        const CALL: &str = "/v3/lease/grant";
        let secs = ttl.as_secs().max(1);
        let v = self.call(CALL, json!({ "TTL": secs.to_string() }))?;
        let id = int(&v["ID"])
            .filter(|&i| i != 0)
            .ok_or_else(|| unexpected(CALL, "no lease ID"))?;
        let granted = int(&v["TTL"]).unwrap_or(0);
        Ok((LeaseId(id), Duration::from_secs(granted.max(0) as u64)))
    }

    /// Renews `lease`; its remaining TTL, or None if it expired (or never
    /// existed): whatever was attached to it is gone.
    pub fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>, EtcdError> {
        const CALL: &str = "/v3/lease/keepalive";
        let v = self.call(CALL, json!({ "ID": lease.0.to_string() }))?;
        // A stream of answers; the gateway returns the first under "result".
        let ttl = int(&v["result"]["TTL"]).unwrap_or(0);
        Ok((ttl > 0).then(|| Duration::from_secs(ttl as u64)))
    }

    /// Revokes `lease` (its keys are deleted at once).
    pub fn revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", json!({ "ID": lease.0.to_string() }))
            .map(|_| ())
    }

    /// The value of `key`, if it exists.
    pub fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        const CALL: &str = "/v3/kv/range";
        let v = self.call(CALL, json!({ "key": B64.encode(key) }))?;
        Ok(kvs(CALL, &v)?.into_iter().next())
    }

    /// Every key that starts with `prefix`, in key order.
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, EtcdError> {
        const CALL: &str = "/v3/kv/range";
        let end = prefix_end(prefix.as_bytes());
        let v = self.call(
            CALL,
            json!({ "key": B64.encode(prefix), "range_end": B64.encode(end) }),
        )?;
        kvs(CALL, &v)
    }

    /// Writes `key` (attached to `lease` if given).
    pub fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<(), EtcdError> {
        self.call("/v3/kv/put", put_body(key, value, lease))
            .map(|_| ())
    }

    /// Runs `success` if every condition in `compare` holds, else `failure`,
    /// atomically.
    pub fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnOutcome, EtcdError> {
        const CALL: &str = "/v3/kv/txn";
        let body = json!({
            "compare": compare.iter().map(compare_json).collect::<Vec<_>>(),
            "success": success.iter().map(op_json).collect::<Vec<_>>(),
            "failure": failure.iter().map(op_json).collect::<Vec<_>>(),
        });
        let v = self.call(CALL, body)?;
        let succeeded = v["succeeded"].as_bool().unwrap_or(false);
        let mut reads = Vec::new();
        for r in v["responses"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            if let Some(range) = r.get("response_range") {
                reads.push(kvs(CALL, range)?);
            }
        }
        Ok(TxnOutcome { succeeded, reads })
    }
}

fn decode_answer(
    ep: &Endpoint,
    call: &'static str,
    status: u16,
    answer: &[u8],
) -> Result<Value, EtcdError> {
    let v: Value = serde_json::from_slice(answer).map_err(|e| EtcdError::Unexpected {
        call,
        why: format!("not JSON ({e})"),
    })?;
    if status != 200 {
        let message = v["error"]
            .as_str()
            .or(v["message"].as_str())
            .unwrap_or("(no message)")
            .to_string();
        return Err(EtcdError::Refused {
            endpoint: ep.to_string(),
            call,
            status,
            message,
        });
    }
    Ok(v)
}

fn unexpected(call: &'static str, why: &str) -> EtcdError {
    EtcdError::Unexpected {
        call,
        why: why.to_string(),
    }
}

/// A protobuf-JSON int64: a decimal string (or a number); missing is None.
fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn kvs(call: &'static str, v: &Value) -> Result<Vec<KeyValue>, EtcdError> {
    let Some(list) = v.get("kvs") else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| unexpected(call, "kvs is not a list"))?;
    list.iter().map(|kv| key_value(call, kv)).collect()
}

fn key_value(call: &'static str, kv: &Value) -> Result<KeyValue, EtcdError> {
    let b64 = |field: &str| -> Result<Vec<u8>, EtcdError> {
        match kv[field].as_str() {
            None => Ok(Vec::new()),
            Some(s) => B64
                .decode(s)
                .map_err(|e| unexpected(call, &format!("{field} is not base64 ({e})"))),
        }
    };
    let key = String::from_utf8(b64("key")?).map_err(|_| unexpected(call, "a key is not UTF-8"))?;
    Ok(KeyValue {
        key,
        value: b64("value")?,
        create_revision: int(&kv["create_revision"]).unwrap_or(0),
        mod_revision: int(&kv["mod_revision"]).unwrap_or(0),
        lease: int(&kv["lease"]).unwrap_or(0),
    })
}

/// The end of the range of keys that start with `prefix` (etcd's rule: the
/// prefix with its last byte below 0xff incremented).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn put_body(key: &str, value: &[u8], lease: Option<LeaseId>) -> Value {
    let mut p = json!({ "key": B64.encode(key), "value": B64.encode(value) });
    if let Some(l) = lease {
        p["lease"] = json!(l.0.to_string());
    }
    p
}

fn compare_json(c: &Compare) -> Value {
    match c {
        Compare::Absent(k) => json!({
            "key": B64.encode(k), "target": "CREATE", "result": "EQUAL", "create_revision": "0"
        }),
        Compare::Value(k, v) => json!({
            "key": B64.encode(k), "target": "VALUE", "result": "EQUAL", "value": B64.encode(v)
        }),
        Compare::Lease(k, l) => json!({
            "key": B64.encode(k), "target": "LEASE", "result": "EQUAL", "lease": l.0.to_string()
        }),
    }
}

fn op_json(o: &Op) -> Value {
    match o {
        Op::Put { key, value, lease } => json!({ "request_put": put_body(key, value, *lease) }),
        Op::Get(k) => json!({ "request_range": { "key": B64.encode(k) } }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_follow_etcds_rule() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn int64_fields_are_strings_or_numbers() {
        assert_eq!(int(&json!("42")), Some(42));
        assert_eq!(int(&json!(7)), Some(7));
        assert_eq!(int(&json!(null)), None);
        assert_eq!(int(&json!("x")), None);
    }

    #[test]
    fn key_values_decode_and_bad_base64_is_an_error() {
        let v = json!({"kvs": [{"key": B64.encode("/k"), "value": B64.encode("v"), "create_revision": "3", "lease": "9"}]});
        let got = kvs("/v3/kv/range", &v).unwrap();
        assert_eq!(got[0].key, "/k");
        assert_eq!(got[0].value, b"v");
        assert_eq!(
            (got[0].create_revision, got[0].mod_revision, got[0].lease),
            (3, 0, 9)
        );
        assert!(kvs("/v3/kv/range", &json!({"kvs": [{"key": "!!"}]})).is_err());
        assert!(kvs("/v3/kv/range", &json!({})).unwrap().is_empty());
    }
}
