//! The messages of the admin socket: one JSON [`Request`] per line from the
//! client, one JSON [`Response`] per line from the daemon.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::states::{ReplicaState, Role};

/// A request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// State of every volume.
    Status,
    /// Make this replica node the primary (epoch + 1), then restart as such.
    Promote {
        /// Promote even an Inconsistent replica (loud warning).
        #[serde(default)]
        force: bool,
    },
    /// Make this primary node a replica, then restart as such.
    Demote,
    /// Set the resync bandwidth (bytes per second) of this primary's links.
    SetResyncRate {
        /// Bytes per second.
        rate: u64,
    },
    /// On a primary: compare every region's checksum with each in-sync
    /// replica (online, rate-limited like a resync); the outcome shows in
    /// each replica's `verify` status.
    Verify {
        /// Resync the regions found different.
        #[serde(default)]
        repair: bool,
    },
    /// On the primary: resize VOLUME to `size` bytes (a multiple of 4 KiB),
    /// on this node and, in the replication stream, on every replica.
    /// Shrinking discards the data past the new end and needs `force`.
    Resize {
        /// The volume.
        volume: String,
        /// Its new size in bytes.
        size: u64,
        /// Allow a shrink.
        #[serde(default)]
        force: bool,
    },
    /// Live restart: hand every listener and NBD connection over to a new
    /// process of `binary` (default: the daemon's own path), which serves
    /// them on; answered once it serves.
    Restart {
        /// The binary to run.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<PathBuf>,
    },
    /// Changed-block tracking: the byte ranges of `volume` changed by
    /// records after LSN `since` (on any node of the volume: LSNs are the
    /// same on all of them). Answered in [`Response::changes`].
    Changes {
        /// The volume.
        volume: String,
        /// The last LSN the base (a previous backup) includes; 0 for every
        /// change ever tracked.
        since: u64,
    },
    /// Point-in-time snapshot: from now on the volume's content as of the
    /// next LSN boundary is served read-only as the NBD export
    /// `VOLUME@NAME` (on this node). Answered in [`Response::snapshots`].
    SnapshotCreate {
        /// The volume.
        volume: String,
        /// The snapshot's name (`[A-Za-z0-9._-]`, 1 to 64 bytes).
        name: String,
        /// The most bytes of old data the snapshot keeps aside (default
        /// 1 GiB); past it the snapshot breaks, never the writes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        space: Option<u64>,
    },
    /// Deletes a snapshot: its export goes, its side file is removed.
    SnapshotDelete {
        /// The volume.
        volume: String,
        /// The snapshot's name.
        name: String,
    },
    /// The snapshots of `volume` (every volume's when absent).
    SnapshotList {
        /// The volume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
    },
}

/// A point-in-time snapshot of a volume, served as a read-only NBD export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The volume.
    pub volume: String,
    /// The snapshot's name.
    pub name: String,
    /// Its NBD export name, `VOLUME@NAME`.
    pub export: String,
    /// The volume's UUID (the same on every node), 8-4-4-4-12 hex as
    /// `changes` prints it.
    pub uuid: String,
    /// The last LSN the snapshot includes: it holds every record with an
    /// LSN up to and including this one, and none after (0: none). The
    /// same meaning as [`Changes::lsn`]: a backup read from this snapshot
    /// stores this LSN, and the next incremental asks `changes --since` it.
    pub lsn: u64,
    /// Its size in bytes (the volume's size at `lsn`).
    pub size: u64,
    /// The most bytes of old data it may keep aside.
    pub space: u64,
    /// Bytes of old data kept aside so far.
    pub used: u64,
    /// Why it broke (its export then fails every read with EIO), if it did.
    pub broken: Option<String>,
    /// When it was created, in milliseconds since the Unix epoch.
    pub created_ms: u64,
}

/// One byte range of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    /// Volume byte offset.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

