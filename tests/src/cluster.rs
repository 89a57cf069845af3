//! Replicated nodes under test: primaries and replicas of one volume, each a
//! `mirrorblkd` with its own data store, journal, admin socket and NBD port
//! in the test's directory, all on 127.0.0.1.
//!
//! - [`write_secret`]: a shared-secret file (`--secret-file`).
//! - [`Node::start_replica`] / [`Node::start_primary`]: start a node with the
//!   flags of a replicated setup. A replica's `--replication-listen` port is a
//!   fixed number (the primary's `--peer` names it, and a restarted replica
//!   must come back on it): it is picked free below the kernel's ephemeral
//!   range, and picked again if the daemon cannot bind it.
//! - [`Node::status`]: the volume's state from the admin socket (the same
//!   JSON `mirrorblk --admin-socket PATH status --json` prints).
//! - [`Node::wait_replicas_in_sync`]: poll a primary until its replicas stream.
//! - [`assert_stores_identical`]: byte comparison of stopped nodes' data stores.
//!
//! Every node is a [`Daemon`], so it is killed by PID when dropped.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mirrorblk_admin::cluster::{self, NodeSpec};
use mirrorblk_admin::{ReplicaStatus, Role, VolumeStatus};

use crate::daemon::{Daemon, TestDir};
use crate::util::{first_difference, Rng, MIB};

/// The export every replicated test uses.
pub const EXPORT: &str = "vol0";
/// Its size.
pub const VOLUME_SIZE: &str = "256M";
/// Its size in bytes.
pub const VOLUME_BYTES: u64 = 256 * MIB;

