//! Every setting, declared once: its flag, TOML key, value type, help text
//! and (through [`defaults`]) its default.
//!
//! [`Settings`] is both the command line (clap) and the TOML file (serde):
//! a field's name is its TOML key and, in kebab case, its flag. A flag-only
//! field is `#[serde(skip)]` (so the file refuses it as unknown), the
//! file-only `[[volume]]` list is `#[arg(skip)]`. Node settings stay `None`
//! until [`Settings::over`] lays the flags over the file; resolution then
//! applies the defaults.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;
use serde::{Deserialize, Deserializer};

use super::defaults;
use super::error::ConfigError;
use crate::journal::format::Role;
use crate::replication::{Mode, OnReplicaLoss, Peer};
use crate::store::Preallocate;
use crate::units::{ByteSize, Interval};

/// mirrorblkd: serves block volumes over NBD from a local store, through a
/// crash-safe write-ahead journal, on io_uring.
///
/// Give one volume with --export/--data/--journal (and --size to create
/// missing files), or several in a TOML file with --config. Flags override the
/// file's top-level keys; an --export volume is added to the file's volumes.
///
/// By default every write is durable in the journal (O_DIRECT + O_DSYNC,
/// group commit) before it is acknowledged, so FLUSH and FUA are free and
/// every reply is a promise that survives a power cut; --durability flush
/// keeps NBD's own, weaker contract instead.
///
/// Exit status: 0 after a clean stop, 1 on a runtime failure, 2 when the
/// configuration is wrong (one sentence on stderr says what to fix).
#[derive(Debug, Clone, Default, Parser, Deserialize)]
#[command(name = "mirrorblkd", version, about, long_about, max_term_width = 100)]
#[serde(deny_unknown_fields)]
pub struct Settings {
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
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// The volume the flags define (a file has `[[volume]]` tables instead).
    #[command(flatten)]
    #[serde(skip)]
    pub volume: VolumeSettings,

    /// TCP address for NBD clients.
    #[arg(long, value_name = "HOST:PORT", help_default = defaults::LISTEN)]
    pub listen: Option<SocketAddr>,

    /// The NBD address this node publishes in etcd's leader record when it
    /// is primary, for clients that look the primary up there (`mirrorblk
    /// primary`, `mirrorblk attach --etcd`): where clients reach it, when
    /// that is not --listen (NAT, a proxy, a listen address of 0.0.0.0).
    /// [default: the --listen address]
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,

    /// Also serve NBD on this Unix socket path (replaced if it exists).
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,

    /// Worker cores (io_uring runtimes). Volumes are dealt over them, and
    /// each volume's plain-export connections spread over all of them
    /// (each to the core serving the fewest, its home first on a tie):
    /// reads are served on the core that received them, everything else
    /// on the home core. `--cores 1` keeps every connection on one core.
    /// [default: the number of CPUs]
    #[arg(long, value_name = "N")]
    pub cores: Option<usize>,

    /// I/O buffer memory per core (page aligned, the large classes registered
    /// with io_uring); bounds the data in flight.
    #[arg(long, value_name = "SIZE", help_default = defaults::BUFFER_MEMORY)]
    pub buffer_memory: Option<ByteSize>,

    /// Microseconds a core keeps polling after a request starts or ends,
    /// instead of sleeping, while at most one request (of at most 64 KiB)
    /// is in flight on it.
    /// Cuts the latency of short queues (QD1) where waking an idle CPU is
    /// slow (a virtual machine whose idle CPUs do not poll, deep C-states),
    /// at the price of up to one CPU kept busy while such a client is
    /// active. At most 10000; 0 never polls.
    /// (docs/OPERATIONS.md, "Idle CPUs and latency")
    #[arg(long, value_name = "MICROSECONDS", help_default = "0")]
    pub busy_poll_us: Option<u32>,

    /// Serve Prometheus metrics at http://HOST:PORT/metrics (off when not given).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<SocketAddr>,

    /// NBD over TLS for TCP clients: off, on (clients choose with
    /// NBD_OPT_STARTTLS) or require (a clear-text client gets
    /// NBD_REP_ERR_TLS_REQD for every option and is never served). The
    /// --unix socket stays clear text (its file mode guards it).
    #[arg(long, value_enum, value_name = "MODE", help_default = "off")]
    pub tls: Option<TlsMode>,

