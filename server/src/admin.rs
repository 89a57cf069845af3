//! The admin socket: a Unix stream socket (mode 0600) speaking JSON lines.
//!
//! Each line a client sends is one [`Request`]; the daemon answers each with
//! one [`Response`] line. The messages and the client live in the
//! `mirrorblk_admin` crate; this module serves them. `mirrorblk` is the usual
//! client; the format is also meant for scripts (`socat - UNIX-CONNECT:PATH`).
//!
//! Volume state lives on the cores, so the admin thread asks each core over
//! its channel and merges the answers; no data-path state is shared.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

/// Longest request line accepted.
const MAX_LINE: usize = 64 << 10;
/// Why promote and demote are refused on a node run with `--etcd`.
const COORDINATED_ROLE: &str = "this node's role is decided by etcd (--etcd): promote and demote would bypass the lease and the in-sync set; stop the primary (or let its lease lapse) and an in-sync replica takes over. `mirrorblk primary --etcd URL VOLUME` shows the primary";

/// How long a core may take to answer.
const CORE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a core may take over a resize: a grow zeroes the new part of a
/// block device, and the replicas acknowledge the record like a write.
const RESIZE_TIMEOUT: Duration = Duration::from_secs(120);

pub use mirrorblk_admin::{
    call, Listening, ReplicaStatus, Request, Response, VerifyStatus, VolumeStatus,
};

/// What a status answer says about the process itself: which run of the
/// daemon answers, and, once it serves, where (readiness for supervisors).
#[derive(Debug)]
pub struct Readiness {
    pid: u32,
    started_at: f64,
    listening: std::sync::OnceLock<Listening>,
    /// The coordinator's view, on a node run with `--etcd`.
    coordinator: std::sync::Mutex<Option<mirrorblk_admin::CoordinatorStatus>>,
}

impl Readiness {
    /// This process, started now, not serving yet.
    pub fn new() -> Readiness {
        let started_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Readiness {
            pid: std::process::id(),
            started_at,
            listening: std::sync::OnceLock::new(),
            coordinator: std::sync::Mutex::new(None),
        }
    }

    /// Publishes the bound addresses: from now on status answers carry them.
    pub fn serving(&self, listening: Listening) {
        let _ = self.listening.set(listening);
    }

    /// Publishes the coordinator's view: from now on status answers carry it.
    pub fn coordinator(&self, status: mirrorblk_admin::CoordinatorStatus) {
        *self.coordinator.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
    }

    /// Whether etcd decides this node's role.
    fn coordinated(&self) -> bool {
        self.coordinator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Fills the process fields of a status answer.
    fn stamp(&self, resp: &mut Response) {
        resp.pid = Some(self.pid);
        resp.started_at = Some(self.started_at);
        resp.listen = self.listening.get().cloned();
        resp.coordinator = self
            .coordinator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        resp.event_log = crate::events::path();
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness::new()
    }
}

/// Binds the admin socket at `path` (mode 0600), replacing a stale one.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
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
    Ok(listener)
}

/// Serves the admin socket `listener` (bound at `path`) until `stop` is
/// set (a hand-over passes the listener on) or the process ends.
pub fn spawn(
    listener: UnixListener,
    path: &Path,
    node: String,
    cores: Vec<mpsc::Sender<crate::control::CoreMsg>>,
    readiness: Arc<Readiness>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use std::os::fd::AsFd;
    listener.set_nonblocking(true)?;
    let path: PathBuf = path.to_path_buf();
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            while crate::sockio::wait_acceptable(listener.as_fd(), &stop) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let node = node.clone();
                        let cores = cores.clone();
                        let readiness = readiness.clone();
                        let _ = std::thread::Builder::new()
                            .name("admin-conn".into())
                            .spawn(move || serve(s, &node, &cores, &readiness));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        tracing::warn!("admin socket {}: accept failed: {e}", path.display());
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
}

