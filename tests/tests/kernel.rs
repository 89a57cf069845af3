//! A real Linux kernel mounts mirrorblk through its nbd driver.
//!
//! Each test boots a small qemu guest (Debian's kernel, busybox,
//! nbd-client, e2fsprogs; see tests/kernel/ and `mirrorblk_tests::kernel`)
//! whose only network path is a relay to one port on 127.0.0.1, and checks
//! the `PASS`/`FAIL` lines its workload reports:
//!
//! - `standard_workload`: attach with `nbd-client -N vol0 -b 4096`, raw
//!   writes read back (first, middle and last blocks), mkfs.ext4, files
//!   with checksums, umount, `e2fsck -fn`, remount and verify, disconnect,
//!   reconnect, verify again.
//! - `failover_workload`: a primary and a `sync` replica; the guest writes
//!   and fsyncs files in a loop, the primary is `kill -9`ed mid-loop, the
//!   replica promoted and the relay pointed at it; the guest reattaches and
//!   remounts, and every file whose fsync returned must be there.
//! - `harness_fails_*`: the same harness fails against a server that drops
//!   writes (`nbdkit null`) and when no server is there, so a green run
//!   means something.
//!
//! The guests run one at a time (the `kernel-guest` test group in
//! .config/nextest.toml): under TCG one guest keeps a core busy.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mirrorblk_admin::{self as admin, ReplicaState, Request, Role};
use mirrorblk_tests::cluster::{pick_port, write_secret, Node, EXPORT};
use mirrorblk_tests::daemon::SERVING;
use mirrorblk_tests::kernel::{Guest, Relay};
use mirrorblk_tests::{Daemon, TestDir};

const RELAY: &str = env!("CARGO_BIN_EXE_guestfwd-relay");

/// How long one guest may run, boot to power-off. Under TCG on a loaded
/// 2-core machine the standard workload takes ~30 s; nextest kills a test
/// after 4 minutes.
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);

/// The standard workload's steps, in order.
const STANDARD_STEPS: &[&str] = &[
    "boot",
    "connect",
    "raw",
    "mkfs",
    "files",
    "fsck",
    "verify",
    "disconnect",
    "reconnect",
    "fsck-after-reconnect",
    "verify-after-reconnect",
    "disconnect-final",
    "standard",
];

/// The cheap workload the negative checks run.
const RAW_STEPS: &[&str] = &["boot", "connect", "raw", "disconnect", "raw-workload"];

#[test]
fn standard_workload() {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args(EXPORT, "256M"));
    let relay = Relay::new(Path::new(RELAY), &dir, d.port(), Duration::from_secs(5));
    let out = Guest::boot(&dir, "standard", &[], &relay).wait(GUEST_TIMEOUT);
    eprintln!(
        "standard workload: {:.1} s ({:?})",
        out.elapsed.as_secs_f64(),
        out.accel
    );
    if let Err(e) = out.check(STANDARD_STEPS) {
        panic!("standard workload against mirrorblkd failed:\n{e}");
    }
}

/// The NBD port of the last `serving NBD on` line of a node's current run
/// if there are at least `n` such lines (a promoted node re-executes itself
/// in the same process and serves on a new ephemeral port).
fn nth_serving_port(node: &Node, n: usize) -> Option<u16> {
    let lines = node.log_lines_with(SERVING);
    if lines.len() < n {
        return None;
    }
    let line = lines.last()?;
    let at = line.find(SERVING)? + SERVING.len();
    let addr: std::net::SocketAddr = line[at..].split_whitespace().next()?.parse().ok()?;
    Some(addr.port())
}

