//! What is measured: the targets (mirrorblkd, its peers, the raw file), how to
//! start and stop each one, and what a completed write means on each.
//!
//! Targets are data, not code paths: a new one is one more [`Target`] value
//! with different arguments, see [`mirrorblk_variant`]; a replicated one also
//! carries a [`Replication`] (see `cluster.rs`, which starts its processes).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cluster::{self, Replication};
use crate::error::{Error, IoContext, Result};
use crate::fio::Charged;

/// Longest wait for a server to accept connections (mirrorblkd zero-fills a
/// new 256 MiB journal before it listens, which takes seconds on a slow disk).
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a server gets to exit after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest run of a `--version`-style availability probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Start attempts when we choose a port (another process may take the free
/// port we found before the server binds it).
const START_ATTEMPTS: usize = 3;
/// Placeholders of server arguments replaced by a port we choose free.
const CHOSEN_PORTS: [&str; 3] = ["port", "metrics_port", "repl_port"];
/// The write jobs: what a replicated target runs (reads never touch the
/// replicas: they are served by the primary alone, as with 0 replicas).
pub const WRITE_JOBS: [&str; 4] = [
    "4k-randwrite-qd1",
    "4k-randwrite-qd32",
    "64k-randrw70-qd16",
    "1m-write-qd8",
];

/// How a target is reached.
#[derive(Debug, Clone)]
pub enum Launch {
    /// fio runs on the volume file itself with io_uring and O_DIRECT: the
    /// disk's limit, no server, no network.
    Direct {
        /// Extra fio options (e.g. `--sync=dsync`).
        fio_args: Vec<String>,
    },
    /// A server process that fio reaches with its nbd engine.
    Server {
        /// The program (a name looked up in PATH, or a path).
        program: PathBuf,
        /// Arguments; `{port}`, `{file}`, `{journal}` and `{size}` (bytes)
        /// are replaced when it starts, and so is `{metrics_port}` (a
        /// free port for `--metrics-listen`).
        args: Vec<String>,
        /// How the listening port is decided.
        port: PortMode,
        /// Extra argument lists that must run successfully for the target to
        /// be usable (e.g. `nbdkit memory --version` checks the plugin).
        probes: Vec<Vec<String>>,
    },
}

/// How a server's TCP port is decided.
#[derive(Debug, Clone)]
pub enum PortMode {
    /// We find a free port and pass it as `{port}`.
    Chosen,
    /// The server binds port 0 and logs a line containing `marker` followed
    /// by `HOST:PORT` on stderr (`delay-proxy`: "listening on 127.0.0.1:PORT").
    Logged {
        /// Text just before the address.
        marker: String,
        /// Whether readiness also needs a TCP connection to succeed (not
        /// for a proxy, where a connection would reach the thing behind it).
        connect: bool,
    },
    /// mirrorblkd: it binds port 0 and is ready once its admin socket
    /// (`socket`, placeholders allowed, e.g. `{admin}`) answers `status`
    /// with the addresses it serves on; the NBD port comes from there.
    Admin {
        /// The `--admin-socket` path it is started with.
        socket: String,
    },
}

/// One thing to measure.
#[derive(Debug, Clone)]
pub struct Target {
    /// Short name used on the command line and in the table.
    pub name: String,
    /// How it is reached.
    pub launch: Launch,
    /// NBD export name to ask for.
    pub export: String,
    /// One line: when is a completed write durable on this target.
    pub durability: String,
    /// Whether this is one of the peers the ratios are taken against.
    pub peer: bool,
    /// Whether it needs a journal file next to the data file.
    pub needs_journal: bool,
    /// Whether it runs when `--targets` is not given.
    pub in_default: bool,
    /// For a replicated mirrorblkd: its replicas, mode and link.
    pub replication: Option<Replication>,
    /// Only these jobs run on it (`None`: every job).
    pub jobs: Option<Vec<String>>,
}

/// The files of one fresh volume.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Data file (sparse, `size` bytes).
    pub file: PathBuf,
    /// Journal path (created by the server when it needs one).
    pub journal: PathBuf,
    /// Size in bytes.
    pub size: u64,
}

