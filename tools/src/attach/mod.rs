//! `mirrorblk attach` and `mirrorblk detach`: a kernel nbd device that
//! follows the primary.
//!
//! attach negotiates the export itself ([`servers`]), configures
//! `/dev/nbdN` over the kernel's generic netlink nbd family ([`device`]) with
//! an I/O timeout and a dead-connection timeout, and stays running. When the
//! kernel marks the connection dead (a `LINK_DEAD` notification: the server
//! closed it, TCP keepalive gave up, or a request went unanswered for the
//! I/O timeout) it looks for the primary again (etcd's leader record, then
//! each `--server`) and hands the kernel the new socket with
//! `NBD_CMD_RECONFIGURE`; the kernel resends what was in flight. Requests
//! wait meanwhile, for up to the dead-connection timeout; only then would
//! they fail.
//!
//! The stall a reconnect causes: requests issued after the connection died
//! wait until the new socket is there; requests that were in flight on the
//! dead socket are requeued when their I/O timeout expires. So the stall is
//! bounded by max(time to find the primary, I/O timeout).
//!
//! detach finds the attach process by its pid file
//! (`/run/mirrorblk/nbdN.attach.pid`), asks it to stop (SIGTERM: it
//! disconnects the device and exits), waits for it, and disconnects the
//! device itself in any case (so it also detaches a device that nbd-client
//! or a killed attach left behind).

pub mod device;
pub mod netlink;
pub mod servers;

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use device::{DeviceConfig, DeviceError, Nbd};
use servers::{Negotiated, Sources, Timeouts, Tried};

/// Where attach keeps its pid file.
pub const RUN_DIR: &str = "/run/mirrorblk";
/// How often attach checks that the device is still configured (detached
/// by someone else: it exits).
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// How long one wait for a notification blocks (the signal check interval).
const TICK: Duration = Duration::from_millis(250);
/// Longest pause between two rounds of looking for the primary.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How often a reconnect that keeps failing is logged.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// How long detach waits for the attach process to exit.
const DETACH_WAIT: Duration = Duration::from_secs(30);

/// Set by SIGTERM, SIGINT or SIGHUP: disconnect and exit.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signals() -> Result<(), AttachError> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    // No SA_RESTART: a blocking netlink receive returns EINTR at once.
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { sigaction(sig, &act) }
            .map_err(|e| AttachError::Setup(format!("cannot handle {sig:?}: {e}")))?;
    }
    Ok(())
}

/// What `mirrorblk attach` was asked to do.
#[derive(Debug, Clone)]
pub struct AttachArgs {
    /// `--server HOST:PORT`, in order.
    pub servers: Vec<String>,
    /// `--etcd URL`s.
    pub etcd: Vec<String>,
    /// `--export NAME`.
    pub export: String,
    /// `/dev/nbdN`.
    pub device: PathBuf,
    /// `--io-timeout`.
    pub io_timeout: Duration,
    /// `--dead-conn-timeout`.
    pub dead_conn_timeout: Duration,
    /// `--connect-timeout` (TCP connect and NBD handshake, each).
    pub connect_timeout: Duration,
    /// `--connections`.
    pub connections: u32,
    /// `--json`: events as JSON lines on stdout.
    pub json: bool,
    /// `--size-check`: how often the server is asked for the export's size
    /// (zero: never).
    pub size_check: Duration,
}

/// Why attach stopped.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The kernel side.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// No candidate served the export.
    #[error("no server serves export '{export}'; tried:\n{}", list(.tried))]
    NoServer {
        /// The export.
        export: String,
        /// Every candidate and why it failed.
        tried: Vec<Tried>,
    },
    /// The export cannot be used by the kernel's nbd driver.
    #[error("{0}")]
    Export(String),
    /// Local setup (signals, pid file).
    #[error("{0}")]
    Setup(String),
}

