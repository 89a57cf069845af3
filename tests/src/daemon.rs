//! Running `mirrorblkd` under test: start it on an ephemeral port, read its
//! log, stop it cleanly, crash it with `kill -9`, restart it on the same files.
//!
//! A daemon is ready when its admin socket answers `status` with the
//! addresses it serves on ([`mirrorblk_admin::probe`]); a daemon started
//! without `--admin-socket` is given one by the harness. A restart, also a
//! role change's re-exec under the same PID, shows as a new run (pid and
//! start time) in that answer.
//!
//! Processes are only ever signalled by their own PID, and every daemon still
//! running when its [`Daemon`] is dropped is killed (also when a test panics,
//! in which case its log is printed so the failure can be understood).

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use mirrorblk_admin::Ready;
use nbd::Client;

/// How long a daemon may take from exec to serving (debug builds, journal
/// creation, recovery of a full journal, a loaded 2-core machine).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Socket timeout for test clients: a server that stops answering fails the
/// test instead of hanging it.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

/// The log line that tells a human the daemon serves, followed by the bound
/// address (the harness itself asks the admin socket).
pub const SERVING: &str = "serving NBD on ";
/// How often a starting daemon's admin socket is asked whether it serves.
const READY_POLL: Duration = Duration::from_millis(20);

/// The `--admin-socket` value in `args`, if they give one.
fn admin_socket_in(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--admin-socket" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.to_str().and_then(|a| a.strip_prefix("--admin-socket=")) {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// An admin socket path of the harness's own, for a daemon started without
/// one (short: a Unix socket path is limited to 108 bytes).
fn harness_admin_socket() -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("mirrorblk-h{}-{n}.admin", std::process::id()))
}

/// The admin socket a daemon with `args` is polled on, and the arguments
/// it runs with (`args` plus `--admin-socket` when they give none).
fn with_admin_socket(args: &[OsString], own: &Path) -> (PathBuf, Vec<OsString>) {
    match admin_socket_in(args) {
        Some(path) => (path, args.to_vec()),
        None => {
            let mut a = args.to_vec();
            a.push("--admin-socket".into());
            a.push(own.into());
            (own.to_path_buf(), a)
        }
    }
}

// ---------------------------------------------------------------------------
// Locating (and if needed building) the binary
// ---------------------------------------------------------------------------

/// Path of the `mirrorblkd` binary under test.
///
/// `MIRRORBLKD` overrides it and is used as is. Otherwise it is
/// `target/<profile>/mirrorblkd`, found from this test executable's path
/// (`target/<profile>/deps/<test>`). `cargo nextest run --workspace` builds
/// only the test targets, not the daemon binary, so when that file is missing
/// or older than the server or protocol sources it is built once with
/// `cargo build -p mirrorblk-server --bin mirrorblkd` (cargo's own lock
/// serialises concurrent test processes).
pub fn mirrorblkd_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("MIRRORBLKD") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("cannot find the test executable's path");
        let mut profile_dir = exe
            .parent()
            .expect("test executable has a parent directory")
            .to_path_buf();
        if profile_dir.file_name() == Some(OsStr::new("deps")) {
            profile_dir.pop();
        }
        let bin = profile_dir.join("mirrorblkd");
        ensure_built(&bin, &profile_dir);
        bin
    })
    .clone()
}

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return meta.modified().ok();
    }
    let mut newest = None;
    for entry in std::fs::read_dir(path).ok()?.flatten() {
        let m = newest_mtime(&entry.path());
        newest = newest.max(m);
    }
    newest
}

/// The workspace crates the `mirrorblk` CLI is built from (sources and
/// manifests, relative to the workspace root): its own, then those of
/// `mirrorblkd` ([`DAEMON_SOURCES`]).
const CLI_SOURCES: [&str; 6] = ["tools", "server", "nbd", "admin", "etcd", "backup"];
/// The workspace crates `mirrorblkd` is built from: the CLI's but `tools`.
const DAEMON_SOURCES: &[&str] = CLI_SOURCES.split_at(1).1;