fn serve(
    stream: UnixStream,
    node: &str,
    cores: &[mpsc::Sender<crate::control::CoreMsg>],
    readiness: &Readiness,
) {
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
        let (resp, after) = answer(line.trim(), node, cores, readiness);
        let mut text = serde_json::to_string(&resp)
            .unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"));
        text.push('\n');
        let written = out.write_all(text.as_bytes()).and_then(|()| out.flush());
        // The restart closes this socket: it comes only after the answer
        // is on its way.
        match after {
            After::Nothing => {}
            After::Restart(role) => crate::lifecycle::request_restart(role),
            After::HandedOver(done) => {
                let _ = done.send(());
            }
        }
        if written.is_err() {
            return;
        }
    }
}

/// What the connection does once an answer is written.
enum After {
    /// Nothing.
    Nothing,
    /// Restart with this role (promote, demote).
    Restart(mirrorblk_admin::Role),
    /// Tell the main thread the restart's answer is out (it then exits).
    HandedOver(std::sync::mpsc::SyncSender<()>),
}

impl From<Option<mirrorblk_admin::Role>> for After {
    fn from(r: Option<mirrorblk_admin::Role>) -> After {
        r.map_or(After::Nothing, After::Restart)
    }
}

/// The answer to one request line, and what to do once it is sent. Every
/// request but `status` (monitors poll it) is recorded in the event log
/// with its outcome.
fn answer(
    line: &str,
    node: &str,
    cores: &[mpsc::Sender<crate::control::CoreMsg>],
    readiness: &Readiness,
) -> (Response, After) {
    let req = match serde_json::from_str::<Request>(line) {
        Ok(req) => req,
        Err(e) => {
            return (
                Response::error(format!(
            "cannot parse request ({e}); send one JSON object per line, e.g. {{\"cmd\":\"status\"}}"
        )),
                After::Nothing,
            )
        }
    };
    if req == Request::Status {
        let (mut resp, restart) = handle(req, node, cores);
        if resp.ok {
            readiness.stamp(&mut resp);
        }
        return (resp, restart.into());
    }
    if let Request::Changes { volume, since } = &req {
        // A query (backup tools run it before every backup): not an event.
        return (changes(volume, *since, node, cores), After::Nothing);
    }
    if let Request::SnapshotList { .. } = &req {
        // A query: not an event.
        return (snapshots(req, node, cores), After::Nothing);
    }
    if let Request::SnapshotCreate { .. } | Request::SnapshotDelete { .. } = &req {
        let command = serde_json::to_string(&req).unwrap_or_default();
        let resp = snapshots(req, node, cores);
        record(command, &resp);
        return (resp, After::Nothing);
    }
    if let Request::Restart { binary } = req {
        // Recorded as restart events: after a hand-over the new process
        // owns the event log.
        return restart(binary, node);
    }
    // As parsed, not as sent: bounded, and without fields the daemon ignored.
    let command = serde_json::to_string(&req).unwrap_or_default();
    let (resp, restart) = match req {
        Request::Promote { .. } | Request::Demote if readiness.coordinated() => {
            (Response::error(COORDINATED_ROLE), None)
        }
        req => handle(req, node, cores),
    };
    record(command, &resp);
    (resp, restart.into())
}

/// Records an admin command and its outcome in the event log (not status
/// queries: monitors poll them).
fn record(command: String, resp: &Response) {
    crate::events::emit(crate::events::EventKind::AdminCommand {
        command,
        ok: resp.ok,
        error: resp.error.clone(),
    });
}

/// Carries out `req` on every core; the answer, and the role to restart
/// with once the answer is sent (promote, demote).
fn handle(
    req: Request,
    node: &str,
    cores: &[mpsc::Sender<crate::control::CoreMsg>],
) -> (Response, Option<mirrorblk_admin::Role>) {
    let mut volumes = Vec::new();
    for core in cores {
        match ask_core(core, &req) {
            Ok(mut v) => volumes.append(&mut v),
            Err(why) => return (Response::error(why), None),
        }
    }
    volumes.sort_by(|a, b| a.name.cmp(&b.name));
    let restart = restart_role(&req);
    if let Some(why) = unknown_volume(&req, &volumes) {
        return (Response::error(why), None);
    }
    let mut resp = Response::answered(node);
    resp.volumes = volumes;
    (resp, restart)
}

