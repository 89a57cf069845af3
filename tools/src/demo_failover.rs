//! `mirrorblk demo --auto-failover`: the demo's three nodes with no
//! `--role`, each asking the demo's own etcd who is primary. A watcher
//! prints every change of primary, and restarts a node that died (say,
//! `kill -9` of the primary) so it rejoins as a replica.

use std::path::Path;
use std::process::{Child, Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mirrorblk_admin::cluster::NodeSpec;
use mirrorblk_admin::{call_within, Request, Role};
use nix::sys::signal::SigSet;

use crate::demo::{start_all, stop_all, Ports};
use crate::demo_etcd::DemoEtcd;

/// How long the nodes may take to elect a primary.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one status request may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the watcher looks at the nodes.
const WATCH_POLL: Duration = Duration::from_millis(200);
/// How long a dead node stays down before the watcher restarts it (long
/// enough to see the failover happen without it).
const RESTART_AFTER: Duration = Duration::from_secs(5);
/// The etcd ports, counted from the demo's NBD port.
const ETCD_CLIENT_OFFSET: u16 = 200;
const ETCD_PEER_OFFSET: u16 = 201;

/// The demo's nodes and where their processes stand.
type Children = Arc<Mutex<Vec<(String, Child)>>>;

/// Starts etcd, then the nodes of `specs` with `--etcd`; prints the primary
/// and how to kill it; watches until `stop` arrives; stops everything.
pub fn run(
    dir: &Path,
    ports: &Ports,
    specs: Vec<NodeSpec>,
    daemon: &Path,
    stop: &SigSet,
) -> ExitCode {
    let mut etcd = match DemoEtcd::start(
        dir,
        &ports.host,
        ports.port + ETCD_CLIENT_OFFSET,
        ports.port + ETCD_PEER_OFFSET,
    ) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("mirrorblk: {e}");
            return ExitCode::from(1);
        }
    };
    let specs = with_etcd(specs, etcd.url());
    let children = match start_all(dir, &specs, daemon) {
        Ok(c) => Arc::new(Mutex::new(c)),
        Err(code) => {
            etcd.stop();
            return code;
        }
    };
    let code = match wait_primary(&specs, ELECTION_TIMEOUT) {
        Some(p) => {
            print_banner(dir, etcd.url(), &p.name, &p.nbd, p.pid);
            watch_until(stop, &specs, &children, dir, daemon, &p.name);
            ExitCode::SUCCESS
        }
        None => {
            eprintln!(
                "mirrorblk: no node became primary with its replicas in sync within {ELECTION_TIMEOUT:?}; see the logs in {}",
                dir.display()
            );
            ExitCode::from(1)
        }
    };
    println!("stopping the demo nodes and etcd...");
    let mut running = lock(&children);
    // A node killed (and not yet restarted) is no failure of the demo's.
    running.retain_mut(|(_, c)| matches!(c.try_wait(), Ok(None)));
    let nodes_ok = stop_all(&mut running);
    let etcd_ok = etcd.stop();
    if code == ExitCode::SUCCESS && !(nodes_ok && etcd_ok) {
        return ExitCode::from(1);
    }
    code
}

/// The demo's node specs with no role and `--etcd url`.
pub fn with_etcd(specs: Vec<NodeSpec>, url: &str) -> Vec<NodeSpec> {
    specs
        .into_iter()
        .map(|mut s| {
            s.role = None;
            s.extra.extend(["--etcd".into(), url.into()]);
            s
        })
        .collect()
}

fn lock(children: &Children) -> std::sync::MutexGuard<'_, Vec<(String, Child)>> {
    children.lock().unwrap_or_else(|p| p.into_inner())
}

/// The node that says it is primary now.
struct Primary {
    name: String,
    nbd: String,
    pid: u32,
    /// The replicas it published in etcd as in sync (only they may take over).
    in_sync: Vec<String>,
}

fn primary_now(specs: &[NodeSpec]) -> Option<Primary> {
    specs.iter().find_map(|s| {
        let admin = s.admin.as_deref()?;
        let resp = call_within(admin, &Request::Status, STATUS_TIMEOUT).ok()?;
        let volume = resp.volumes.iter().find(|v| v.name == s.export)?;
        if volume.role != Role::Primary {
            return None;
        }
        Some(Primary {
            name: s.name.clone(),
            nbd: resp.listen.as_ref()?.nbd.to_string(),
            pid: resp.pid?,
            in_sync: resp.coordinator.map(|c| c.in_sync).unwrap_or_default(),
        })
    })
}

/// Polls until a node is primary with every other node published in sync
/// (so a replica may take over when it is killed), at most `timeout`.
fn wait_primary(specs: &[NodeSpec], timeout: Duration) -> Option<Primary> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(p) = primary_now(specs) {
            let mut others = specs.iter().filter(|s| s.name != p.name);
            if others.all(|s| p.in_sync.contains(&s.name)) {
                return Some(p);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(WATCH_POLL);
    }
}