/// What changed in a volume after an LSN (the answer to `changes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// The volume.
    pub volume: String,
    /// Its UUID (the same on every node), 8-4-4-4-12 hex.
    pub uuid: String,
    /// The LSN asked about.
    pub since: u64,
    /// The last LSN the answer covers: every record up to it is included.
    /// The next incremental asks `since` the LSN its own base includes.
    pub lsn: u64,
    /// True when the ranges are exact (a superset of what changed after
    /// `since`, at region granularity). False when `since` is older than
    /// what the table knows (`known_since`): the ranges are then the whole
    /// volume, and a full backup is needed.
    pub complete: bool,
    /// The oldest `since` answered exactly.
    pub known_since: u64,
    /// Granularity of the tracking in bytes.
    pub region_size: u64,
    /// Volume size in bytes.
    pub size: u64,
    /// Sum of the ranges' lengths.
    pub bytes: u64,
    /// Changed ranges: sorted, disjoint, merged, region-aligned (the last
    /// one ends at the volume's end).
    pub ranges: Vec<ByteRange>,
}

/// How a live restart went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestartOutcome {
    /// The process that handed over.
    pub from_pid: u32,
    /// The process that serves now.
    pub pid: u32,
    /// The binary it runs.
    pub binary: PathBuf,
    /// NBD connections handed over.
    pub connections: usize,
    /// How long clients waited: from the moment the old process stopped
    /// taking requests until the new one served, in milliseconds.
    pub pause_ms: u64,
}

/// The state of one volume, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// Export name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Read-only export.
    pub read_only: bool,
    /// Role of this node for the volume.
    pub role: Role,
    /// Epoch.
    pub epoch: u64,
    /// Highest LSN assigned (0: none yet).
    pub last_lsn: u64,
    /// Highest LSN durable in the local journal (all below it are too).
    pub durable_lsn: u64,
    /// When a reply promises durability (`--durability`).
    #[serde(default)]
    pub durability: crate::Durability,
    /// Highest LSN written to the local journal, durable or not (with
    /// `--durability flush`, acknowledged up to here; equal to
    /// `durable_lsn` with per-write durability).
    #[serde(default)]
    pub written_lsn: u64,
    /// Highest LSN applied to the data store (all below it are too).
    pub applied_lsn: u64,
    /// Journal bytes in use.
    pub journal_used: u64,
    /// Journal record area size.
    pub journal_size: u64,
    /// Group commits since start.
    pub journal_batches: u64,
    /// Checkpoints since start.
    pub checkpoints: u64,
    /// Set when the journal failed (the volume refuses writes).
    pub journal_error: Option<String>,
    /// True while a resync is incomplete (never promote such a node).
    #[serde(default)]
    pub inconsistent: bool,
    /// On a primary: its replicas.
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
}

/// A primary's view of one replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Peer node name.
    pub peer: String,
    /// Where the link stands.
    pub state: ReplicaState,
    /// Why it is out of sync, if it is.
    pub reason: Option<String>,
    /// Highest LSN durable on the replica.
    pub durable_lsn: u64,
    /// How many LSNs it trails the primary by.
    pub lag_lsn: u64,
    /// How many bytes of journaled changes it lacks durably.
    #[serde(default)]
    pub lag_bytes: u64,
    /// Resync progress (bytes done, bytes total) while one runs.
    pub resync: Option<(u64, u64)>,
    /// Bytes of the volume in regions marked out of sync for it.
    #[serde(default)]
    pub out_of_sync_bytes: u64,
    /// The running or last verify pass.
    #[serde(default)]
    pub verify: Option<VerifyStatus>,
    /// Last heartbeat round trip in microseconds.
    pub rtt_us: u64,
}

impl ReplicaStatus {
    /// In sync with no resync left: the replica has everything and counts
    /// for acknowledgements.
    pub fn is_settled(&self) -> bool {
        self.state == ReplicaState::InSync && self.resync.is_none()
    }
}

