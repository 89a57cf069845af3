//! Replicated mirrorblk targets: a primary `mirrorblkd` with replicas (each
//! its own `mirrorblkd` process with its own data file, journal and admin
//! socket) on loopback, optionally behind a delaying TCP proxy (a cross-site
//! link), in one of the replication modes.
//!
//! The order of a start is: replicas (each on a replication port we choose),
//! then one `delay-proxy` per replica for a cross-site target, then the
//! primary with `--peer NAME=ADDR` for each (the proxy's address when there
//! is one), then a wait, bounded by [`IN_SYNC_TIMEOUT`], until the primary's
//! admin socket shows every running replica `in-sync` with no resync left
//! (a fresh replica first gets a checksum resync of the whole volume).
//!
//! The command lines are built by the pure functions below, from the node
//! specs shared with the tests and `mirrorblk demo`
//! ([`mirrorblk_admin::cluster`]), so they can be checked without starting
//! anything.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mirrorblk_admin::cluster::{self, NodeSpec};
use mirrorblk_admin::{ReplicaState, ReplicaStatus, Role};
use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::process::{self, Helper, PortMode, Running, Server, Volume};

/// Longest wait for every replica to be in sync (including the checksum
/// resync of a fresh 1 GiB volume, about 0.4 s per replica on the
/// development machine; the rest is slack for a loaded machine).
pub const IN_SYNC_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest metrics scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// The primary's node name; replicas are n2, n3, ...
pub const PRIMARY_NODE: &str = "n1";
/// The Prometheus counter of userspace payload copies on the write path.
pub const COPIES_METRIC: &str = "mirrorblk_payload_copies_total";
/// The Prometheus counter of client request bytes (per op).
pub const REQUEST_BYTES_METRIC: &str = "mirrorblk_request_bytes_total";

pub use mirrorblk_admin::Mode;

/// When a completed write is durable, in `mode`.
pub fn mode_durability(mode: Mode) -> &'static str {
    match mode {
        Mode::Sync => {
            "every write durable in the primary's journal and in the journal of every \
             in-sync replica before its reply"
        }
        Mode::Flush => {
            "every write durable in the primary's journal and received (in memory) by every \
             in-sync replica before its reply; durable on the replicas only at the next \
             FLUSH/FUA (fio sends none)"
        }
        Mode::Async => {
            "every write durable in the primary's journal before its reply; replicas trail \
             by at most --max-lag (64M default), writers slowed beyond it"
        }
    }
}

/// How a replicated target is set up.
#[derive(Debug, Clone)]
pub struct Replication {
    /// Replicas configured on the primary (`--peer` flags).
    pub peers: usize,
    /// How many of them are not started (the last ones): the
    /// "replication configured, replica down" case.
    pub down: usize,
    /// Acknowledgement mode.
    pub mode: Mode,
    /// Delay of the TCP proxy between the primary and each replica, per
    /// direction, in milliseconds (`None`: direct loopback).
    pub delay_ms: Option<u64>,
    /// The delaying proxy (`delay-proxy`), for cross-site targets.
    pub delay_proxy: PathBuf,
    /// Every node runs `--durability flush` (NBD's contract): a write is
    /// acknowledged once the disks have it, durable at FLUSH or FUA.
    pub durability_flush: bool,
}

impl Replication {
    /// Node names of the replicas: n2, n3, ...
    pub fn replica_names(&self) -> Vec<String> {
        (0..self.peers).map(|i| format!("n{}", i + 2)).collect()
    }

    /// Whether replica `i` (0-based) is started.
    pub fn runs(&self, i: usize) -> bool {
        i < self.peers.saturating_sub(self.down)
    }

    /// Replicas that are started.
    pub fn running(&self) -> usize {
        self.peers.saturating_sub(self.down)
    }

    /// One line: when is a completed write durable on this target.
    pub fn durability(&self) -> String {
        let mut d = format!(
            "{} replica(s) on loopback, mode {}: {}",
            self.peers,
            self.mode.as_str(),
            mode_durability(self.mode)
        );
        if self.durability_flush {
            d = format!(
                "{} replica(s) on loopback, mode {}, every node --durability flush (NBD's \
                 contract): a write acknowledged once the primary's journal and every in-sync \
                 replica's journal have it written (not synced); a FLUSH or FUA write completes \
                 once all of them have synced everything acknowledged before it",
                self.peers,
                self.mode.as_str()
            );
        }
        if self.down > 0 {
            d = format!(
                "{} configured replica(s), {} of them not running (on-replica-loss degrade), \
                 mode {}: every write durable in the primary's journal before its reply, \
                 the down replica resyncs when it comes back",
                self.peers,
                self.down,
                self.mode.as_str()
            );
        }
        if let Some(ms) = self.delay_ms {
            d.push_str(&format!(
                "; each replica behind a TCP proxy delaying {ms} ms each way (cross-site link)"
            ));
        }
        d
    }