/// A generator seeded from the clock, the pid and a call counter (for
/// secrets and port numbers, which need not be replayable).
fn fresh_rng() -> Rng {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    Rng::new(t ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Writes a fresh random secret (32 random bytes as 64 hex digits, mode
/// 0600) to `name` in `dir` and returns its path.
pub fn write_secret(dir: &TestDir, name: &str) -> PathBuf {
    let path = dir.join(name);
    cluster::write_secret(&path).expect("write the secret file");
    path
}

/// The lowest port the kernel hands out for outgoing connections.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// A TCP port on 127.0.0.1 that is free right now, for a fixed
/// `--replication-listen`. It is taken from below the kernel's ephemeral
/// range, so no outgoing connection can be given it while a replica that
/// owns it is down; a daemon that still cannot bind it is restarted on
/// another one by [`Node::start_replica`].
pub fn pick_port() -> u16 {
    let low = ephemeral_low();
    let (from, to) = if low >= 4096 {
        (low / 2, low)
    } else {
        (20000, 30000)
    };
    let mut rng = fresh_rng();
    for _ in 0..200 {
        let port = from + rng.below(u64::from(to - from)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    // A crowded range: let the kernel choose (it may be ephemeral).
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free TCP port on 127.0.0.1")
}

/// One node's files in the test directory.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    /// Node name (`--node`).
    pub name: String,
    /// Data store.
    pub data: PathBuf,
    /// Journal.
    pub journal: PathBuf,
    /// Admin socket.
    pub admin: PathBuf,
}

impl NodeFiles {
    /// `<name>.data`, `<name>.journal` and `<name>.admin` in `dir`.
    pub fn new(dir: &TestDir, name: &str) -> NodeFiles {
        NodeFiles {
            name: name.to_string(),
            data: dir.join(&format!("{name}.data")),
            journal: dir.join(&format!("{name}.journal")),
            admin: dir.join(&format!("{name}.admin")),
        }
    }

    /// The volume, node name, admin socket and an ephemeral NBD port.
    fn spec(&self, journal_size: &str, extra: &[&str]) -> NodeSpec {
        NodeSpec {
            name: self.name.clone(),
            export: EXPORT.into(),
            data: self.data.clone(),
            journal: self.journal.clone(),
            size: VOLUME_SIZE.into(),
            journal_size: Some(journal_size.into()),
            listen: "127.0.0.1:0".into(),
            admin: Some(self.admin.clone()),
            extra: extra.iter().map(OsString::from).collect(),
            ..NodeSpec::default()
        }
    }

    /// Flags of a replica accepting its primary on `replication`.
    pub fn replica_args(
        &self,
        secret: &Path,
        replication: SocketAddr,
        journal_size: &str,
        extra: &[&str],
    ) -> Vec<OsString> {
        NodeSpec {
            role: Some(Role::Replica),
            replication_listen: Some(replication.to_string()),
            secret: Some(secret.to_path_buf()),
            ..self.spec(journal_size, extra)
        }
        .args()
    }

    /// Flags of a primary replicating to `peers` (`NAME=HOST:PORT` each).
    pub fn primary_args(
        &self,
        secret: &Path,
        peers: &[String],
        journal_size: &str,
        extra: &[&str],
    ) -> Vec<OsString> {
        let peers = peers
            .iter()
            .map(|p| match p.split_once('=') {
                Some((name, addr)) => (name.to_string(), addr.to_string()),
                None => panic!("peer {p:?} is not NAME=HOST:PORT"),
            })
            .collect();
        NodeSpec {
            role: Some(Role::Primary),
            peers,
            secret: Some(secret.to_path_buf()),
            ..self.spec(journal_size, extra)
        }
        .args()
    }

    /// Flags of a node whose role etcd decides (no `--role`): it accepts a
    /// primary on `replication`, replicates to `peers` (name, `HOST:PORT`)
    /// when it leads, and asks the etcd at `etcd` (`URL[,URL…]`); `extra`
    /// last (the mode, `--unix`, `--lease-ttl`…).
    pub fn coordinated_args(
        &self,
        secret: &Path,
        replication: SocketAddr,
        peers: &[(String, String)],
        etcd: &str,
        extra: &[&str],
    ) -> Vec<OsString> {
        let mut flags = vec!["--etcd", etcd];
        flags.extend_from_slice(extra);
        NodeSpec {
            replication_listen: Some(replication.to_string()),
            peers: peers.to_vec(),
            secret: Some(secret.to_path_buf()),
            ..self.spec(crate::coordinated::JOURNAL, &flags)
        }
        .args()
    }

    /// Flags of a standalone primary on these files: no peers, no secret,
    /// no replication listener (how a replica is promoted for now).
    pub fn standalone_primary_args(&self, journal_size: &str) -> Vec<OsString> {
        NodeSpec {
            role: Some(Role::Primary),
            ..self.spec(journal_size, &[])
        }
        .args()
    }
}

/// A running (or stopped) node of a replicated volume.
#[derive(Debug)]
pub struct Node {
    /// Its files and name.
    pub files: NodeFiles,
    /// The process (killed by PID when dropped).
    pub daemon: Daemon,
    /// Its `--replication-listen` address, for a replica.
    pub replication: Option<SocketAddr>,
}

/// How many times a replica is started on a new port when its
/// replication port turned out to be taken.
const PORT_ATTEMPTS: usize = 5;

impl Node {
    /// Starts replica `name` of [`EXPORT`] in `dir` with `secret`, a journal
    /// of `journal_size` and `extra` flags, on a fixed free replication port.
    #[track_caller]
    pub fn start_replica(
        dir: &TestDir,
        name: &str,
        secret: &Path,
        journal_size: &str,
        extra: &[&str],
    ) -> Node {
        let files = NodeFiles::new(dir, name);
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let addr: SocketAddr = ([127, 0, 0, 1], pick_port()).into();
            match Daemon::try_start(files.replica_args(secret, addr, journal_size, extra)) {
                Ok(daemon) => {
                    return Node {
                        files,
                        daemon,
                        replication: Some(addr),
                    }
                }
                Err(e) if e.log.contains("--replication-listen") && e.status.is_some() => {
                    // Someone took the port between the probe and the bind.
                    last = e.to_string();
                }
                Err(e) => panic!("replica {name} did not start: {e}"),
            }
        }
        panic!("replica {name} could not bind a replication port in {PORT_ATTEMPTS} attempts; last failure: {last}");
    }

    /// Starts primary `name` of [`EXPORT`] in `dir` replicating to
    /// `replicas` with `secret`, a journal of `journal_size` and `extra`
    /// flags (e.g. `--mode async`).
    #[track_caller]
    pub fn start_primary(
        dir: &TestDir,
        name: &str,
        secret: &Path,
        replicas: &[&Node],
        journal_size: &str,
        extra: &[&str],
    ) -> Node {
        let files = NodeFiles::new(dir, name);
        let peers: Vec<String> = replicas.iter().map(|r| r.peer_arg()).collect();
        let daemon = Daemon::try_start(files.primary_args(secret, &peers, journal_size, extra))
            .unwrap_or_else(|e| panic!("primary {name} did not start: {e}"));
        Node {
            files,
            daemon,
            replication: None,
        }
    }

    /// Node name.
    pub fn name(&self) -> &str {
        &self.files.name
    }

    /// `NAME=127.0.0.1:PORT`, for a primary's `--peer`.
    pub fn peer_arg(&self) -> String {
        let addr = self
            .replication
            .unwrap_or_else(|| panic!("{} is not a replica", self.name()));
        format!("{}={addr}", self.name())
    }

    /// The volume's status from the admin socket, or why it could not be had.
    pub fn try_status(&self) -> Result<VolumeStatus, String> {
        cluster::volume_status(&self.files.admin, EXPORT)
            .map_err(|e| format!("{}: {e}", self.name()))
    }

    /// The volume's status from the admin socket.
    #[track_caller]
    pub fn status(&self) -> VolumeStatus {
        self.try_status().unwrap_or_else(|e| panic!("{e}"))
    }

    /// On a primary: its view of replica `peer`.
    #[track_caller]
    pub fn replica_view(&self, peer: &str) -> ReplicaStatus {
        view_of(&self.status(), peer)
    }

    /// Polls this primary until every replica is `in-sync` with no resync
    /// running, and returns that status; panics with the last status seen.
    #[track_caller]
    pub fn wait_replicas_in_sync(&self, timeout: Duration) -> VolumeStatus {
        match cluster::wait_in_sync(&self.files.admin, EXPORT, &[], timeout, &|| false) {
            Ok((_, status)) => status,
            Err(e) => panic!(
                "{}: timed out waiting for every replica in-sync with no resync: {e}",
                self.name()
            ),
        }
    }

    /// Polls the status every 50 ms until `ok` holds and returns it; panics
    /// after `timeout` naming `what` and showing the last status.
    #[track_caller]
    pub fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        mut ok: impl FnMut(&VolumeStatus) -> bool,
    ) -> VolumeStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.try_status() {
                Ok(s) if ok(&s) => return s,
                Ok(s) => format!("{s:#?}"),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!(
                    "{}: timed out after {timeout:?} waiting for {what}; last status:\n{last}",
                    self.name()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Log lines of the current (or last) run containing `needle`.
    pub fn log_lines_with(&self, needle: &str) -> Vec<String> {
        self.daemon
            .log_lines()
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect()
    }

    /// Freezes the process (SIGSTOP, by PID): it answers nothing, but its
    /// sockets stay open, like a node that hangs. A frozen node is still
    /// killed when dropped.
    pub fn freeze(&self) {
        let pid = self.daemon.pid();
        send_signal(pid, libc::SIGSTOP);
        // kill(2) returns before the stop lands: wait (bounded) until every
        // thread is stopped, so nothing the test does next can be served
        // by a replica still running for a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !all_threads_stopped(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "process {pid} did not stop within 5 s of SIGSTOP"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Lets a frozen process run again (SIGCONT, by PID).
    pub fn thaw(&self) {
        send_signal(self.daemon.pid(), libc::SIGCONT);
    }

    /// SIGTERM and wait; panics (with the log) unless it exits with status 0.
    #[track_caller]
    pub fn stop(&mut self) {
        let st = self.daemon.terminate();
        assert!(
            st.success(),
            "{} exited with {st} after SIGTERM (want 0); its log:\n{}",
            self.name(),
            self.daemon.full_log()
        );
    }
}

/// Whether every thread of `pid` is in the stopped state ('T' in /proc).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            return false;
        };
        // The state follows the parenthesised command name.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        if !matches!(state, Some('T') | Some('t')) {
            return false;
        }
        any = true;
    }
    any
}

fn send_signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}) failed: {}",
        std::io::Error::last_os_error()
    );
}

