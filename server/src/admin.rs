//! The admin socket: a Unix stream socket (mode 0600) speaking JSON lines.
//!
//! Each line a client sends is one [`Request`]; the daemon answers each with
//! one [`Response`] line. `mirrorblk` is the usual client; the format is also
//! meant for scripts (`socat - UNIX-CONNECT:PATH`).
//!
//! Volume state lives on the cores, so the admin thread asks each core over
//! its channel and merges the answers; no data-path state is shared.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Longest request line accepted.
const MAX_LINE: usize = 64 << 10;
/// How long a core may take to answer.
const CORE_TIMEOUT: Duration = Duration::from_secs(5);

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
    pub role: String,
    /// Epoch.
    pub epoch: u64,
    /// Highest LSN assigned (0: none yet).
    pub last_lsn: u64,
    /// Highest LSN durable in the local journal (all below it are too).
    pub durable_lsn: u64,
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
    /// connecting, catching-up, in-sync, out-of-sync.
    pub state: String,
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

impl VerifyStatus {
    /// The status of a pass in progress (or just ended).
    pub fn running(job: &crate::replication::resync::Job, repair: bool) -> VerifyStatus {
        let (done_bytes, total_bytes) = job.progress();
        VerifyStatus {
            running: !job.finished(),
            repair,
            done_bytes,
            total_bytes,
            differing: job.differing.clone(),
            busy: job.busy.clone(),
            region_bytes: crate::replication::bitmap::REGION,
            aborted: None,
            seconds: job.started.elapsed().as_secs_f64(),
        }
    }
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
}

impl Response {
    fn error(msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(msg.into()),
            node: String::new(),
            volumes: Vec::new(),
        }
    }
}

/// A question to a core, with where to send its answer.
pub struct CoreQuery {
    /// The request.
    pub request: Request,
    /// Where the core answers with its volumes' part (or why it refused).
    pub reply: std::sync::mpsc::SyncSender<Result<Vec<VolumeStatus>, String>>,
}

/// Serves the admin socket at `path` until the process ends.
pub fn spawn(
    path: &Path,
    node: String,
    cores: Vec<mpsc::Sender<crate::node::CoreMsg>>,
) -> std::io::Result<()> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if m.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let listener = UnixListener::bind(path)?;
    // Only the owner may steer the node.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let path: PathBuf = path.to_path_buf();
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        let node = node.clone();
                        let cores = cores.clone();
                        let _ = std::thread::Builder::new()
                            .name("admin-conn".into())
                            .spawn(move || serve(s, &node, &cores));
                    }
                    Err(e) => {
                        tracing::warn!("admin socket {}: accept failed: {e}", path.display());
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(())
}

fn serve(stream: UnixStream, node: &str, cores: &[mpsc::Sender<crate::node::CoreMsg>]) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE as u64).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let resp = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => handle(req, node, cores),
            Err(e) => Response::error(format!(
                "cannot parse request ({e}); send one JSON object per line, e.g. {{\"cmd\":\"status\"}}"
            )),
        };
        let mut text = serde_json::to_string(&resp)
            .unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"));
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

fn handle(req: Request, node: &str, cores: &[mpsc::Sender<crate::node::CoreMsg>]) -> Response {
    let mut volumes = Vec::new();
    for core in cores {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let q = CoreQuery {
            request: req.clone(),
            reply: tx,
        };
        if core.blocking_send(crate::node::CoreMsg::Admin(q)).is_err() {
            return Response::error("a core has stopped; the node is shutting down");
        }
        match rx.recv_timeout(CORE_TIMEOUT) {
            Ok(Ok(mut v)) => volumes.append(&mut v),
            Ok(Err(why)) => return Response::error(why),
            Err(_) => {
                return Response::error(
                    "a core did not answer within 5 s; the node may be overloaded",
                )
            }
        }
    }
    volumes.sort_by(|a, b| a.name.cmp(&b.name));
    match req {
        Request::Promote { .. } => {
            crate::lifecycle::request_restart(crate::journal::format::Role::Primary)
        }
        Request::Demote => crate::lifecycle::request_restart(crate::journal::format::Role::Replica),
        Request::Status | Request::SetResyncRate { .. } | Request::Verify { .. } => {}
    }
    Response {
        ok: true,
        error: None,
        node: node.to_string(),
        volumes,
    }
}

/// Client side: sends one request and reads one response.
pub fn call(path: &Path, req: &Request) -> Result<Response, String> {
    let stream = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot connect to the admin socket {}: {e}; is mirrorblkd running with --admin-socket {}?",
            path.display(),
            path.display()
        )
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    let mut text = serde_json::to_string(req).map_err(|e| e.to_string())?;
    text.push('\n');
    w.write_all(text.as_bytes())
        .map_err(|e| format!("admin socket write failed: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream)
        .take(16 << 20)
        .read_line(&mut line)
        .map_err(|e| format!("admin socket read failed: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("bad answer from the daemon ({e}): {line}"))
}
