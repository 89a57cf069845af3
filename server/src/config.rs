//! Node configuration: a TOML file, command-line flags, or both (flags win).
//!
//! Validation turns every mistake into one sentence that says what to fix;
//! the daemon prints it and exits with status 2.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use crate::units::{is_aligned, ByteSize};

/// Default NBD listen address (the IANA NBD port, loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
/// Default journal size for a volume.
pub const DEFAULT_JOURNAL_SIZE: ByteSize = ByteSize(256 << 20);

fn default_true() -> bool {
    true
}

/// Writes of at least this many bytes go in place (see `--in-place-min`).
pub const DEFAULT_IN_PLACE_MIN: ByteSize = ByteSize(128 << 10);
/// Default I/O buffer memory per core.
pub const DEFAULT_BUFFER_MEMORY: ByteSize = ByteSize(128 << 20);

/// mirrorblkd: serves block volumes over NBD from a local store, through a
/// crash-safe write-ahead journal, on io_uring.
///
/// Give one volume with --export/--data/--journal (and --size to create
/// missing files), or several in a TOML file with --config. Flags override the
/// file's top-level keys; an --export volume is added to the file's volumes.
///
/// Every write is durable in the journal (O_DIRECT + O_DSYNC, group commit)
/// before it is acknowledged, so FLUSH and FUA are free and every reply is a
/// promise that survives a power cut.
///
/// Exit status: 0 after a clean stop, 1 on a runtime failure, 2 when the
/// configuration is wrong (one sentence on stderr says what to fix).
#[derive(Debug, Clone, Parser, Default)]
#[command(name = "mirrorblkd", version, about, long_about, max_term_width = 100)]
pub struct Cli {
    /// This node's name (shown by status; peers know it by this name).
    /// [default: the host name]
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,

    /// Unix socket for the admin CLI (`mirrorblk --admin-socket PATH status`),
    /// JSON lines, mode 0600. Off when not given.
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,

    /// TOML configuration file with `[[volume]]` tables (see systemd/example-*.toml).
    #[arg(short = 'c', long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Export (volume) name clients ask for, e.g. with nbd://HOST/NAME.
    #[arg(long, value_name = "NAME")]
    pub export: Option<String>,

    /// Data store of the --export volume: a regular file (created when missing
    /// and --size is given) or a block device.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,

    /// Journal of the --export volume: a file, created (zero-filled, with
    /// --journal-size) when missing.
    #[arg(long, value_name = "PATH")]
    pub journal: Option<PathBuf>,

    /// Volume size, a multiple of 4 KiB, with K/M/G/T binary suffixes (1G = 1 GiB).
    /// [default: the size of the existing data file or device]
    #[arg(long, value_name = "SIZE")]
    pub size: Option<ByteSize>,

    /// Size of a journal created for the --export volume. Larger journals
    /// absorb longer write bursts; the largest request accepted is a quarter
    /// of it (at most 32M).
    #[arg(long, value_name = "SIZE", default_value_t = DEFAULT_JOURNAL_SIZE)]
    pub journal_size: ByteSize,

    /// How a missing --data file is created: full (written with zeroes once,
    /// so later writes never allocate; several times faster) or sparse
    /// (instant, slower until filled).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = crate::store::Preallocate::Full)]
    pub preallocate: crate::store::Preallocate,

    /// Description of the --export volume shown by NBD_OPT_INFO/LIST.
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,

    /// Serve the --export volume read-only (writes, trims and zeroes fail with EPERM).
    #[arg(long)]
    pub read_only: bool,

    /// Serve reads of the --export volume through the host's page cache
    /// (as nbdkit's file plugin and qemu-nbd's default cache mode do):
    /// repeated reads come from memory. Writes stay direct and durable either
    /// way, and the kernel drops cached pages they overwrite. `false` reads
    /// with O_DIRECT, for a client that caches everything itself (a kernel
    /// nbd device, a VM) when host memory is tight. Data files only: on a
    /// block device reads are always direct.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub read_cache: bool,

    /// TCP address for NBD clients. [default: 127.0.0.1:10809]
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<SocketAddr>,

    /// Also serve NBD on this Unix socket path (replaced if it exists).
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,

    /// Worker cores (io_uring runtimes); volumes are spread over them.
    /// [default: the number of CPUs, at most the number of volumes]
    #[arg(long, value_name = "N")]
    pub cores: Option<usize>,

