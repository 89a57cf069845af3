//! Node configuration: a TOML file, command-line flags, or both (flags win).
//!
//! Each setting is declared once, in [`settings`]: flag, TOML key, type, help
//! text, and its default in [`defaults`]. [`Config::from_cli`] lays the flags
//! over the file and `resolve` validates the result into a [`Config`].
//! Validation turns every mistake into one sentence that says what to fix
//! ([`ConfigError`]); the daemon prints it and exits with status 2.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub mod defaults;
mod error;
mod resolve;
pub mod settings;

pub use error::ConfigError;
pub use settings::{Cli, LogFormat, Settings, TlsMode, VolumeSettings};

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

/// Where the coordinator is and how long a lease lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// etcd client URLs (`http://HOST:PORT`).
    pub endpoints: Vec<String>,
    /// The lease TTL.
    pub lease_ttl: std::time::Duration,
}

/// NBD over TLS, validated: the policy and the loaded certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTlsConfig {
    /// Optional or required.
    pub policy: nbd::TlsPolicy,
    /// The certificates (`--tls-certificates`, `--tls-verify-peer`).
    pub material: crate::tls::Material,
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
    /// The NBD address published in etcd's leader record, when it is not
    /// `listen` (`HOST:PORT`, checked).
    pub advertise: Option<String>,
    /// NBD Unix socket.
    pub unix: Option<PathBuf>,
    /// Worker cores.
    pub cores: usize,
    /// Buffer memory per core.
    pub buffer_memory: u64,
    /// How long a core polls after a request starts or ends (`None`: never).
    pub busy_poll: Option<std::time::Duration>,
    /// Connection limit (serving connections).
    pub max_connections: usize,
    /// The bounds on connections still negotiating or authenticating.
    pub handshake: crate::admission::Limits,
    /// NBD over TLS, when `--tls` is on or require.
    pub tls: Option<NbdTlsConfig>,
    /// Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Log level filter.
    pub log_level: String,
    /// Longest time between checkpoints.
    pub checkpoint_interval: std::time::Duration,
    /// Smallest aligned write written in place (0: none).
    pub in_place_min: u64,
    /// When a reply promises durability.
    pub durability: crate::journal::Durability,
    /// Role given on the command line or in the file.
    pub role: Option<crate::journal::format::Role>,
    /// Replication, when peers or a replication listener are configured.
    pub replication: Option<crate::replication::ReplicationConfig>,
    /// The coordinator (etcd), when configured.
    pub coordinator: Option<CoordinatorConfig>,
    /// The lease TTL (checked and kept whether or not `--etcd` is given).
    pub lease_ttl: std::time::Duration,
    /// The event log file.
    pub event_log: PathBuf,
    /// Its size bound before rotation.
    pub event_log_max_bytes: u64,
    /// Volumes.
    pub volumes: Vec<VolumeConfig>,
}

impl Config {
    /// Where and how this node writes its event log.
    pub fn event_log_config(&self) -> crate::events::EventLogConfig {
        crate::events::EventLogConfig {
            path: self.event_log.clone(),
            max_bytes: self.event_log_max_bytes,
            node: self.node.clone(),
        }
    }
}

/// Reads and parses a TOML configuration file.
pub fn load_file(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
        path: path.to_path_buf(),
        reason: e.to_string().trim_end().to_string(),
    })
}

impl Config {
    /// Lays the flags over the file (if any) and validates the result.
    pub fn from_cli(cli: &Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(p) => load_file(p)?,
            None => Settings::default(),
        };
        resolve::resolve(cli.over(file))
    }
}

#[cfg(test)]
mod tests;