    /// Directory with ca-cert.pem, server-cert.pem, server-key.pem and an
    /// optional ca-crl.pem (the layout qemu, nbdkit and libnbd use; `mirrorblk
    /// certs init DIR` writes one). Needed by --tls on|require and
    /// --replication-tls.
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,

    /// With --tls: NBD clients must present a certificate signed by
    /// ca-cert.pem (and not revoked in ca-crl.pem).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub tls_verify_peer: Option<bool>,

    /// The replication link runs mutual TLS with --tls-certificates: each
    /// node presents server-cert.pem and accepts only a peer whose
    /// certificate ca-cert.pem signed (unexpired, not in ca-crl.pem). The
    /// shared secret is still proved inside it. Every node must agree.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub replication_tls: Option<bool>,

    /// Most client connections at once; more are refused at accept.
    #[arg(long, value_name = "N", help_default = defaults::MAX_CONNECTIONS)]
    pub max_connections: Option<usize>,

    /// Most connections still negotiating (NBD) or authenticating
    /// (replication) at once, per port. When full, the one that has gone
    /// longest without progress is dropped to make room: a newcomer is never
    /// refused because of idle strangers.
    #[arg(long, value_name = "N", help_default = defaults::MAX_HANDSHAKES)]
    pub max_handshakes: Option<usize>,

    /// Most connections still negotiating from one source address; the
    /// source's own most stalled one makes room for its next.
    #[arg(long, value_name = "N", help_default = defaults::MAX_HANDSHAKES_PER_SOURCE)]
    pub max_handshakes_per_source: Option<usize>,

    /// Longest time a connection may take to negotiate (NBD) or to send its
    /// HELLO (replication) before it is dropped.
    #[arg(long, value_name = "DURATION", help_default = defaults::HANDSHAKE_TIMEOUT)]
    pub handshake_timeout: Option<Deferred<Interval>>,

    /// Longest time applied writes stay in the journal before a checkpoint
    /// (store fdatasync + superblock update) releases them. A checkpoint also
    /// happens whenever a quarter of the journal is applied. Shorter means
    /// faster restarts; longer means fewer device cache flushes.
    #[arg(long, value_name = "DURATION", help_default = defaults::CHECKPOINT_INTERVAL)]
    pub checkpoint_interval: Option<Deferred<Interval>>,

    /// When a reply promises that a write survives a power cut.
    ///
    /// per-write: every reply does. A write is durable in the journal before
    /// it is acknowledged (group commit), so FLUSH and FUA cost nothing more,
    /// and a client that never flushes (or a cache that lies about flushing)
    /// loses nothing.
    ///
    /// flush: NBD's own contract, what a disk with a volatile cache keeps. A
    /// write is acknowledged once the disk has it: it survives the daemon's
    /// death (kill -9), not a power cut. A FLUSH, and a write with FUA,
    /// completes once everything acknowledged before it, on any connection,
    /// is durable (concurrent flushes share one fdatasync). Faster for
    /// clients that flush rarely (file systems, qemu with cache=writeback);
    /// no gain for clients that flush or FUA every write. With replication
    /// the same holds on every replica the mode waits for: a write once
    /// their disks have it, FLUSH and FUA once it is durable there too
    /// (docs/REPLICATION.md, "Durability").
    #[arg(long, value_enum, value_name = "MODE", help_default = choice(defaults::DURABILITY))]
    pub durability: Option<crate::journal::Durability>,

    /// Writes at least this large (and 4 KiB aligned) skip the double write:
    /// the data goes durably to its home in the data store and the journal
    /// records only its metadata (as BlueStore does). 0 journals every
    /// write in full.
    #[arg(long, value_name = "SIZE", help_default = defaults::IN_PLACE_MIN)]
    pub in_place_min: Option<ByteSize>,

    /// Where this node accepts its primary's replication connection.
    #[arg(long, value_name = "HOST:PORT")]
    pub replication_listen: Option<SocketAddr>,

    /// Another node of the cluster, by name and replication address
    /// (repeatable). The primary connects to every peer.
    #[arg(long = "peer", value_name = "NAME=HOST:PORT")]
    #[serde(default)]
    pub peers: Vec<Deferred<Peer>>,

    /// File holding the secret shared by all nodes (at least 16 bytes); peers
    /// prove they know it (HMAC-SHA256) before any data flows.
    #[arg(long, value_name = "PATH")]
    pub secret_file: Option<PathBuf>,