    /// Programs this target needs besides `mirrorblkd`.
    pub fn helpers(&self) -> Vec<&Path> {
        let mut v = Vec::new();
        if self.delay_ms.is_some() {
            v.push(self.delay_proxy.as_path());
        }
        v
    }
}

/// The flags of a replica node `node` on `vol`: `{repl_port}` is replaced by
/// the replication port when it starts (chosen free, retried if lost).
/// `extra` is appended (the durability flag the primary runs with too).
pub fn replica_args(
    node: &str,
    vol: &Volume,
    admin: &Path,
    secret: &Path,
    extra: &[String],
) -> Vec<String> {
    let spec = NodeSpec {
        name: node.into(),
        export: "vol0".into(),
        data: vol.file.clone(),
        journal: vol.journal.clone(),
        size: vol.size.to_string(),
        listen: "127.0.0.1:0".into(),
        admin: Some(admin.to_path_buf()),
        role: Some(Role::Replica),
        replication_listen: Some("127.0.0.1:{repl_port}".into()),
        secret: Some(secret.to_path_buf()),
        extra: extra.iter().map(Into::into).collect(),
        ..NodeSpec::default()
    };
    strings(spec.args())
}

/// The durability flags every node of `r` runs with (none: the default,
/// durable per write).
pub fn durability_args(r: &Replication) -> Vec<String> {
    if r.durability_flush {
        vec!["--durability".into(), "flush".into()]
    } else {
        Vec::new()
    }
}

/// The flags that make a single-volume mirrorblkd the primary of `peers`
/// (`(name, address)`: the replica's, or its proxy's) in `mode`.
pub fn primary_args(peers: &[(String, SocketAddr)], secret: &Path, mode: Mode) -> Vec<String> {
    let spec = NodeSpec {
        name: PRIMARY_NODE.into(),
        role: Some(Role::Primary),
        peers: peers
            .iter()
            .map(|(n, a)| (n.clone(), a.to_string()))
            .collect(),
        secret: Some(secret.to_path_buf()),
        mode: Some(mode),
        ..NodeSpec::default()
    };
    let mut a = strings(vec!["--node".into(), PRIMARY_NODE.into()]);
    a.extend(strings(spec.replication_args()));
    a
}

/// Arguments as text (the bench's command lines are text, with placeholders).
fn strings(args: Vec<std::ffi::OsString>) -> Vec<String> {
    args.into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// `delay-proxy` arguments: listen on any free loopback port, relay to
/// `target`, `delay_ms` late each way.
pub fn proxy_args(target: SocketAddr, delay_ms: u64) -> Vec<String> {
    vec![
        "127.0.0.1:0".into(),
        target.to_string(),
        delay_ms.to_string(),
    ]
}

/// A primary's view of one replica, from `status --json`, as the report
/// records it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaRecord {
    /// Peer name.
    pub peer: String,
    /// Where its link stands.
    pub state: ReplicaState,
    /// Whether a resync is still running.
    pub resyncing: bool,
    /// LSNs it trails by.
    pub lag_lsn: u64,
    /// Why it is out of sync, if it is.
    pub reason: Option<String>,
}

impl From<&ReplicaStatus> for ReplicaRecord {
    fn from(r: &ReplicaStatus) -> ReplicaRecord {
        ReplicaRecord {
            peer: r.peer.clone(),
            state: r.state,
            resyncing: r.resync.is_some(),
            lag_lsn: r.lag_lsn,
            reason: r.reason.clone(),
        }
    }
}

/// The sum of every series of metric `name` in a Prometheus text exposition
/// whose labels contain all of `labels` (e.g. `op="write"`), or `None` if no
/// series matched.
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here (not a longer metric with this prefix).
        let (lbls, value) = if let Some(r) = rest.strip_prefix('{') {
            let Some((l, v)) = r.split_once('}') else {
                continue;
            };
            (l, v)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        if !labels
            .iter()
            .all(|want| lbls.split(',').any(|l| l == *want))
        {
            continue;
        }
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|x| x.parse::<f64>().ok())
        {
            sum = Some(sum.unwrap_or(0.0) + v);
        }
    }
    sum
}

