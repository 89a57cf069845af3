//! The role a coordinated node starts with. A node starts as a replica
//! unless it is the restart of an election winner: the winner hands its
//! lease to its restarted self (see `lifecycle::hand_over_lease`), and the
//! new process is primary only if etcd's leader key still holds that lease
//! and names this node. Anything else — a crash, a kill -9, etcd
//! unreachable — starts a replica, which campaigns if it may.

use std::time::{Duration, Instant};

use mirrorblk_etcd::{records, Client, LeaderRecord, LeaseId, VolumeKeys};

use super::{call_timeout, decide};
use crate::config::CoordinatorConfig;
use crate::journal::format::Role;
use crate::lease_fence::LeaseFence;
use crate::lifecycle::LEASE_ENV;

/// How a coordinated node starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Startup {
    /// Its role.
    pub role: Role,
    /// Its lease, when it starts as primary.
    pub lease: Option<(LeaseId, Duration)>,
    /// Its epoch as primary (0 otherwise).
    pub epoch: u64,
}

impl Startup {
    const REPLICA: Startup = Startup {
        role: Role::Replica,
        lease: None,
        epoch: 0,
    };
}

/// Decides the starting role of `node` for `volume`; on a primary, opens
/// `fence` for the lease just renewed.
pub fn starting_role(
    cfg: &CoordinatorConfig,
    node: &str,
    volume: &str,
    fence: &LeaseFence,
) -> Startup {
    let handed = std::env::var(LEASE_ENV)
        .ok()
        .and_then(|s| i64::from_str_radix(&s, 16).ok());
    let Some(id) = handed.map(LeaseId) else {
        return Startup::REPLICA;
    };
    let client = match Client::new(&cfg.endpoints, call_timeout(cfg.lease_ttl)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return Startup::REPLICA;
        }
    };
    let sent = Instant::now();
    match still_ours(&client, id, node, volume) {
        Ok((ttl, epoch)) => {
            fence.extend_until(decide::fence_deadline(sent, ttl));
            tracing::info!(
                volume,
                "etcd lease {id} handed over: starting as primary in epoch {epoch}"
            );
            crate::events::emit(crate::events::EventKind::LeaseGranted {
                volume: volume.to_string(),
                lease: id.to_string(),
                ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            });
            Startup {
                role: Role::Primary,
                lease: Some((id, ttl)),
                epoch,
            }
        }
        Err(why) => {
            tracing::warn!(volume, "not starting as primary: {why}");
            let _ = client.revoke(id);
            Startup::REPLICA
        }
    }
}

/// Renews lease `id` and checks that the leader key holds it and names
/// `node`: the TTL and the leader's epoch, or why not.
fn still_ours(
    client: &Client,
    id: LeaseId,
    node: &str,
    volume: &str,
) -> Result<(Duration, u64), String> {
    let ttl = client
        .keep_alive(id)
        .map_err(|e| e.to_string())?
        .ok_or("the handed-over lease expired during the restart")?;
    let kv = client
        .get(&VolumeKeys::new(volume).leader())
        .map_err(|e| e.to_string())?
        .ok_or("no leader key")?;
    let rec: LeaderRecord = records::decode(&kv).map_err(|e| e.to_string())?;
    if kv.lease != id.0 || rec.node != node {
        return Err(format!(
            "the leader key names {} under another lease",
            rec.node
        ));
    }
    Ok((ttl, rec.epoch))
}
