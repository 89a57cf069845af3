//! What mirrorblk keeps in etcd, per volume, under `/mirrorblk/<volume>/`:
//!
//! | key | value | lease |
//! |---|---|---|
//! | `leader` | [`LeaderRecord`]: the primary | the primary's |
//! | `epoch` | the latest epoch, decimal | none (advanced by compare-and-swap) |
//! | `in-sync` | [`InSyncRecord`]: who has every acknowledged write | none |
//! | `nodes/<node>` | [`NodeRecord`]: each node's durable position | that node's |
//!
//! Values are JSON. Anything else found there is reported as malformed
//! with its key, and never acted upon.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::client::KeyValue;

/// The keys of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeKeys {
    base: String,
}

impl VolumeKeys {
    /// The keys of `volume`.
    pub fn new(volume: &str) -> VolumeKeys {
        assert!(
            !volume.is_empty() && !volume.contains('/'),
            "volume names have no '/'"
        );
        VolumeKeys {
            base: format!("/mirrorblk/{volume}/"),
        }
    }

    /// The leader key: present while a primary holds the volume.
    pub fn leader(&self) -> String {
        format!("{}leader", self.base)
    }

    /// The epoch counter.
    pub fn epoch(&self) -> String {
        format!("{}epoch", self.base)
    }

    /// The in-sync set.
    pub fn in_sync(&self) -> String {
        format!("{}in-sync", self.base)
    }

    /// One node's state.
    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.base)
    }

    /// The prefix of every node's state.
    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.base)
    }
}

/// The volume's primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// Its node name.
    pub node: String,
    /// Where clients reach it (its `--advertise`, else its `--listen`, e.g.
    /// `127.0.0.1:10809`).
    pub nbd: String,
    /// Its epoch.
    pub epoch: u64,
}

/// The nodes that have every write the primary acknowledged: the primary
/// publishes it before it acknowledges a write without one of its replicas.
/// Only these may take over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InSyncRecord {
    /// The epoch of the primary that published it.
    pub epoch: u64,
    /// That primary.
    pub primary: String,
    /// Its replicas that have every acknowledged write.
    pub replicas: Vec<String>,
}

impl InSyncRecord {
    /// Whether `node` has every write acknowledged in this epoch.
    pub fn includes(&self, node: &str) -> bool {
        self.primary == node || self.replicas.iter().any(|r| r == node)
    }
}

/// A node's state, refreshed while it lives (attached to its lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Its name.
    pub node: String,
    /// Where it serves NBD clients when primary.
    pub nbd: String,
    /// Its epoch.
    pub epoch: u64,
    /// Its next LSN: it has every record below durably.
    pub next_lsn: u64,
    /// Whether its store is consistent (no resync unfinished).
    pub consistent: bool,
}

/// A value in etcd that is not what mirrorblk writes there.
#[derive(Debug, thiserror::Error)]
#[error("unexpected value at etcd key {key}: {why}; mirrorblk will not act on it (fix or delete the key with etcdctl)")]
pub struct MalformedRecord {
    /// The key.
    pub key: String,
    /// What is wrong.
    pub why: String,
}

/// Decodes a JSON record.
pub fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, MalformedRecord> {
    serde_json::from_slice(&kv.value).map_err(|e| MalformedRecord {
        key: kv.key.clone(),
        why: e.to_string(),
    })
}

/// Decodes the epoch counter (decimal text).
pub fn decode_epoch(kv: &KeyValue) -> Result<u64, MalformedRecord> {
    std::str::from_utf8(&kv.value)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| MalformedRecord {
            key: kv.key.clone(),
            why: "not a decimal epoch".to_string(),
        })
}

/// Encodes a record as the JSON stored.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &[u8]) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        }
    }

    #[test]
    fn keys_are_under_the_volume() {
        let k = VolumeKeys::new("vol0");
        assert_eq!(k.leader(), "/mirrorblk/vol0/leader");
        assert_eq!(k.node("n2"), "/mirrorblk/vol0/nodes/n2");
        assert!(k.node("n2").starts_with(&k.nodes()));
    }

    #[test]
    fn records_round_trip_and_garbage_names_its_key() {
        let r = InSyncRecord {
            epoch: 3,
            primary: "n1".into(),
            replicas: vec!["n2".into()],
        };
        assert_eq!(decode::<InSyncRecord>(&kv("/k", &encode(&r))).unwrap(), r);
        assert!(r.includes("n1") && r.includes("n2") && !r.includes("n3"));
        let e = decode::<LeaderRecord>(&kv("/mirrorblk/v/leader", b"{\"node\":1}")).unwrap_err();
        assert!(e.to_string().contains("/mirrorblk/v/leader"), "{e}");
        assert_eq!(decode_epoch(&kv("/e", b"17")).unwrap(), 17);
        assert!(decode_epoch(&kv("/e", b"-1")).is_err());
    }
}