impl Volume {
    /// The admin socket of a mirrorblkd serving this volume (`{admin}`):
    /// `NAME.admin` next to the data file.
    pub fn admin_socket(&self) -> PathBuf {
        self.file.with_extension("admin")
    }

    /// Creates `dir/NAME.img` of `size` bytes (sparse) and names the journal
    /// `dir/NAME.journal`.
    pub fn create(dir: &Path, name: &str, size: u64) -> Result<Volume> {
        let file = dir.join(format!("{name}.img"));
        let f = File::create(&file).ctx(|| format!("cannot create {}", file.display()))?;
        f.set_len(size)
            .ctx(|| format!("cannot size {} to {size} bytes", file.display()))?;
        Ok(Volume {
            file,
            journal: dir.join(format!("{name}.journal")),
            size,
        })
    }
}

/// The targets of the default comparison, in table order.
/// `mirrorblkd` is the daemon binary to run.
pub fn builtin(mirrorblkd: &Path) -> Vec<Target> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        Target {
            name: "raw".into(),
            launch: Launch::Direct { fio_args: vec![] },
            export: String::new(),
            durability: "fio io_uring O_DIRECT on the file, no server: reaches the device, \
                         durable against power loss only after a device cache flush (fio sends none)"
                .into(),
            peer: false,
            needs_journal: false,
            in_default: true,
            replication: None,
            jobs: None,
        },
        // Not in the default run (it would push it past 10 minutes): the
        // disk's limit for mirrorblk's promise, every write durable at completion.
        Target {
            name: "raw-dsync".into(),
            launch: Launch::Direct {
                fio_args: s(&["--sync=dsync"]),
            },
            export: String::new(),
            durability: "fio io_uring O_DIRECT+O_DSYNC on the file, no server: every write \
                         durable at completion (the disk's limit for mirrorblk's promise)"
                .into(),
            peer: false,
            needs_journal: false,
            in_default: false,
            replication: None,
            jobs: None,
        },
        Target {
            name: "nbdkit-memory".into(),
            launch: Launch::Server {
                program: "nbdkit".into(),
                args: s(&["-f", "-p", "{port}", "-i", "127.0.0.1", "memory", "{size}"]),
                port: PortMode::Chosen,
                probes: vec![s(&["memory", "--version"])],
            },
            export: "vol0".into(),
            durability: "never durable: RAM only, lost when the server exits".into(),
            peer: false,
            needs_journal: false,
            in_default: true,
            replication: None,
            jobs: None,
        },
        Target {
            name: "nbdkit-file".into(),
            launch: Launch::Server {
                program: "nbdkit".into(),
                args: s(&["-f", "-p", "{port}", "-i", "127.0.0.1", "file", "{file}"]),
                port: PortMode::Chosen,
                probes: vec![s(&["file", "--version"])],
            },
            export: "vol0".into(),
            durability: "page cache: durable only after NBD FLUSH (fdatasync); fio sends none".into(),
            peer: true,
            needs_journal: false,
            in_default: true,
            replication: None,
            jobs: None,
        },
        Target {
            name: "qemu-nbd".into(),
            launch: Launch::Server {
                program: "qemu-nbd".into(),
                args: s(&[
                    "-f",
                    "raw",
                    "--cache=none",
                    "--aio=io_uring",
                    "-b",
                    "127.0.0.1",
                    "-p",
                    "{port}",
                    "-x",
                    "vol0",
                    "-t",
                    "{file}",
                ]),
                port: PortMode::Chosen,
                probes: vec![],
            },
            export: "vol0".into(),
            durability: "O_DIRECT (cache=none): in the device, durable against power loss only \
                         after NBD FLUSH (device cache flush); fio sends none"
                .into(),
            peer: true,
            needs_journal: false,
            in_default: true,
            replication: None,
            jobs: None,
        },
        mirrorblk_variant(
            "mirrorblk",
            mirrorblkd,
            &[],
            "every write durable before its reply (journal O_DIRECT+O_DSYNC, group commit; writes of 128K and more go durably in place instead); reads through the page cache",
        ),
    ]
}

