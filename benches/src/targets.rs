//! What is measured: the targets (mirrorblkd, its peers, the raw file), how to
//! start and stop each one, and what a completed write means on each.
//!
//! Targets are data, not code paths: a new one is one more [`Target`] value
//! with different arguments, see [`mirrorblk_variant`]; a replicated one also
//! carries a [`Replication`] (see `cluster.rs`, which starts its processes;
//! `process.rs` supervises each one).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cluster::{self, Replication};
use crate::error::{Error, Result};
use crate::process::{run_bounded, which, PortMode, Running, Server, Volume};
use crate::qsd::{self, QsdMirror};

/// Longest run of a `--version`-style availability probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// The write jobs: what a replicated target runs (reads never touch the
/// replicas: they are served by the primary alone, as with 0 replicas).
pub const WRITE_JOBS: [&str; 5] = [
    "4k-randwrite-qd1",
    "4k-randwrite-qd32",
    "4k-randwrite-qd32-fsync32",
    "64k-randrw70-qd16",
    "1m-write-qd8",
];

/// When a completed write is durable on a single mirrorblkd.
const MIRRORBLK_DURABILITY: &str = "every write durable before its reply (journal O_DIRECT+O_DSYNC, \
     group commit; writes of 128K and more go durably in place instead); reads through the page cache";

/// What a completed write promises on a target: targets are compared
/// with the peers of their own class only (like with like), and the report
/// has a table per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Every write durable before its reply (power-cut safe): raw-dsync
    /// (the disk's limit), qemu-nbd `--cache=directsync`, nbdkit `file`
    /// behind the `fua` filter with `fuamode=force`, mirrorblk.
    DurablePerWrite,
    /// NBD's own contract: durable at FLUSH and FUA only: nbdkit `file`,
    /// qemu-nbd `--cache=none`, mirrorblk `--durability flush`. mirrorblk
    /// (durable per write, a stronger promise) is shown beside them.
    NbdContract,
    /// Replicated: mirrorblk with replicas, and its peer, qemu-storage-daemon's
    /// active mirror to a second qemu-storage-daemon (`qsd-mirror`).
    Replicated,
    /// Context, no promise compared: raw O_DIRECT, nbdkit `memory`.
    Context,
}

impl Class {
    /// Every class, in report order.
    pub const ALL: [Class; 4] = [
        Class::DurablePerWrite,
        Class::NbdContract,
        Class::Replicated,
        Class::Context,
    ];