/// A binary of the workspace and what it is built from.
pub struct BinarySpec {
    /// The cargo package.
    pub package: &'static str,
    /// The binary's name.
    pub name: &'static str,
    /// Workspace crates (directories) whose `src/` and `Cargo.toml` it is
    /// built from, besides `Cargo.lock`.
    pub crates: &'static [&'static str],
}

/// `mirrorblkd`.
pub const DAEMON: BinarySpec = BinarySpec {
    package: "mirrorblk-server",
    name: "mirrorblkd",
    crates: DAEMON_SOURCES,
};

/// The `mirrorblk` CLI.
pub const CLI: BinarySpec = BinarySpec {
    package: "mirrorblk-tools",
    name: "mirrorblk",
    crates: &CLI_SOURCES,
};

/// Builds `bin` (of `spec`, in `profile_dir`) when it is missing or older
/// than any of its sources: a target directory copied from another tree, or
/// a test run that built only the test crates, would otherwise test a stale
/// binary.
pub fn ensure_built_spec(bin: &Path, profile_dir: &Path, spec: &BinarySpec) {
    let root = workspace_root();
    let newest_source = spec
        .crates
        .iter()
        .flat_map(|c| [root.join(c).join("src"), root.join(c).join("Cargo.toml")])
        .chain(std::iter::once(root.join("Cargo.lock")))
        .filter_map(|p| newest_mtime(&p))
        .max();
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
    let reason = match (built, newest_source) {
        (None, _) => "it does not exist",
        (Some(b), Some(s)) if s > b => "it is older than its sources",
        _ => return,
    };
    eprintln!("building {} because {reason}", bin.display());
    let profile = match profile_dir.file_name().and_then(OsStr::to_str) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // `--workspace --tests`, not `-p PACKAGE`: the feature set the test
    // build itself used (the whole workspace's, dev-dependencies included),
    // so only the binary is built again; a `-p` build compiled the server
    // library again with other features. With the variables below, a
    // rebuild inside a test took over a minute: long enough for its load to
    // end before the step it times.
    cmd.current_dir(&root).args([
        "build",
        "--workspace",
        "--tests",
        "--bin",
        spec.name,
        "--profile",
        &profile,
    ]);
    if let Some(target_dir) = profile_dir.parent() {
        cmd.arg("--target-dir").arg(target_dir);
    }
    // What cargo set for this test run describes the test, not the build:
    // a build script tracking one (ring's tracks CARGO_MANIFEST_DIR) would
    // be built again, and again by the next `cargo test` without it.
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_for_a_test_run) {
            cmd.env_remove(name);
        }
    }
    let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
    if !ok {
        // Someone may be half-way through editing the sources: an existing
        // binary is still better than no test run, but say so loudly.
        assert!(
            bin.exists(),
            "could not build {} (run `cargo build -p {}`)",
            bin.display(),
            spec.package
        );
        eprintln!(
            "WARNING: building {} failed; testing the existing, possibly stale {}",
            spec.name,
            bin.display()
        );
    }
}

/// Whether `name` is an environment variable cargo sets for the test binary
/// it runs (the test's package, crate and binaries), as opposed to one that
/// configures cargo itself.
fn set_for_a_test_run(name: &str) -> bool {
    const PREFIXES: [&str; 5] = [
        "CARGO_MANIFEST_",
        "CARGO_PKG_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_PRIMARY_",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p)) || name == "CARGO_TARGET_TMPDIR"
}

fn ensure_built(bin: &Path, profile_dir: &Path) {
    ensure_built_spec(bin, profile_dir, &DAEMON);
}

// ---------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------

