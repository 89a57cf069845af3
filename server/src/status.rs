//! What `mirrorblk status` shows of a volume, assembled from the engine's
//! and the replication role's state (neither of them knows the admin types).

use crate::engine::EngineStatus;
use crate::journal::Journal;
use crate::replication::resync::JobKind;
use crate::replication::{LinkState, Phase};
use crate::volume::Volume;
use mirrorblk_admin::{ReplicaStatus, VolumeStatus};

/// The status of one volume.
pub fn volume_status(vol: &Volume) -> VolumeStatus {
    let info = vol.info();
    let e: EngineStatus = vol.engine().status();
    let journal = vol.engine().journal();
    VolumeStatus {
        name: info.name.clone(),
        size: info.size,
        read_only: info.read_only,
        role: vol.role(),
        epoch: e.epoch.0,
        last_lsn: e.next_lsn.last(),
        durable_lsn: e.durable_next.last(),
        applied_lsn: e.applied_next.last(),
        journal_used: e.journal_used,
        journal_size: e.journal_size,
        journal_batches: e.journal_batches,
        checkpoints: e.stats.checkpoints,
        journal_error: e.journal_error,
        inconsistent: e.inconsistent,
        replicas: vol
            .primary()
            .iter()
            .flat_map(|p| p.links.iter())
            .map(|l| replica_status(l, journal))
            .collect(),
    }
}

/// A primary's view of one replica.
fn replica_status(l: &LinkState, journal: &Journal) -> ReplicaStatus {
    let phase = l.phase.borrow().clone();
    let durable = l.durable_next.get();
    let job = l.job.borrow();
    ReplicaStatus {
        peer: l.peer.name.clone(),
        state: l.replica_state(),
        reason: match phase {
            Phase::OutOfSync(r) => Some(r),
            _ => None,
        },
        durable_lsn: durable.last(),
        lag_lsn: journal.next_lsn().0.saturating_sub(durable.0),
        lag_bytes: journal.retained_bytes_from(durable),
        resync: job
            .as_ref()
            .and_then(|j| matches!(j.kind, JobKind::Resync { .. }).then(|| j.progress())),
        out_of_sync_bytes: l.oos.borrow().bytes(),
        verify: job
            .as_ref()
            .and_then(|j| match j.kind {
                JobKind::Verify { repair } => Some(j.verify_status(repair)),
                _ => None,
            })
            .or_else(|| l.last_verify.borrow().clone()),
        rtt_us: l.rtt_us.get(),
    }
}
