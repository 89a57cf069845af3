//! Process supervision for the benches: a server process we start (with
//! ports we choose or it reports), its readiness, its log, and its bounded
//! stop; the fresh volume files it serves; and a started target's set of
//! processes (primary, replicas, proxies).
//!
//! Both `targets.rs` (what is measured) and `cluster.rs` (how a replicated
//! target's processes are started) build on this module; it knows neither.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mirrorblk_admin::readiness::PROBE_TIMEOUT;
use mirrorblk_admin::{Ready, Request, Response};

use crate::error::{Error, IoContext, Result};
use crate::fio::Charged;

/// Longest wait for a server to accept connections (mirrorblkd zero-fills a
/// new 256 MiB journal before it listens, which takes seconds on a slow disk).
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a server gets to exit after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Start attempts when we choose a port (another process may take the free
/// port we found before the server binds it).
const START_ATTEMPTS: usize = 3;
/// Placeholders of server arguments replaced by a port we choose free.
const CHOSEN_PORTS: [&str; 3] = ["port", "metrics_port", "repl_port"];

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
    /// with the addresses it serves on; the NBD port comes from there (from
    /// its log for a build older than that answer, see [`legacy_port`]).
    Admin {
        /// The `--admin-socket` path it is started with.
        socket: String,
    },
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
                PortMode::Admin { .. } => Some(LEGACY_READY_MARKER.to_string()),
                PortMode::Chosen => None,
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
        let mut logged = None;
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
                if let Ok(p) = rx.try_recv() {
                    logged = Some(p);
                }
                if let Some(p) = admin_port(admin, logged) {
                    server.port = p;
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

    /// Waits up to `within` for a server that was asked to exit (not by a
    /// signal) to do so: `Some` once it has (clean if it exited 0), `None`
    /// if it is still running.
    pub fn await_exit(&mut self, within: Duration) -> Result<Option<StopOutcome>> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.exited()? {
                return Ok(Some(StopOutcome {
                    status: st.to_string(),
                    clean: st.success(),
                    killed: false,
                    seconds: t0.elapsed().as_secs_f64(),
                }));
            }
            if t0.elapsed() >= within {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
    /// Asks the primary to exit by itself (qemu-storage-daemon: cancel its
    /// mirror job, then QMP `quit`) before any signal; `Err` says why it
    /// could not, and the signals follow as for every target.
    pub graceful: Option<GracefulStop>,
}

/// A target's own way of shutting its primary down (see [`Running::graceful`]).
pub type GracefulStop = Box<dyn FnOnce() -> std::result::Result<(), String>>;

/// How long a primary that was asked to exit ([`Running::graceful`]) gets
/// before the signals.
pub const GRACEFUL_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// Stops the primary (its graceful stop first, when it has one), then
    /// the helpers (SIGTERM, SIGKILL after a bound).
    pub fn stop(&mut self) -> Vec<ProcessStop> {
        let asked = match self.graceful.take() {
            Some(g) => g(),
            None => Err("no graceful stop".into()),
        };
        let primary = match asked {
            Ok(()) => match self.primary.await_exit(GRACEFUL_EXIT_TIMEOUT) {
                Ok(Some(o)) => Ok(o),
                Ok(None) | Err(_) => self.primary.stop(),
            },
            Err(_) => self.primary.stop(),
        };
        let mut out = vec![ProcessStop {
            role: self.role.clone(),
            outcome: primary.map_err(|e| e.to_string()),
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

/// What a mirrorblkd logs once it serves, with its NBD address: how builds
/// older than the status answer's `listen` field (baselines of an A/B,
/// `--baseline-bin`) tell their port.
pub const LEGACY_READY_MARKER: &str = "serving NBD on ";

/// The NBD port of the mirrorblkd at `admin` once it serves: from its
/// status answer, or by [`legacy_port`] from `logged` (its log line).
fn admin_port(admin: &Path, logged: Option<u16>) -> Option<u16> {
    let resp = mirrorblk_admin::call_within(admin, &Request::Status, PROBE_TIMEOUT).ok()?;
    match Ready::from_response(&resp) {
        Some(r) => Some(r.listen.nbd.port()),
        None => legacy_port(&resp, logged),
    }
}

/// The port of a serving daemon too old to report readiness: one whose
/// status answer has no `pid` (every current build stamps it, also while
/// starting) and which has logged [`LEGACY_READY_MARKER`] (`logged`). Only
/// for baselines of older builds; current ones never take this path.
pub fn legacy_port(status: &Response, logged: Option<u16>) -> Option<u16> {
    if status.ok && status.pid.is_none() {
        logged
    } else {
        None
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
    fn only_a_build_without_readiness_fields_is_ready_by_its_log() {
        let answer = |json: &str| -> Response { serde_json::from_str(json).expect("parses") };
        let old = answer(r#"{"ok":true,"node":"n1","volumes":[]}"#);
        assert_eq!(legacy_port(&old, Some(4000)), Some(4000));
        assert_eq!(legacy_port(&old, None), None);
        // A current build still starting: it has a pid but no addresses yet.
        let starting = answer(r#"{"ok":true,"node":"n1","volumes":[],"pid":7,"started_at":1.5}"#);
        assert_eq!(legacy_port(&starting, Some(4000)), None);
        let refused = answer(r#"{"ok":false,"error":"busy"}"#);
        assert_eq!(legacy_port(&refused, Some(4000)), None);
    }

    #[test]
    fn quotes_only_what_needs_it() {
        let line = shell_line(Path::new("nbdkit"), &["-p".into(), "a b".into()]);
        assert_eq!(line, "nbdkit -p 'a b'");
    }
}