/// A test's own temporary directory, deleted when dropped (kept, and its
/// path printed, if the test panicked and `MIRRORBLK_KEEP_TMP` is set).
#[derive(Debug)]
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl TestDir {
    /// Creates a fresh directory under the system temporary directory.
    pub fn new() -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("mirrorblk-test-")
            .tempdir()
            .expect("cannot create a temporary directory");
        TestDir { dir: Some(dir) }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("TestDir is alive").path()
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    /// Flags for one volume named `export` of `size` (e.g. "64M") with data
    /// and journal files in this directory, a 64M journal, and an ephemeral
    /// port on 127.0.0.1.
    pub fn volume_args(&self, export: &str, size: &str) -> Vec<OsString> {
        vec![
            "--export".into(),
            export.into(),
            "--data".into(),
            self.join(&format!("{export}.data")).into(),
            "--journal".into(),
            self.join(&format!("{export}.journal")).into(),
            "--size".into(),
            size.into(),
            "--journal-size".into(),
            "64M".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ]
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("MIRRORBLK_KEEP_TMP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("keeping test directory {}", d.keep().display());
            }
        }
    }
}

/// Replaces the value of `--listen` in a daemon's `args` with `addr`.
/// Panics if there is no `--listen` (every argument list the harness
/// builds has one).
pub fn set_listen(args: &mut [OsString], addr: &str) {
    let i = args
        .iter()
        .position(|a| a == "--listen")
        .expect("the daemon arguments have --listen");
    args[i + 1] = addr.into();
}

/// Converts anything string-like into an argument list.
pub fn args<I, S>(items: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    items
        .into_iter()
        .map(|s| s.as_ref().to_os_string())
        .collect()
}

// ---------------------------------------------------------------------------
// Captured output
// ---------------------------------------------------------------------------

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    closed: bool,
}

/// Lines of one output stream, filled by a reader thread.
#[derive(Default)]
struct Log {
    state: Mutex<LogState>,
    cond: Condvar,
}

impl Log {
    /// Starts a thread that appends every line of `stream` until it closes.
    fn capture(stream: impl Read + Send + 'static) -> Arc<Log> {
        let log = Arc::new(Log::default());
        let l = log.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let s = String::from_utf8_lossy(&line)
                            .trim_end_matches(['\n', '\r'])
                            .to_string();
                        l.state.lock().unwrap().lines.push(s);
                        l.cond.notify_all();
                    }
                }
            }
            l.state.lock().unwrap().closed = true;
            l.cond.notify_all();
        });
        log
    }

    fn text(&self) -> String {
        let s = self.state.lock().unwrap();
        let mut t = s.lines.join("\n");
        if !t.is_empty() {
            t.push('\n');
        }
        t
    }

    fn lines(&self) -> Vec<String> {
        self.state.lock().unwrap().lines.clone()
    }

    /// Waits up to `timeout` for a line containing `needle`.
    fn wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().unwrap();
        loop {
            if let Some(l) = s.lines.iter().find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if s.closed || now >= deadline {
                return None;
            }
            s = self.cond.wait_timeout(s, deadline - now).unwrap().0;
        }
    }

    /// Waits up to `timeout` for the stream to close (the process exited).
    fn wait_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().unwrap();
        while !s.closed {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            s = self.cond.wait_timeout(s, deadline - now).unwrap().0;
        }
    }
}

/// Sends `sig` to `pid` (a process this harness started).
fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with our own child's pid; no memory is involved.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// The exit status of `pid` (a child, or an orphan this subreaper
/// inherited), if it has exited; reaps it.
fn try_wait_pid(pid: u32) -> Option<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let mut status = 0;
    // SAFETY: waitpid on one pid with WNOHANG; `status` is ours.
    let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    (r == pid as libc::pid_t).then(|| ExitStatus::from_raw(status))
}

/// Whether `pid` exists and is not a zombie.
fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

/// Waits up to `timeout` for `pid` to exit and reaps it: its status when
/// this process could reap it, a stand-in (killed) when another did.
fn wait_pid(pid: u32, timeout: Duration) -> Option<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = try_wait_pid(pid) {
            return Some(st);
        }
        if !pid_alive(pid) {
            // Exiting since the first look: reap it once it is waitable (if
            // it is ours; another reaper leaves a stand-in status).
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                if let Some(st) = try_wait_pid(pid) {
                    return Some(st);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            return Some(ExitStatus::from_raw(libc::SIGKILL));
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits up to `timeout` for `child` to exit.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// A running daemon
// ---------------------------------------------------------------------------

/// Why a daemon did not start serving.
#[derive(Debug)]
pub struct StartFailure {
    /// Exit status, if it exited (None: it hung and was killed).
    pub status: Option<ExitStatus>,
    /// Everything it wrote on stderr.
    pub log: String,
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(st) => write!(
                f,
                "mirrorblkd exited with {st} before serving; its log:\n{}",
                self.log
            ),
            None => write!(
                f,
                "mirrorblkd did not start serving within {START_TIMEOUT:?} (killed); its log:\n{}",
                self.log
            ),
        }
    }
}