/// GETs `http://127.0.0.1:PORT/metrics` (HTTP/1.0: the body ends at close).
pub fn scrape(port: u16) -> Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let what = || format!("cannot scrape http://{addr}/metrics");
    let mut s = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT).ctx(what)?;
    s.set_read_timeout(Some(SCRAPE_TIMEOUT)).ctx(what)?;
    s.set_write_timeout(Some(SCRAPE_TIMEOUT)).ctx(what)?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ctx(what)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ctx(what)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200") => {
            Ok(body.to_string())
        }
        _ => Err(Error::Tool(format!(
            "http://{addr}/metrics answered: {}",
            text.lines().next().unwrap_or("nothing")
        ))),
    }
}

/// The replicas of `vol0` as the primary's admin socket reports them.
pub fn status(admin: &Path) -> Result<Vec<ReplicaRecord>> {
    let v = cluster::volume_status(admin, "vol0").map_err(Error::Tool)?;
    Ok(v.replicas.iter().map(ReplicaRecord::from).collect())
}

/// Polls the primary until every replica in `want` is in sync with no
/// resync left; returns the seconds waited and the states then.
pub fn wait_in_sync(
    admin: &Path,
    want: &[String],
    timeout: Duration,
    interrupted: &dyn Fn() -> bool,
) -> Result<(f64, Vec<ReplicaRecord>)> {
    let (waited, v) = cluster::wait_in_sync(admin, "vol0", want, timeout, interrupted)
        .map_err(|e| Error::Tool(e.to_string()))?;
    let states = v.replicas.iter().map(ReplicaRecord::from).collect();
    Ok((waited.as_secs_f64(), states))
}

/// Writes a fresh shared secret to `path` (see [`cluster::write_secret`]).
pub fn write_secret(path: &Path) -> Result<()> {
    cluster::write_secret(path).ctx(|| format!("cannot write the secret {}", path.display()))
}