/// Why a core gave no answer.
enum AskError {
    /// Its queue is closed: the node is shutting down.
    Stopped,
    /// It did not answer within this limit.
    Late(Duration),
}

impl AskError {
    /// The refusal an admin client reads; `after` says what goes on
    /// regardless (a resize keeps going after its answer is late).
    fn message(&self, after: &str) -> String {
        match self {
            AskError::Stopped => "a core has stopped; the node is shutting down".to_string(),
            AskError::Late(limit) => format!(
                "a core did not answer within {} s; the node may be overloaded{after}",
                limit.as_secs()
            ),
        }
    }
}

/// Sends one core the message `make` builds around a reply channel and
/// waits up to `limit` for its answer.
fn ask<T>(
    core: &mpsc::Sender<crate::control::CoreMsg>,
    make: impl FnOnce(std::sync::mpsc::SyncSender<T>) -> crate::control::CoreMsg,
    limit: Duration,
) -> Result<T, AskError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    if core.blocking_send(make(tx)).is_err() {
        return Err(AskError::Stopped);
    }
    rx.recv_timeout(limit).map_err(|_| AskError::Late(limit))
}

/// Carries out `req` on one core: the volumes it serves, as the request
/// left them, or why not.
fn ask_core(
    core: &mpsc::Sender<crate::control::CoreMsg>,
    req: &Request,
) -> Result<Vec<VolumeStatus>, String> {
    let (limit, after) = match req {
        Request::Resize { .. } => (
            RESIZE_TIMEOUT,
            " (the resize goes on: mirrorblk status shows the size)",
        ),
        _ => (CORE_TIMEOUT, ""),
    };
    let query = |reply| {
        crate::control::CoreMsg::Admin(crate::control::CoreQuery {
            request: req.clone(),
            reply,
        })
    };
    ask(core, query, limit).map_err(|e| e.message(after))?
}

/// The role the node restarts with once it has answered `req`.
fn restart_role(req: &Request) -> Option<mirrorblk_admin::Role> {
    match req {
        Request::Promote { .. } => Some(mirrorblk_admin::Role::Primary),
        Request::Demote => Some(mirrorblk_admin::Role::Replica),
        Request::Status
        | Request::SetResyncRate { .. }
        | Request::Verify { .. }
        | Request::Resize { .. }
        | Request::Restart { .. }
        | Request::Changes { .. }
        | Request::SnapshotCreate { .. }
        | Request::SnapshotDelete { .. }
        | Request::SnapshotList { .. } => None,
    }
}

/// Asks every core what changed in `volume` after LSN `since`; the core
/// serving it answers.
fn changes(
    volume: &str,
    since: u64,
    node: &str,
    cores: &[mpsc::Sender<crate::control::CoreMsg>],
) -> Response {
    for core in cores {
        let query = |reply| {
            crate::control::CoreMsg::Changes(crate::control::ChangesQuery {
                volume: volume.to_string(),
                since,
                reply,
            })
        };
        match ask(core, query, CORE_TIMEOUT) {
            Ok(Some(c)) => {
                let mut r = Response::answered(node);
                r.changes = Some(c);
                return r;
            }
            Ok(None) => {}
            Err(e) => return Response::error(e.message("")),
        }
    }
    Response::error(format!(
        "no volume '{volume}' on node {node}: `mirrorblk status` lists its volumes"
    ))
}

/// How long a core may take to create a snapshot (it waits, bounded, for
/// the records before it to be applied).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(25);