    /// The report's heading for the class.
    pub fn heading(self) -> &'static str {
        match self {
            Class::DurablePerWrite => "Durable per write (every write power-cut safe before its reply)",
            Class::NbdContract => "NBD's contract (durable at FLUSH and FUA only): mirrorblk-flush among them; mirrorblk, durable per write, beside them",
            Class::Replicated => "Replicated (mirrorblk with replicas; qsd-mirror, qemu-storage-daemon's write-blocking active mirror, is the peer)",
            Class::Context => "Context (no durability compared)",
        }
    }
}

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
    /// What a completed write promises: ratios are taken against the peers
    /// of the same class.
    pub class: Class,
    /// Whether this is one of the peers the ratios of its class are taken
    /// against.
    pub peer: bool,
    /// Whether it needs a journal file next to the data file.
    pub needs_journal: bool,
    /// Whether it runs when `--targets` is not given.
    pub in_default: bool,
    /// For a replicated mirrorblkd: its replicas, mode and link.
    pub replication: Option<Replication>,
    /// For `qsd-mirror`: the qemu-storage-daemon active mirror's settings
    /// (`Launch::Server`'s arguments are then the source daemon's template,
    /// see `qsd.rs`).
    pub qsd: Option<QsdMirror>,
    /// Only these jobs run on it (`None`: every job).
    pub jobs: Option<Vec<String>>,
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
            class: Class::Context,
            peer: false,
            needs_journal: false,
            in_default: true,
            replication: None,
            qsd: None,
            jobs: None,
        },
        // The disk's limit for mirrorblk's promise, every write durable at
        // completion.
        Target {
            name: "raw-dsync".into(),
            launch: Launch::Direct {
                fio_args: s(&["--sync=dsync"]),
            },
            export: String::new(),
            durability: "fio io_uring O_DIRECT+O_DSYNC on the file, no server: every write \
                         durable at completion (the disk's limit for mirrorblk's promise)"
                .into(),
            class: Class::DurablePerWrite,
            peer: false,
            needs_journal: false,
            in_default: true,
            replication: None,
            qsd: None,
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
            class: Class::Context,
            peer: false,
            needs_journal: false,
            in_default: true,
            replication: None,
            qsd: None,
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
            durability: "page cache: durable only after NBD FLUSH (fdatasync) or a FUA write"
                .into(),
            class: Class::NbdContract,
            peer: true,
            needs_journal: false,
            in_default: true,
            replication: None,
            qsd: None,
            jobs: None,
        },
        qemu_nbd(
            "qemu-nbd",
            "none",
            Class::NbdContract,
            "O_DIRECT (cache=none): in the device, durable against power loss only \
             after NBD FLUSH (device cache flush) or a FUA write",
        ),
        qemu_nbd(
            "qemu-nbd-directsync",
            "directsync",
            Class::DurablePerWrite,
            "O_DIRECT|O_DSYNC (cache=directsync): every write durable before its reply",
        ),
        Target {
            name: "nbdkit-file-fua".into(),
            launch: Launch::Server {
                program: "nbdkit".into(),
                args: s(&[
                    "-f",
                    "-p",
                    "{port}",
                    "-i",
                    "127.0.0.1",
                    "--filter=fua",
                    "file",
                    "{file}",
                    "fuamode=force",
                ]),
                port: PortMode::Chosen,
                probes: vec![s(&["--filter=fua", "file", "--version"])],
            },
            export: "vol0".into(),
            durability: "page cache plus fdatasync after every write (fua filter, fuamode=force): \
                         every write durable before its reply"
                .into(),
            class: Class::DurablePerWrite,
            peer: true,
            needs_journal: false,
            in_default: true,
            replication: None,
            qsd: None,
            jobs: None,
        },
        mirrorblk_variant("mirrorblk", mirrorblkd, &[], MIRRORBLK_DURABILITY),
        mirrorblk_flush(mirrorblkd),
        mirrorblk_poll(mirrorblkd),
    ]
}

/// The busy-polling window of `mirrorblk-poll`, in microseconds: longer
/// than a QD1 request's whole cycle on this project's machine (about
/// 200–400 µs), so a core at QD1 never sleeps between two requests.
pub const POLL_US: u32 = 500;

/// mirrorblkd with `--busy-poll-us`: the same durability as `mirrorblk`,
/// trading CPU for the wake-ups of short queues. Not in the default run.
fn mirrorblk_poll(mirrorblkd: &Path) -> Target {
    let mut t = mirrorblk_variant(
        "mirrorblk-poll",
        mirrorblkd,
        &["--busy-poll-us".into(), POLL_US.to_string()],
        &format!(
            "{MIRRORBLK_DURABILITY}; --busy-poll-us {POLL_US}: a core polls instead of sleeping \
             for {POLL_US} µs after each request while at most one is in flight on it"
        ),
    );
    t.in_default = false;
    t
}

/// mirrorblkd with `--durability flush`: a peer-level target of NBD's
/// contract (not itself a peer: ratios are taken against nbdkit and qemu).
fn mirrorblk_flush(mirrorblkd: &Path) -> Target {
    let mut t = mirrorblk_variant(
        "mirrorblk-flush",
        mirrorblkd,
        &["--durability".into(), "flush".into()],
        "--durability flush: a write acknowledged once the disk has it (journal O_DIRECT \
         without O_DSYNC), durable against power loss only after NBD FLUSH or a FUA write \
         (one group fdatasync); writes of 128K and more still go durably in place",
    );
    t.class = Class::NbdContract;
    t
}