/// A `mirrorblkd` process started by this test, with its stderr log.
///
/// The same `Daemon` can be stopped and started again on the same arguments
/// (same files); each run's log is kept separately.
pub struct Daemon {
    bin: PathBuf,
    /// A command the daemon runs under (`ip netns exec NS`), which execs it
    /// in place, so the PID is the daemon's own.
    prefix: Vec<OsString>,
    args: Vec<OsString>,
    child: Option<Child>,
    runs: Vec<Arc<Log>>,
    /// The admin socket given to daemons started without one.
    own_admin: PathBuf,
    /// The current run, as its admin socket reported it.
    ready: Option<Ready>,
    last_exit: Option<ExitStatus>,
    /// The process serving since a live restart (`mirrorblk restart`): the
    /// old one's child, which the harness (a subreaper) inherits and reaps.
    adopted: Option<u32>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("args", &self.args)
            .field("pid", &self.child.as_ref().map(Child::id))
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Starts `mirrorblkd` with `args` and waits until it serves; panics with
    /// its log if it does not.
    #[track_caller]
    pub fn start<I, S>(args: I) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Daemon::try_start(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `mirrorblkd` with `args` and waits until it serves.
    pub fn try_start<I, S>(args: I) -> Result<Daemon, StartFailure>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Daemon::try_start_under(Vec::new(), args)
    }

