//! `mirrorblk demo`: a three-node cluster on one machine (primary n1,
//! replicas n2 and n3 of volume vol0), run until Ctrl-C. The nodes' command
//! lines, the shared secret and readiness come from the admin crate's
//! cluster launcher, the one the tests and the benches use.

use std::path::Path;
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use mirrorblk_admin::cluster::{write_secret, NodeSpec};
use mirrorblk_admin::Role;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;

/// How long the primary may take to serve.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the demo listens: the primary's NBD `host:port`; the other ports
/// are counted from it (etcd's too, with `--auto-failover`).
pub struct Ports {
    /// The host every node listens on.
    pub host: String,
    /// The primary's NBD port (with `--auto-failover`, n1's).
    pub port: u16,
}

impl Ports {
    fn parse(listen: &str) -> Option<Ports> {
        let (h, p) = listen.rsplit_once(':')?;
        Some(Ports {
            host: h.to_string(),
            port: p.parse().ok()?,
        })
    }

    fn at(&self, offset: u16) -> String {
        format!("{}:{}", self.host, self.port + offset)
    }
}

/// The three nodes, primary first. Ports: the primary's NBD port, then
/// replication ports above it and the replicas' (idle) NBD ports above those.
fn nodes(dir: &Path, ports: &Ports, size: &str) -> Vec<NodeSpec> {
    let names = ["n1", "n2", "n3"];
    let repl = |i: usize| ports.at(1 + i as u16);
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let journal = dir.join(format!("{name}.journal"));
            // Later runs keep the roles the nodes last had (after a promote, say).
            let role =
                (!journal.exists()).then_some(if i == 0 { Role::Primary } else { Role::Replica });
            let mut extra: Vec<std::ffi::OsString> =
                vec!["--description".into(), "mirrorblk demo volume".into()];
            if i == 0 {
                extra.extend(["--metrics-listen".into(), ports.at(100).into()]);
            }
            NodeSpec {
                name: name.to_string(),
                export: "vol0".into(),
                data: dir.join(format!("{name}.img")),
                journal,
                size: size.into(),
                listen: if i == 0 {
                    ports.at(0)
                } else {
                    ports.at(11 + i as u16)
                },
                admin: Some(dir.join(format!("{name}.sock"))),
                role,
                replication_listen: Some(repl(i)),
                peers: (0..names.len())
                    .filter(|&j| j != i)
                    .map(|j| (names[j].to_string(), repl(j)))
                    .collect(),
                secret: Some(dir.join("secret")),
                extra,
                ..NodeSpec::default()
            }
        })
        .collect()
}

/// Runs the demo in `dir` with the primary on `listen`; with
/// `auto_failover`, etcd decides the roles (see [`crate::demo_failover`]).
pub fn run(
    dir: &Path,
    listen: &str,
    size: &str,
    daemon: &Path,
    (auto_failover, tls): (bool, bool),
) -> ExitCode {
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("mirrorblk: cannot create {}: {e}", dir.display());
        return ExitCode::from(1);
    }
    let Some(ports) = Ports::parse(listen) else {
        eprintln!("mirrorblk: --listen must be HOST:PORT");
        return ExitCode::from(2);
    };
    let mut nodes = nodes(dir, &ports, size);
    if tls {
        if let Err(code) = with_tls(dir, &mut nodes) {
            return code;
        }
    }
    let secret = dir.join("secret");
    if !secret.exists() {
        if let Err(e) = write_secret(&secret) {
            eprintln!("mirrorblk: cannot write {}: {e}", secret.display());
            return ExitCode::from(1);
        }
    }
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    // Blocked here, so only our sigwait sees Ctrl-C; the children get a clean SIGTERM.
    let _ = stop.thread_block();
    if auto_failover {
        return crate::demo_failover::run(dir, &ports, nodes, daemon, &stop);
    }
    let mut children = match start_all(dir, &nodes, daemon) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let primary_admin = nodes[0].admin.clone().unwrap_or_default();
    if let Err(code) = wait_serving(dir, &primary_admin, &mut children) {
        stop_all(&mut children);
        return code;
    }
    print_banner(dir, listen, &ports, size);
    if tls {
        let pki = dir.join("pki");
        println!(
            "\nTLS is required (--tls require, --replication-tls); clear-text nbd:// is refused. Use:\n  \
             nbdinfo 'nbds://{listen}/vol0?tls-certificates={pki}'\n  \
             qemu-io --object tls-creds-x509,id=tls0,dir={pki},endpoint=client --image-opts \
             'driver=nbd,host={host},port={port},export=vol0,tls-creds=tls0' -c 'read 0 1M'",
            pki = pki.display(),
            host = ports.host,
            port = ports.port,
        );
    }
    let _ = stop.wait();
    println!("stopping the demo nodes...");
    if stop_all(&mut children) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `--tls`: certificates in `DIR/pki` (made once with `certs init`), NBD