/// Replica `peer` in a primary's status.
#[track_caller]
pub fn view_of(status: &VolumeStatus, peer: &str) -> ReplicaStatus {
    status
        .replicas
        .iter()
        .find(|r| r.peer == peer)
        .cloned()
        .unwrap_or_else(|| panic!("the primary's status lists no replica {peer}: {status:#?}"))
}

/// Where two files first differ, compared 1 MiB at a time; None if they
/// are byte-identical.
pub fn files_differ(a: &Path, b: &Path) -> Option<String> {
    let open = |p: &Path| File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let (la, lb) = (
        fa.metadata().expect("metadata").len(),
        fb.metadata().expect("metadata").len(),
    );
    if la != lb {
        return Some(format!("sizes differ: {la} vs {lb} bytes"));
    }
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut at = 0u64;
    while at < la {
        let n = (la - at).min(MIB) as usize;
        fa.read_exact(&mut ba[..n]).expect("read store");
        fb.read_exact(&mut bb[..n]).expect("read store");
        if let Some(d) = first_difference(at, &ba[..n], &bb[..n]) {
            return Some(d);
        }
        at += n as u64;
    }
    None
}

/// Asserts every node's data store is byte-identical to the first one's
/// (call it once all of them are stopped).
#[track_caller]
pub fn assert_stores_identical(nodes: &[&Node]) {
    let (first, rest) = nodes.split_first().expect("at least one node");
    for n in rest {
        if let Some(d) = files_differ(&first.files.data, &n.files.data) {
            panic!(
                "data store of {} differs from {}'s: {d}",
                n.name(),
                first.name()
            );
        }
    }
}

