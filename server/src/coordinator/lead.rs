//! The primary's side: it keeps checking that the leader key is still its
//! own, and publishes the in-sync set whenever the replicas that have every
//! acknowledged write change — before a write is acknowledged without one.

use mirrorblk_etcd::{records, Compare, InSyncRecord, LeaderRecord, Op};

use super::Coordinator;
use crate::control::{CoordAnswer, CoordRequest};
use crate::events::{emit, EventKind};

impl Coordinator {
    /// One round on the primary.
    pub(super) fn lead(&mut self) {
        if !self.still_leader() {
            return;
        }
        let proposal = match self.ask(CoordRequest::ProposeInSync) {
            Ok(CoordAnswer::Proposal(p)) => p,
            Ok(other) => {
                tracing::error!("unexpected answer to ProposeInSync: {other:?}");
                return;
            }
            Err(e) => {
                tracing::warn!(volume = %self.w.volume, "cannot ask for the in-sync set: {e}");
                return;
            }
        };
        if self.published.as_ref() != Some(&proposal) {
            self.publish_in_sync(proposal);
        }
    }

    /// Whether the leader key still holds this node's lease; steps down
    /// when etcd says otherwise (not when etcd is unreachable: then the
    /// fence holds replies until it answers).
    fn still_leader(&mut self) -> bool {
        let Some((lease, _)) = self.lease else {
            return false;
        };
        match self.client.get(&self.keys.leader()) {
            Ok(Some(kv)) if kv.lease == lease.0 => {
                if let Ok(rec) = records::decode::<LeaderRecord>(&kv) {
                    self.leader = Some(rec);
                }
                true
            }
            Ok(Some(kv)) => {
                let who = records::decode::<LeaderRecord>(&kv)
                    .map(|r| format!("{} leads in epoch {}", r.node, r.epoch))
                    .unwrap_or_else(|e| e.to_string());
                self.step_down(&format!("the leader key is no longer its own ({who})"));
                false
            }
            Ok(None) => {
                self.step_down("its leader key is gone");
                false
            }
            Err(e) => {
                self.set_reachable(false, &e.to_string());
                false
            }
        }
    }

    /// Writes `replicas` as the in-sync set, if the leader key is still this
    /// node's, and then lets the core stop waiting for the others.
    fn publish_in_sync(&mut self, replicas: Vec<String>) {
        let Some((lease, _)) = self.lease else { return };
        let rec = InSyncRecord {
            epoch: self.epoch,
            primary: self.w.node.clone(),
            replicas: replicas.clone(),
        };
        let put = Op::Put {
            key: self.keys.in_sync(),
            value: records::encode(&rec),
            lease: None,
        };
        let cond = [Compare::Lease(self.keys.leader(), lease)];
        match self.client.txn(&cond, &[put], &[]) {
            Ok(t) if t.succeeded => {
                tracing::info!(volume = %self.w.volume, epoch = self.epoch, "in-sync set published: [{}]", replicas.join(", "));
                if let Err(e) = self.ask(CoordRequest::Published(replicas.clone())) {
                    tracing::error!(volume = %self.w.volume, "cannot apply the published in-sync set: {e}");
                    return;
                }
                emit(EventKind::InSyncPublished {
                    volume: self.w.volume.clone(),
                    epoch: self.epoch,
                    replicas: replicas.clone(),
                });
                self.published = Some(replicas);
            }
            Ok(_) => self.step_down("its leader key changed while publishing the in-sync set"),
            Err(e) => self.set_reachable(false, &e.to_string()),
        }
    }
}