/// The replicated mirrorblkd targets, in table order: 1 and 2 replicas on
/// loopback in each mode; one configured replica that is not running (mode
/// sync, the default on-replica-loss degrade); and 1 replica behind a proxy
/// delaying `delay_ms` each way in each mode. They run only the write jobs
/// and are not in the default run (`--replicated` adds them).
pub fn replicated(mirrorblkd: &Path, delay_ms: u64) -> Vec<Target> {
    let dir = mirrorblkd.parent().unwrap_or(Path::new("."));
    let repl = |peers, down, mode, delay_ms| Replication {
        peers,
        down,
        mode,
        delay_ms,
        delay_proxy: dir.join("delay-proxy"),
    };
    let mut specs = Vec::new();
    for peers in [1, 2] {
        for &mode in cluster::Mode::ALL {
            specs.push((
                format!("mirrorblk-r{peers}-{}", mode.as_str()),
                repl(peers, 0, mode, None),
            ));
        }
    }
    specs.push((
        "mirrorblk-r1down-sync".into(),
        repl(1, 1, cluster::Mode::Sync, None),
    ));
    for &mode in cluster::Mode::ALL {
        specs.push((
            format!("mirrorblk-r1-{}-{delay_ms}ms", mode.as_str()),
            repl(1, 0, mode, Some(delay_ms)),
        ));
    }
    specs
        .into_iter()
        .map(|(name, r)| {
            let mut t = mirrorblk_variant(&name, mirrorblkd, &[], &r.durability());
            t.in_default = false;
            t.jobs = Some(WRITE_JOBS.iter().map(|j| j.to_string()).collect());
            t.replication = Some(r);
            t
        })
        .collect()
}

/// A mirrorblkd target with `extra` arguments appended to the single-volume
/// command line (which serves Prometheus metrics, so the payload-copy
/// counter can be read after the run).
pub fn mirrorblk_variant(
    name: &str,
    mirrorblkd: &Path,
    extra: &[String],
    durability: &str,
) -> Target {
    let mut args: Vec<String> = [
        "--export",
        "vol0",
        "--data",
        "{file}",
        "--journal",
        "{journal}",
        "--size",
        "{size}",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:{metrics_port}",
        "--admin-socket",
        "{admin}",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    Target {
        name: name.into(),
        launch: Launch::Server {
            program: mirrorblkd.to_path_buf(),
            args,
            port: PortMode::Admin {
                socket: "{admin}".into(),
            },
            probes: vec![],
        },
        export: "vol0".into(),
        durability: durability.into(),
        peer: false,
        needs_journal: true,
        in_default: true,
        replication: None,
        jobs: None,
    }
}

/// Finds `program` in PATH (or checks it, if it contains a `/`).
pub fn which(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Runs `program args` with stdout and stderr captured, killing it after
/// `timeout`. Returns (exit success, stdout + stderr).
pub fn run_bounded(program: &Path, args: &[String], timeout: Duration) -> Result<(bool, String)> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| format!("cannot run {}", program.display()))?;
    // Read the pipes on threads so a chatty program cannot block on a full
    // pipe while we wait for it.
    let out = child.stdout.take().map(read_all_thread);
    let err = child.stderr.take().map(read_all_thread);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .ctx(|| format!("cannot wait for {}", program.display()))?
        {
            break Some(st);
        }
        if Instant::now() >= deadline {
            // Our own child, by handle (i.e. by its PID).
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut text = String::new();
    for h in [out, err].into_iter().flatten() {
        // The pipe closed when the child exited or was killed, so this returns.
        text.push_str(&h.join().unwrap_or_default());
    }
    match status {
        Some(st) => Ok((st.success(), text)),
        None => Err(Error::Tool(format!(
            "{} {} did not finish within {:?}",
            program.display(),
            args.join(" "),
            timeout
        ))),
    }
}

fn read_all_thread<R: std::io::Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = r.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    })
}