    /// Starts `mirrorblkd` with `args` inside network namespace `netns`
    /// (through `ip netns exec`, which execs the daemon in place).
    pub fn try_start_in_netns<I, S>(netns: &str, args: I) -> Result<Daemon, StartFailure>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Daemon::try_start_under(
            vec!["ip".into(), "netns".into(), "exec".into(), netns.into()],
            args,
        )
    }

    fn try_start_under<I, S>(prefix: Vec<OsString>, args: I) -> Result<Daemon, StartFailure>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut d = Daemon {
            bin: mirrorblkd_path(),
            prefix,
            args: self::args(args),
            child: None,
            runs: Vec::new(),
            own_admin: harness_admin_socket(),
            ready: None,
            last_exit: None,
            adopted: None,
        };
        d.spawn()?;
        Ok(d)
    }

    fn spawn(&mut self) -> Result<(), StartFailure> {
        assert!(self.child.is_none(), "daemon is already running");
        let (admin, args) = with_admin_socket(&self.args, &self.own_admin);
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let mut child = cmd
            .args(&args)
            // The log level comes from the flags only, whatever the caller's environment says.
            .env_remove("MIRRORBLK_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        let stderr: ChildStderr = child.stderr.take().expect("stderr is piped");
        let log = Log::capture(stderr);
        self.runs.push(log.clone());
        self.ready = None;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // The previous run has exited, so whatever answers is this one.
            if let Some(ready) = mirrorblk_admin::probe(&admin) {
                self.ready = Some(ready);
                self.child = Some(child);
                return Ok(());
            }
            if let Ok(Some(st)) = child.try_wait() {
                log.wait_closed(Duration::from_secs(5));
                self.last_exit = Some(st);
                return Err(StartFailure {
                    status: Some(st),
                    log: log.text(),
                });
            }
            if Instant::now() >= deadline {
                signal(child.id(), libc::SIGKILL);
                let _ = child.wait();
                return Err(StartFailure {
                    status: None,
                    log: log.text(),
                });
            }
            std::thread::sleep(READY_POLL);
        }
    }

    /// Starts the daemon again with the same arguments (it must be stopped).
    #[track_caller]
    pub fn restart(&mut self) {
        if let Err(e) = self.spawn() {
            panic!("restart failed: {e}");
        }
    }

    /// Starts the daemon again with new arguments (it must be stopped).
    #[track_caller]
    pub fn restart_with<I, S>(&mut self, args: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args = self::args(args);
        self.restart();
    }

    /// Starts the daemon again, returning the failure instead of panicking.
    pub fn try_restart(&mut self) -> Result<(), StartFailure> {
        self.spawn()
    }

    /// The arguments it runs with.
    pub fn args(&self) -> &[OsString] {
        &self.args
    }

    /// PID of the running daemon.
    pub fn pid(&self) -> u32 {
        if let Some(pid) = self.adopted {
            return pid;
        }
        self.child.as_ref().expect("daemon is not running").id()
    }

    /// Makes this harness process a child subreaper, so that a daemon's
    /// successor at a live restart becomes its child once the old daemon
    /// exits (and can be waited for and reaped here).
    pub fn become_subreaper() {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(r, 0, "prctl(PR_SET_CHILD_SUBREAPER)");
    }

    /// After a live restart that answered `pid`: waits (up to `timeout`)
    /// for the old process to exit, then follows `pid` as this daemon (the
    /// same log: it inherited the old one's stderr). Returns the old
    /// process's exit status.
    #[track_caller]
    pub fn follow_successor(&mut self, pid: u32, timeout: Duration) -> ExitStatus {
        if let Some(old) = self.adopted.take() {
            let st = wait_pid(old, timeout).unwrap_or_else(|| {
                panic!("the old daemon (pid {old}) did not exit within {timeout:?}")
            });
            self.adopted = Some(pid);
            self.last_exit = Some(st);
            return st;
        }
        let mut child = self.child.take().expect("daemon is not running");
        let st = wait_timeout(&mut child, timeout).unwrap_or_else(|| {
            panic!(
                "the old daemon (pid {}) did not exit within {timeout:?}; its log:\n{}",
                child.id(),
                self.log()
            )
        });
        self.adopted = Some(pid);
        self.last_exit = Some(st);
        st
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        if let Some(pid) = self.adopted {
            return try_wait_pid(pid).is_none() && pid_alive(pid);
        }
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Panics (with the log) if the daemon has died, e.g. crashed on bad input.
    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Some(pid) = self.adopted {
            assert!(
                self.is_running(),
                "mirrorblkd (pid {pid}, taken over at a live restart) died; its log:\n{}",
                self.log()
            );
            return;
        }
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                let log = self.runs.last().map(|l| {
                    l.wait_closed(Duration::from_secs(5));
                    l.text()
                });
                panic!(
                    "mirrorblkd died with {st}; its log:\n{}",
                    log.unwrap_or_default()
                );
            }
        } else {
            panic!("mirrorblkd is not running");
        }
    }

    /// Resident memory of the running daemon in bytes (VmRSS from /proc), to
    /// check that hostile input cannot make it allocate without bound.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .expect("VmRSS in /proc/PID/status")
    }

    /// The TCP address it serves on (from its admin socket's status).
    pub fn addr(&self) -> SocketAddr {
        self.ready().listen.nbd
    }

    /// The current run as its admin socket reported it when it became ready.
    pub fn ready(&self) -> &Ready {
        self.ready.as_ref().expect("daemon has not started serving")
    }

    /// The admin socket the harness asks (the one its arguments give, or
    /// the harness's own when they give none).
    pub fn admin_socket(&self) -> PathBuf {
        admin_socket_in(&self.args).unwrap_or_else(|| self.own_admin.clone())
    }

    /// The TCP port it serves on.
    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr())
    }

    /// A raw TCP connection with the test socket timeouts.
    pub fn tcp(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr())
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.addr()));
        s.set_read_timeout(Some(CLIENT_TIMEOUT))
            .expect("set_read_timeout");
        s.set_write_timeout(Some(CLIENT_TIMEOUT))
            .expect("set_write_timeout");
        let _ = s.set_nodelay(true);
        s
    }

    /// An NBD client attached to `export` (simple replies).
    #[track_caller]
    pub fn connect(&self, export: &str) -> Client<TcpStream> {
        Client::connect(self.tcp(), export, false)
            .unwrap_or_else(|e| panic!("NBD handshake for '{export}' failed: {e}"))
    }

    /// An NBD client attached to `export` with structured replies and
    /// `base:allocation`.
    #[track_caller]
    pub fn connect_structured(&self, export: &str) -> Client<TcpStream> {
        Client::connect(self.tcp(), export, true)
            .unwrap_or_else(|e| panic!("NBD handshake for '{export}' failed: {e}"))
    }

    /// Waits until a run other than `before` (see [`Daemon::ready`])
    /// serves: a daemon that changes role re-executes itself in place, same
    /// PID, and serves again, on a new port when it listens on port 0.
    /// Panics with the log on timeout.
    #[track_caller]
    pub fn wait_serving_again(&mut self, before: &Ready, timeout: Duration) {
        let admin = self.admin_socket();
        let deadline = Instant::now() + timeout;
        loop {
            match mirrorblk_admin::probe(&admin) {
                Some(now) if !now.same_run(before) => {
                    self.ready = Some(now);
                    return;
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                panic!(
                    "the daemon did not serve again within {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log of the current (or last) run.
    pub fn log(&self) -> String {
        self.runs.last().map(|l| l.text()).unwrap_or_default()
    }

    /// The log lines of the current (or last) run.
    pub fn log_lines(&self) -> Vec<String> {
        self.runs.last().map(|l| l.lines()).unwrap_or_default()
    }

    /// The logs of every run so far, each headed by its run number.
    pub fn full_log(&self) -> String {
        let mut t = String::new();
        for (i, l) in self.runs.iter().enumerate() {
            t.push_str(&format!("--- mirrorblkd run {} ---\n", i + 1));
            t.push_str(&l.text());
        }
        t
    }

    /// Waits up to `timeout` for a log line of the current run containing
    /// `needle` and returns it; panics with the log otherwise.
    #[track_caller]
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let log = self.runs.last().expect("daemon was started");
        log.wait_for(needle, timeout).unwrap_or_else(|| {
            panic!(
                "no log line containing {needle:?} within {timeout:?}; the log:\n{}",
                log.text()
            )
        })
    }

    /// `kill -9` (by PID) and reap it. The log is complete afterwards.
    pub fn kill9(&mut self) {
        if let Some(pid) = self.adopted.take() {
            signal(pid, libc::SIGKILL);
            self.last_exit = wait_pid(pid, STOP_TIMEOUT);
            if let Some(l) = self.runs.last() {
                l.wait_closed(Duration::from_secs(5));
            }
            return;
        }
        let mut child = self.child.take().expect("daemon is not running");
        signal(child.id(), libc::SIGKILL);
        let st = child.wait().expect("wait for killed daemon");
        self.last_exit = Some(st);
        if let Some(l) = self.runs.last() {
            l.wait_closed(Duration::from_secs(5));
        }
    }

    /// SIGTERM (by PID) and wait for a clean exit; returns the exit status.
    /// Panics if it does not exit within [`STOP_TIMEOUT`] (it is then killed).
    #[track_caller]
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(pid) = self.adopted.take() {
            signal(pid, libc::SIGTERM);
            let st = wait_pid(pid, STOP_TIMEOUT).unwrap_or_else(|| {
                signal(pid, libc::SIGKILL);
                let _ = wait_pid(pid, STOP_TIMEOUT);
                panic!("mirrorblkd (pid {pid}) did not exit within {STOP_TIMEOUT:?} of SIGTERM; its log:\n{}", self.log())
            });
            self.last_exit = Some(st);
            if let Some(l) = self.runs.last() {
                l.wait_closed(Duration::from_secs(5));
            }
            return st;
        }
        let mut child = self.child.take().expect("daemon is not running");
        signal(child.id(), libc::SIGTERM);
        let st = match wait_timeout(&mut child, STOP_TIMEOUT) {
            Some(st) => st,
            None => {
                signal(child.id(), libc::SIGKILL);
                let _ = child.wait();
                panic!(
                    "mirrorblkd did not exit within {STOP_TIMEOUT:?} of SIGTERM; its log:\n{}",
                    self.log()
                );
            }
        };
        self.last_exit = Some(st);
        if let Some(l) = self.runs.last() {
            l.wait_closed(Duration::from_secs(5));
        }
        st
    }

    /// Exit status of the last run that ended.
    pub fn last_exit(&self) -> Option<ExitStatus> {
        self.last_exit
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.adopted.take() {
            signal(pid, libc::SIGKILL);
            let _ = wait_pid(pid, Duration::from_secs(10));
        }
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.own_admin);
        if std::thread::panicking() {
            eprintln!("{}", self.full_log());
        }
    }
}

// ---------------------------------------------------------------------------
// Runs that are expected to end (configuration errors, --help)
// ---------------------------------------------------------------------------

/// How a run that should have ended by itself went.
#[derive(Debug)]
pub struct Exited {
    /// Its exit status; None if it had to be killed (it kept running).
    pub status: Option<ExitStatus>,
    /// Whether it got as far as serving NBD.
    pub served: bool,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// Time from exec to exit (or to being killed).
    pub elapsed: Duration,
}

impl Exited {
    /// The exit code, or -1 if it was killed.
    pub fn code(&self) -> i32 {
        self.status.and_then(|s| s.code()).unwrap_or(-1)
    }

    /// Stderr lines that are not tracing log lines (those start with a
    /// timestamp): the daemon's own messages, like `mirrorblkd: ...`.
    pub fn message_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty() && !is_log_line(l))
            .collect()
    }
}

