//! From merged [`Settings`] to a validated [`Config`]: defaults applied, every
//! rule checked in the order the errors have always been reported.

use std::collections::HashSet;
use std::path::PathBuf;

use super::defaults;
use super::error::ConfigError;
use super::settings::{Settings, VolumeSettings};
use super::{Config, CoordinatorConfig, VolumeConfig};
use crate::journal::format::{Role, MAX_NAME};
use crate::replication::{Peer, ReplicationConfig};
use crate::units::{is_aligned, ByteSize, Interval};

/// Validates `s` (flags already laid over the file) into a [`Config`].
pub(super) fn resolve(s: Settings) -> Result<Config, ConfigError> {
    let volumes = volumes(&s)?;
    let cores = cores(s.cores);
    let buffer_memory = buffer_memory(s.buffer_memory)?;
    let busy_poll = busy_poll(s.busy_poll_us)?;
    let max_connections = max_connections(s.max_connections)?;
    let checkpoint_interval = s
        .checkpoint_interval
        .clone()
        .map(|t| t.resolve("checkpoint_interval"))
        .transpose()?
        .unwrap_or(defaults::CHECKPOINT_INTERVAL);
    let handshake = handshake(&s)?;
    let mut replication = replication(&s)?;
    let (tls, replication_tls) = tls(&s)?;
    match (&mut replication, replication_tls) {
        (Some(r), Some(m)) => r.tls = Some(m),
        (None, Some(_)) => return Err(ConfigError::ReplicationTlsWithoutReplication),
        (_, None) => {}
    }
    let (event_log, event_log_max_bytes) = event_log(&s, &volumes)?;
    if s.role == Some(Role::Replica) && replication.as_ref().and_then(|r| r.listen).is_none() {
        return Err(ConfigError::ReplicaWithoutListen);
    }
    // Any durability replicates: with `flush`, FLUSH and FUA send barriers
    // (docs/REPLICATION.md, "Durability").
    let durability = s.durability.unwrap_or(defaults::DURABILITY);
    let lease_ttl = lease_ttl(&s)?;
    let coordinator = coordinator(&s, replication.is_some(), lease_ttl)?;
    Ok(Config {
        node: s.node.unwrap_or_else(hostname),
        admin_socket: s.admin_socket,
        listen: s.listen.unwrap_or(defaults::LISTEN),
        advertise: s.advertise.as_deref().map(advertise).transpose()?,
        unix: s.unix,
        cores,
        buffer_memory: buffer_memory.0,
        busy_poll,
        max_connections,
        handshake,
        tls,
        metrics_listen: s.metrics_listen,
        log_level: s.log_level.unwrap_or_else(|| defaults::LOG_LEVEL.into()),
        checkpoint_interval: checkpoint_interval.0,
        in_place_min: s.in_place_min.unwrap_or(defaults::IN_PLACE_MIN).0,
        durability,
        role: s.role,
        replication,
        coordinator,
        lease_ttl,
        event_log,
        event_log_max_bytes,
        volumes,
    })
}

/// The coordinator, when `--etcd` is given: it needs replication, excludes
/// `--role`, and its lease is whole seconds of at least the minimum.
fn coordinator(
    s: &Settings,
    replicated: bool,
    lease_ttl: std::time::Duration,
) -> Result<Option<CoordinatorConfig>, ConfigError> {
    if s.etcd.is_empty() {
        return Ok(None);
    }
    if s.role.is_some() {
        return Err(ConfigError::EtcdWithRole);
    }
    if !replicated {
        return Err(ConfigError::EtcdWithoutReplication);
    }
    for e in &s.etcd {
        e.parse::<mirrorblk_etcd::http::Endpoint>()
            .map_err(|err| ConfigError::EtcdEndpoint(err.to_string()))?;
    }
    Ok(Some(CoordinatorConfig {
        endpoints: s.etcd.clone(),
        lease_ttl,
    }))
}

/// `--advertise`: `HOST:PORT` with a host and a port number.
fn advertise(a: &str) -> Result<String, ConfigError> {
    let ok = a
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if ok {
        Ok(a.to_string())
    } else {
        Err(ConfigError::Advertise(a.to_string()))
    }
}

/// The lease TTL: whole seconds, at least the minimum.
fn lease_ttl(s: &Settings) -> Result<std::time::Duration, ConfigError> {
    let ttl = s
        .lease_ttl
        .clone()
        .map(|t| t.resolve("lease_ttl"))
        .transpose()?
        .unwrap_or(defaults::LEASE_TTL);
    if ttl < defaults::MIN_LEASE_TTL || ttl.0.subsec_nanos() != 0 {
        return Err(ConfigError::LeaseTtl);
    }
    Ok(ttl.0)
}