fn print_banner(dir: &Path, etcd: &str, name: &str, nbd: &str, pid: u32) {
    println!(
        "\nmirrorblk demo with automatic failover: nodes n1, n2, n3 of volume vol0 (sync mode), roles decided by etcd at {etcd}\n\
         data, journals and logs in {dir}\n\n\
         {name} is primary: nbd://{nbd}/vol0 (pid {pid})\n\n\
         Try:\n  mirrorblk primary --etcd {etcd} vol0\n  \
         fio --name=t --ioengine=nbd --uri=nbd://{nbd}/vol0 --rw=randwrite --bs=4k --iodepth=8 --size=64M --runtime=60 --time_based &\n  \
         kill -9 {pid}      # the primary dies; within about 3 s a replica takes over (printed below)\n  \
         mirrorblk --admin-socket {dir}/n1.sock status\n  \
         mirrorblk --admin-socket {dir}/n2.sock events\n\n\
         A node that dies is restarted after {restart} s and rejoins as a replica. Press Ctrl-C to stop.\n",
        dir = dir.display(),
        restart = RESTART_AFTER.as_secs(),
    );
}

/// Watches on a thread until a stop signal arrives (this thread waits for it).
fn watch_until(
    stop: &SigSet,
    specs: &[NodeSpec],
    children: &Children,
    dir: &Path,
    daemon: &Path,
    first: &str,
) {
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (done, specs, children) = (done.clone(), specs.to_vec(), children.clone());
        let (dir, daemon, first) = (dir.to_path_buf(), daemon.to_path_buf(), first.to_string());
        std::thread::spawn(move || watch(&done, &specs, &children, &dir, &daemon, first))
    };
    let _ = stop.wait();
    done.store(true, Ordering::Relaxed);
    let _ = watcher.join();
}

/// Prints each new primary and restarts dead nodes, until `done`.
fn watch(
    done: &AtomicBool,
    specs: &[NodeSpec],
    children: &Children,
    dir: &Path,
    daemon: &Path,
    mut primary: String,
) {
    let mut dead_since: Vec<Option<Instant>> = vec![None; specs.len()];
    let mut lost_at: Option<Instant> = None;
    while !done.load(Ordering::Relaxed) {
        match primary_now(specs) {
            Some(p) if p.name != primary => {
                let after = lost_at
                    .map(|t| format!(" {:.1} s after the primary died", t.elapsed().as_secs_f64()));
                println!(
                    "{} is primary now{}: nbd://{}/vol0 (pid {})",
                    p.name,
                    after.unwrap_or_default(),
                    p.nbd,
                    p.pid
                );
                primary = p.name;
                lost_at = None;
            }
            _ => {}
        }
        for (i, spec) in specs.iter().enumerate() {
            if check_dead(children, &spec.name, &mut dead_since[i]) && spec.name == primary {
                lost_at = Some(Instant::now());
            }
            if dead_since[i].is_some_and(|t| t.elapsed() >= RESTART_AFTER) {
                restart(children, spec, dir, daemon);
                dead_since[i] = None;
            }
        }
        std::thread::sleep(WATCH_POLL);
    }
}

/// Notes node `name` dead when its process has exited; true the first time.
fn check_dead(children: &Children, name: &str, since: &mut Option<Instant>) -> bool {
    if since.is_some() {
        return false;
    }
    let mut c = lock(children);
    let Some((_, child)) = c.iter_mut().find(|(n, _)| n == name) else {
        return false;
    };
    let Ok(Some(status)) = child.try_wait() else {
        return false;
    };
    println!(
        "{name} exited ({status}); it is restarted in {} s",
        RESTART_AFTER.as_secs()
    );
    *since = Some(Instant::now());
    true
}

/// Starts node `spec` again, on the same flags (its role comes from etcd).
fn restart(children: &Children, spec: &NodeSpec, dir: &Path, daemon: &Path) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{}.log", spec.name)));
    let spawned = log.map_err(|e| e.to_string()).and_then(|log| {
        Command::new(daemon)
            .args(spec.args())
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())
    });
    match spawned {
        Ok(child) => {
            println!(
                "{} restarted (pid {}); it rejoins as a replica",
                spec.name,
                child.id()
            );
            if let Some(slot) = lock(children).iter_mut().find(|(n, _)| *n == spec.name) {
                slot.1 = child;
            }
        }
        Err(e) => eprintln!("mirrorblk: cannot restart {}: {e}", spec.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_under_etcd_have_no_role_and_name_etcd() {
        let spec = NodeSpec {
            name: "n1".into(),
            role: Some(Role::Primary),
            extra: vec!["--description".into(), "d".into()],
            ..NodeSpec::default()
        };
        let out = with_etcd(vec![spec], "http://127.0.0.1:2379");
        assert_eq!(out[0].role, None);
        let args: Vec<String> = out[0]
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(!args.contains(&"--role".to_string()), "{args:?}");
        let at = args.iter().position(|a| a == "--etcd").expect("--etcd");
        assert_eq!(args[at + 1], "http://127.0.0.1:2379");
    }
}