/// Whether a stderr line is a tracing log line (`2026-01-01T00:00:00.000Z  INFO ...`).
fn is_log_line(l: &str) -> bool {
    let b = l.as_bytes();
    b.len() > 20 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[10] == b'T'
}

/// Runs `mirrorblkd` with `args` and waits up to `timeout` for it to exit.
/// If it starts serving (its admin socket says so; the harness gives it one
/// when `args` do not) or is still running at the deadline it is killed and
/// `status` is None.
pub fn run_to_exit<I, S>(args: I, timeout: Duration) -> Exited
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let bin = mirrorblkd_path();
    let own_admin = harness_admin_socket();
    let (admin, args) = with_admin_socket(&self::args(args), &own_admin);
    let start = Instant::now();
    let mut child = Command::new(&bin)
        .args(args)
        .env_remove("MIRRORBLK_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let out = Log::capture(child.stdout.take().expect("piped"));
    let err = Log::capture(child.stderr.take().expect("piped"));
    let deadline = start + timeout;
    let mut served = false;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if mirrorblk_admin::probe(&admin).is_some() {
            served = true;
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
        if served || Instant::now() >= deadline {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
            break None;
        }
    };
    let elapsed = start.elapsed();
    let _ = std::fs::remove_file(&own_admin);
    out.wait_closed(Duration::from_secs(5));
    err.wait_closed(Duration::from_secs(5));
    Exited {
        status,
        served,
        stdout: out.text(),
        stderr: err.text(),
        elapsed,
    }
}

#[cfg(test)]
mod tests {
    use super::set_for_a_test_run;

    #[test]
    fn a_nested_build_drops_what_describes_the_test_and_keeps_what_configures_cargo() {
        for (name, dropped) in [
            ("CARGO_MANIFEST_DIR", true),
            ("CARGO_MANIFEST_PATH", true),
            ("CARGO_PKG_NAME", true),
            ("CARGO_CRATE_NAME", true),
            ("CARGO_BIN_EXE_delay-proxy", true),
            ("CARGO_PRIMARY_PACKAGE", true),
            ("CARGO_TARGET_TMPDIR", true),
            ("CARGO_HOME", false),
            ("CARGO_TARGET_DIR", false),
            ("CARGO_BUILD_JOBS", false),
            ("CARGO_INCREMENTAL", false),
            ("CARGO", false),
            ("RUSTFLAGS", false),
        ] {
            assert_eq!(set_for_a_test_run(name), dropped, "{name}");
        }
    }
}
