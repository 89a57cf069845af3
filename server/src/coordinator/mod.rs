//! The coordinator: with `--etcd`, etcd decides which node is a volume's
//! primary, and this thread carries that out on the node (docs/FAILOVER.md).
//!
//! - The primary is whoever holds the volume's leader key, created in one
//!   compare-and-swap under the holder's lease (`follow.rs`), which also
//!   advances the epoch counter.
//! - The primary renews its lease every `decide::keepalive_interval` and
//!   moves the [`LeaseFence`] deadline after each renewal, so it stops
//!   acknowledging before its lease can expire; it publishes the in-sync
//!   set before it acknowledges a write without a replica (`lead.rs`).
//! - A replica campaigns when the leader key is gone, only if it is named in
//!   the in-sync set, the most up-to-date first (`decide.rs`).
//! - Role changes restart the daemon (as `promote` does); a new primary
//!   hands its lease to the restarted process (`startup.rs`).
//!
//! It runs on its own thread with blocking etcd calls: nothing here is on
//! the data path, which only reads the fence.

mod decide;
mod follow;
mod lead;
pub mod startup;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mirrorblk_admin::CoordinatorStatus;
use mirrorblk_etcd::{Client, LeaseId, NodeRecord, VolumeKeys};
use tokio::sync::mpsc;

use crate::admin::Readiness;
use crate::config::CoordinatorConfig;
use crate::control::{CoordAnswer, CoordQuery, CoordRequest, CoreMsg, Position};
use crate::events::{emit, EventKind};
use crate::journal::format::Role;
use crate::lease_fence::LeaseFence;

pub use startup::{starting_role, Startup};

/// How long one etcd call may take on one endpoint.
pub fn call_timeout(ttl: Duration) -> Duration {
    decide::keepalive_interval(ttl).min(Duration::from_secs(1))
}

/// How long a core may take to answer (a promotion first applies what
/// the replica received, for up to 30 s).
const CORE_TIMEOUT: Duration = Duration::from_secs(40);

/// A core answer slower than this is logged (it delays lease renewals).
const SLOW_CORE: Duration = Duration::from_millis(300);

/// What the coordinator thread needs.
pub struct Wiring {
    /// Settings.
    pub cfg: CoordinatorConfig,
    /// This node's name.
    pub node: String,
    /// The coordinated volume.
    pub volume: String,
    /// Where this node serves NBD clients.
    pub nbd: String,
    /// The core of the volume.
    pub core: mpsc::Sender<CoreMsg>,
    /// The node's lease fence.
    pub fence: Arc<LeaseFence>,
    /// Where status answers read the coordinator's view.
    pub readiness: Arc<Readiness>,
}

/// What a live restart asks of a running coordinator (docs/RESTART.md).
#[derive(Debug, Default)]
pub struct Handle {
    /// The lease as of the last finished round; locked while a round runs,
    /// so [`Handle::hand_over`] never sees one half done.
    lease: Mutex<Option<LeaseId>>,
    /// The node is being handed over to a successor.
    handing_over: AtomicBool,
}

impl Handle {
    /// Freezes the coordinator for a live restart and returns its lease for
    /// the successor. From the next round on it only renews the lease —
    /// no campaign, no publication, no step-down: the successor decides
    /// from here — and goes on renewing until this process ends, so the
    /// lease cannot lapse however long the hand-over takes. Waits for a
    /// round under way (each is bounded by the etcd call timeouts).
    pub fn hand_over(&self) -> Option<LeaseId> {
        let lease = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        self.handing_over.store(true, Ordering::SeqCst);
        *lease
    }

    fn handing_over(&self) -> bool {
        self.handing_over.load(Ordering::SeqCst)
    }
}

/// The coordinator's state.
struct Coordinator {
    w: Wiring,
    handle: Arc<Handle>,
    client: Client,
    keys: VolumeKeys,
    role: Role,
    /// This node's lease and its TTL as granted.
    lease: Option<(LeaseId, Duration)>,
    /// When the next keep-alive is due.
    next_keepalive: Instant,
    /// On the primary: its epoch and the in-sync set last published.
    epoch: u64,
    published: Option<Vec<String>>,
    /// The leader etcd last named (node, NBD address, epoch).
    leader: Option<mirrorblk_etcd::LeaderRecord>,
    /// On a replica: why it does not campaign, and when it will.
    refusal: Option<String>,
    campaign_at: Option<Instant>,
    reachable: bool,
    /// On the primary: since when replies are held.
    held_since: Option<Instant>,
    /// A restart was requested: nothing more to do in this process.
    done: bool,
}