fn list(tried: &[Tried]) -> String {
    if tried.is_empty() {
        return "  (no candidates: give --server or --etcd)".into();
    }
    tried
        .iter()
        .map(|t| format!("  {t}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The pid file of the attach process of `/dev/nbd<index>`.
pub fn pid_file(index: u32) -> PathBuf {
    Path::new(RUN_DIR).join(format!("nbd{index}.attach.pid"))
}

/// The logical block size to give the kernel: the server's preferred
/// block size (so the kernel never splits below it; 4096 for mirrorblk),
/// else its minimum, at least 512. The kernel takes powers of two from 512
/// to 4096 (a page).
pub fn block_size(min_block: u32, preferred: u32) -> Result<u64, String> {
    let min = u64::from(min_block.max(512));
    if !min.is_power_of_two() || min > 4096 {
        return Err(format!(
            "the export's minimum block size is {min_block} bytes; the kernel's nbd driver takes a power of two from 512 to 4096"
        ));
    }
    let p = u64::from(preferred);
    Ok(if p.is_power_of_two() && (min..=4096).contains(&p) {
        p
    } else {
        min
    })
}

/// Runs `mirrorblk attach`; prints the error and returns 1 (2 for usage).
pub fn attach(a: AttachArgs) -> ExitCode {
    match run_attach(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mirrorblk attach {}: {e}", a.device.display());
            ExitCode::from(if matches!(e, AttachError::Usage(_)) {
                2
            } else {
                1
            })
        }
    }
}

fn check_args(a: &AttachArgs) -> Result<u32, AttachError> {
    if a.servers.is_empty() && a.etcd.is_empty() {
        return Err(AttachError::Usage(
            "give at least one --server HOST:PORT or --etcd URL".into(),
        ));
    }
    if a.export.is_empty() {
        return Err(AttachError::Usage("--export NAME may not be empty".into()));
    }
    if a.connections == 0 || a.connections > 16 {
        return Err(AttachError::Usage("--connections takes 1 to 16".into()));
    }
    if a.io_timeout.as_secs() == 0 || a.dead_conn_timeout.as_secs() == 0 {
        return Err(AttachError::Usage(
            "--io-timeout and --dead-conn-timeout are whole seconds, at least 1s".into(),
        ));
    }
    Ok(device::parse_device(&a.device)?)
}

/// A device being served, and everything a reconnect needs.
struct Attached<'a> {
    args: &'a AttachArgs,
    nbd: Nbd,
    notes: netlink::Socket,
    sources: Sources,
    cfg: DeviceConfig,
    /// The server the device's connection goes to now.
    server: String,
}

fn run_attach(a: &AttachArgs) -> Result<(), AttachError> {
    let index = check_args(a)?;
    install_signals()?;
    let mut nbd = Nbd::open()?;
    if nbd.status(index)? == Some(true) {
        return Err(DeviceError::Busy(index).into());
    }
    // Subscribed before the connect, so no LINK_DEAD can be missed.
    let notes = nbd.subscribe()?;
    notes
        .set_timeout(Some(TICK))
        .map_err(|e| AttachError::Setup(format!("netlink receive timeout: {e}")))?;
    let etcd = if a.etcd.is_empty() {
        None
    } else {
        Some(
            mirrorblk_etcd::Client::new(&a.etcd[..], a.connect_timeout)
                .map_err(|e| AttachError::Usage(format!("--etcd: {e}")))?,
        )
    };
    let sources = Sources {
        etcd,
        servers: a.servers.clone(),
        export: a.export.clone(),
        timeouts: Timeouts {
            connect: a.connect_timeout,
            handshake: a.connect_timeout,
        },
    };
    let conns = open_connections(&sources, a.connections)?;
    let first = &conns[0];
    let cfg = DeviceConfig {
        index,
        size: first.size,
        block_size: block_size(first.min_block, first.preferred_block)
            .map_err(AttachError::Export)?,
        server_flags: first.flags,
        io_timeout: a.io_timeout.as_secs(),
        dead_conn_timeout: a.dead_conn_timeout.as_secs(),
    };
    nbd.connect(&cfg, &fds(&conns))?;
    let server = first.server.clone();
    // The kernel holds its own references to the sockets.
    drop(conns);
    let pid = write_pid_file(index)?;
    announce(a, &cfg, &server);
    let mut att = Attached {
        args: a,
        nbd,
        notes,
        sources,
        cfg,
        server,
    };
    let r = att.serve();
    let _ = std::fs::remove_file(pid);
    r
}

fn fds(conns: &[Negotiated]) -> Vec<RawFd> {
    conns.iter().map(|c| c.stream.as_raw_fd()).collect()
}

/// `n` connections to the first candidate that serves the export. More
/// than one needs the server's multi-conn flag.
fn open_connections(sources: &Sources, n: u32) -> Result<Vec<Negotiated>, AttachError> {
    let first = sources.find().map_err(|tried| AttachError::NoServer {
        export: sources.export.clone(),
        tried,
    })?;
    if n > 1 && first.flags & nbd::consts::FLAG_CAN_MULTI_CONN == 0 {
        return Err(AttachError::Export(format!(
            "{} does not allow several connections to '{}' (no multi-conn flag): use --connections 1",
            first.server, sources.export
        )));
    }
    let mut conns = vec![first];
    while conns.len() < n as usize {
        let more = servers::handshake(&conns[0].server, &sources.export, sources.timeouts)
            .map_err(|why| AttachError::NoServer {
                export: sources.export.clone(),
                tried: vec![Tried {
                    server: conns[0].server.clone(),
                    why,
                }],
            })?;
        conns.push(more);
    }
    Ok(conns)
}

fn write_pid_file(index: u32) -> Result<PathBuf, AttachError> {
    let path = pid_file(index);
    std::fs::create_dir_all(RUN_DIR)
        .and_then(|()| std::fs::write(&path, format!("{}\n", std::process::id())))
        .map_err(|e| AttachError::Setup(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

fn announce(a: &AttachArgs, cfg: &DeviceConfig, server: &str) {
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "event": "attached",
                "device": a.device.display().to_string(),
                "export": a.export,
                "size": cfg.size,
                "block_size": cfg.block_size,
                "server": server,
                "connections": a.connections,
                "io_timeout_s": cfg.io_timeout,
                "dead_conn_timeout_s": cfg.dead_conn_timeout,
                "pid": std::process::id(),
            })
        );
    } else {
        println!(
            "{} attached: export '{}' ({} bytes, {}-byte blocks) from {server}",
            a.device.display(),
            a.export,
            cfg.size,
            cfg.block_size
        );
    }
    log(
        a,
        &format!(
            "attached to {server}; I/O timeout {} s, dead-connection timeout {} s",
            cfg.io_timeout, cfg.dead_conn_timeout
        ),
    );
    notify_systemd();
}