    /// I/O buffer memory per core (registered, page aligned); bounds the data
    /// in flight. [default: 128M]
    #[arg(long, value_name = "SIZE")]
    pub buffer_memory: Option<ByteSize>,

    /// Serve Prometheus metrics at http://HOST:PORT/metrics (off when not given).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<SocketAddr>,

    /// Most client connections at once; more are refused at accept. [default: 1024]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Longest time applied writes stay in the journal before a checkpoint
    /// (store fdatasync + superblock update) releases them. A checkpoint also
    /// happens whenever a quarter of the journal is applied. Shorter means
    /// faster restarts; longer means fewer device cache flushes. [default: 1s]
    #[arg(long, value_name = "DURATION", value_parser = crate::units::parse_duration)]
    pub checkpoint_interval: Option<std::time::Duration>,

    /// Writes at least this large (and 4 KiB aligned) skip the double write:
    /// the data goes durably to its home in the data store and the journal
    /// records only its metadata (as BlueStore does). 0 journals every
    /// write in full. [default: 128K]
    #[arg(long, value_name = "SIZE")]
    pub in_place_min: Option<ByteSize>,

    /// Where this node accepts its primary's replication connection.
    #[arg(long, value_name = "HOST:PORT")]
    pub replication_listen: Option<SocketAddr>,

    /// Another node of the cluster, by name and replication address
    /// (repeatable). The primary connects to every peer.
    #[arg(long = "peer", value_name = "NAME=HOST:PORT")]
    pub peers: Vec<crate::replication::Peer>,

    /// File holding the secret shared by all nodes (at least 16 bytes); peers
    /// prove they know it (HMAC-SHA256) before any data flows.
    #[arg(long, value_name = "PATH")]
    pub secret_file: Option<PathBuf>,

    /// This node's role for its volumes. [default: the role it last had;
    /// primary when no peers are configured]
    #[arg(long, value_enum, value_name = "ROLE")]
    pub role: Option<crate::journal::format::Role>,

    /// When writes are acknowledged: sync (durable on the replicas too),
    /// flush (received by the replicas; FLUSH/FUA wait for their durability),
    /// async (local only; replicas trail by at most --max-lag). [default: sync]
    #[arg(long, value_enum, value_name = "MODE")]
    pub mode: Option<crate::replication::Mode>,

    /// In sync mode, acknowledge once this many replicas have a write
    /// durable. [default: every in-sync replica]
    #[arg(long, value_name = "N")]
    pub min_sync_replicas: Option<usize>,

    /// A peer silent for this long is declared dead. [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = crate::units::parse_duration)]
    pub heartbeat_timeout: Option<std::time::Duration>,

    /// When a replica is lost: degrade (go on without it; it resyncs later)
    /// or block (hold writes until it is back). [default: degrade]
    #[arg(long, value_enum, value_name = "POLICY")]
    pub on_replica_loss: Option<crate::replication::OnReplicaLoss>,

    /// In async mode, the most bytes a replica may trail by before writers
    /// are slowed. [default: 64M]
    #[arg(long, value_name = "SIZE")]
    pub max_lag: Option<ByteSize>,

    /// Bandwidth of resyncs and verifies, per replica: region bytes sent
    /// per second (a checksum comparison counts a sixteenth of its region).
    /// Live writes are never held for it. [default: 200M per second]
    #[arg(long, value_name = "SIZE")]
    pub resync_rate: Option<ByteSize>,

    /// Log level: error, warn, info, debug or trace (or a tracing filter).
    /// [default: info; the MIRRORBLK_LOG environment variable also works]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The TOML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Node name.
    pub node: Option<String>,
    /// Admin socket path.
    pub admin_socket: Option<PathBuf>,
    /// NBD TCP address.
    pub listen: Option<SocketAddr>,
    /// NBD Unix socket.
    pub unix: Option<PathBuf>,
    /// Worker cores.
    pub cores: Option<usize>,
    /// Buffer memory per core.
    pub buffer_memory: Option<ByteSize>,
    /// Connection limit.
    pub max_connections: Option<usize>,
    /// Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Log level.
    pub log_level: Option<String>,
    /// Checkpoint interval, e.g. "1s".
    pub checkpoint_interval: Option<String>,
    /// Smallest write that goes in place, e.g. "128K" ("0" turns it off).
    pub in_place_min: Option<ByteSize>,
    /// Replication listen address.
    pub replication_listen: Option<SocketAddr>,
    /// Peers as "NAME=HOST:PORT".
    #[serde(default)]
    pub peers: Vec<String>,
    /// Secret file.
    pub secret_file: Option<PathBuf>,
    /// Role.
    pub role: Option<crate::journal::format::Role>,
    /// Mode.
    pub mode: Option<crate::replication::Mode>,
    /// Quorum in sync mode.
    pub min_sync_replicas: Option<usize>,
    /// Heartbeat timeout, e.g. "5s".
    pub heartbeat_timeout: Option<String>,
    /// Replica-loss policy.
    pub on_replica_loss: Option<crate::replication::OnReplicaLoss>,
    /// Async lag bound.
    pub max_lag: Option<ByteSize>,
    /// Resync bandwidth per second.
    pub resync_rate: Option<ByteSize>,
    /// Volumes.
    #[serde(default, rename = "volume")]
    pub volumes: Vec<FileVolume>,
}