/// Starts a replicated target: replicas, proxies, then the primary
/// (`program` with `base_args` plus the replication flags), in `dir` (the
/// target's own directory: replica volumes, secret, admin sockets), logging
/// to `log` (the primary) and `log` with the process's role in its name.
/// Returns once the primary accepts NBD connections; the caller then waits
/// for the replicas with [`wait_in_sync`].
pub fn start(
    r: &Replication,
    program: &Path,
    base_args: &[String],
    vol: &Volume,
    dir: &Path,
    log: &Path,
) -> Result<Running> {
    std::fs::create_dir_all(dir).ctx(|| format!("cannot create {}", dir.display()))?;
    let secret = dir.join("secret");
    write_secret(&secret)?;
    let side_log = |role: &str| {
        let stem = log
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        log.with_file_name(format!("{stem}.{role}.log"))
    };
    let mut helpers: Vec<Helper> = Vec::new();
    let mut peers: Vec<(String, SocketAddr)> = Vec::new();
    for (i, name) in r.replica_names().into_iter().enumerate() {
        let addr = if r.runs(i) {
            let rvol = Volume::create(dir, &name, vol.size)?;
            let admin = dir.join(format!("{name}.admin"));
            let args = replica_args(&name, &rvol, &admin, &secret, &durability_args(r));
            // Ready once its admin socket reports its listeners (the
            // replication one included); no probe connection to its NBD port.
            let mode = PortMode::Admin {
                socket: admin.display().to_string(),
            };
            let server = Server::start(program, &args, &mode, vol, &side_log(&name))?;
            let port = server
                .chosen("repl_port")
                .ok_or_else(|| Error::Tool(format!("replica {name} got no replication port")))?;
            helpers.push(Helper {
                role: format!("replica {name}"),
                server,
                charged: true,
            });
            SocketAddr::from((Ipv4Addr::LOCALHOST, port))
        } else {
            // Configured but never started: a port nothing listens on.
            SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?))
        };
        let addr = match (r.delay_ms, r.runs(i)) {
            (Some(ms), true) => {
                let mode = PortMode::Logged {
                    marker: "listening on ".into(),
                    // Connecting would open a replication connection.
                    connect: false,
                };
                let server = Server::start(
                    &r.delay_proxy,
                    &proxy_args(addr, ms),
                    &mode,
                    vol,
                    &side_log(&format!("proxy-{name}")),
                )?;
                let a = SocketAddr::from((Ipv4Addr::LOCALHOST, server.port));
                helpers.push(Helper {
                    role: format!("delay-proxy {name}"),
                    server,
                    // The proxy stands for the network: not the servers' CPU.
                    charged: false,
                });
                a
            }
            _ => addr,
        };
        peers.push((name, addr));
    }
    // The single-volume command line gives the primary its admin socket.
    let admin = vol.admin_socket();
    let mut args = base_args.to_vec();
    args.extend(durability_args(r));
    args.extend(primary_args(&peers, &secret, r.mode));
    let mode = PortMode::Admin {
        socket: admin.display().to_string(),
    };
    let primary = Server::start(program, &args, &mode, vol, log)?;
    Ok(Running {
        primary,
        role: "primary".into(),
        helpers,
        admin: Some(admin),
        graceful: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol() -> Volume {
        Volume {
            file: "/d/n2.img".into(),
            journal: "/d/n2.journal".into(),
            size: 1 << 30,
        }
    }

    #[test]
    fn replica_command_line() {
        let a = replica_args(
            "n2",
            &vol(),
            Path::new("/d/n2.admin"),
            Path::new("/d/secret"),
            &[],
        );
        let line = process::shell_line(Path::new("mirrorblkd"), &a);
        assert_eq!(
            line,
            "mirrorblkd --node n2 --export vol0 --data /d/n2.img --journal /d/n2.journal \
             --size 1073741824 --listen 127.0.0.1:0 --admin-socket /d/n2.admin --role replica \
             --replication-listen '127.0.0.1:{repl_port}' --secret-file /d/secret"
        );
    }

    #[test]
    fn nbd_contract_runs_every_node_with_durability_flush() {
        let mut r = Replication {
            peers: 1,
            down: 0,
            mode: Mode::Sync,
            delay_ms: None,
            delay_proxy: "delay-proxy".into(),
            durability_flush: false,
        };
        assert!(durability_args(&r).is_empty());
        r.durability_flush = true;
        let flags = durability_args(&r);
        assert_eq!(flags, ["--durability", "flush"]);
        let a = replica_args("n2", &vol(), Path::new("/a"), Path::new("/s"), &flags);
        assert!(a.ends_with(&flags), "{a:?}");
        assert!(r.durability().contains("--durability flush"));
    }

    #[test]
    fn primary_command_line_names_every_peer() {
        let peers = vec![
            ("n2".to_string(), "127.0.0.1:4000".parse().unwrap()),
            ("n3".to_string(), "127.0.0.1:4001".parse().unwrap()),
        ];
        let a = primary_args(&peers, Path::new("/d/secret"), Mode::Flush);
        assert_eq!(
            a.join(" "),
            "--node n1 --role primary --peer n2=127.0.0.1:4000 \
             --peer n3=127.0.0.1:4001 --secret-file /d/secret --mode flush"
        );
        assert_eq!(
            proxy_args("127.0.0.1:4000".parse().unwrap(), 5).join(" "),
            "127.0.0.1:0 127.0.0.1:4000 5"
        );
    }

    #[test]
    fn replica_down_is_configured_but_not_run() {
        let r = Replication {
            peers: 2,
            down: 1,
            mode: Mode::Sync,
            delay_ms: None,
            delay_proxy: "delay-proxy".into(),
            durability_flush: false,
        };
        assert_eq!(r.replica_names(), vec!["n2", "n3"]);
        assert!(r.runs(0) && !r.runs(1));
        assert_eq!(r.running(), 1);
        assert!(r.durability().contains("not running"));
    }

    #[test]
    fn sums_matching_metric_series() {
        let text = "# HELP mirrorblk_payload_copies_total x\n\
                    mirrorblk_payload_copies_total{volume=\"vol0\"} 0\n\
                    mirrorblk_payload_copies_total_other{volume=\"vol0\"} 7\n\
                    mirrorblk_request_bytes_total{volume=\"vol0\",op=\"write\"} 4096\n\
                    mirrorblk_request_bytes_total{volume=\"vol0\",op=\"read\"} 8192\n\
                    plain 3\n";
        assert_eq!(metric_value(text, COPIES_METRIC, &[]), Some(0.0));
        assert_eq!(
            metric_value(text, REQUEST_BYTES_METRIC, &["op=\"write\""]),
            Some(4096.0)
        );
        assert_eq!(metric_value(text, REQUEST_BYTES_METRIC, &[]), Some(12288.0));
        assert_eq!(metric_value(text, "plain", &[]), Some(3.0));
        assert_eq!(metric_value(text, "missing", &[]), None);
    }
}