/// TLS required and the replication links in mutual TLS on every node.
fn with_tls(dir: &Path, nodes: &mut [NodeSpec]) -> Result<(), ExitCode> {
    let pki = dir.join("pki");
    if !pki.join("ca-cert.pem").exists() {
        let code = crate::certs::init(&crate::certs::InitArgs {
            dir: &pki,
            hosts: &crate::certs::default_hosts(),
            days: 825,
            force: false,
        });
        if code != ExitCode::SUCCESS {
            return Err(code);
        }
    }
    for n in nodes {
        n.extra.extend([
            "--tls".into(),
            "require".into(),
            "--tls-certificates".into(),
            pki.clone().into(),
            "--replication-tls".into(),
        ]);
    }
    Ok(())
}

/// Starts every node, replicas first so the primary finds them at once;
/// the children come back in start order.
pub fn start_all(
    dir: &Path,
    nodes: &[NodeSpec],
    daemon: &Path,
) -> Result<Vec<(String, Child)>, ExitCode> {
    let mut children: Vec<(String, Child)> = Vec::new();
    for n in nodes.iter().rev() {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.log", n.name)));
        let log = match log {
            Ok(f) => f,
            Err(e) => {
                eprintln!("mirrorblk: cannot open a log in {}: {e}", dir.display());
                stop_all(&mut children);
                return Err(ExitCode::from(1));
            }
        };
        match Command::new(daemon).args(n.args()).stderr(log).spawn() {
            Ok(c) => children.push((n.name.clone(), c)),
            Err(e) => {
                eprintln!("mirrorblk: cannot start {}: {e}; build it first with: cargo build --release --workspace", daemon.display());
                stop_all(&mut children);
                return Err(ExitCode::from(1));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(children)
}

/// Waits (bounded) until the primary's admin socket says it serves, or a
/// node died; on a timeout the demo goes on as it always did.
fn wait_serving(
    dir: &Path,
    admin: &Path,
    children: &mut [(String, Child)],
) -> Result<(), ExitCode> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        for (name, c) in children.iter_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                eprintln!(
                    "mirrorblk: node {name} exited at start-up ({status}); see {}/{name}.log",
                    dir.display()
                );
                return Err(ExitCode::from(1));
            }
        }
        if mirrorblk_admin::probe(admin).is_some() || Instant::now() > deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn print_banner(dir: &Path, listen: &str, ports: &Ports, size: &str) {
    let host = &ports.host;
    let port = ports.port;
    println!(
        "\nmirrorblk demo is up: primary n1 with replicas n2 and n3 (sync mode), volume vol0 ({size}) on nbd://{listen}/vol0\n\
         data, journals and logs in {dir}; metrics on http://{host}:{metrics}/metrics\n\n\
         Try:\n  nbdinfo nbd://{listen}/vol0\n  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' nbd://{listen}/vol0\n  \
         fio --name=t --ioengine=nbd --uri=nbd://{listen}/vol0 --rw=randwrite --bs=4k --iodepth=32 --size={size} --runtime=10 --time_based\n  \
         mirrorblk --admin-socket {dir}/n1.sock status\n  \
         sudo modprobe nbd && sudo nbd-client {host} {port} /dev/nbd0 -N vol0 -b 4096\n\nPress Ctrl-C to stop.",
        dir = dir.display(),
        metrics = port + 100,
    );
}

/// SIGTERMs every node, the primary (started last) first so the replicas
/// receive everything before they stop, and waits for each; whether all
/// exited cleanly.
pub fn stop_all(children: &mut [(String, Child)]) -> bool {
    let mut ok = true;
    for (name, c) in children.iter_mut().rev() {
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        match c.wait() {
            Ok(s) if s.success() => {}
            Ok(s) => {
                eprintln!("mirrorblk: node {name} stopped with {s}");
                ok = false;
            }
            Err(e) => {
                eprintln!("mirrorblk: waiting for node {name} failed: {e}");
                ok = false;
            }
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_ports_and_peers() {
        let ports = Ports::parse("127.0.0.1:10809").expect("parses");
        let n = nodes(Path::new("/nonexistent-demo"), &ports, "1G");
        let listens: Vec<&str> = n.iter().map(|s| s.listen.as_str()).collect();
        assert_eq!(
            listens,
            ["127.0.0.1:10809", "127.0.0.1:10821", "127.0.0.1:10822"]
        );
        let repl: Vec<&str> = n
            .iter()
            .filter_map(|s| s.replication_listen.as_deref())
            .collect();
        assert_eq!(
            repl,
            ["127.0.0.1:10810", "127.0.0.1:10811", "127.0.0.1:10812"]
        );
        assert_eq!(
            n[0].peers,
            [
                ("n2".to_string(), "127.0.0.1:10811".to_string()),
                ("n3".to_string(), "127.0.0.1:10812".to_string())
            ]
        );
        assert_eq!(n[0].role, Some(Role::Primary));
        assert_eq!(n[2].role, Some(Role::Replica));
        assert!(Ports::parse("nohost").is_none());
    }
}