    /// This node's role for its volumes. [default: the role it last had;
    /// primary when no peers are configured]
    #[arg(long, value_enum, value_name = "ROLE")]
    pub role: Option<Role>,

    /// etcd client URLs (http://HOST:PORT; comma-separated or repeated).
    /// With them and no --role, etcd decides which node is primary: the
    /// holder of the volume's leader key, kept under a lease of
    /// --lease-ttl. Only a node named in the primary's in-sync set may take
    /// over, so nothing acknowledged is lost (docs/FAILOVER.md).
    #[arg(long, value_name = "URL", value_delimiter = ',')]
    #[serde(default)]
    pub etcd: Vec<String>,

    /// The lease a node holds in etcd (whole seconds, at least 2). The
    /// primary stops acknowledging a quarter of it after its last renewal
    /// could have been lost, and a replica takes over once it has expired:
    /// a dead primary is replaced after about 1 to 1.5 times this.
    #[arg(long, value_name = "DURATION", help_default = defaults::LEASE_TTL)]
    pub lease_ttl: Option<Deferred<Interval>>,

    /// When writes are acknowledged: sync (durable on the replicas too),
    /// flush (received by the replicas; FLUSH/FUA wait for their durability),
    /// async (local only; replicas trail by at most --max-lag).
    #[arg(long, value_enum, value_name = "MODE", help_default = choice(defaults::MODE))]
    pub mode: Option<Mode>,

    /// In sync mode, acknowledge once this many replicas have a write
    /// durable. [default: every in-sync replica]
    #[arg(long, value_name = "N")]
    pub min_sync_replicas: Option<usize>,

    /// A peer silent for this long is declared dead.
    #[arg(long, value_name = "DURATION", help_default = defaults::HEARTBEAT_TIMEOUT)]
    pub heartbeat_timeout: Option<Deferred<Interval>>,

    /// When a replica is lost: degrade (go on without it; it resyncs later)
    /// or block (hold writes until it is back).
    #[arg(
        long,
        value_enum,
        value_name = "POLICY",
        help_default = choice(defaults::ON_REPLICA_LOSS)
    )]
    pub on_replica_loss: Option<OnReplicaLoss>,

    /// In async mode, the most bytes a replica may trail by before writers
    /// are slowed.
    #[arg(long, value_name = "SIZE", help_default = defaults::MAX_LAG)]
    pub max_lag: Option<ByteSize>,

    /// Bandwidth of resyncs and verifies, per replica: region bytes sent
    /// per second (a checksum comparison counts a sixteenth of its region).
    /// Live writes are never held for it.
    #[arg(
        long,
        value_name = "SIZE",
        help_default = format_args!("{} per second", defaults::RESYNC_RATE)
    )]
    pub resync_rate: Option<ByteSize>,

    /// Log level: error, warn, info, debug or trace (or a tracing filter).
    #[arg(
        long,
        value_name = "LEVEL",
        help_default = format_args!(
            "{}; the MIRRORBLK_LOG environment variable also works",
            defaults::LOG_LEVEL
        )
    )]
    pub log_level: Option<String>,

    /// The node's event log: role changes, leases, fences, peer and client
    /// connections, resyncs and admin commands, one JSON line each, written
    /// durably (`mirrorblk events` reads it); required when the first
    /// volume's journal is a device. [default: the first volume's journal
    /// path with `.events.jsonl` appended]
    #[arg(long, value_name = "PATH")]
    pub event_log: Option<PathBuf>,

    /// Size at which the event log is rotated: the file becomes PATH.1 (the
    /// older PATH.1 becomes PATH.2, and so on; three old files are kept).
    #[arg(long, value_name = "SIZE", help_default = defaults::EVENT_LOG_MAX_BYTES)]
    pub event_log_max_bytes: Option<ByteSize>,

    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = defaults::LOG_FORMAT)]
    #[serde(skip)]
    pub log_format: LogFormat,

    /// The file's `[[volume]]` tables.
    #[arg(skip)]
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeSettings>,
}

/// The command line is the settings as given by flags.
pub type Cli = Settings;

