//! A replica's side: it watches the leader key; when the key is gone and
//! this node may take over (see `decide::candidacy`), it campaigns, the most
//! up-to-date candidate first, with one compare-and-swap that creates the
//! leader key under its lease, advances the epoch and resets the in-sync
//! set to the new primary alone. The winner promotes itself and restarts.

use std::time::Instant;

use mirrorblk_etcd::{records, Compare, InSyncRecord, KeyValue, LeaderRecord, NodeRecord, Op};

use super::{decide, Coordinator};
use crate::control::{CoordRequest, Position};
use crate::events::{emit, EventKind};
use crate::journal::format::Role;
use crate::units::Epoch;

impl Coordinator {
    /// One round on a replica.
    pub(super) fn follow(&mut self, now: Instant) {
        match self.client.get(&self.keys.leader()) {
            Ok(Some(kv)) => self.saw_leader(&kv),
            Ok(None) => self.election(now),
            Err(e) => self.set_reachable(false, &e.to_string()),
        }
    }

    fn saw_leader(&mut self, kv: &KeyValue) {
        self.campaign_at = None;
        match records::decode::<LeaderRecord>(kv) {
            Ok(rec) if self.leader.as_ref() != Some(&rec) => {
                tracing::info!(volume = %self.w.volume, "primary is {} (NBD {}) in epoch {}", rec.node, rec.nbd, rec.epoch);
                emit(EventKind::LeaderSeen {
                    volume: self.w.volume.clone(),
                    leader: rec.node.clone(),
                    epoch: rec.epoch,
                });
                self.leader = Some(rec);
            }
            Ok(_) => {}
            // A leader key we cannot read still means someone holds it.
            Err(e) => tracing::error!("{e}"),
        }
    }

    /// No leader: campaign if this node may, when its turn comes.
    fn election(&mut self, now: Instant) {
        if self.leader.take().is_some() {
            tracing::warn!(volume = %self.w.volume, "the primary's leader key is gone");
        }
        let Some((lease, ttl)) = self.lease else {
            return;
        };
        let Ok(pos) = self.position() else { return };
        let in_sync = match self.read_in_sync() {
            Ok(s) => s,
            Err(why) => return self.refuse(why),
        };
        let record = in_sync.as_ref().map(|(r, _)| r);
        if let Err(why) = decide::candidacy(record, &self.w.node, pos.consistent) {
            return self.refuse(why.to_string());
        }
        self.refusal = None;
        let nodes = self.read_nodes();
        let rank = decide::rank(
            &self.w.node,
            (pos.epoch.0, pos.durable_next.0),
            &nodes,
            record,
        );
        let at = *self
            .campaign_at
            .get_or_insert(now + decide::campaign_delay(rank, ttl));
        if now >= at {
            self.campaign_at = None;
            self.campaign(lease, pos, in_sync.map(|(_, raw)| raw));
        }
    }

    fn refuse(&mut self, why: String) {
        if self.refusal.as_ref() != Some(&why) {
            tracing::warn!(volume = %self.w.volume, "not campaigning for primary: {why}");
            emit(EventKind::CampaignRefused {
                volume: self.w.volume.clone(),
                reason: why.clone(),
            });
            self.refusal = Some(why);
        }
    }