/// qemu-nbd serving the volume file raw with `--cache=CACHE` and io_uring:
/// a peer of `class`.
fn qemu_nbd(name: &str, cache: &str, class: Class, durability: &str) -> Target {
    let cache = format!("--cache={cache}");
    let args = [
        "-f",
        "raw",
        &cache,
        "--aio=io_uring",
        "-b",
        "127.0.0.1",
        "-p",
        "{port}",
        "-x",
        "vol0",
        "-t",
        "{file}",
    ];
    Target {
        name: name.into(),
        launch: Launch::Server {
            program: "qemu-nbd".into(),
            args: args.iter().map(|x| x.to_string()).collect(),
            port: PortMode::Chosen,
            probes: vec![],
        },
        export: "vol0".into(),
        durability: durability.into(),
        class,
        peer: true,
        needs_journal: false,
        in_default: true,
        replication: None,
        qsd: None,
        jobs: None,
    }
}

/// `qsd-mirror`: the peer of the replicated targets, qemu-storage-daemon
/// exporting the volume over NBD while mirroring it synchronously
/// (`blockdev-mirror` `copy-mode=write-blocking`) to a second
/// qemu-storage-daemon over NBD on loopback (`qsd.rs` starts both). Write
/// jobs only, not in the default run.
pub fn qsd_mirror() -> Target {
    let m = QsdMirror::default();
    Target {
        name: "qsd-mirror".into(),
        launch: Launch::Server {
            program: "qemu-storage-daemon".into(),
            args: qsd::source_template(&m),
            port: PortMode::Chosen,
            probes: vec![],
        },
        export: qsd::EXPORT.into(),
        durability: qsd::DURABILITY.into(),
        class: Class::Replicated,
        peer: true,
        needs_journal: false,
        in_default: false,
        replication: None,
        qsd: Some(m),
        jobs: Some(WRITE_JOBS.iter().map(|j| j.to_string()).collect()),
    }
}

