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
/// `fence` for the lease just renewed. `live` is the lease a live restart
/// handed over (else the role-change restart's, from the environment).
pub fn starting_role(
    cfg: &CoordinatorConfig,
    node: &str,
    volume: &str,
    fence: &LeaseFence,
    live: Option<LeaseId>,
) -> Startup {
    let from_env = std::env::var(LEASE_ENV)
        .ok()
        .and_then(|s| i64::from_str_radix(&s, 16).ok())
        .map(LeaseId);
    let Some(id) = live.or(from_env) else {
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
        // A live restart of a replica: its lease carries its position
        // record, and keeping it leaves no gap an election could see.
        Err(NotLeader::Elsewhere { ttl, why }) if live.is_some() => {
            tracing::info!(volume, "etcd lease {id} handed over: a replica ({why})");
            Startup {
                role: Role::Replica,
                lease: Some((id, ttl)),
                epoch: 0,
            }
        }
        Err(NotLeader::Elsewhere { why, .. } | NotLeader::Lost(why)) => {
            tracing::warn!(volume, "not starting as primary: {why}");
            let _ = client.revoke(id);
            Startup::REPLICA
        }
    }
}

/// Why a handed-over lease does not make this node the primary.
#[derive(Debug)]
enum NotLeader {
    /// The lease is alive, and the leader key is absent or under another
    /// lease: the lease may go on as a replica's.
    Elsewhere { ttl: Duration, why: String },
    /// Expired, etcd unreachable, or a leader key under this lease that
    /// names another node or cannot be read: the lease must go.
    Lost(String),
}

/// Renews lease `id` and checks that the leader key holds it and names
/// `node`: the TTL and the leader's epoch, or why not.
fn still_ours(
    client: &Client,
    id: LeaseId,
    node: &str,
    volume: &str,
) -> Result<(Duration, u64), NotLeader> {
    let lost = |e: String| NotLeader::Lost(e);
    let ttl = client
        .keep_alive(id)
        .map_err(|e| lost(e.to_string()))?
        .ok_or_else(|| lost("the handed-over lease expired during the restart".into()))?;
    let kv = client
        .get(&VolumeKeys::new(volume).leader())
        .map_err(|e| lost(e.to_string()))?
        .ok_or_else(|| NotLeader::Elsewhere {
            ttl,
            why: "no leader key".into(),
        })?;
    if kv.lease != id.0 {
        return Err(NotLeader::Elsewhere {
            ttl,
            why: "the leader key is under another lease".into(),
        });
    }
    let rec: LeaderRecord = records::decode(&kv).map_err(|e| lost(e.to_string()))?;
    if rec.node != node {
        return Err(lost(format!(
            "the leader key under this lease names {}",
            rec.node
        )));
    }
    Ok((ttl, rec.epoch))
}