/// Starts the coordinator thread of a node that started as `start` says;
/// the handle freezes it for a live restart.
pub fn spawn(w: Wiring, start: Startup) -> std::io::Result<Arc<Handle>> {
    let client = Client::new(&w.cfg.endpoints, call_timeout(w.cfg.lease_ttl))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let keys = VolumeKeys::new(&w.volume);
    let handle = Arc::new(Handle::default());
    *handle.lease.lock().unwrap_or_else(|e| e.into_inner()) = start.lease.map(|(id, _)| id);
    let c = Coordinator {
        handle: handle.clone(),
        client,
        keys,
        role: start.role,
        lease: start.lease,
        next_keepalive: Instant::now(),
        epoch: start.epoch,
        published: None,
        leader: None,
        refusal: None,
        campaign_at: None,
        reachable: true,
        held_since: None,
        done: false,
        w,
    };
    std::thread::Builder::new()
        .name("coordinator".into())
        .spawn(move || c.run())
        .map(|_| handle)
}

impl Coordinator {
    fn run(mut self) {
        let handle = self.handle.clone();
        loop {
            {
                let mut lease = handle.lease.lock().unwrap_or_else(|e| e.into_inner());
                if !self.done {
                    self.step(Instant::now());
                }
                *lease = self.lease.map(|(id, _)| id);
            }
            self.publish_status();
            std::thread::sleep(decide::tick(self.w.cfg.lease_ttl));
        }
    }

    /// One round: the lease, then what the role asks.
    fn step(&mut self, now: Instant) {
        self.keep_lease(now);
        if self.done || self.handle.handing_over() {
            return;
        }
        match self.role {
            Role::Primary => self.lead(),
            _ => self.follow(now),
        }
        self.watch_fence(Instant::now());
    }

    /// Grants a lease when there is none (not on a primary: its lease is its
    /// leadership), renews it when due, and publishes this node's position
    /// (not while handing over: the cores are stopping, and the successor
    /// publishes its own).
    fn keep_lease(&mut self, now: Instant) {
        let over = self.handle.handing_over();
        let Some((id, _)) = self.lease else {
            if self.role != Role::Primary && !over {
                self.grant();
            }
            return;
        };
        if now < self.next_keepalive {
            return;
        }
        match self.client.keep_alive(id) {
            Ok(Some(ttl)) => {
                self.lease = Some((id, ttl));
                self.next_keepalive = now + decide::keepalive_interval(ttl);
                if self.role == Role::Primary {
                    self.w.fence.extend_until(decide::fence_deadline(now, ttl));
                }
                self.set_reachable(true, "");
                if !over {
                    self.publish_position(id);
                }
            }
            Ok(None) => self.lease_expired(),
            Err(e) => {
                self.set_reachable(false, &e.to_string());
                self.next_keepalive = now + decide::tick(self.w.cfg.lease_ttl);
            }
        }
    }

    fn grant(&mut self) {
        match self.client.grant(self.w.cfg.lease_ttl) {
            Ok((id, ttl)) => {
                tracing::info!(volume = %self.w.volume, "etcd lease {id} granted ({} s)", ttl.as_secs());
                emit(EventKind::LeaseGranted {
                    volume: self.w.volume.clone(),
                    lease: id.to_string(),
                    ttl_ms: millis(ttl),
                });
                self.lease = Some((id, ttl));
                self.next_keepalive = Instant::now() + decide::keepalive_interval(ttl);
                self.set_reachable(true, "");
                self.publish_position(id);
            }
            Err(e) => self.set_reachable(false, &e.to_string()),
        }
    }

    /// The lease is gone in etcd: a primary has lost its leadership.
    fn lease_expired(&mut self) {
        tracing::warn!(volume = %self.w.volume, "etcd lease expired");
        emit(EventKind::LeaseLost {
            volume: self.w.volume.clone(),
            reason: "it expired in etcd".into(),
        });
        self.lease = None;
        // While handing over, the successor finds the lease gone and starts
        // as a replica itself: nothing to demote here.
        if self.role == Role::Primary && !self.handle.handing_over() {
            self.step_down("its etcd lease expired");
        }
    }