impl Settings {
    /// These settings (the flags) laid over `file`'s: a setting given here
    /// wins, and peers given here replace the file's list. The flag-only
    /// settings come from here, the `[[volume]]` tables from `file`.
    pub fn over(&self, file: Settings) -> Settings {
        // Destructured so that a new setting cannot be left out of the merge.
        let Settings {
            node,
            admin_socket,
            config: _,
            volume: _,
            listen,
            advertise,
            unix,
            cores,
            buffer_memory,
            busy_poll_us,
            metrics_listen,
            max_connections,
            max_handshakes,
            max_handshakes_per_source,
            handshake_timeout,
            tls,
            tls_certificates,
            tls_verify_peer,
            replication_tls,
            checkpoint_interval,
            durability,
            in_place_min,
            replication_listen,
            peers,
            secret_file,
            etcd,
            lease_ttl,
            role,
            mode,
            min_sync_replicas,
            heartbeat_timeout,
            on_replica_loss,
            max_lag,
            resync_rate,
            log_level,
            event_log,
            event_log_max_bytes,
            log_format: _,
            volumes,
        } = file;
        let flags = self.clone();
        Settings {
            node: flags.node.or(node),
            admin_socket: flags.admin_socket.or(admin_socket),
            config: flags.config,
            volume: flags.volume,
            listen: flags.listen.or(listen),
            advertise: flags.advertise.or(advertise),
            unix: flags.unix.or(unix),
            cores: flags.cores.or(cores),
            buffer_memory: flags.buffer_memory.or(buffer_memory),
            busy_poll_us: flags.busy_poll_us.or(busy_poll_us),
            metrics_listen: flags.metrics_listen.or(metrics_listen),
            max_connections: flags.max_connections.or(max_connections),
            max_handshakes: flags.max_handshakes.or(max_handshakes),
            max_handshakes_per_source: flags
                .max_handshakes_per_source
                .or(max_handshakes_per_source),
            handshake_timeout: flags.handshake_timeout.or(handshake_timeout),
            tls: flags.tls.or(tls),
            tls_certificates: flags.tls_certificates.or(tls_certificates),
            tls_verify_peer: flags.tls_verify_peer.or(tls_verify_peer),
            replication_tls: flags.replication_tls.or(replication_tls),
            checkpoint_interval: flags.checkpoint_interval.or(checkpoint_interval),
            durability: flags.durability.or(durability),
            in_place_min: flags.in_place_min.or(in_place_min),
            replication_listen: flags.replication_listen.or(replication_listen),
            peers: if flags.peers.is_empty() {
                peers
            } else {
                flags.peers
            },
            secret_file: flags.secret_file.or(secret_file),
            etcd: if flags.etcd.is_empty() {
                etcd
            } else {
                flags.etcd
            },
            lease_ttl: flags.lease_ttl.or(lease_ttl),
            role: flags.role.or(role),
            mode: flags.mode.or(mode),
            min_sync_replicas: flags.min_sync_replicas.or(min_sync_replicas),
            heartbeat_timeout: flags.heartbeat_timeout.or(heartbeat_timeout),
            on_replica_loss: flags.on_replica_loss.or(on_replica_loss),
            max_lag: flags.max_lag.or(max_lag),
            resync_rate: flags.resync_rate.or(resync_rate),
            log_level: flags.log_level.or(log_level),
            event_log: flags.event_log.or(event_log),
            event_log_max_bytes: flags.event_log_max_bytes.or(event_log_max_bytes),
            log_format: flags.log_format,
            volumes,
        }
    }
}

