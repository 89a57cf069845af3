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
        size: info.size.get(),
        read_only: info.read_only,
        role: vol.role(),
        epoch: e.epoch.0,
        last_lsn: e.next_lsn.last(),
        durable_lsn: e.durable_next.last(),
        durability: e.durability,
        written_lsn: e.written_next.last(),
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

/// What changed in `vol` after LSN `since` (changed-block tracking).
pub fn changes(vol: &Volume, since: u64) -> mirrorblk_admin::Changes {
    let info = vol.info();
    let report = vol.engine().changed_since(since);
    let c = report.changed;
    let ranges: Vec<mirrorblk_admin::ByteRange> = c
        .ranges
        .iter()
        .map(|&(offset, length)| mirrorblk_admin::ByteRange { offset, length })
        .collect();
    mirrorblk_admin::Changes {
        volume: info.name.clone(),
        uuid: uuid_text(&report.uuid),
        since,
        lsn: report.lsn,
        complete: c.complete,
        known_since: c.floor,
        region_size: crate::engine::changes::REGION,
        size: info.size.get(),
        bytes: ranges.iter().map(|r| r.length).sum(),
        ranges,
    }
}

/// How `snapshot list` shows snapshot `info` of `vol`.
pub fn snapshot(vol: &Volume, info: &crate::engine::SnapshotInfo) -> mirrorblk_admin::Snapshot {
    let volume = vol.info().name.clone();
    mirrorblk_admin::Snapshot {
        export: format!("{volume}@{}", info.name),
        volume,
        name: info.name.clone(),
        uuid: uuid_text(&vol.engine().volume_uuid()),
        lsn: info.lsn,
        size: info.size,
        space: info.space,
        used: info.used,
        broken: info.broken.clone(),
        created_ms: info.created_ms,
    }
}

/// A UUID in its usual 8-4-4-4-12 hex form.
pub fn uuid_text(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
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