    /// Writes this node's position under its lease (for the election).
    fn publish_position(&mut self, lease: LeaseId) {
        let Ok(p) = self.position() else { return };
        let rec = NodeRecord {
            node: self.w.node.clone(),
            nbd: self.w.nbd.clone(),
            epoch: p.epoch.0,
            next_lsn: p.durable_next.0,
            consistent: p.consistent,
        };
        let value = mirrorblk_etcd::records::encode(&rec);
        if let Err(e) = self
            .client
            .put(&self.keys.node(&self.w.node), &value, Some(lease))
        {
            self.set_reachable(false, &e.to_string());
        }
    }

    fn set_reachable(&mut self, ok: bool, why: &str) {
        if ok != self.reachable {
            if ok {
                tracing::info!("etcd reachable again");
                emit(EventKind::CoordinatorReachable {});
            } else {
                tracing::warn!("etcd unreachable: {why}");
                emit(EventKind::CoordinatorUnreachable {
                    reason: why.to_string(),
                });
            }
        }
        self.reachable = ok;
    }

    /// Notes when replies start and stop being held (for logs and status).
    fn watch_fence(&mut self, now: Instant) {
        if self.role != Role::Primary {
            return;
        }
        let valid = self.w.fence.valid_at(now);
        match (valid, self.held_since) {
            (false, None) => {
                let reason = "the lease was not renewed in time: replies wait until it is renewed or another node leads";
                tracing::warn!(volume = %self.w.volume, "{reason}");
                emit(EventKind::WritesHeld {
                    volume: self.w.volume.clone(),
                    reason: reason.into(),
                });
                self.held_since = Some(now);
            }
            (true, Some(since)) => {
                let held = now.duration_since(since);
                tracing::info!(volume = %self.w.volume, "lease renewed: replies resume after {} ms", held.as_millis());
                emit(EventKind::WritesResumed {
                    volume: self.w.volume.clone(),
                    held_ms: millis(held),
                });
                self.held_since = None;
            }
            _ => {}
        }
    }

    /// Asks the volume's core.
    fn ask(&self, request: CoordRequest) -> Result<CoordAnswer, String> {
        let (tx, rx) = sync_channel(1);
        let q = CoordQuery {
            volume: self.w.volume.clone(),
            request,
            reply: tx,
        };
        self.w
            .core
            .blocking_send(CoreMsg::Coordinate(q))
            .map_err(|_| "the volume's core has stopped".to_string())?;
        let asked = Instant::now();
        let answer = rx
            .recv_timeout(CORE_TIMEOUT)
            .map_err(|_| "the volume's core did not answer".to_string())?;
        if asked.elapsed() > SLOW_CORE {
            tracing::warn!(volume = %self.w.volume, "the volume's core took {} ms to answer the coordinator", asked.elapsed().as_millis());
        }
        answer
    }

    fn position(&self) -> Result<Position, String> {
        match self.ask(CoordRequest::Position)? {
            CoordAnswer::Position(p) => Ok(p),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// Leaves the primary role: holds replies, persists the replica role and
    /// restarts (the held connections close unanswered).
    fn step_down(&mut self, why: &str) {
        tracing::error!(volume = %self.w.volume, "stepping down as primary: {why}; restarting as a replica");
        self.w.fence.close();
        if let Some((id, _)) = self.lease.take() {
            emit(EventKind::LeaseLost {
                volume: self.w.volume.clone(),
                reason: why.to_string(),
            });
            let _ = self.client.revoke(id);
        }
        if let Err(e) = self.ask(CoordRequest::Demote(format!("etcd: {why}"))) {
            tracing::error!(volume = %self.w.volume, "demoting failed: {e}");
        }
        crate::lifecycle::request_restart(Role::Replica);
        self.done = true;
    }

    fn publish_status(&self) {
        let ttl = self.w.cfg.lease_ttl;
        self.w.readiness.coordinator(CoordinatorStatus {
            etcd: self.client.endpoints(),
            reachable: self.reachable,
            lease_ttl_ms: millis(ttl),
            lease: self.lease.map(|(id, _)| id.to_string()),
            leader: self.leader.as_ref().map(|l| l.node.clone()),
            leader_nbd: self.leader.as_ref().map(|l| l.nbd.clone()),
            epoch: self.leader.as_ref().map(|l| l.epoch),
            in_sync: self.published.clone().unwrap_or_default(),
            writes_held: self.held_since.is_some(),
            not_candidate: self.refusal.clone(),
        });
    }
}

/// A duration in whole milliseconds (saturating).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
