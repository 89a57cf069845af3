//! A served volume: its storage [`Engine`] and, on a replicating primary,
//! its replication role ([`Primary`]). This is where the two meet, and all
//! it adds is the acknowledgement rule: a mutation is durable locally (the
//! engine), then waits for the replicas as the mode says (replication).
//!
//! Role changes (promote, demote, adopting a newer epoch) persist through
//! the engine; the control plane decides when, and restarts the node.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use nbd::ErrorCode;

use crate::buffer::{BufPool, Payload};
use crate::engine::write::Change;
use crate::engine::{Engine, EngineError, ReadData, ReplicationHooks, ResizeError, VolumeInfo};
use crate::journal::format::Role;
use crate::lease_fence::LeaseFence;
use crate::replication::{Primary, ReplicaWait, Request};
use crate::store::Allocation;
use crate::telemetry::VolumeMetrics;
use crate::units::{Epoch, Lsn};

/// Why a role change or an operator request was refused.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The volume already has the role asked for.
    #[error("volume '{volume}' is already {role} on this node")]
    AlreadyRole {
        /// Volume name.
        volume: String,
        /// Its role.
        role: &'static str,
    },
    /// Promoting an Inconsistent replica without `--force`.
    #[error("volume '{0}' is Inconsistent (a resync did not finish): promoting it would serve stale data; promote a consistent replica, or pass --force if this is the only copy left")]
    Inconsistent(String),
    /// Verify asked of a node that is not a replicating primary.
    #[error("volume '{0}' is not a replicated primary on this node: run verify on the primary")]
    NotReplicatedPrimary(String),
    /// Verify asked while some replica is not ready.
    #[error("cannot verify volume '{volume}' now: {why}; wait until every replica is in sync (mirrorblk status) and try again")]
    VerifyNotReady {
        /// Volume name.
        volume: String,
        /// Which replicas are not ready.
        why: String,
    },
    /// The coordinator's epoch is not newer than this node's.
    #[error("volume '{volume}': the coordinator's epoch {offered} is not newer than this node's epoch {current}; refusing to promote")]
    StaleEpoch {
        /// Volume name.
        volume: String,
        /// The epoch offered.
        offered: Epoch,
        /// This node's.
        current: Epoch,
    },
    /// A resize asked of a node that is not the volume's primary.
    #[error("volume '{0}' is not primary on this node: resize it on its primary (the replicas follow in the replication stream)")]
    NotPrimary(String),
    /// A resize asked while a resync or verify pass runs.
    #[error("cannot resize volume '{volume}' now: {why}; wait until it ends (mirrorblk status) and try again")]
    ResizeNotReady {
        /// Volume name.
        volume: String,
        /// Which passes run.
        why: String,
    },
    /// The resize was refused or failed.
    #[error("{0}")]
    Resize(#[from] ResizeError),
    /// The engine failed.
    #[error("{0}")]
    Engine(#[from] EngineError),
}

/// A volume bound to its core.
pub struct Volume {
    engine: Rc<Engine>,
    /// This node's role for the volume.
    role: Role,
    /// Replication state when this node is a replicating primary.
    primary: Option<Rc<Primary>>,
    /// Whether a primary is connected (a replica takes one at a time).
    replica_session: Cell<bool>,
    /// Replies wait here while the coordinator's lease may have lapsed.
    fence: Arc<LeaseFence>,
}

impl Volume {
    /// Assembles a volume: the engine, the replication role that hooks
    /// into it on a primary with peers, and the node's lease fence.
    pub fn new(
        engine: Rc<Engine>,
        role: Role,
        primary: Option<Rc<Primary>>,
        fence: Arc<LeaseFence>,
    ) -> Volume {
        if let Some(p) = &primary {
            assert_eq!(role, Role::Primary, "only a primary replicates");
            engine.set_hooks(p.clone() as Rc<dyn ReplicationHooks>);
        }
        if role == Role::Replica {
            // A replica's store also changes by resync, with no record
            // counted: other cores never read it on their own.
            engine.close_read_gate();
        }
        Volume {
            engine,
            role,
            primary,
            replica_session: Cell::new(false),
            fence,
        }
    }

    /// The storage engine.
    pub fn engine(&self) -> &Rc<Engine> {
        &self.engine
    }

    /// Replication state, on a replicating primary.
    pub fn primary(&self) -> Option<&Rc<Primary>> {
        self.primary.as_ref()
    }

    /// This node's role for the volume.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Metric handles.
    pub fn metrics(&self) -> &VolumeMetrics {
        self.engine.metrics()
    }

    /// Static description.
    pub fn info(&self) -> &VolumeInfo {
        self.engine.info()
    }

    /// The core's buffer pool.
    pub fn pool(&self) -> &Rc<BufPool> {
        self.engine.pool()
    }

    /// The node's lease fence, which holds replies while the lease may
    /// have lapsed.
    pub fn fence(&self) -> &Arc<LeaseFence> {
        &self.fence
    }

    /// Takes the volume's single replica-session slot (false if taken).
    pub fn claim_replica_session(&self) -> bool {
        !self.replica_session.replace(true)
    }

    /// Frees the replica-session slot.
    pub fn release_replica_session(&self) {
        self.replica_session.set(false);
    }

    /// Journals `m` (durably with `fua`), then waits for the replicas as
    /// the modes say (see [`crate::replication::replica_wait`]), and for a
    /// valid lease.
    async fn mutate(&self, m: Change, fua: bool) -> Result<(), ErrorCode> {
        let Some(lsn) = self.engine.mutate(m).await? else {
            return Ok(());
        };
        let request = if fua { Request::Fua } else { Request::Write };
        let wait = self.replica_wait(request);
        // Asked before the local sync, so the replicas sync alongside it.
        self.ask_barrier(wait, lsn);
        if fua {
            self.engine.make_durable(lsn).await?;
        }
        self.wait_replicas(lsn, wait).await;
        self.fence.wait_valid().await;
        if let Some(p) = &self.primary {
            p.note_acked(lsn);
        }
        Ok(())
    }

    /// What `request` waits for on the replicas (nothing without them).
    fn replica_wait(&self, request: Request) -> ReplicaWait {
        self.primary
            .as_ref()
            .map_or(ReplicaWait::Nothing, |p| p.wait_for(request))
    }

    /// Sends the replicas a barrier for `lsn` when `wait` needs one.
    fn ask_barrier(&self, wait: ReplicaWait, lsn: Lsn) {
        if let (Some(p), ReplicaWait::Durable { barrier: true }) = (&self.primary, wait) {
            p.request_barrier(lsn);
        }
    }

    /// Waits until the replicas hold `lsn` as `wait` says.
    async fn wait_replicas(&self, lsn: Lsn, wait: ReplicaWait) {
        let Some(p) = &self.primary else { return };
        let t = std::time::Instant::now();
        match wait {
            ReplicaWait::Nothing => return,
            ReplicaWait::Lag => p.wait_lag().await,
            ReplicaWait::Received => p.wait_acked(lsn, false).await,
            ReplicaWait::Durable { .. } => p.wait_acked(lsn, true).await,
        }
        self.metrics()
            .replica_wait
            .record(t.elapsed().as_secs_f64());
    }

    /// Writes a payload at `offset`; returns once it is acknowledged.
    pub async fn write(&self, offset: u64, payload: Payload, fua: bool) -> Result<(), ErrorCode> {
        self.mutate(Change::write(offset, payload), fua).await
    }

    /// Discards `[offset, offset+len)`; returns once acknowledged.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ErrorCode> {
        self.mutate(Change::trim(offset, len), fua).await
    }

    /// Zeroes `[offset, offset+len)`; returns once acknowledged.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), ErrorCode> {
        self.mutate(Change::write_zeroes(offset, len, no_hole), fua)
            .await
    }

    /// Completes once every write acknowledged before it is durable where
    /// the modes require: locally always (already so per write; a group
    /// flush with `--durability flush`), and on the replicas in
    /// replication flush mode (writes were acknowledged on receipt there)
    /// or with `--durability flush` (written; a barrier makes them durable).
    pub async fn flush(&self) -> Result<(), ErrorCode> {
        let wait = self.replica_wait(Request::Flush);
        let journal = self.engine.journal();
        // Every write acknowledged so far is written locally (with
        // `--durability flush`); otherwise everything reserved is covered.
        let next = match wait {
            ReplicaWait::Durable { barrier: true } => journal.written_next(),
            _ => journal.next_lsn(),
        };
        let last = next.0.checked_sub(1).filter(|&l| l > 0).map(Lsn);
        if let Some(last) = last {
            self.ask_barrier(wait, last);
        }
        self.engine.flush().await?;
        if let Some(last) = last {
            self.wait_replicas(last, wait).await;
        }
        self.fence.wait_valid().await;
        Ok(())
    }

    /// Reads `[offset, offset+len)`. Held like writes while the lease may
    /// have lapsed: another primary may have acknowledged newer data.
    pub async fn read(&self, offset: u64, len: u64) -> Result<ReadData, ErrorCode> {
        let data = self.engine.read(offset, len).await?;
        self.fence.wait_valid().await;
        Ok(data)
    }

    /// Allocation of `[offset, offset+len)`.
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<Allocation> {
        self.engine.allocation(offset, len)
    }

    /// Makes this replica the primary: persists epoch + 1 (or `epoch`, the
    /// coordinator's, which must be newer than this node's) and the role.
    /// The caller then restarts the node, which comes up serving NBD and
    /// connecting to its peers as their primary. Refused while the store is
    /// inconsistent unless `force`.
    pub async fn promote(&self, force: bool, epoch: Option<Epoch>) -> Result<Epoch, VolumeError> {
        let name = &self.info().name;
        if self.role == Role::Primary {
            return Err(VolumeError::AlreadyRole {
                volume: name.clone(),
                role: "primary",
            });
        }
        let journal = self.engine.journal();
        let inconsistent = journal.inconsistent();
        if inconsistent && !force {
            return Err(VolumeError::Inconsistent(name.clone()));
        }
        if inconsistent {
            tracing::error!(volume = %name, "FORCED promotion of an Inconsistent replica: data written since its last complete resync may be missing");
        }
        // Everything received must be journaled and applied before the new
        // epoch starts.
        self.engine
            .wait_applied(journal.next_lsn(), Duration::from_secs(30))
            .await?;
        let epoch = epoch.unwrap_or(Epoch(journal.epoch().0 + 1));
        if epoch <= journal.epoch() {
            return Err(VolumeError::StaleEpoch {
                volume: name.clone(),
                offered: epoch,
                current: journal.epoch(),
            });
        }
        self.engine
            .persist_role(Role::Primary, epoch, false)
            .await?;
        tracing::warn!(volume = %name, "promoted to primary in epoch {epoch}");
        Ok(epoch)
    }

    /// Makes this node a replica (it will resync from the primary that
    /// connects to it). Persists the role; the caller restarts the node.
    pub async fn demote(&self) -> Result<(), VolumeError> {
        if self.role == Role::Replica {
            return Err(VolumeError::AlreadyRole {
                volume: self.info().name.clone(),
                role: "a replica",
            });
        }
        let journal = self.engine.journal();
        self.engine
            .persist_role(Role::Replica, journal.epoch(), journal.inconsistent())
            .await?;
        // Until the restart, every read is the home core's to decide.
        self.engine.close_read_gate();
        tracing::warn!(volume = %self.info().name, "demoted to replica");
        Ok(())
    }

    /// On a primary: asks each in-sync link to run a verify pass. Refused
    /// when the volume is not primary, has no replicas, or a replica is not
    /// in sync.
    pub fn request_verify(&self, repair: bool) -> Result<(), VolumeError> {
        let name = &self.info().name;
        let Some(p) = &self.primary else {
            return Err(VolumeError::NotReplicatedPrimary(name.clone()));
        };
        let blockers = p.verify_blockers();
        if !blockers.is_empty() {
            return Err(VolumeError::VerifyNotReady {
                volume: name.clone(),
                why: blockers.join(", "),
            });
        }
        p.start_verify(repair, self.engine.size());
        Ok(())
    }

    /// Resizes the volume to `size` bytes (on its primary): the resize
    /// record is ordered among the writes, replicated like them, and
    /// acknowledged as the mode acknowledges a FUA write. Refused while a
    /// resync or verify pass runs (passes are planned over the regions of
    /// their start). Returns the size before.
    pub async fn resize(&self, size: u64, force: bool) -> Result<u64, VolumeError> {
        let name = &self.info().name;
        if self.role != Role::Primary {
            return Err(VolumeError::NotPrimary(name.clone()));
        }
        if let Some(p) = &self.primary {
            let blockers = p.resize_blockers();
            if !blockers.is_empty() {
                return Err(VolumeError::ResizeNotReady {
                    volume: name.clone(),
                    why: blockers.join(", "),
                });
            }
        }
        let old = self.engine.size();
        let Some(lsn) = self.engine.resize(size, force).await? else {
            return Ok(old);
        };
        let wait = self.replica_wait(Request::Fua);
        self.ask_barrier(wait, lsn);
        self.wait_replicas(lsn, wait).await;
        self.fence.wait_valid().await;
        if let Some(p) = &self.primary {
            p.note_acked(lsn);
        }
        tracing::warn!(volume = %name, "resized from {old} to {size} bytes (LSN {lsn}); open connections are served up to the new end; their clients learn the size from mirrorblk attach (kernel), a reconnect, or qemu's block_resize");
        Ok(old)
    }

    /// Graceful stop (see [`Engine::shutdown`]).
    pub async fn shutdown(&self, limit: Duration) -> bool {
        self.engine.shutdown(limit).await
    }
}