impl Target {
    /// Checks that the target can run here; the error is the reason to print
    /// when skipping it.
    pub fn check(&self) -> std::result::Result<(), String> {
        let Launch::Server {
            program, probes, ..
        } = &self.launch
        else {
            return Ok(());
        };
        if let Some(r) = &self.replication {
            for h in r.helpers() {
                if !h.is_file() {
                    return Err(format!(
                        "{} not found (cargo build --release --workspace builds it)",
                        h.display()
                    ));
                }
            }
        }
        let Some(path) = which(program) else {
            return Err(format!(
                "{} not found (install it: nbdkit → package nbdkit, qemu-nbd → qemu-utils, \
                 mirrorblkd → cargo build --release -p mirrorblk-server)",
                program.display()
            ));
        };
        let mut all = vec![vec!["--version".to_string()]];
        all.extend(probes.iter().cloned());
        for args in all {
            match run_bounded(&path, &args, PROBE_TIMEOUT) {
                Ok((true, _)) => {}
                Ok((false, out)) => {
                    return Err(format!(
                        "{} {} failed: {}",
                        path.display(),
                        args.join(" "),
                        out.trim()
                    ))
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// The server's version line, if it has a server.
    pub fn version(&self) -> Option<String> {
        let Launch::Server { program, .. } = &self.launch else {
            return None;
        };
        let path = which(program)?;
        let (_, out) = run_bounded(&path, &["--version".to_string()], PROBE_TIMEOUT).ok()?;
        out.lines().next().map(|l| l.trim().to_string())
    }

    /// Whether job `name` runs on this target.
    pub fn runs_job(&self, name: &str) -> bool {
        self.jobs
            .as_ref()
            .is_none_or(|j| j.iter().any(|x| x == name))
    }

    /// Starts the server for `vol`, logging its output to `log`, and waits
    /// until it accepts TCP connections. `None` for [`Launch::Direct`]. A
    /// replicated target's replicas (and proxies) are started first, their
    /// files in `dir` (a directory of this target's own).
    pub fn start(&self, vol: &Volume, log: &Path, dir: &Path) -> Result<Option<Running>> {
        let Launch::Server {
            program,
            args,
            port,
            ..
        } = &self.launch
        else {
            return Ok(None);
        };
        let program = which(program)
            .ok_or_else(|| Error::Tool(format!("{} not found", program.display())))?;
        match &self.replication {
            None => Ok(Some(Running {
                primary: Server::start(&program, args, port, vol, log)?,
                role: "server".into(),
                helpers: Vec::new(),
                admin: None,
            })),
            Some(r) => cluster::start(r, &program, args, vol, dir, log).map(Some),
        }
    }
}

/// Replaces the placeholders of `args`: the volume's, and the chosen ports
/// (`("port", 1234)` replaces `{port}`).
pub fn expand(args: &[String], vol: &Volume, ports: &[(String, u16)]) -> Vec<String> {
    args.iter()
        .map(|a| {
            let mut a = a
                .replace("{file}", &vol.file.to_string_lossy())
                .replace("{journal}", &vol.journal.to_string_lossy())
                .replace("{size}", &vol.size.to_string())
                .replace("{admin}", &vol.admin_socket().to_string_lossy());
            for (name, p) in ports {
                a = a.replace(&format!("{{{name}}}"), &p.to_string());
            }
            a
        })
        .collect()
}

/// The chosen-port placeholders (see `CHOSEN_PORTS`) that `args` uses.
pub fn port_placeholders(args: &[String]) -> Vec<&'static str> {
    CHOSEN_PORTS
        .iter()
        .copied()
        .filter(|n| args.iter().any(|a| a.contains(&format!("{{{n}}}"))))
        .collect()
}

/// A free TCP port on 127.0.0.1 (free now; the caller retries if a race
/// takes it before the server binds).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).ctx(|| "cannot bind 127.0.0.1:0".into())?;
    Ok(l.local_addr()
        .ctx(|| "cannot read a bound address".into())?
        .port())
}

/// A command line as one shell-pasteable string.
pub fn shell_line(program: &Path, args: &[String]) -> String {
    let mut out = shell_quote(&program.to_string_lossy());
    for a in args {
        out.push(' ');
        out.push_str(&shell_quote(a));
    }
    out
}

fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// How [`Server::spawn`] tells that a server is ready.
struct Readiness<'a> {
    /// How its port is decided.
    mode: &'a PortMode,
    /// The port we chose for `{port}`, if any.
    chosen: Option<u16>,
    /// Its admin socket, for [`PortMode::Admin`].
    admin: Option<PathBuf>,
}

/// A running server process we started.
pub struct Server {
    child: Child,
    /// Its PID (the root of the process tree charged for CPU).
    pub pid: i32,
    /// The TCP port it listens on (its NBD port; a proxy's listening port).
    pub port: u16,
    /// The ports we chose for its placeholders (`metrics_port`, ...).
    pub chosen: Vec<(String, u16)>,
    /// The exact command line.
    pub command: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    /// Wall time from spawn to accepting connections.
    pub ready_after: Duration,
}

/// How a server stopped.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StopOutcome {
    /// Exit status as text ("exit status: 0", "signal: 9 (SIGKILL)", ...).
    pub status: String,
    /// Whether it exited 0 by itself after SIGTERM.
    pub clean: bool,
    /// Whether SIGKILL was needed.
    pub killed: bool,
    /// Seconds from SIGTERM to exit.
    pub seconds: f64,
}