/// The replicated targets, in table order: their peer `qsd-mirror` (see
/// [`qsd_mirror`]), then mirrorblkd with 1 and 2 replicas on
/// loopback in each mode; one configured replica that is not running (mode
/// sync, the default on-replica-loss degrade); 1 replica behind a proxy
/// delaying `delay_ms` each way in each mode; and 1 and 2 replicas in mode
/// sync with every node in `--durability flush` (NBD's contract,
/// replicated). They run only the write jobs
/// and are not in the default run (`--replicated` adds them).
pub fn replicated(mirrorblkd: &Path, delay_ms: u64) -> Vec<Target> {
    let dir = mirrorblkd.parent().unwrap_or(Path::new("."));
    let repl = |peers, down, mode, delay_ms| Replication {
        peers,
        down,
        mode,
        delay_ms,
        delay_proxy: dir.join("delay-proxy"),
        durability_flush: false,
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
    // NBD's contract, replicated: every node in durability flush, mode
    // sync (a FLUSH or FUA waits for the replicas' syncs).
    for peers in [1, 2] {
        let mut r = repl(peers, 0, cluster::Mode::Sync, None);
        r.durability_flush = true;
        specs.push((format!("mirrorblk-flush-r{peers}-sync"), r));
    }
    let mirrorblk = specs.into_iter().map(|(name, r)| {
        let mut t = mirrorblk_variant(&name, mirrorblkd, &[], &r.durability());
        t.in_default = false;
        t.class = Class::Replicated;
        t.jobs = Some(WRITE_JOBS.iter().map(|j| j.to_string()).collect());
        t.replication = Some(r);
        t
    });
    std::iter::once(qsd_mirror()).chain(mirrorblk).collect()
}

/// The mirrorblk targets again, run with another build of the daemon
/// (`baseline`, e.g. the commit before a change) and the same arguments, for
/// an A/B in one run: `mirrorblk` becomes `mirrorblk-base`, `mirrorblk-r1-sync`
/// becomes `mirrorblk-base-r1-sync`, `mirrorblk-flush` `mirrorblk-base-flush`,
/// and so on. None is in the default run;
/// the cross-site ones use the delay proxy built next to `mirrorblkd`.
pub fn baseline(baseline: &Path, mirrorblkd: &Path, delay_ms: u64) -> Vec<Target> {
    let proxy = mirrorblkd
        .parent()
        .unwrap_or(Path::new("."))
        .join("delay-proxy");
    let mut all = vec![mirrorblk_variant(
        "mirrorblk",
        baseline,
        &[],
        MIRRORBLK_DURABILITY,
    )];
    // The peer is no build of ours: only the mirrorblk targets come again.
    all.extend(
        replicated(baseline, delay_ms)
            .into_iter()
            .filter(|t| t.qsd.is_none()),
    );
    // Last, so the per-write and replicated ones keep their places.
    all.push(mirrorblk_flush(baseline));
    for t in &mut all {
        t.name = t.name.replacen("mirrorblk", "mirrorblk-base", 1);
        t.durability = format!("baseline build {}: {}", baseline.display(), t.durability);
        t.in_default = false;
        if let Some(r) = t.replication.as_mut() {
            r.delay_proxy = proxy.clone();
        }
    }
    all
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
        class: Class::DurablePerWrite,
        peer: false,
        needs_journal: true,
        in_default: true,
        replication: None,
        qsd: None,
        jobs: None,
    }
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
                "{} not found (install it: nbdkit → package nbdkit, qemu-nbd and \
                 qemu-storage-daemon → qemu-utils, mirrorblkd → cargo build --release -p mirrorblk-server)",
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
        if let Some(m) = &self.qsd {
            return qsd::start(m, &program, args, vol, dir, log).map(Some);
        }
        match &self.replication {
            None => Ok(Some(Running {
                primary: Server::start(&program, args, port, vol, log)?,
                role: "server".into(),
                helpers: Vec::new(),
                admin: None,
                graceful: None,
            })),
            Some(r) => cluster::start(r, &program, args, vol, dir, log).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicated_targets_run_only_write_jobs() {
        let all = replicated(Path::new("/b/mirrorblkd"), 5);
        let names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "qsd-mirror",
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
                "mirrorblk-flush-r1-sync",
                "mirrorblk-flush-r2-sync",
            ]
        );
        for t in &all {
            assert!(!t.in_default);
            assert!(t.runs_job("4k-randwrite-qd32") && !t.runs_job("4k-randread-qd32"));
        }
        let r = all[1].replication.as_ref().expect("replicated");
        assert_eq!(r.delay_proxy, Path::new("/b/delay-proxy"));
        // The peer of the class: qemu-storage-daemon, its own settings.
        let q = &all[0];
        assert!(q.peer && q.class == Class::Replicated && q.replication.is_none());
        assert_eq!(q.qsd, Some(QsdMirror::default()));
        assert!(q.durability.contains("no flush per write"));
        for t in &all[1..] {
            assert!(!t.peer && t.qsd.is_none() && t.class == Class::Replicated);
        }
    }

    #[test]
    fn baseline_targets_run_the_other_build_under_their_own_names() {
        let all = baseline(Path::new("/old/mirrorblkd"), Path::new("/b/mirrorblkd"), 5);
        let names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.len(), 14);
        assert_eq!(names[13], "mirrorblk-base-flush");
        assert_eq!(all[13].class, Class::NbdContract);
        assert_eq!(
            names[..3],
            [
                "mirrorblk-base",
                "mirrorblk-base-r1-sync",
                "mirrorblk-base-r1-flush"
            ]
        );
        for t in &all {
            let Launch::Server { program, .. } = &t.launch else {
                panic!("{} has no server", t.name);
            };
            assert_eq!(program, Path::new("/old/mirrorblkd"));
            assert!(!t.in_default && t.durability.starts_with("baseline build /old/mirrorblkd"));
        }
        let r = all[1].replication.as_ref().expect("replicated");
        assert_eq!((r.peers, r.mode), (1, cluster::Mode::Sync));
        assert_eq!(r.delay_proxy, Path::new("/b/delay-proxy"));
        assert!(all[0].runs_job("4k-randread-qd32") && !all[1].runs_job("4k-randread-qd32"));
    }
}