/// The admin CLI binary, next to the daemon: built here when missing or
/// older than its sources (once per test process), unless `MIRRORBLKD`
/// names the daemon (binaries installed elsewhere are used as they are).
pub fn mirrorblk_cli() -> PathBuf {
    static CLI: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CLI.get_or_init(|| {
        let daemon = crate::daemon::mirrorblkd_path();
        let cli = daemon.with_file_name("mirrorblk");
        match cli.parent() {
            Some(dir) if std::env::var_os("MIRRORBLKD").is_none() => {
                crate::daemon::ensure_built_spec(&cli, dir, &crate::daemon::CLI)
            }
            _ => {}
        }
        cli
    })
    .clone()
}

/// `mirrorblk certs init DIR EXTRA…`: a CA and server and client
/// certificates in the layout qemu, nbdkit and libnbd share; panics with
/// the CLI's message when it fails.
pub fn certs_init(dir: &std::path::Path, extra: &[&str]) {
    let o = std::process::Command::new(mirrorblk_cli())
        .args(["certs", "init"])
        .arg(dir)
        .args(extra)
        .output()
        .expect("run mirrorblk certs init");
    assert!(
        o.status.success(),
        "certs init failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
/// What a `mirrorblk` run printed and how it ended.
#[derive(Debug)]
pub struct CliRun {
    /// Exit code (-1: killed at the deadline).
    pub code: i32,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl Node {
    /// Runs `mirrorblk --admin-socket <this node's> ARGS…`, killed (by its
    /// PID) if it runs longer than `limit`.
    pub fn cli(&self, args: &[&str], limit: Duration) -> CliRun {
        use std::process::{Command, Stdio};
        let mut child = Command::new(mirrorblk_cli())
            .arg("--admin-socket")
            .arg(&self.files.admin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the mirrorblk CLI");
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let ereader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + limit;
        let code = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break st.code().unwrap_or(-1);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break -1;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        CliRun {
            code,
            stdout: reader.join().unwrap_or_default(),
            stderr: ereader.join().unwrap_or_default(),
        }
    }
}
