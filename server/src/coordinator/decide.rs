//! The coordinator's decisions, as pure functions of plain values: when the
//! primary must stop acknowledging, who may campaign, in which order, and
//! with which epoch. The effects (etcd calls, core requests) live in
//! `lead.rs` and `follow.rs`.

use std::time::{Duration, Instant};

use mirrorblk_etcd::{InSyncRecord, NodeRecord};

/// The part of a lease kept in reserve: the primary stops acknowledging
/// this long before the lease could expire in etcd, for clock-rate
/// differences and the time its last keep-alive spent in flight.
pub fn margin(ttl: Duration) -> Duration {
    ttl / 4
}

/// How often the lease is renewed: four renewals fit in the part of the
/// lease the primary uses, so three in a row may fail before it holds
/// writes.
pub fn keepalive_interval(ttl: Duration) -> Duration {
    (ttl - margin(ttl)) / 4
}

/// Until when the primary may acknowledge after a keep-alive *sent* at
/// `sent` renewed a lease of `ttl`: etcd restarts the lease's clock when it
/// receives the keep-alive, which is after `sent`, so the lease cannot have
/// expired before `sent + ttl`; the margin is kept in reserve.
pub fn fence_deadline(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl - margin(ttl)
}

/// How often the coordinator looks at etcd: a tenth of the lease, so a
/// replica sees the leader key vanish at most that late.
pub fn tick(ttl: Duration) -> Duration {
    ttl / 10
}

/// Why a node may not take over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotCandidate {
    /// Its store is Inconsistent.
    Inconsistent,
    /// The primary did not name it in sync: it may lack acknowledged writes.
    NotInSync {
        /// The primary that published the set.
        primary: String,
        /// Its epoch.
        epoch: u64,
        /// The replicas named.
        replicas: Vec<String>,
    },
}

impl std::fmt::Display for NotCandidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotCandidate::Inconsistent => write!(
                f,
                "its store is Inconsistent (a resync did not finish): it may lack acknowledged writes"
            ),
            NotCandidate::NotInSync {
                primary,
                epoch,
                replicas,
            } => write!(
                f,
                "not in the in-sync set that {primary} published in epoch {epoch} ({}): it may lack acknowledged writes",
                if replicas.is_empty() {
                    "no replica".to_string()
                } else {
                    replicas.join(", ")
                }
            ),
        }
    }
}

/// Whether `me` may campaign: its store is consistent, and it is named in
/// the in-sync set (as a replica, or as the primary that published it). With
/// no set yet (a new cluster), every consistent node may.
pub fn candidacy(
    in_sync: Option<&InSyncRecord>,
    me: &str,
    consistent: bool,
) -> Result<(), NotCandidate> {
    if !consistent {
        return Err(NotCandidate::Inconsistent);
    }
    match in_sync {
        Some(s) if !s.includes(me) => Err(NotCandidate::NotInSync {
            primary: s.primary.clone(),
            epoch: s.epoch,
            replicas: s.replicas.clone(),
        }),
        _ => Ok(()),
    }
}

/// How many live candidates are ahead of `me`, whose position is
/// (`epoch`, `durable_next`): a candidate is ahead with a higher epoch, or
/// the same and more records, or the same and a smaller name. The most
/// up-to-date candidate goes first (it loses nothing it received).
pub fn rank(
    me: &str,
    mine: (u64, u64),
    nodes: &[NodeRecord],
    in_sync: Option<&InSyncRecord>,
) -> usize {
    let key = |epoch: u64, lsn: u64, name: &str| (epoch, lsn, std::cmp::Reverse(name.to_string()));
    let my_key = key(mine.0, mine.1, me);
    nodes
        .iter()
        .filter(|n| n.node != me && n.consistent)
        .filter(|n| in_sync.is_none_or(|s| s.includes(&n.node)))
        .filter(|n| key(n.epoch, n.next_lsn, &n.node) > my_key)
        .count()
}

/// How long a candidate of `rank` waits before it campaigns: the first at
/// once, each next one half a lease later, in case those ahead are stuck.
pub fn campaign_delay(rank: usize, ttl: Duration) -> Duration {
    ttl / 2 * u32::try_from(rank).unwrap_or(u32::MAX / 2).min(16)
}

/// The epoch a winner takes: above the coordinator's counter and above its
/// own, so no two primaries ever share one.
pub fn next_epoch(counter: Option<u64>, local: u64) -> u64 {
    counter.unwrap_or(0).max(local) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, epoch: u64, lsn: u64, consistent: bool) -> NodeRecord {
        NodeRecord {
            node: name.into(),
            nbd: String::new(),
            epoch,
            next_lsn: lsn,
            consistent,
        }
    }

    fn set(primary: &str, replicas: &[&str]) -> InSyncRecord {
        InSyncRecord {
            epoch: 4,
            primary: primary.into(),
            replicas: replicas.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn the_fence_closes_a_margin_before_the_lease_can_expire() {
        let t = Instant::now();
        let ttl = Duration::from_secs(2);
        assert_eq!(fence_deadline(t, ttl), t + Duration::from_millis(1500));
        assert!(fence_deadline(t, ttl) < t + ttl, "no margin");
        assert!(keepalive_interval(ttl) * 3 < ttl - margin(ttl));
    }

    #[test]
    fn only_consistent_nodes_of_the_in_sync_set_campaign() {
        // (in-sync set, me, consistent, may campaign)
        let s = set("n1", &["n2"]);
        let table = [
            (Some(&s), "n2", true, true),
            (Some(&s), "n1", true, true),
            (Some(&s), "n3", true, false),
            (Some(&s), "n2", false, false),
            (None, "n3", true, true),
            (None, "n3", false, false),
        ];
        for (in_sync, me, consistent, want) in table {
            assert_eq!(
                candidacy(in_sync, me, consistent).is_ok(),
                want,
                "{in_sync:?} {me} {consistent}"
            );
        }
        let why = candidacy(Some(&s), "n3", true).unwrap_err().to_string();
        assert!(
            why.contains("n1") && why.contains("epoch 4") && why.contains("n2"),
            "{why}"
        );
    }

    #[test]
    fn the_most_up_to_date_candidate_ranks_first() {
        let s = set("n1", &["n2", "n3"]);
        let nodes = [
            node("n2", 4, 100, true),
            node("n3", 4, 90, true),
            node("n4", 4, 500, true),  // not in the set
            node("n5", 4, 900, false), // inconsistent
        ];
        assert_eq!(rank("n2", (4, 100), &nodes, Some(&s)), 0);
        assert_eq!(rank("n3", (4, 90), &nodes, Some(&s)), 1);
        // Equal positions: the smaller name first.
        assert_eq!(rank("n3", (4, 100), &nodes, Some(&s)), 1);
        assert_eq!(rank("n1", (4, 100), &nodes, Some(&s)), 0);
        // A new cluster: every consistent node counts.
        assert_eq!(rank("n2", (4, 100), &nodes, None), 1);
        assert_eq!(campaign_delay(0, Duration::from_secs(2)), Duration::ZERO);
        assert_eq!(
            campaign_delay(2, Duration::from_secs(2)),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn epochs_only_grow() {
        assert_eq!(next_epoch(None, 0), 1);
        assert_eq!(next_epoch(Some(7), 3), 8);
        assert_eq!(next_epoch(Some(2), 5), 6);
    }
}