/// One `[[volume]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileVolume {
    /// Export name.
    pub name: String,
    /// Data store path.
    pub data: PathBuf,
    /// Journal path.
    pub journal: PathBuf,
    /// Size (required to create a missing data file).
    pub size: Option<ByteSize>,
    /// Journal size when creating it.
    pub journal_size: Option<ByteSize>,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Read-only export.
    #[serde(default)]
    pub read_only: bool,
    /// How a missing data file is created.
    #[serde(default)]
    pub preallocate: crate::store::Preallocate,
    /// Serve reads through the page cache (default true).
    #[serde(default = "default_true")]
    pub read_cache: bool,
}

/// A validated volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeConfig {
    /// Export name.
    pub name: String,
    /// Data store path.
    pub data: PathBuf,
    /// Journal path.
    pub journal: PathBuf,
    /// Size, if given.
    pub size: Option<u64>,
    /// Journal size when creating it.
    pub journal_size: u64,
    /// Description.
    pub description: String,
    /// Read-only export.
    pub read_only: bool,
    /// How a missing data file is created.
    pub preallocate: crate::store::Preallocate,
    /// Serve reads through the page cache (writes stay direct).
    pub read_cache: bool,
}

/// A validated node configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Node name.
    pub node: String,
    /// Admin socket path.
    pub admin_socket: Option<PathBuf>,
    /// NBD TCP address.
    pub listen: SocketAddr,
    /// NBD Unix socket.
    pub unix: Option<PathBuf>,
    /// Worker cores.
    pub cores: usize,
    /// Buffer memory per core.
    pub buffer_memory: u64,
    /// Connection limit.
    pub max_connections: usize,
    /// Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Log level filter.
    pub log_level: String,
    /// Longest time between checkpoints.
    pub checkpoint_interval: std::time::Duration,
    /// Smallest aligned write written in place (0: none).
    pub in_place_min: u64,
    /// Role given on the command line or in the file.
    pub role: Option<crate::journal::format::Role>,
    /// Replication, when peers or a replication listener are configured.
    pub replication: Option<crate::replication::ReplicationConfig>,
    /// Volumes.
    pub volumes: Vec<VolumeConfig>,
}

/// A configuration mistake, phrased as what to fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