/// Carries out a snapshot request on every core: the cores serving the
/// volumes it names answer; a list gathers them all.
fn snapshots(
    req: Request,
    node: &str,
    cores: &[mpsc::Sender<crate::control::CoreMsg>],
) -> Response {
    let volume = match &req {
        Request::SnapshotCreate { volume, .. } | Request::SnapshotDelete { volume, .. } => {
            Some(volume.clone())
        }
        Request::SnapshotList { volume } => volume.clone(),
        _ => return Response::error("not a snapshot request"),
    };
    let mut found = None::<Vec<mirrorblk_admin::Snapshot>>;
    for core in cores {
        let query = |reply| {
            crate::control::CoreMsg::Snapshot(crate::control::SnapshotQuery {
                request: req.clone(),
                reply,
            })
        };
        match ask(core, query, SNAPSHOT_TIMEOUT) {
            Ok(Some(Ok(mut list))) => found.get_or_insert_with(Vec::new).append(&mut list),
            Ok(Some(Err(why))) => return Response::error(why),
            Ok(None) => {}
            Err(e) => return Response::error(e.message("")),
        }
    }
    match (found, volume) {
        (None, Some(v)) => Response::error(format!(
            "no volume '{v}' on node {node}: `mirrorblk status` lists its volumes"
        )),
        (found, _) => {
            let mut r = Response::answered(node);
            r.snapshots = Some(found.unwrap_or_default());
            r
        }
    }
}

/// Why a request naming a volume (resize) names none of this node's.
fn unknown_volume(req: &Request, volumes: &[VolumeStatus]) -> Option<String> {
    let Request::Resize { volume, .. } = req else {
        return None;
    };
    if volumes.iter().any(|v| v.name == *volume) {
        return None;
    }
    let known: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    Some(format!(
        "this node has no volume '{volume}' (it has: {}); check the name with mirrorblk status",
        known.join(", ")
    ))
}

/// How long the admin connection waits for the main thread's hand-over.
const HAND_OVER_LIMIT: Duration = Duration::from_secs(240);

/// Live restart: starts `binary` (default: the daemon's own path) and, once
/// it says HELLO, has the main thread hand the node over to it. A binary
/// that fails to start leaves this process serving, untouched.
fn restart(binary: Option<PathBuf>, node: &str) -> (Response, After) {
    let binary = binary.unwrap_or_else(crate::handover::own_path);
    crate::events::emit(crate::events::EventKind::RestartRequested {
        binary: binary.display().to_string(),
    });
    let failed = |why: String| {
        tracing::error!("restart: {why}");
        crate::events::emit(crate::events::EventKind::RestartFailed {
            reason: why.clone(),
        });
        (Response::error(why), After::Nothing)
    };
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut successor = match crate::handover::Successor::spawn(&binary, &args) {
        Ok(s) => s,
        Err(e) => {
            return failed(format!(
                "{e}; this process (pid {}) serves on",
                std::process::id()
            ))
        }
    };
    tracing::info!(
        "restart: started {} (pid {}); waiting for it to parse its configuration",
        binary.display(),
        successor.pid()
    );
    if let Err(e) = successor.wait_hello() {
        return failed(format!(
            "{e}; this process (pid {}) serves on",
            std::process::id()
        ));
    }
    let (answer, outcome) = std::sync::mpsc::sync_channel(1);
    let (written_tx, written) = std::sync::mpsc::sync_channel(1);
    let order = crate::handover::HandOverOrder {
        successor,
        binary,
        answer,
        written,
    };
    if let Err(order) = crate::handover::request_hand_over(order) {
        order.successor.abandon();
        return failed("a role change or another restart is already under way".into());
    }
    let resp = match outcome.recv_timeout(HAND_OVER_LIMIT) {
        Ok(Ok(o)) => {
            let mut r = Response::answered(node);
            r.pid = Some(o.pid);
            r.restart = Some(o);
            r
        }
        Ok(Err(why)) => Response::error(why),
        Err(_) => Response::error("the hand-over did not finish in time; see the daemon's log"),
    };
    // The main thread ends the process once this answer is on its way.
    (resp, After::HandedOver(written_tx))
}