/// The file's volumes, then the flags' one; at least one, each valid, no
/// name or path used twice.
fn volumes(s: &Settings) -> Result<Vec<VolumeConfig>, ConfigError> {
    let mut volumes = Vec::new();
    for v in s.volumes.iter().chain([&s.volume]) {
        volumes.extend(volume(v)?);
    }
    if volumes.is_empty() {
        return Err(ConfigError::NoVolume);
    }
    let mut names = HashSet::new();
    let mut paths = HashSet::new();
    for v in &volumes {
        if v.name.is_empty() || v.name.len() > MAX_NAME {
            return Err(ConfigError::NameLength(v.name.clone()));
        }
        if !names.insert(&v.name) {
            return Err(ConfigError::DuplicateName(v.name.clone()));
        }
        for p in [&v.data, &v.journal] {
            if !paths.insert(p) {
                return Err(ConfigError::DuplicatePath(p.clone()));
            }
        }
        check_size(v)?;
    }
    Ok(volumes)
}

/// The volume `v` defines: none without name, data and journal; all three
/// or none must be given (a `[[volume]]` table always has all three).
fn volume(v: &VolumeSettings) -> Result<Option<VolumeConfig>, ConfigError> {
    let (name, data, journal) = match (&v.name, &v.data, &v.journal) {
        (Some(n), Some(d), Some(j)) => (n, d, j),
        (None, None, None) => return Ok(None),
        _ => return Err(ConfigError::PartialVolume),
    };
    Ok(Some(VolumeConfig {
        name: name.clone(),
        data: data.clone(),
        journal: journal.clone(),
        size: v.size.map(|s| s.0),
        journal_size: v.journal_size.0,
        description: v.description.clone().unwrap_or_default(),
        read_only: v.read_only,
        preallocate: v.preallocate,
        read_cache: v.read_cache,
    }))
}

/// A volume's size, when given, is a non-zero multiple of the block size.
fn check_size(v: &VolumeConfig) -> Result<(), ConfigError> {
    match v.size {
        Some(size) if size == 0 || !is_aligned(size) => Err(ConfigError::UnalignedSize {
            volume: v.name.clone(),
            size,
        }),
        _ => Ok(()),
    }
}

/// The event log's path (by default beside the first volume's journal) and
/// its size bound.
fn event_log(s: &Settings, volumes: &[VolumeConfig]) -> Result<(PathBuf, u64), ConfigError> {
    let max = s
        .event_log_max_bytes
        .unwrap_or(defaults::EVENT_LOG_MAX_BYTES);
    if max < defaults::MIN_EVENT_LOG_MAX_BYTES {
        return Err(ConfigError::EventLogTooSmall(max));
    }
    let path = match (&s.event_log, volumes.first()) {
        (Some(p), _) => p.clone(),
        // Beside a journal on a block device the file would land in /dev,
        // a memory file system: gone at the next boot.
        (None, Some(v)) if crate::store::in_device_dir(&v.journal) => {
            return Err(ConfigError::EventLogInDev(v.journal.clone()))
        }
        (None, Some(v)) => {
            let mut p = v.journal.clone().into_os_string();
            p.push(defaults::EVENT_LOG_SUFFIX);
            PathBuf::from(p)
        }
        // resolve() refused a node without volumes already.
        (None, None) => return Err(ConfigError::NoVolume),
    };
    Ok((path, max.0))
}

/// Cores asked for (or the CPUs), at least one. More cores than volumes
/// is useful: a volume's plain-export connections spread over every core.
fn cores(given: Option<usize>) -> usize {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    given.unwrap_or(cpus).max(1)
}

fn buffer_memory(given: Option<ByteSize>) -> Result<ByteSize, ConfigError> {
    let m = given.unwrap_or(defaults::BUFFER_MEMORY);
    if m < defaults::MIN_BUFFER_MEMORY {
        return Err(ConfigError::BufferMemoryTooSmall(m));
    }
    Ok(m)
}

/// The busy-poll window: none for 0 (the default), at most
/// [`crate::busy_poll::MAX_WINDOW`].
fn busy_poll(given_us: Option<u32>) -> Result<Option<std::time::Duration>, ConfigError> {
    let us = given_us.unwrap_or(0);
    let window = std::time::Duration::from_micros(u64::from(us));
    if window > crate::busy_poll::MAX_WINDOW {
        return Err(ConfigError::BusyPollTooLong(us));
    }
    Ok((us > 0).then_some(window))
}

fn max_connections(given: Option<usize>) -> Result<usize, ConfigError> {
    match given.unwrap_or(defaults::MAX_CONNECTIONS) {
        0 => Err(ConfigError::NoConnections),
        n => Ok(n),
    }
}