fn replication_config(
    cli: &Cli,
    file: &FileConfig,
) -> Result<Option<crate::replication::ReplicationConfig>, ConfigError> {
    use crate::replication::{Peer, ReplicationConfig};
    let mut peers = cli.peers.clone();
    if peers.is_empty() {
        for p in &file.peers {
            peers.push(
                p.parse::<Peer>()
                    .map_err(|e| ConfigError(format!("peers: {e}")))?,
            );
        }
    }
    let listen = cli.replication_listen.or(file.replication_listen);
    if peers.is_empty() && listen.is_none() {
        return Ok(None);
    }
    let Some(secret_path) = cli.secret_file.clone().or(file.secret_file.clone()) else {
        return err("replication needs --secret-file PATH: a file with the same secret (at least 16 bytes) on every node, e.g. head -c 32 /dev/urandom | base64 > /etc/mirrorblk/secret");
    };
    let secret = std::fs::read(&secret_path).map_err(|e| {
        ConfigError(format!(
            "cannot read secret file {}: {e}",
            secret_path.display()
        ))
    })?;
    let secret: Vec<u8> = secret.trim_ascii().to_vec();
    if secret.len() < 16 {
        return err(format!(
            "secret file {} holds {} bytes; use at least 16 random bytes",
            secret_path.display(),
            secret.len()
        ));
    }
    let mut names = HashSet::new();
    for p in &peers {
        if !names.insert(p.name.clone()) {
            return err(format!("peer '{}' is given twice", p.name));
        }
    }
    let heartbeat_timeout = match (cli.heartbeat_timeout, &file.heartbeat_timeout) {
        (Some(d), _) => d,
        (None, Some(t)) => crate::units::parse_duration(t)
            .map_err(|e| ConfigError(format!("heartbeat_timeout: {e}")))?,
        (None, None) => std::time::Duration::from_secs(5),
    };
    if heartbeat_timeout < std::time::Duration::from_millis(100) {
        return err("--heartbeat-timeout must be at least 100ms");
    }
    let min_sync_replicas = cli.min_sync_replicas.or(file.min_sync_replicas);
    if let Some(n) = min_sync_replicas {
        if n > peers.len() {
            return err(format!(
                "--min-sync-replicas {n} is more than the {} peers configured",
                peers.len()
            ));
        }
    }
    Ok(Some(ReplicationConfig {
        listen,
        peers,
        secret,
        mode: cli.mode.or(file.mode).unwrap_or_default(),
        min_sync_replicas,
        heartbeat_timeout,
        on_replica_loss: cli
            .on_replica_loss
            .or(file.on_replica_loss)
            .unwrap_or_default(),
        max_lag: cli
            .max_lag
            .or(file.max_lag)
            .map(|s| s.0)
            .unwrap_or(64 << 20),
        resync_rate: cli
            .resync_rate
            .or(file.resync_rate)
            .map(|s| s.0)
            .unwrap_or(200 << 20),
    }))
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

/// Reads and parses a TOML configuration file.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        ConfigError(format!(
            "config file {}: {}",
            path.display(),
            e.to_string().trim_end()
        ))
    })
}