/// A verify pass against one replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyStatus {
    /// Still running.
    pub running: bool,
    /// Whether differing regions are resynced.
    pub repair: bool,
    /// Bytes compared so far.
    pub done_bytes: u64,
    /// Bytes to compare.
    pub total_bytes: u64,
    /// Offsets of the regions found different (each `region_bytes` long).
    pub differing: Vec<u64>,
    /// Offsets of regions written too continuously to compare (not verified).
    #[serde(default)]
    pub busy: Vec<u64>,
    /// Size of a region.
    pub region_bytes: u64,
    /// Set when the pass stopped before the end (the link was lost).
    pub aborted: Option<String>,
    /// Seconds it ran.
    pub seconds: f64,
}

/// A response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// What went wrong, and what to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Node name.
    #[serde(default)]
    pub node: String,
    /// Volumes (for `status`).
    #[serde(default)]
    pub volumes: Vec<VolumeStatus>,
    /// The daemon's process id (in `status` answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// When the daemon's process image started, in seconds since the Unix
    /// epoch (with a fraction: a role change re-executes the daemon under
    /// the same pid, and this tells the runs apart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<f64>,
    /// The addresses the daemon serves on, once every listener is bound and
    /// accepting (in `status` answers; absent while it is still starting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<Listening>,
    /// The coordinator's view, on a node run with `--etcd` (in `status`
    /// answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<CoordinatorStatus>,
    /// The node's event log file (in `status` answers), which
    /// `mirrorblk events` reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_log: Option<PathBuf>,
    /// How a `restart` went (in its answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartOutcome>,
    /// What changed (in the answer to `changes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<Changes>,
    /// Snapshots (in the answers to `snapshot_create`, `snapshot_delete`:
    /// the one concerned; `snapshot_list`: every one asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<Snapshot>>,
}

/// What a node run with `--etcd` knows of its coordination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorStatus {
    /// The etcd endpoints.
    pub etcd: Vec<String>,
    /// Whether etcd answered the last call.
    pub reachable: bool,
    /// The lease TTL, in milliseconds.
    pub lease_ttl_ms: u64,
    /// This node's lease (hex), while it holds one.
    pub lease: Option<String>,
    /// The volume's primary, as etcd last said.
    pub leader: Option<String>,
    /// Where the primary serves NBD clients.
    pub leader_nbd: Option<String>,
    /// The primary's epoch.
    pub epoch: Option<u64>,
    /// The replicas the primary published as in sync (on the primary).
    pub in_sync: Vec<String>,
    /// On the primary: whether replies are held because the lease may have
    /// lapsed.
    pub writes_held: bool,
    /// On a replica: why it does not campaign, if it would not.
    pub not_candidate: Option<String>,
}

/// The bound addresses of a daemon that serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listening {
    /// The NBD TCP address (the real port when `--listen` asked for port 0).
    pub nbd: SocketAddr,
    /// The NBD Unix socket, if it serves one.
    #[serde(default)]
    pub unix: Option<PathBuf>,
    /// The replication listener, on a node that accepts a primary.
    #[serde(default)]
    pub replication: Option<SocketAddr>,
}