/// One volume: a `[[volume]]` table, or the `--export` volume's flags.
///
/// Volume settings are never merged (a flag volume is added to the file's),
/// so their defaults are applied as they are parsed, on both sides from the
/// same [`defaults`] constant, and clap prints them.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSettings {
    /// Export (volume) name clients ask for, e.g. with nbd://HOST/NAME.
    #[arg(long = "export", value_name = "NAME")]
    #[serde(deserialize_with = "required")]
    pub name: Option<String>,

    /// Data store of the --export volume: a regular file (created when missing
    /// and --size is given) or a block device.
    #[arg(long, value_name = "PATH")]
    #[serde(deserialize_with = "required")]
    pub data: Option<PathBuf>,

    /// Journal of the --export volume: a file, created (zero-filled, with
    /// --journal-size) when missing.
    #[arg(long, value_name = "PATH")]
    #[serde(deserialize_with = "required")]
    pub journal: Option<PathBuf>,

    /// Volume size, a multiple of 4 KiB, with K/M/G/T binary suffixes (1G = 1 GiB).
    /// [default: the size of the existing data file or device]
    #[arg(long, value_name = "SIZE")]
    pub size: Option<ByteSize>,

    /// Size of a journal created for the --export volume. Larger journals
    /// absorb longer write bursts; the largest request accepted is a quarter
    /// of it (at most 32M).
    #[arg(long, value_name = "SIZE", default_value_t = defaults::JOURNAL_SIZE)]
    #[serde(default = "defaults::journal_size")]
    pub journal_size: ByteSize,

    /// How a missing --data file is created: full (written with zeroes once,
    /// so later writes never allocate; several times faster) or sparse
    /// (instant, slower until filled).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = defaults::PREALLOCATE)]
    #[serde(default = "defaults::preallocate")]
    pub preallocate: Preallocate,

    /// Description of the --export volume shown by NBD_OPT_INFO/LIST.
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,

    /// Serve the --export volume read-only (writes, trims and zeroes fail with EPERM).
    #[arg(long)]
    #[serde(default)]
    pub read_only: bool,

    /// Serve reads of the --export volume through the host's page cache
    /// (as nbdkit's file plugin and qemu-nbd's default cache mode do):
    /// repeated reads come from memory. Writes stay direct and durable either
    /// way, and the kernel drops cached pages they overwrite. `false` reads
    /// with O_DIRECT, for a client that caches everything itself (a kernel
    /// nbd device, a VM) when host memory is tight. Data files only: on a
    /// block device reads are always direct.
    #[arg(long, value_name = "BOOL", default_value_t = defaults::READ_CACHE, action = clap::ArgAction::Set)]
    #[serde(default = "defaults::read_cache")]
    pub read_cache: bool,
}

impl Default for VolumeSettings {
    fn default() -> Self {
        VolumeSettings {
            name: None,
            data: None,
            journal: None,
            size: None,
            journal_size: defaults::JOURNAL_SIZE,
            preallocate: defaults::PREALLOCATE,
            description: None,
            read_only: false,
            read_cache: defaults::READ_CACHE,
        }
    }
}

/// A key the file must give although the flag side is optional (the flags
/// check `--export`/`--data`/`--journal` together instead): missing, it is
/// refused while parsing, as "missing field `name`".
fn required<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// `--tls`: whether NBD clients may or must use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS.
    Off,
    /// TLS for clients that ask (NBD_OPT_STARTTLS); clear text otherwise.
    On,
    /// TLS or nothing.
    Require,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for LogFormat {
    fn default() -> Self {
        defaults::LOG_FORMAT
    }
}

/// A value parsed by `T`'s `FromStr` on both sides, at different times: a
/// flag at once (clap refuses bad text with its usage line), the file's text
/// during resolution, so the refusal names the key (`peers: peer 'x' must
/// look like NAME=HOST:PORT, …`) and a replication-only key is checked only
/// when replication is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deferred<T> {
    /// Parsed from a flag.
    Parsed(T),
    /// As written in the file, not parsed yet.
    Text(String),
}

impl<T: FromStr> FromStr for Deferred<T> {
    type Err = T::Err;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Deferred::Parsed)
    }
}

impl<'de, T> Deserialize<'de> for Deferred<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Deferred::Text)
    }
}

impl<T: FromStr<Err = String>> Deferred<T> {
    /// The value; the file's text is parsed now, and refused as `key: why`.
    pub fn resolve(self, key: &'static str) -> Result<T, ConfigError> {
        match self {
            Deferred::Parsed(v) => Ok(v),
            Deferred::Text(t) => t
                .parse()
                .map_err(|reason| ConfigError::Value { key, reason }),
        }
    }
}

/// Ends an option's help with its default, `… [default: 128M]`, taken from
/// the same constant the resolution applies. Called by clap's derive as the
/// `help_default = VALUE` argument attribute, after the doc comment set the
/// help (from which the derive dropped the final period).
pub trait HelpDefault {
    /// This option with `[default: value]` after its help.
    fn help_default(self, value: impl fmt::Display) -> Self;
}

impl HelpDefault for clap::Arg {
    fn help_default(self, value: impl fmt::Display) -> Self {
        let help = self.get_help().map(ToString::to_string).unwrap_or_default();
        let long = self.get_long_help().map(ToString::to_string);
        let arg = self.help(format!("{help}. [default: {value}]"));
        match long {
            Some(long) => arg.long_help(format!("{long} [default: {value}]")),
            None => arg,
        }
    }
}

/// A choice's name as its flag takes it (`sync`, `degrade`).
fn choice(v: impl clap::ValueEnum) -> impl fmt::Display {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}