impl Config {
    /// Merges flags over the file (if any) and validates the result.
    pub fn from_cli(cli: &Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        let mut volumes: Vec<VolumeConfig> = file
            .volumes
            .iter()
            .map(|v| VolumeConfig {
                name: v.name.clone(),
                data: v.data.clone(),
                journal: v.journal.clone(),
                size: v.size.map(|s| s.0),
                journal_size: v.journal_size.unwrap_or(DEFAULT_JOURNAL_SIZE).0,
                description: v.description.clone(),
                read_only: v.read_only,
                preallocate: v.preallocate,
                read_cache: v.read_cache,
            })
            .collect();
        match (&cli.export, &cli.data, &cli.journal) {
            (Some(name), Some(data), Some(journal)) => volumes.push(VolumeConfig {
                name: name.clone(),
                data: data.clone(),
                journal: journal.clone(),
                size: cli.size.map(|s| s.0),
                journal_size: cli.journal_size.0,
                description: cli.description.clone().unwrap_or_default(),
                read_only: cli.read_only,
                preallocate: cli.preallocate,
                read_cache: cli.read_cache,
            }),
            (None, None, None) => {}
            _ => {
                return err(
                    "--export, --data and --journal go together: give all three to define a volume",
                )
            }
        }
        if volumes.is_empty() {
            return err("no volume configured: give --export NAME --data PATH --journal PATH [--size SIZE], or --config FILE");
        }
        let mut names = HashSet::new();
        let mut paths = HashSet::new();
        for v in &volumes {
            if v.name.is_empty() || v.name.len() > crate::journal::format::MAX_NAME {
                return err(format!(
                    "volume name '{}' must be 1 to {} bytes long",
                    v.name,
                    crate::journal::format::MAX_NAME
                ));
            }
            if !names.insert(v.name.clone()) {
                return err(format!(
                    "volume name '{}' is used twice; export names must be unique",
                    v.name
                ));
            }
            for p in [&v.data, &v.journal] {
                if !paths.insert(p.clone()) {
                    return err(format!("{} is used twice (as a data store or journal); every volume needs its own files", p.display()));
                }
            }
            if let Some(s) = v.size {
                if s == 0 || !is_aligned(s) {
                    return err(format!(
                        "size of volume '{}' is {s} bytes, not a multiple of 4 KiB; use e.g. {}",
                        v.name,
                        ByteSize(crate::units::align_up(s.max(1)))
                    ));
                }
            }
        }
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let cores = cli
            .cores
            .or(file.cores)
            .unwrap_or(cpus)
            .clamp(1, volumes.len().max(1));
        let buffer_memory = cli
            .buffer_memory
            .or(file.buffer_memory)
            .unwrap_or(DEFAULT_BUFFER_MEMORY)
            .0;
        if buffer_memory < (48 << 20) {
            return err(format!(
                "--buffer-memory {} is too small: use at least 48M (one 32M request must fit)",
                ByteSize(buffer_memory)
            ));
        }
        let max_connections = cli.max_connections.or(file.max_connections).unwrap_or(1024);
        if max_connections == 0 {
            return err("--max-connections must be at least 1");
        }
        let checkpoint_interval = match (cli.checkpoint_interval, &file.checkpoint_interval) {
            (Some(d), _) => d,
            (None, Some(t)) => crate::units::parse_duration(t)
                .map_err(|e| ConfigError(format!("checkpoint_interval: {e}")))?,
            (None, None) => std::time::Duration::from_secs(1),
        };
        let listen = cli
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("default address parses"));
        let replication = replication_config(cli, &file)?;
        let role = cli.role.or(file.role);
        if role == Some(crate::journal::format::Role::Replica)
            && replication.as_ref().and_then(|r| r.listen).is_none()
        {
            return err(
                "--role replica needs --replication-listen HOST:PORT, where the primary connects",
            );
        }
        let node = cli.node.clone().or(file.node).unwrap_or_else(hostname);
        Ok(Config {
            node,
            admin_socket: cli.admin_socket.clone().or(file.admin_socket),
            listen,
            unix: cli.unix.clone().or(file.unix),
            cores,
            buffer_memory,
            max_connections,
            metrics_listen: cli.metrics_listen.or(file.metrics_listen),
            log_level: cli
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            checkpoint_interval,
            in_place_min: cli
                .in_place_min
                .or(file.in_place_min)
                .unwrap_or(DEFAULT_IN_PLACE_MIN)
                .0,
            role,
            replication,
            volumes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["mirrorblkd"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).expect("flags parse")
    }

    #[test]
    fn flags_define_a_volume() {
        let c = Config::from_cli(&cli(&[
            "--export",
            "v",
            "--data",
            "/x/d",
            "--journal",
            "/x/j",
            "--size",
            "1G",
        ]))
        .unwrap();
        assert_eq!(c.volumes[0].size, Some(1 << 30));
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    }

    #[test]
    fn unaligned_size_is_refused_with_a_suggestion() {
        let e = Config::from_cli(&cli(&[
            "--export",
            "v",
            "--data",
            "/d",
            "--journal",
            "/j",
            "--size",
            "4097",
        ]))
        .unwrap_err();
        assert!(
            e.0.contains("not a multiple of 4 KiB") && e.0.contains("8K"),
            "{}",
            e.0
        );
    }

    #[test]
    fn partial_volume_flags_are_refused() {
        let e = Config::from_cli(&cli(&["--export", "v"])).unwrap_err();
        assert!(e.0.contains("go together"));
    }

    #[test]
    fn toml_file_with_two_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:1234\"\n[[volume]]\nname = \"a\"\ndata = \"/a\"\njournal = \"/aj\"\nsize = \"64M\"\n[[volume]]\nname = \"b\"\ndata = \"/b\"\njournal = \"/bj\"\nread_only = true\n",
        )
        .unwrap();
        let c = Config::from_cli(&cli(&["--config", p.to_str().unwrap()])).unwrap();
        assert_eq!(c.volumes.len(), 2);
        assert_eq!(c.listen.port(), 1234);
        assert!(c.volumes[1].read_only);
    }

    #[test]
    fn shipped_example_config_parses() {
        let text = include_str!("../../systemd/example-node.toml");
        let f: FileConfig = toml::from_str(text).expect("example config parses");
        assert_eq!(f.volumes.len(), 2);
        assert!(f.volumes[1].read_only);
    }

    #[test]
    fn unknown_toml_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "lisen = \"x\"\n").unwrap();
        let e = Config::from_cli(&cli(&["--config", p.to_str().unwrap()])).unwrap_err();
        assert!(e.0.contains("lisen"), "{}", e.0);
    }

    #[test]
    fn duplicate_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[[volume]]\nname = \"a\"\ndata = \"/a\"\njournal = \"/a\"\n",
        )
        .unwrap();
        let e = Config::from_cli(&cli(&["--config", p.to_str().unwrap()])).unwrap_err();
        assert!(e.0.contains("used twice"), "{}", e.0);
    }
}