    /// The in-sync set and its raw value (compared in the campaign).
    fn read_in_sync(&mut self) -> Result<Option<(InSyncRecord, Vec<u8>)>, String> {
        match self.client.get(&self.keys.in_sync()) {
            Ok(None) => Ok(None),
            Ok(Some(kv)) => records::decode(&kv)
                .map(|r| Some((r, kv.value)))
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("cannot read the in-sync set: {e}")),
        }
    }

    /// The live nodes' positions (unreadable ones are skipped, and said).
    fn read_nodes(&mut self) -> Vec<NodeRecord> {
        match self.client.get_prefix(&self.keys.nodes()) {
            Ok(kvs) => kvs
                .iter()
                .filter_map(|kv| records::decode(kv).map_err(|e| tracing::error!("{e}")).ok())
                .collect(),
            Err(e) => {
                self.set_reachable(false, &e.to_string());
                Vec::new()
            }
        }
    }

    /// Tries to become the primary in one transaction.
    fn campaign(
        &mut self,
        lease: mirrorblk_etcd::LeaseId,
        pos: Position,
        in_sync_raw: Option<Vec<u8>>,
    ) {
        let counter = match self.client.get(&self.keys.epoch()) {
            Ok(kv) => kv,
            Err(e) => return self.set_reachable(false, &e.to_string()),
        };
        let seen = match counter.as_ref().map(records::decode_epoch).transpose() {
            Ok(s) => s,
            Err(e) => return self.refuse(e.to_string()),
        };
        let epoch = decide::next_epoch(seen, pos.epoch.0);
        let mut cond = vec![Compare::Absent(self.keys.leader())];
        cond.push(match &counter {
            Some(kv) => Compare::Value(self.keys.epoch(), kv.value.clone()),
            None => Compare::Absent(self.keys.epoch()),
        });
        cond.push(match in_sync_raw {
            Some(raw) => Compare::Value(self.keys.in_sync(), raw),
            None => Compare::Absent(self.keys.in_sync()),
        });
        let ops = self.winner_ops(lease, epoch);
        match self.client.txn(&cond, &ops, &[Op::Get(self.keys.leader())]) {
            Ok(t) if t.succeeded => self.won(epoch),
            Ok(t) => {
                let winner = t
                    .reads
                    .first()
                    .and_then(|r| r.first())
                    .and_then(|kv| records::decode::<LeaderRecord>(kv).ok());
                let winner = winner
                    .map(|w| w.node)
                    .unwrap_or_else(|| "(a concurrent change)".into());
                tracing::info!(volume = %self.w.volume, "campaign lost to {winner}");
                emit(EventKind::CampaignLost {
                    volume: self.w.volume.clone(),
                    winner,
                });
            }
            Err(e) => self.set_reachable(false, &e.to_string()),
        }
    }

    /// The winner's writes: the leader key, the epoch, a fresh in-sync set.
    fn winner_ops(&self, lease: mirrorblk_etcd::LeaseId, epoch: u64) -> Vec<Op> {
        let leader = LeaderRecord {
            node: self.w.node.clone(),
            nbd: self.w.nbd.clone(),
            epoch,
        };
        let in_sync = InSyncRecord {
            epoch,
            primary: self.w.node.clone(),
            replicas: Vec::new(),
        };
        vec![
            Op::Put {
                key: self.keys.leader(),
                value: records::encode(&leader),
                lease: Some(lease),
            },
            Op::Put {
                key: self.keys.epoch(),
                value: epoch.to_string().into_bytes(),
                lease: None,
            },
            Op::Put {
                key: self.keys.in_sync(),
                value: records::encode(&in_sync),
                lease: None,
            },
        ]
    }

    /// Won: persist the primary role in `epoch` and restart with the lease.
    fn won(&mut self, epoch: u64) {
        tracing::warn!(volume = %self.w.volume, "won the election: becoming primary in epoch {epoch}");
        emit(EventKind::CampaignWon {
            volume: self.w.volume.clone(),
            epoch,
        });
        match self.ask(CoordRequest::Promote(Epoch(epoch))) {
            Ok(_) => {
                if let Some((id, _)) = self.lease {
                    // Renewed once more: the restart must finish within the
                    // lease for the new process image to keep it.
                    if let Err(e) = self.client.keep_alive(id) {
                        tracing::warn!("renewing the lease before restarting failed: {e}");
                    }
                    crate::lifecycle::hand_over_lease(id.0);
                }
                crate::lifecycle::request_restart(Role::Primary);
                self.done = true;
            }
            Err(e) => {
                // Give the leadership back at once: another may promote.
                tracing::error!(volume = %self.w.volume, "cannot promote after winning: {e}; releasing the leader key");
                if let Some((id, _)) = self.lease.take() {
                    let _ = self.client.revoke(id);
                }
            }
        }
    }
}