#[test]
fn failover_workload() {
    let dir = TestDir::new();
    let secret = write_secret(&dir, "secret");
    let mut r2 = Node::start_replica(&dir, "n2", &secret, "64M", &[]);
    let mut p = Node::start_primary(&dir, "n1", &secret, &[&r2], "64M", &["--mode", "sync"]);
    p.wait_replicas_in_sync(Duration::from_secs(30));
    let relay = Relay::new(
        Path::new(RELAY),
        &dir,
        p.daemon.port(),
        // A reconnect made while the replica is being promoted waits for it.
        Duration::from_secs(60),
    );
    // -nonetlink: with netlink (nbd-client 3.24's default) a write in flight
    // when the server dies was seen to leave fsync hanging for minutes; the
    // ioctl interface fails it with EIO at once. See tests/kernel/README.md.
    let mut guest = Guest::boot(&dir, "failover", &["-nonetlink"], &relay);

    // Kill the primary mid-loop: the guest keeps writing after f10.
    if let Err(e) = guest.wait_for_line("FSYNCED f10 ", Duration::from_secs(120)) {
        panic!("the guest did not get 10 files fsynced on the primary: {e}");
    }
    let before = p.status();
    assert_eq!(
        before.replicas.first().map(|r| r.state),
        Some(ReplicaState::InSync),
        "n2 was not in sync when the primary was killed: {before:#?}"
    );
    let killed_at = Instant::now();
    p.daemon.kill9();
    let fsynced_at_kill = guest
        .lines()
        .iter()
        .filter(|l| l.starts_with("FSYNCED "))
        .count();

    // Promote n2 (what `mirrorblk --admin-socket n2.admin promote` sends); it
    // re-executes itself as primary and serves NBD on a new port.
    let resp = admin::call(&r2.files.admin, &Request::Promote { force: false })
        .unwrap_or_else(|e| panic!("promote n2: {e}"));
    assert!(resp.ok, "promote n2 refused: {:?}", resp.error);
    let deadline = Instant::now() + Duration::from_secs(30);
    let port = loop {
        if let Some(port) = nth_serving_port(&r2, 2) {
            break port;
        }
        assert!(
            Instant::now() < deadline,
            "promoted n2 did not serve NBD again within 30 s; its log:\n{}",
            r2.daemon.full_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    relay.point_at(port);
    eprintln!(
        "failover: primary killed after {fsynced_at_kill} fsynced files; n2 serves on port {port} {:.1} s later",
        killed_at.elapsed().as_secs_f64()
    );

    let out = guest.wait(GUEST_TIMEOUT);
    eprintln!(
        "failover workload: {:.1} s ({:?})",
        out.elapsed.as_secs_f64(),
        out.accel
    );
    let steps = [
        "boot",
        "connect",
        "mkfs",
        "mount",
        "umount-after-error",
        "reconnect",
        "remount",
        "write-after-failover",
        "fsck-after-failover",
        "verify",
        "failover",
    ];
    if let Err(e) = out.check(&steps) {
        panic!("failover workload failed:\n{e}");
    }
    // The guest checked every fsynced file; make sure that covered files
    // from both sides of the failover.
    let fsynced: Vec<&String> = out
        .lines
        .iter()
        .filter(|l| l.starts_with("FSYNCED "))
        .collect();
    let after = fsynced
        .iter()
        .filter(|l| l.starts_with("FSYNCED g"))
        .count();
    assert!(
        fsynced.len() - after >= 10 && after >= 10,
        "expected >= 10 files fsynced before and 10 after the failover, got {} and {after}",
        fsynced.len() - after
    );
    let s = r2.status();
    assert_eq!(s.role, Role::Primary, "n2 is not primary: {s:#?}");
    r2.stop();
}

/// `nbdkit null`: accepts every write and throws it away, reads zeros.
struct Nbdkit {
    child: Child,
    port: u16,
}

impl Nbdkit {
    fn null(size: &str) -> Nbdkit {
        let port = pick_port();
        let child = Command::new("nbdkit")
            .args([
                "--foreground",
                "--exit-with-parent",
                "--ipaddr",
                "127.0.0.1",
            ])
            .args(["--port", &port.to_string(), "null", size])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run nbdkit (apt-get install nbdkit): {e}"));
        let n = Nbdkit { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nbdkit did not listen on {port} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn harness_fails_against_server_that_drops_writes() {
    let dir = TestDir::new();
    let nbdkit = Nbdkit::null("256M");
    let relay = Relay::new(Path::new(RELAY), &dir, nbdkit.port, Duration::from_secs(5));
    let out = Guest::boot(&dir, "raw", &[], &relay).wait(GUEST_TIMEOUT);
    let err = out
        .check(RAW_STEPS)
        .expect_err("the raw workload passed against nbdkit null, which drops every write");
    // It must fail where the data is checked, not earlier for another reason.
    assert!(
        out.passed("connect"),
        "nbd-client did not even attach to nbdkit:\n{err}"
    );
    assert!(
        out.failures().iter().any(|l| l.starts_with("FAIL raw:")),
        "expected a FAIL raw line (data read back differs):\n{err}"
    );
    eprintln!("as expected: {:?}", out.failures());
}

#[test]
fn harness_fails_without_server() {
    let dir = TestDir::new();
    // A port nobody listens on, and a relay that gives up after 1 s.
    let relay = Relay::new(Path::new(RELAY), &dir, pick_port(), Duration::from_secs(1));
    let out = Guest::boot(&dir, "raw", &[], &relay).wait(GUEST_TIMEOUT);
    let err = out
        .check(RAW_STEPS)
        .expect_err("the raw workload passed with no server behind the relay");
    assert!(
        out.passed("boot"),
        "the guest did not even boot, so this proves nothing about the server check:\n{err}"
    );
    assert!(
        out.failures()
            .iter()
            .any(|l| l.starts_with("FAIL connect:")),
        "expected a FAIL connect line:\n{err}"
    );
    eprintln!("as expected: {:?}", out.failures());
}