fn log(a: &AttachArgs, msg: &str) {
    eprintln!("mirrorblk attach {}: {msg}", a.device.display());
}

/// `READY=1` to systemd when run as a `Type=notify` service.
fn notify_systemd() {
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(b"READY=1", &addr))
    } else {
        sock.send_to(b"READY=1", Path::new(&path))
    };
    if let Err(e) = sent {
        eprintln!("mirrorblk attach: cannot notify systemd: {e}");
    }
}

impl Attached<'_> {
    /// Waits for notifications until stopped or detached.
    fn serve(&mut self) -> Result<(), AttachError> {
        let index = self.cfg.index;
        let family = self.nbd.family_id();
        let mut last_status = Instant::now();
        let mut last_size_check = Instant::now();
        loop {
            if STOP.load(Ordering::SeqCst) {
                return self.stop();
            }
            match self.notes.recv() {
                Ok(msgs) => {
                    if msgs
                        .iter()
                        .any(|m| device::link_dead(family, m) == Some(index))
                    {
                        self.reconnect("the kernel reports the connection dead")?;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // Notifications were dropped: one may have been ours.
                    self.reconnect("netlink notifications were lost")?;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(DeviceError::Netlink(e).into()),
            }
            if last_status.elapsed() >= STATUS_EVERY {
                last_status = Instant::now();
                if self.nbd.status(index)? != Some(true) {
                    log(
                        self.args,
                        "the device was detached (mirrorblk detach or nbd-client -d); exiting",
                    );
                    self.event(serde_json::json!({"event": "detached"}));
                    return Ok(());
                }
            }
            if size_check_due(self.args.size_check, last_size_check.elapsed()) {
                last_size_check = Instant::now();
                self.follow_size()?;
            }
        }
    }

    /// Asks the server for the export's size and, when it changed (a
    /// `mirrorblk resize`), gives the kernel the new size. A server that
    /// cannot be asked is not an error here: a dead connection is the
    /// kernel's to report (LINK_DEAD), and the next check asks again.
    fn follow_size(&mut self) -> Result<(), AttachError> {
        let size = match servers::probe_size(&self.server, &self.args.export, self.sources.timeouts)
        {
            Ok(size) => size,
            Err(_) => return Ok(()),
        };
        if size == self.cfg.size {
            return Ok(());
        }
        self.nbd.resize(self.cfg.index, size)?;
        self.resized(size, "the export was resized");
        Ok(())
    }

    /// Records a new device size (already given to the kernel).
    fn resized(&mut self, size: u64, why: &str) {
        let from = self.cfg.size;
        self.cfg.size = size;
        let how = if size < from { "shrunk" } else { "grown" };
        log(
            self.args,
            &format!("{why}: the device is {how} from {from} to {size} bytes"),
        );
        self.event(serde_json::json!({
            "event": "resized",
            "from": from,
            "size": size,
            "server": self.server,
        }));
    }

    /// On a signal: disconnect the device and return.
    fn stop(&mut self) -> Result<(), AttachError> {
        log(self.args, "stopping: disconnecting the device");
        let r = self.nbd.disconnect(self.cfg.index);
        self.event(serde_json::json!({"event": "detached"}));
        r.map_err(Into::into)
    }

    fn event(&self, v: serde_json::Value) {
        if self.args.json {
            println!("{v}");
        }
    }

    /// Finds the primary and hands the kernel fresh sockets, retrying
    /// (backing off to [`MAX_BACKOFF`]) until it works or attach is stopped.
    fn reconnect(&mut self, why: &str) -> Result<(), AttachError> {
        let started = Instant::now();
        log(
            self.args,
            &format!("{why}; looking for the primary of '{}'", self.args.export),
        );
        let mut backoff = Duration::from_millis(50);
        let mut reported = Instant::now();
        let mut attempts = 0u32;
        while !STOP.load(Ordering::SeqCst) {
            attempts += 1;
            match open_connections(&self.sources, self.args.connections) {
                Ok(conns) => match self.nbd.reconfigure(
                    self.cfg.index,
                    &fds(&conns),
                    (conns[0].size != self.cfg.size).then_some(conns[0].size),
                ) {
                    Ok(()) => {
                        self.server.clone_from(&conns[0].server);
                        self.reconnected(&conns[0], started, attempts, why);
                        if conns[0].size != self.cfg.size {
                            self.resized(conns[0].size, "resized while the connection was down");
                        }
                        return Ok(());
                    }
                    Err(e) => log(
                        self.args,
                        &format!("handing the new connection over failed: {e}"),
                    ),
                },
                Err(e) if reported.elapsed() >= REPORT_EVERY => {
                    reported = Instant::now();
                    log(
                        self.args,
                        &format!(
                            "still no primary after {:.1} s: {e}",
                            started.elapsed().as_secs_f64()
                        ),
                    );
                }
                Err(_) => {}
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        Ok(())
    }

    fn reconnected(&self, n: &Negotiated, started: Instant, attempts: u32, why: &str) {
        let ms = started.elapsed().as_millis();
        if n.flags != self.cfg.server_flags {
            log(
                self.args,
                &format!(
                    "note: {} sends transmission flags {:#x}, the device was set up with {:#x} (kept)",
                    n.server, n.flags, self.cfg.server_flags
                ),
            );
        }
        log(
            self.args,
            &format!(
                "reconnected to {} after {ms} ms ({attempts} attempt(s)); the kernel resends what was in flight",
                n.server
            ),
        );
        self.event(serde_json::json!({
            "event": "reconnected",
            "server": n.server,
            "reconnect_ms": ms,
            "attempts": attempts,
            "reason": why,
        }));
    }
}

/// Whether to ask the server for the export's size again: `every` has
/// passed since the last check (never when `every` is zero).
fn size_check_due(every: Duration, since: Duration) -> bool {
    !every.is_zero() && since >= every
}

/// Runs `mirrorblk detach`.
pub fn detach(dev: &Path) -> ExitCode {
    match run_detach(dev) {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mirrorblk detach {}: {e}", dev.display());
            ExitCode::from(1)
        }
    }
}

/// Whether the NUL-separated `cmdline` is `mirrorblk attach` (of `dev`,
/// when given: its last argument).
fn is_attach(cmdline: &[u8], dev: Option<&Path>) -> bool {
    let args: Vec<&[u8]> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .collect();
    let is_mirrorblk = args.first().is_some_and(|a0| a0.ends_with(b"mirrorblk"));
    let of_dev = dev.is_none_or(|d| {
        args.last()
            .is_some_and(|a| *a == d.as_os_str().as_encoded_bytes())
    });
    is_mirrorblk && args.iter().any(|a| *a == b"attach") && of_dev
}

/// The pid in `path` if that process is a running `mirrorblk attach`.
fn attach_pid(path: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    // A stale file may name a pid reused by another program: check it.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    (pid > 1 && is_attach(&cmdline, None)).then_some(pid)
}

/// The `mirrorblk attach` process of `dev`, found by its pid file, else
/// by its command line (the pid file's folder may have been removed, e.g.
/// by another unit's RuntimeDirectory= cleanup).
fn find_attach(index: u32, dev: &Path) -> Option<i32> {
    if let Some(pid) = attach_pid(&pid_file(index)) {
        return Some(pid);
    }
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid > 1 && pid != me)
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| is_attach(&c, Some(dev)))
        })
}