impl Server {
    /// Starts `program` with `args` (placeholders replaced, see [`expand`])
    /// for `vol`, logging to `log`, and waits until it is ready (see
    /// [`PortMode`]). Retried on fresh ports when we chose any.
    pub fn start(
        program: &Path,
        args: &[String],
        mode: &PortMode,
        vol: &Volume,
        log: &Path,
    ) -> Result<Server> {
        let placeholders = port_placeholders(args);
        let mut last = None;
        for attempt in 1..=START_ATTEMPTS {
            let mut ports = Vec::new();
            for n in &placeholders {
                ports.push((n.to_string(), free_port()?));
            }
            let listen = ports.iter().find(|(n, _)| n == "port").map(|p| p.1);
            let argv = expand(args, vol, &ports);
            let admin = match mode {
                PortMode::Admin { socket } => expand(std::slice::from_ref(socket), vol, &ports)
                    .pop()
                    .map(PathBuf::from),
                _ => None,
            };
            let ready = Readiness {
                mode,
                chosen: listen,
                admin,
            };
            match Server::spawn(program, argv, &ready, ports, log, attempt) {
                Ok(s) => return Ok(s),
                // Only a server we gave a port to can lose a race for it.
                Err(e) if !placeholders.is_empty() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Tool("server did not start".into())))
    }

    /// The port chosen for placeholder `name` (e.g. `"metrics_port"`).
    pub fn chosen(&self, name: &str) -> Option<u16> {
        self.chosen.iter().find(|(n, _)| n == name).map(|p| p.1)
    }