impl Response {
    /// A refusal saying `msg`.
    pub fn error(msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(msg.into()),
            ..Response::answered("")
        }
    }

    /// A successful answer from `node`, its payload still to be filled in.
    pub fn answered(node: impl Into<String>) -> Response {
        Response {
            ok: true,
            error: None,
            node: node.into(),
            volumes: Vec::new(),
            pid: None,
            started_at: None,
            listen: None,
            coordinator: None,
            event_log: None,
            restart: None,
            changes: None,
            snapshots: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status answer as the daemon wrote it while its states were strings
    /// (field order as declared): the typed messages read it and write back
    /// the same bytes.
    const STATUS_LINE: &str = concat!(
        r#"{"ok":true,"node":"n1","volumes":[{"name":"vol0","size":268435456,"read_only":false,"#,
        r#""role":"primary","epoch":2,"last_lsn":10,"durable_lsn":10,"#,
        r#""durability":"per-write","written_lsn":10,"applied_lsn":9,"#,
        r#""journal_used":4096,"journal_size":67108864,"journal_batches":5,"checkpoints":1,"#,
        r#""journal_error":null,"inconsistent":false,"replicas":["#,
        r#"{"peer":"n2","state":"in-sync","reason":null,"durable_lsn":10,"lag_lsn":0,"#,
        r#""lag_bytes":0,"resync":null,"out_of_sync_bytes":0,"verify":null,"rtt_us":80},"#,
        r#"{"peer":"n3","state":"out-of-sync","reason":"heartbeat timeout","durable_lsn":3,"#,
        r#""lag_lsn":7,"lag_bytes":28672,"resync":[1,2],"out_of_sync_bytes":1048576,"#,
        r#""verify":null,"rtt_us":0}]}]}"#
    );

    #[test]
    fn status_answer_round_trips_byte_identical() {
        let resp: Response = serde_json::from_str(STATUS_LINE).expect("parses");
        let v = &resp.volumes[0];
        assert_eq!(v.role, Role::Primary);
        assert_eq!(v.replicas[0].state, ReplicaState::InSync);
        assert_eq!(v.replicas[1].state, ReplicaState::OutOfSync);
        assert_eq!(serde_json::to_string(&resp).expect("writes"), STATUS_LINE);
    }

    /// A daemon from before `--durability` sends neither `durability` nor
    /// `written_lsn`: its answer still reads, as per-write durability.
    #[test]
    fn a_status_answer_without_durability_fields_reads_as_per_write() {
        let old = STATUS_LINE.replace(r#""durability":"per-write","written_lsn":10,"#, "");
        assert_ne!(old, STATUS_LINE);
        let resp: Response = serde_json::from_str(&old).expect("parses");
        let v = &resp.volumes[0];
        assert_eq!(v.durability, crate::Durability::PerWrite);
        assert_eq!(v.written_lsn, 0);
    }

    #[test]
    fn requests_keep_their_command_words() {
        let lines = [
            (Request::Status, r#"{"cmd":"status"}"#),
            (
                Request::Promote { force: true },
                r#"{"cmd":"promote","force":true}"#,
            ),
            (Request::Demote, r#"{"cmd":"demote"}"#),
            (
                Request::SetResyncRate { rate: 5 },
                r#"{"cmd":"set_resync_rate","rate":5}"#,
            ),
            (
                Request::Verify { repair: false },
                r#"{"cmd":"verify","repair":false}"#,
            ),
            (
                Request::Resize {
                    volume: "vol0".into(),
                    size: 2 << 30,
                    force: false,
                },
                r#"{"cmd":"resize","volume":"vol0","size":2147483648,"force":false}"#,
            ),
            (
                Request::SnapshotCreate {
                    volume: "vol0".into(),
                    name: "b1".into(),
                    space: Some(1 << 20),
                },
                r#"{"cmd":"snapshot_create","volume":"vol0","name":"b1","space":1048576}"#,
            ),
            (
                Request::SnapshotDelete {
                    volume: "vol0".into(),
                    name: "b1".into(),
                },
                r#"{"cmd":"snapshot_delete","volume":"vol0","name":"b1"}"#,
            ),
            (
                Request::SnapshotList { volume: None },
                r#"{"cmd":"snapshot_list"}"#,
            ),
        ];
        for (req, line) in lines {
            assert_eq!(serde_json::to_string(&req).expect("writes"), line);
            assert_eq!(serde_json::from_str::<Request>(line).expect("parses"), req);
        }
    }

    #[test]
    fn settled_means_in_sync_with_no_resync() {
        let resp: Response = serde_json::from_str(STATUS_LINE).expect("parses");
        let mut r = resp.volumes[0].replicas[0].clone();
        assert!(r.is_settled());
        r.resync = Some((1, 2));
        assert!(!r.is_settled());
        r.resync = None;
        r.state = ReplicaState::Resyncing;
        assert!(!r.is_settled());
    }
}