fn run_detach(dev: &Path) -> Result<String, AttachError> {
    let index = device::parse_device(dev)?;
    let mut nbd = Nbd::open()?;
    let mut stopped = None;
    if let Some(pid) = find_attach(index, dev) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        // It disconnects the device and exits.
        kill(Pid::from_raw(pid), Signal::SIGTERM)
            .map_err(|e| AttachError::Setup(format!("cannot signal attach process {pid}: {e}")))?;
        let deadline = Instant::now() + DETACH_WAIT;
        while Path::new(&format!("/proc/{pid}")).exists() {
            if Instant::now() >= deadline {
                return Err(AttachError::Setup(format!(
                    "attach process {pid} did not exit within {DETACH_WAIT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stopped = Some(pid);
    }
    match nbd.status(index)? {
        None if stopped.is_none() => {
            return Ok(format!(
                "{} is not attached (no such nbd device)",
                dev.display()
            ))
        }
        Some(false) | None => {}
        Some(true) => nbd.disconnect(index)?,
    }
    Ok(match stopped {
        Some(pid) => format!("{} detached (attach process {pid} stopped)", dev.display()),
        None => format!("{} detached", dev.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_checks_come_every_interval_and_never_when_off() {
        let s = Duration::from_secs;
        for (every, since, due) in [
            (s(5), s(0), false),
            (s(5), s(4), false),
            (s(5), s(5), true),
            (s(5), s(60), true),
            (s(0), s(0), false),
            (s(0), s(3600), false),
        ] {
            assert_eq!(size_check_due(every, since), due, "{every:?} {since:?}");
        }
    }

    #[test]
    fn block_sizes_the_kernel_takes() {
        assert_eq!(block_size(1, 4096), Ok(4096));
        assert_eq!(block_size(512, 1 << 20), Ok(512));
        assert_eq!(block_size(1, 0), Ok(512));
        assert_eq!(block_size(4096, 4096), Ok(4096));
        assert_eq!(block_size(4096, 512), Ok(4096));
        assert!(block_size(8192, 8192).is_err());
        assert!(block_size(3000, 4096).is_err());
    }

    #[test]
    fn arguments_are_checked_before_anything_runs() {
        let a = AttachArgs {
            servers: vec![],
            etcd: vec![],
            export: "vol0".into(),
            device: "/dev/nbd0".into(),
            io_timeout: Duration::from_secs(10),
            dead_conn_timeout: Duration::from_secs(120),
            size_check: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            connections: 1,
            json: false,
        };
        assert!(matches!(check_args(&a), Err(AttachError::Usage(_))));
        let ok = AttachArgs {
            servers: vec!["127.0.0.1:10809".into()],
            ..a.clone()
        };
        assert_eq!(check_args(&ok).unwrap(), 0);
        let bad_dev = AttachArgs {
            device: "/dev/sda".into(),
            ..ok.clone()
        };
        assert!(matches!(
            check_args(&bad_dev),
            Err(AttachError::Device(DeviceError::NotNbd(_)))
        ));
        let zero = AttachArgs {
            io_timeout: Duration::from_millis(500),
            ..ok
        };
        assert!(matches!(check_args(&zero), Err(AttachError::Usage(_))));
    }

    #[test]
    fn attach_command_lines_are_recognised() {
        let dev = Path::new("/dev/nbd3");
        let attach = b"/usr/local/bin/mirrorblk\0attach\0--server\0h:1\0--export\0v\0/dev/nbd3\0";
        assert!(is_attach(attach, Some(dev)));
        assert!(is_attach(attach, None));
        assert!(!is_attach(attach, Some(Path::new("/dev/nbd1"))));
        assert!(!is_attach(b"mirrorblk\0detach\0/dev/nbd3\0", Some(dev)));
        assert!(!is_attach(
            b"/bin/cargo\0test\0attach\0/dev/nbd3\0",
            Some(dev)
        ));
    }

    #[test]
    fn a_stale_pid_file_names_no_process() {
        let dir = std::env::temp_dir().join(format!("mb-attach-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p");
        // This test process is not an attach process.
        std::fs::write(&f, format!("{}\n", std::process::id())).unwrap();
        assert_eq!(attach_pid(&f), None);
        std::fs::write(&f, "not a pid").unwrap();
        assert_eq!(attach_pid(&f), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