    fn spawn(
        program: &Path,
        argv: Vec<String>,
        ready: &Readiness,
        ports: Vec<(String, u16)>,
        log: &Path,
        attempt: usize,
    ) -> Result<Server> {
        let (mode, chosen) = (ready.mode, ready.chosen);
        let command = shell_line(program, &argv);
        let mut logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .ctx(|| format!("cannot open log {}", log.display()))?;
        let _ = writeln!(logf, "== attempt {attempt}: {command}");
        let out = logf
            .try_clone()
            .ctx(|| format!("cannot reuse log {}", log.display()))?;
        let started = Instant::now();
        let mut cmd = Command::new(program);
        cmd.args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to
        // SIGTERM the server if this harness dies, so no server outlives an
        // interrupted run.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().ctx(|| format!("cannot start {command}"))?;
        let pid = child.id() as i32;
        // stderr goes to the log through this thread, which also reports the
        // listening address; it ends when the server closes stderr (exits).
        let (tx, rx) = mpsc::channel::<u16>();
        if let Some(err) = child.stderr.take() {
            let marker = match mode {
                PortMode::Logged { marker, .. } => Some(marker.clone()),
                PortMode::Chosen | PortMode::Admin { .. } => None,
            };
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(logf, "{line}");
                    if let Some(m) = &marker {
                        if let Some(p) = parse_logged_port(&line, m) {
                            let _ = tx.send(p);
                        }
                    }
                }
            });
        }
        let mut server = Server {
            child,
            pid,
            port: chosen.unwrap_or(0),
            chosen: ports,
            command,
            log: log.to_path_buf(),
            ready_after: Duration::ZERO,
        };
        let deadline = started + READY_TIMEOUT;
        loop {
            if let Some(st) = server.exited()? {
                return Err(Error::Tool(format!(
                    "server exited before accepting connections ({st}); log {}:\n{}",
                    log.display(),
                    log_tail(log, 15)
                )));
            }
            if Instant::now() >= deadline {
                let tail = log_tail(log, 15);
                let _ = server.stop();
                return Err(Error::Tool(format!(
                    "server did not accept connections within {READY_TIMEOUT:?}; log {}:\n{tail}",
                    log.display()
                )));
            }
            if let Some(admin) = &ready.admin {
                if let Some(r) = mirrorblk_admin::probe(admin) {
                    server.port = r.listen.nbd.port();
                    server.ready_after = started.elapsed();
                    return Ok(server);
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            if server.port == 0 {
                if let Ok(p) = rx.recv_timeout(Duration::from_millis(50)) {
                    server.port = p;
                    if matches!(mode, PortMode::Logged { connect: false, .. }) {
                        server.ready_after = started.elapsed();
                        return Ok(server);
                    }
                }
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, server.port));
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                server.ready_after = started.elapsed();
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `Some(status)` if the server has exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .ctx(|| format!("cannot check server {}", self.pid))
    }

    /// SIGTERM, wait up to [`STOP_TIMEOUT`], then SIGKILL.
    pub fn stop(&mut self) -> Result<StopOutcome> {
        let t0 = Instant::now();
        if let Some(st) = self.exited()? {
            return Ok(StopOutcome {
                status: format!("had already exited: {st}"),
                clean: false,
                killed: false,
                seconds: 0.0,
            });
        }
        // SAFETY: kill on the PID of our own, not yet reaped, child: the PID
        // cannot have been reused.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let mut killed = false;
        let mut deadline = t0 + STOP_TIMEOUT;
        loop {
            if let Some(st) = self.exited()? {
                return Ok(StopOutcome {
                    status: st.to_string(),
                    clean: st.success() && !killed,
                    killed,
                    seconds: t0.elapsed().as_secs_f64(),
                });
            }
            if Instant::now() >= deadline {
                if killed {
                    return Err(Error::Tool(format!(
                        "server {} survived SIGKILL for 5 s",
                        self.pid
                    )));
                }
                let _ = self.child.kill();
                killed = true;
                deadline = Instant::now() + Duration::from_secs(5);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A started target: its server, and for a replicated target the processes
/// started before it (replicas, proxies), which are stopped after it.
pub struct Running {
    /// The server fio talks to (a replicated target's primary).
    pub primary: Server,
    /// Its role in records: "server", or "primary" for a replicated target.
    pub role: String,
    /// Replicas and proxies, in start order.
    pub helpers: Vec<Helper>,
    /// The primary's admin socket, when it has one.
    pub admin: Option<PathBuf>,
}

/// A process of a replicated target besides the primary.
pub struct Helper {
    /// "replica n2", "delay-proxy n2".
    pub role: String,
    /// The process.
    pub server: Server,
    /// Whether its CPU is charged to the target (replicas yes; the proxy,
    /// which stands for the network, no).
    pub charged: bool,
}

/// How one process of a target stopped.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProcessStop {
    /// "primary", "replica n2", ...
    pub role: String,
    /// The outcome, or why stopping failed.
    pub outcome: std::result::Result<StopOutcome, String>,
}

impl Running {
    /// The processes whose CPU is charged: the primary and the replicas.
    pub fn charged(&self) -> Vec<Charged> {
        let mut v = vec![Charged {
            label: self.role.clone(),
            pid: self.primary.pid,
        }];
        v.extend(self.helpers.iter().filter(|h| h.charged).map(|h| Charged {
            label: h.role.clone(),
            pid: h.server.pid,
        }));
        v
    }

    /// `(role, process, CPU charged)` of every process, primary first.
    pub fn processes(&self) -> Vec<(&str, &Server, bool)> {
        let mut v = vec![(self.role.as_str(), &self.primary, true)];
        v.extend(
            self.helpers
                .iter()
                .map(|h| (h.role.as_str(), &h.server, h.charged)),
        );
        v
    }

    /// The first process found exited, as "role (status)".
    pub fn exited(&mut self) -> Result<Option<(String, PathBuf, ExitStatus)>> {
        if let Some(st) = self.primary.exited()? {
            return Ok(Some((self.role.clone(), self.primary.log.clone(), st)));
        }
        for h in &mut self.helpers {
            if let Some(st) = h.server.exited()? {
                return Ok(Some((h.role.clone(), h.server.log.clone(), st)));
            }
        }
        Ok(None)
    }

    /// Stops the primary, then the helpers (SIGTERM, SIGKILL after a bound).
    pub fn stop(&mut self) -> Vec<ProcessStop> {
        let mut out = vec![ProcessStop {
            role: self.role.clone(),
            outcome: self.primary.stop().map_err(|e| e.to_string()),
        }];
        for h in &mut self.helpers {
            out.push(ProcessStop {
                role: h.role.clone(),
                outcome: h.server.stop().map_err(|e| e.to_string()),
            });
        }
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Never leave a server behind, whatever path dropped it.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.stop();
        }
    }
}

/// Extracts the port from a line like `... serving NBD on 127.0.0.1:10809`.
pub fn parse_logged_port(line: &str, marker: &str) -> Option<u16> {
    let at = line.find(marker)? + marker.len();
    let addr: String = line[at..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != ',' && *c != ')')
        .collect();
    addr.parse::<SocketAddr>().ok().map(|a| a.port())
}

/// The last `n` lines of a log file (for error messages).
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_logged_port() {
        let l = "2026-01-01T00:00:00Z  INFO mirrorblkd: serving NBD on 127.0.0.1:40123";
        assert_eq!(parse_logged_port(l, "serving NBD on "), Some(40123));
        assert_eq!(parse_logged_port("nothing", "serving NBD on "), None);
    }

    #[test]
    fn expands_volume_and_chosen_port_placeholders() {
        let vol = Volume {
            file: "/d/a.img".into(),
            journal: "/d/a.journal".into(),
            size: 4096,
        };
        let args: Vec<String> = [
            "--data",
            "{file}",
            "--size",
            "{size}",
            "127.0.0.1:{metrics_port}",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        assert_eq!(port_placeholders(&args), vec!["metrics_port"]);
        assert_eq!(
            expand(&args, &vol, &[("metrics_port".into(), 9100)]).join(" "),
            "--data /d/a.img --size 4096 127.0.0.1:9100"
        );
    }

    #[test]
    fn replicated_targets_run_only_write_jobs() {
        let all = replicated(Path::new("/b/mirrorblkd"), 5);
        let names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "mirrorblk-r1-sync",
                "mirrorblk-r1-flush",
                "mirrorblk-r1-async",
                "mirrorblk-r2-sync",
                "mirrorblk-r2-flush",
                "mirrorblk-r2-async",
                "mirrorblk-r1down-sync",
                "mirrorblk-r1-sync-5ms",
                "mirrorblk-r1-flush-5ms",
                "mirrorblk-r1-async-5ms",
            ]
        );
        for t in &all {
            assert!(!t.in_default);
            assert!(t.runs_job("4k-randwrite-qd32") && !t.runs_job("4k-randread-qd32"));
        }
        let r = all[0].replication.as_ref().expect("replicated");
        assert_eq!(r.delay_proxy, Path::new("/b/delay-proxy"));
    }

    #[test]
    fn quotes_only_what_needs_it() {
        let line = shell_line(Path::new("nbdkit"), &["-p".into(), "a b".into()]);
        assert_eq!(line, "nbdkit -p 'a b'");
    }
}
