//! Nodes whose role etcd decides (issue 13's contract): every node of the
//! volume is started alike, with `--replication-listen`, a `--peer` for
//! each other node, the shared secret, a mode and `--etcd URL`, and no
//! `--role`; within a few seconds exactly one of them serves NBD clients.
//!
//! - [`NodeFiles::coordinated_args`](crate::cluster::NodeFiles::coordinated_args):
//!   one such node's flags (also for nodes started in a network namespace).
//! - [`Coordinated::start`]: N such nodes on loopback, fixed replication ports.
//! - [`Coordinated::wait_primary`]: the one node that says it is primary and
//!   serves, with a bounded wait.
//! - [`Coordinated::targets`]: the nodes as the [`writer`](crate::writer)
//!   looks for a serving one.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use mirrorblk_admin::{ReplicaState, Role, VolumeStatus};

use crate::cluster::{pick_port, Node, NodeFiles};
use crate::daemon::{Daemon, TestDir};
use crate::writer::{connect, Target};

/// The journal size of coordinated test nodes (small: three nodes per test).
pub const JOURNAL: &str = "64M";
/// How long a coordinated volume may take to have its primary (etcd lease
/// grant and campaign on a loaded 2-core machine, debug builds).
pub const ELECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to be back in sync after a restart.
pub const IN_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a node serves NBD clients and what it tells them (see
/// [`Coordinated::start_listening`]).
#[derive(Debug, Clone)]
pub struct NbdAddr {
    /// Its fixed port on 127.0.0.1.
    pub port: u16,
    /// Its `--advertise` address, if any.
    pub advertise: Option<String>,
}

/// The nodes of one volume under etcd.
#[derive(Debug)]
pub struct Coordinated {
    /// The nodes, in the order of the names given.
    pub nodes: Vec<Node>,
}

impl Coordinated {
    /// Starts one node per name in `dir`, all with `--etcd etcd`, `--mode
    /// mode`, `secret` and `extra` flags, on fixed free replication ports,
    /// each a peer of all the others.
    #[track_caller]
    pub fn start(
        dir: &TestDir,
        secret: &Path,
        etcd: &str,
        names: &[&str],
        mode: &str,
        extra: &[&str],
    ) -> Coordinated {
        let urls = vec![etcd.to_string(); names.len()];
        Coordinated::start_each(dir, secret, &urls, names, mode, extra)
    }

    /// Like [`Coordinated::start`], node `i` with `--etcd etcd[i]`.
    #[track_caller]
    pub fn start_each(
        dir: &TestDir,
        secret: &Path,
        etcd: &[String],
        names: &[&str],
        mode: &str,
        extra: &[&str],
    ) -> Coordinated {
        Coordinated::start_listening(dir, secret, etcd, names, mode, extra, None)
    }

    /// Like [`Coordinated::start_each`]; with `nbd`, node `i` serves NBD
    /// clients on 127.0.0.1:`nbd[i].port` (a fixed port a client can be
    /// pointed at before the node starts, and that a restart keeps) instead
    /// of an ephemeral one, and publishes `nbd[i].advertise` (when given) in
    /// etcd's leader record as where clients reach it.
    #[track_caller]
    pub fn start_listening(
        dir: &TestDir,
        secret: &Path,
        etcd: &[String],
        names: &[&str],
        mode: &str,
        extra: &[&str],
        nbd: Option<&[NbdAddr]>,
    ) -> Coordinated {
        assert!(
            nbd.is_none_or(|p| p.len() == names.len()),
            "one NBD address per node"
        );
        let addrs: Vec<SocketAddr> = names
            .iter()
            .map(|_| ([127, 0, 0, 1], pick_port()).into())
            .collect();
        let mut flags = vec!["--mode", mode];
        flags.extend_from_slice(extra);
        let nodes = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let files = NodeFiles::new(dir, name);
                let peers: Vec<(String, String)> = (0..names.len())
                    .filter(|&j| j != i)
                    .map(|j| (names[j].to_string(), addrs[j].to_string()))
                    .collect();
                let mut args = files.coordinated_args(secret, addrs[i], &peers, &etcd[i], &flags);
                if let Some(nbd) = nbd {
                    crate::daemon::set_listen(&mut args, &format!("127.0.0.1:{}", nbd[i].port));
                    if let Some(a) = &nbd[i].advertise {
                        args.extend(["--advertise".into(), a.into()]);
                    }
                }
                let daemon = Daemon::try_start(args)
                    .unwrap_or_else(|e| panic!("{name} (under etcd) did not start: {e}"));
                Node {
                    files,
                    daemon,
                    replication: Some(addrs[i]),
                }
            })
            .collect();
        Coordinated { nodes }
    }

    /// The index of the node named `name`.
    #[track_caller]
    pub fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name() == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The nodes as writer targets.
    pub fn targets(&self) -> Vec<Target> {
        self.nodes.iter().map(target_of).collect()
    }

    /// Each running node's status (or why it could not be had), by name.
    pub fn statuses(&self) -> Vec<(String, Result<VolumeStatus, String>)> {
        self.nodes
            .iter()
            .map(|n| (n.name().to_string(), n.try_status()))
            .collect()
    }

    /// The nodes whose status says primary now.
    pub fn primaries(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| matches!(n.try_status(), Ok(s) if s.role == Role::Primary))
            .map(|(i, _)| i)
            .collect()
    }

    /// Waits until exactly one of the nodes `among` says it is primary, no
    /// other node does, and it completes an NBD handshake; returns its index.
    /// Panics after `timeout` with every node's status.
    #[track_caller]
    pub fn wait_primary(&self, among: &[usize], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let primaries = self.primaries();
            if let [only] = primaries[..] {
                if among.contains(&only) && connect(&target_of(&self.nodes[only])).is_some() {
                    return only;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "no single serving primary among {:?} within {timeout:?} (primaries now: {primaries:?}); statuses:\n{}",
                    among.iter().map(|&i| self.nodes[i].name()).collect::<Vec<_>>(),
                    self.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until node `primary` sees every other running node in sync
    /// with nothing out of sync and no resync running, and has published
    /// them in etcd as in sync (only then may they take over).
    #[track_caller]
    pub fn wait_in_sync(&mut self, primary: usize, timeout: Duration) -> VolumeStatus {
        let mut others = Vec::new();
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if i != primary && n.daemon.is_running() {
                others.push(n.name().to_string());
            }
        }
        let started = Instant::now();
        let status =
            self.nodes[primary].wait_status(timeout, "every running replica in sync", |s| {
                others.iter().all(|peer| {
                    s.replicas.iter().any(|r| {
                        &r.peer == peer
                            && r.state == ReplicaState::InSync
                            && r.resync.is_none()
                            && r.out_of_sync_bytes == 0
                    })
                })
            });
        let node = &self.nodes[primary];
        let left = timeout.saturating_sub(started.elapsed());
        crate::util::poll_until(
            left,
            &format!("{} to publish {others:?} as in sync", node.name()),
            || {
                let published = published_in_sync(&node.files.admin)?;
                others.iter().all(|o| published.contains(o)).then_some(())
            },
        );
        status
    }

    /// Every node's status, one per line, for failure messages.
    pub fn describe(&self) -> String {
        self.statuses()
            .into_iter()
            .map(|(name, s)| match s {
                Ok(s) => format!(
                    "{name}: role {} epoch {} last_lsn {} durable_lsn {} inconsistent {} replicas {:?}",
                    s.role,
                    s.epoch,
                    s.last_lsn,
                    s.durable_lsn,
                    s.inconsistent,
                    s.replicas
                        .iter()
                        .map(|r| format!("{}={} {:?}", r.peer, r.state, r.reason))
                        .collect::<Vec<_>>()
                ),
                Err(e) => format!("{name}: no status: {e}"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A node as a writer target.
pub fn target_of(node: &Node) -> Target {
    Target {
        name: node.name().to_string(),
        admin: node.files.admin.clone(),
    }
}

/// The in-sync set the primary at `admin` last published in etcd (its
/// status's coordinator view); None if it does not answer or has none.
pub fn published_in_sync(admin: &Path) -> Option<Vec<String>> {
    let resp = mirrorblk_admin::call_within(
        admin,
        &mirrorblk_admin::Request::Status,
        Duration::from_secs(10),
    )
    .ok()?;
    Some(resp.coordinator?.in_sync)
}
