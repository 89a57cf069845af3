//! Changed-block tracking (issue 15): `mirrorblk changes VOLUME --since LSN`
//! reports exactly the 64 KiB regions a real client (qemu-io) changed after
//! an LSN, and still does after `kill -9` (the table is rebuilt from the
//! journal: nothing missed).

use std::path::Path;
use std::process::Command;

use mirrorblk_admin::Changes;
use mirrorblk_tests::cluster::mirrorblk_cli;
use mirrorblk_tests::tools::qemu_io_ok;
use mirrorblk_tests::{Daemon, TestDir};

const K64: u64 = 64 << 10;
const MIB: u64 = 1 << 20;

/// `mirrorblk changes VOLUME --since LSN --json`, parsed.
fn changes(admin: &Path, volume: &str, since: u64) -> Changes {
    let out = Command::new(mirrorblk_cli())
        .arg("--admin-socket")
        .arg(admin)
        .args(["changes", volume, "--since", &since.to_string(), "--json"])
        .output()
        .expect("run mirrorblk changes");
    assert!(
        out.status.success(),
        "mirrorblk changes failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("changes JSON")
}

fn ranges(c: &Changes) -> Vec<(u64, u64)> {
    c.ranges.iter().map(|r| (r.offset, r.length)).collect()
}

#[test]
fn changes_since_an_lsn_are_exactly_the_written_regions_even_after_kill_9() {
    let dir = TestDir::new();
    let mut d = Daemon::start(dir.volume_args("vol", "16M"));
    let admin = d.admin_socket();
    let uri = d.uri("vol");
    let start = changes(&admin, "vol", 0);
    assert!(start.complete, "{start:?}");
    assert!(start.ranges.is_empty(), "nothing written yet: {start:?}");
    assert_eq!((start.size, start.region_size), (16 * MIB, K64));

    // A write, a write spanning two regions, write-zeroes and a discard.
    qemu_io_ok(
        &uri,
        &[
            "write -P 1 100 4k",
            "write -P 2 1M 128k",
            "write -z 5M 64k",
            "discard 8M 64k",
        ],
    );
    let first = changes(&admin, "vol", 0);
    assert!(first.complete);
    let written = vec![(0, K64), (MIB, 2 * K64), (5 * MIB, K64), (8 * MIB, K64)];
    assert_eq!(ranges(&first), written, "{first:?}");
    assert_eq!(first.bytes, 5 * K64);
    assert!(first.lsn >= 4, "{first:?}");
    assert_eq!(first.uuid, start.uuid);

    // More writes, then kill -9 at once: the table file has not been saved
    // with them (it is saved at most every 5 s); recovery must mark them
    // from the journal.
    qemu_io_ok(&uri, &["write -P 3 3M 4k", "write -P 4 15M 64k"]);
    d.kill9();
    d.restart();
    let admin = d.admin_socket();
    let after = changes(&admin, "vol", first.lsn);
    assert!(after.complete, "{after:?}");
    assert_eq!(ranges(&after), vec![(3 * MIB, K64), (15 * MIB, K64)]);
    assert_eq!(after.uuid, first.uuid, "the same volume");
    let all = changes(&admin, "vol", 0);
    let mut want = written.clone();
    want.insert(2, (3 * MIB, K64));
    want.push((15 * MIB, K64));
    assert_eq!(ranges(&all), want);
    // Since the newest LSN: nothing.
    assert!(changes(&admin, "vol", after.lsn).ranges.is_empty());
}

#[test]
fn a_missing_table_answers_everything_and_says_it_is_not_complete() {
    let dir = TestDir::new();
    let mut d = Daemon::start(dir.volume_args("vol", "4M"));
    let uri = d.uri("vol");
    qemu_io_ok(&uri, &["write -P 1 0 4k"]);
    let before = changes(&d.admin_socket(), "vol", 0);
    // A clean stop checkpoints (and saves the table), then the table goes.
    d.terminate();
    std::fs::remove_file(dir.join("vol.journal.changes")).expect("remove the table");
    d.restart();
    assert!(
        d.full_log().contains("changed-block tracking starts over"),
        "the log says so"
    );
    let old = changes(&d.admin_socket(), "vol", 0);
    assert!(!old.complete, "{old:?}");
    assert_eq!(ranges(&old), vec![(0, 4 * MIB)], "never under-reports");
    assert!(old.known_since >= before.lsn);
    // From what it knows on, exact again.
    let uri = d.uri("vol");
    qemu_io_ok(&uri, &["write -P 2 2M 4k"]);
    let new = changes(&d.admin_socket(), "vol", old.lsn);
    assert!(new.complete);
    assert_eq!(ranges(&new), vec![(2 * MIB, K64)]);
}

/// The same question on a replica, and on it after it is promoted (the old
/// primary killed): the same volume UUID, the same LSNs, the same ranges,
/// so an incremental chain started on the old primary goes on.
#[test]
fn a_promoted_replica_answers_the_same_changes() {
    use mirrorblk_admin::Role;
    use mirrorblk_tests::cluster::{write_secret, Node, EXPORT};
    use std::time::Duration;
    let dir = TestDir::new();
    let secret = write_secret(&dir, "secret");
    let mut r = Node::start_replica(&dir, "n2", &secret, "16M", &[]);
    let mut p = Node::start_primary(&dir, "n1", &secret, &[&r], "16M", &["--mode", "sync"]);
    p.wait_replicas_in_sync(Duration::from_secs(60));
    let base = changes(&p.files.admin, EXPORT, 0).lsn;
    qemu_io_ok(
        &p.daemon.uri(EXPORT),
        &["write -P 1 0 4k", "write -P 2 2M 192k", "write -z 6M 4k"],
    );
    let on_primary = changes(&p.files.admin, EXPORT, base);
    let written = vec![(0, K64), (2 * MIB, 3 * K64), (6 * MIB, K64)];
    assert_eq!(ranges(&on_primary), written);
    // Sync mode: the replica has every acknowledged record, with its LSN.
    let on_replica = changes(&r.files.admin, EXPORT, base);
    assert_eq!(
        on_replica.uuid, on_primary.uuid,
        "the table's key is the volume's UUID"
    );
    assert_eq!(on_replica.lsn, on_primary.lsn);
    assert_eq!(ranges(&on_replica), written);

    // A backup taken at on_primary.lsn; then more writes, the primary dies.
    qemu_io_ok(
        &p.daemon.uri(EXPORT),
        &["write -P 3 9M 4k", "discard 2M 64k"],
    );
    p.daemon.kill9();
    let before = r.daemon.ready().clone();
    let out = r.cli(&["promote"], Duration::from_secs(30));
    assert_eq!(out.code, 0, "mirrorblk promote failed: {out:#?}");
    r.daemon
        .wait_serving_again(&before, Duration::from_secs(30));
    r.wait_status(Duration::from_secs(30), "n2 primary", |s| {
        s.role == Role::Primary
    });
    let next = changes(&r.files.admin, EXPORT, on_primary.lsn);
    assert!(next.complete, "{next:?}");
    assert_eq!(next.uuid, on_primary.uuid);
    assert_eq!(ranges(&next), vec![(2 * MIB, K64), (9 * MIB, K64)]);
    // The chain goes on from the new primary's own writes.
    qemu_io_ok(&r.daemon.uri(EXPORT), &["write -P 4 12M 4k"]);
    let last = changes(&r.files.admin, EXPORT, next.lsn);
    assert_eq!(ranges(&last), vec![(12 * MIB, K64)]);
}

/// A single node (no replicas) killed with -9 while 1 MiB writes go to its
/// store in place, each to a fresh region, up to eight times and at least
/// until one kill found an in-place write under way: every region whose
/// data changed since an LSN is in `changes --since` that LSN, also the
/// region of a write whose payload reached the store but whose record never
/// became durable (never acknowledged, yet the store holds it: only its
/// intent record names it). An incremental backup built on the changes
/// would otherwise keep the old data there for good.
#[test]
fn an_in_place_write_under_way_at_kill_9_is_among_the_changes() {
    use mirrorblk_tests::util::{pattern, Rng};
    use nbd::{Command as NbdCommand, CommandFlags, Request};
    use std::time::{Duration, Instant};

    let dir = TestDir::new();
    let mut d = Daemon::start(dir.volume_args("vol", "256M"));
    let mut rng = Rng::from_env_or_time("an_in_place_write_under_way_at_kill_9");
    let mut intents = 0;
    for cycle in 0..8u64 {
        if cycle >= 3 && intents > 0 {
            break;
        }
        let since = changes(&d.admin_socket(), "vol", 0).lsn;
        let base = cycle * 32 * MIB;
        let kill_at = rng.range(4, 28);
        let seed = rng.next_u64();
        let mut c = d.connect("vol");
        // Sequential 1 MiB writes over a fresh, never written 32 MiB
        // stretch, 8 in flight; the kill comes after `kill_at` were sent.
        let (mut inflight, mut sent) = (0u64, 0u64);
        let deadline = Instant::now() + Duration::from_secs(20);
        while sent < kill_at && Instant::now() < deadline {
            while inflight < 8 && sent < 32 {
                let req = Request {
                    flags: CommandFlags::empty(),
                    command: NbdCommand::Write,
                    cookie: c.next_cookie(),
                    offset: base + sent * MIB,
                    length: MIB,
                };
                c.submit(&req, Some(&pattern(seed ^ sent, MIB as usize)))
                    .expect("submit a write");
                sent += 1;
                inflight += 1;
            }
            c.receive().expect("a write's reply");
            inflight -= 1;
        }
        d.kill9();
        d.restart();
        let under_way: Vec<String> = d
            .log_lines()
            .into_iter()
            .filter(|l| l.contains("were under way at the crash"))
            .collect();
        intents += under_way.len();
        let changed = changes(&d.admin_socket(), "vol", since);
        let listed = |off: u64| {
            changed
                .ranges
                .iter()
                .any(|r| r.offset <= off && off + MIB <= r.offset + r.length)
        };
        let mut c = d.connect("vol");
        for i in 0..32 {
            let off = base + i * MIB;
            let data = c.read(off, MIB as u32).expect("read back");
            if data.iter().any(|&b| b != 0) {
                assert!(
                    listed(off),
                    "cycle {cycle}: the 1 MiB at {off} changed since LSN {since} but is not among the changes {:?} ({under_way:?})",
                    ranges(&changed)
                );
            }
        }
        eprintln!("cycle {cycle}: killed after {sent} writes sent; {under_way:?}");
    }
    assert!(
        intents > 0,
        "no in-place write was under way at any of the kills: the test proved nothing"
    );
}
