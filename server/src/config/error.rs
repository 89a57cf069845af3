//! Configuration mistakes, each phrased as one sentence that says what to fix.

use std::path::PathBuf;

use super::defaults::{MIN_BUFFER_MEMORY, MIN_EVENT_LOG_MAX_BYTES, MIN_HEARTBEAT_TIMEOUT};
use crate::journal::format::MAX_NAME;
use crate::units::{align_up, ByteSize};

/// A configuration mistake; the daemon prints it and exits with status 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` cannot be read.
    #[error("cannot read config file {}: {source}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a bad value.
    #[error("config file {}: {reason}", path.display())]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The TOML parser's explanation.
        reason: String,
    },
    /// A value in the file does not parse.
    #[error("{key}: {reason}")]
    Value {
        /// The TOML key.
        key: &'static str,
        /// Why it does not parse.
        reason: String,
    },
    /// Some but not all of the flags that define a volume.
    #[error("--export, --data and --journal go together: give all three to define a volume")]
    PartialVolume,
    /// Neither flags nor file define a volume.
    #[error("no volume configured: give --export NAME --data PATH --journal PATH [--size SIZE], or --config FILE")]
    NoVolume,
    /// A volume name is empty or too long.
    #[error("volume name '{0}' must be 1 to {MAX_NAME} bytes long")]
    NameLength(String),
    /// Two volumes have the same name.
    #[error("volume name '{0}' is used twice; export names must be unique")]
    DuplicateName(String),
    /// Two volumes share a data store or journal path.
    #[error("{} is used twice (as a data store or journal); every volume needs its own files", .0.display())]
    DuplicatePath(PathBuf),
    /// A volume size that is zero or not block aligned.
    #[error("size of volume '{volume}' is {size} bytes, not a multiple of 4 KiB; use e.g. {}", ByteSize(align_up((*size).max(1))))]
    UnalignedSize {
        /// The volume.
        volume: String,
        /// Its size in bytes.
        size: u64,
    },
    /// `buffer_memory` below [`MIN_BUFFER_MEMORY`].
    #[error("--buffer-memory {0} is too small: use at least {MIN_BUFFER_MEMORY} (one 32M request must fit)")]
    BufferMemoryTooSmall(ByteSize),
    /// `busy_poll_us` above [`crate::busy_poll::MAX_WINDOW`].
    #[error("--busy-poll-us {0} is too long: use at most {max} (polling longer between two requests only burns the CPU)", max = crate::busy_poll::MAX_WINDOW.as_micros())]
    BusyPollTooLong(u32),
    /// `event_log_max_bytes` below [`MIN_EVENT_LOG_MAX_BYTES`].
    #[error("--event-log-max-bytes {0} is too small: use at least {MIN_EVENT_LOG_MAX_BYTES}")]
    EventLogTooSmall(ByteSize),
    /// The event log would default to a path under /dev.
    #[error("the first volume's journal is {} (a device): give --event-log PATH (e.g. /var/lib/mirrorblk/node.events.jsonl), since beside it the event log would be lost at reboot", .0.display())]
    EventLogInDev(PathBuf),
    /// `max_connections = 0`.
    #[error("--max-connections must be at least 1")]
    NoConnections,
    /// `max_handshakes`, `max_handshakes_per_source` or `handshake_timeout`
    /// is zero.
    #[error(
        "--max-handshakes, --max-handshakes-per-source and --handshake-timeout must be above zero"
    )]
    NoHandshakes,
    /// Replication without a secret file.
    #[error("replication needs --secret-file PATH: a file with the same secret (at least 16 bytes) on every node, e.g. head -c 32 /dev/urandom | base64 > /etc/mirrorblk/secret")]
    NoSecretFile,
    /// The secret file cannot be read.
    #[error("cannot read secret file {}: {source}", path.display())]
    ReadSecret {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The secret is shorter than 16 bytes.
    #[error("secret file {} holds {len} bytes; use at least 16 random bytes", path.display())]
    ShortSecret {
        /// The file.
        path: PathBuf,
        /// The secret's length (surrounding white space trimmed).
        len: usize,
    },
    /// Two peers have the same name.
    #[error("peer '{0}' is given twice")]
    DuplicatePeer(String),
    /// `heartbeat_timeout` below [`MIN_HEARTBEAT_TIMEOUT`].
    #[error("--heartbeat-timeout must be at least {MIN_HEARTBEAT_TIMEOUT}")]
    HeartbeatTooShort,
    /// A sync quorum larger than the cluster.
    #[error("--min-sync-replicas {wanted} is more than the {peers} peers configured")]
    TooManySyncReplicas {
        /// `min_sync_replicas`.
        wanted: usize,
        /// How many peers are configured.
        peers: usize,
    },
    /// `--etcd` with `--role`.
    #[error("--role and --etcd exclude each other: with --etcd the coordinator decides the role; drop --role")]
    EtcdWithRole,
    /// `--etcd` without replication.
    #[error("--etcd needs replication: give --replication-listen, --peer and --secret-file too")]
    EtcdWithoutReplication,
    /// A malformed etcd URL.
    #[error("--etcd: {0}")]
    EtcdEndpoint(String),
    /// A malformed `--advertise`.
    #[error("--advertise '{0}' is not HOST:PORT (e.g. 192.0.2.10:10809)")]
    Advertise(String),
    /// A lease TTL etcd cannot honour.
    #[error(
        "--lease-ttl must be whole seconds, at least {}",
        super::defaults::MIN_LEASE_TTL
    )]
    LeaseTtl,
    /// `--tls on|require` or `--replication-tls` without certificates.
    #[error("{0} needs --tls-certificates DIR (ca-cert.pem, server-cert.pem, server-key.pem; `mirrorblk certs init DIR` writes them)")]
    TlsWithoutCertificates(&'static str),
    /// The certificates cannot be used.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// `--replication-tls` without replication.
    #[error("--replication-tls needs replication: give --replication-listen or --peer too")]
    ReplicationTlsWithoutReplication,
    /// A replica that no primary could reach.
    #[error("--role replica needs --replication-listen HOST:PORT, where the primary connects")]
    ReplicaWithoutListen,
}