/// The bounds on connections on probation.
fn handshake(s: &Settings) -> Result<crate::admission::Limits, ConfigError> {
    let max_pending = s.max_handshakes.unwrap_or(defaults::MAX_HANDSHAKES);
    let per_source = s
        .max_handshakes_per_source
        .unwrap_or(defaults::MAX_HANDSHAKES_PER_SOURCE);
    if max_pending == 0 || per_source == 0 {
        return Err(ConfigError::NoHandshakes);
    }
    let deadline = s
        .handshake_timeout
        .clone()
        .map(|t| t.resolve("handshake_timeout"))
        .transpose()?
        .unwrap_or(defaults::HANDSHAKE_TIMEOUT);
    if deadline.0.is_zero() {
        return Err(ConfigError::NoHandshakes);
    }
    Ok(crate::admission::Limits {
        max_pending,
        per_source,
        deadline: deadline.0,
        max_bytes: defaults::HANDSHAKE_MAX_BYTES,
    })
}

/// Replication, when peers or a replication listener are configured.
fn replication(s: &Settings) -> Result<Option<ReplicationConfig>, ConfigError> {
    let peers = s
        .peers
        .iter()
        .map(|p| p.clone().resolve("peers"))
        .collect::<Result<Vec<Peer>, _>>()?;
    let listen = s.replication_listen;
    if peers.is_empty() && listen.is_none() {
        return Ok(None);
    }
    let secret = secret(s.secret_file.as_deref())?;
    let mut names = HashSet::new();
    if let Some(p) = peers.iter().find(|p| !names.insert(&p.name)) {
        return Err(ConfigError::DuplicatePeer(p.name.clone()));
    }
    let heartbeat_timeout = heartbeat_timeout(s)?;
    if let Some(wanted) = s.min_sync_replicas.filter(|&n| n > peers.len()) {
        return Err(ConfigError::TooManySyncReplicas {
            wanted,
            peers: peers.len(),
        });
    }
    Ok(Some(ReplicationConfig {
        listen,
        peers,
        secret,
        mode: s.mode.unwrap_or(defaults::MODE),
        min_sync_replicas: s.min_sync_replicas,
        heartbeat_timeout: heartbeat_timeout.0,
        on_replica_loss: s.on_replica_loss.unwrap_or(defaults::ON_REPLICA_LOSS),
        max_lag: s.max_lag.unwrap_or(defaults::MAX_LAG).0,
        resync_rate: s.resync_rate.unwrap_or(defaults::RESYNC_RATE).0,
        tls: None,
    }))
}

/// `--tls`, `--tls-verify-peer` and `--replication-tls` with the
/// certificates they need, loaded once (so `config check` finds a bad key).
fn tls(
    s: &Settings,
) -> Result<(Option<super::NbdTlsConfig>, Option<crate::tls::Material>), ConfigError> {
    use super::settings::TlsMode;
    let policy = match s.tls.unwrap_or(TlsMode::Off) {
        TlsMode::Off => None,
        TlsMode::On => Some(nbd::TlsPolicy::Optional),
        TlsMode::Require => Some(nbd::TlsPolicy::Required),
    };
    let replication_tls = s.replication_tls.unwrap_or(false);
    if policy.is_none() && !replication_tls {
        return Ok((None, None));
    }
    let dir = s
        .tls_certificates
        .as_deref()
        .ok_or(ConfigError::TlsWithoutCertificates(if policy.is_some() {
            "--tls"
        } else {
            "--replication-tls"
        }))?;
    let verify_peer = s.tls_verify_peer.unwrap_or(false);
    let material = crate::tls::Material::load(dir, verify_peer)?;
    let nbd = policy.map(|policy| super::NbdTlsConfig {
        policy,
        material: material.clone(),
    });
    Ok((nbd, replication_tls.then_some(material)))
}

/// The shared secret: the file's contents without surrounding white space,
/// at least 16 bytes.
fn secret(path: Option<&std::path::Path>) -> Result<Vec<u8>, ConfigError> {
    let path = path.ok_or(ConfigError::NoSecretFile)?;
    let secret = std::fs::read(path).map_err(|source| ConfigError::ReadSecret {
        path: path.to_path_buf(),
        source,
    })?;
    let secret = secret.trim_ascii().to_vec();
    if secret.len() < 16 {
        return Err(ConfigError::ShortSecret {
            path: path.to_path_buf(),
            len: secret.len(),
        });
    }
    Ok(secret)
}

fn heartbeat_timeout(s: &Settings) -> Result<Interval, ConfigError> {
    let t = s
        .heartbeat_timeout
        .clone()
        .map(|t| t.resolve("heartbeat_timeout"))
        .transpose()?
        .unwrap_or(defaults::HEARTBEAT_TIMEOUT);
    if t < defaults::MIN_HEARTBEAT_TIMEOUT {
        return Err(ConfigError::HeartbeatTooShort);
    }
    Ok(t)
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string())
}
