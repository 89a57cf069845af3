//! Point-in-time snapshots (issue 15, item 1): `mirrorblk snapshot
//! create|list|delete` and the read-only export `VOLUME@NAME`, read with
//! nbdcopy and qemu-io while fio and nbdcopy write to the volume, on a
//! primary and on a replica; the space bound breaks the snapshot, never the
//! writes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mirrorblk_admin::{Changes, Event, EventKind, Snapshot};
use mirrorblk_tests::cluster::mirrorblk_cli;
use mirrorblk_tests::tools::{self, qemu_io_ok, Tool, TOOL_TIMEOUT};
use mirrorblk_tests::{Daemon, TestDir};

const K64: u64 = 64 << 10;
const MIB: u64 = 1 << 20;

/// Bound on one fio run under which snapshots are taken and read.
const FIO_SECS: u64 = 6;

/// `mirrorblk --admin-socket ADMIN ARGS…`: exit code, stdout, stderr.
fn cli(admin: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(mirrorblk_cli())
        .arg("--admin-socket")
        .arg(admin)
        .args(args)
        .output()
        .expect("run mirrorblk");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `mirrorblk snapshot create VOLUME NAME [--space S] --json`, parsed.
#[track_caller]
fn create(admin: &Path, volume: &str, name: &str, space: Option<&str>) -> Snapshot {
    let mut args = vec!["snapshot", "create", volume, name, "--json"];
    if let Some(s) = space {
        args.extend(["--space", s]);
    }
    let (code, out, err) = cli(admin, &args);
    assert_eq!(code, 0, "snapshot create failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out:?} is no snapshot: {e}"))
}

/// `mirrorblk snapshot list VOLUME --json`, parsed.
#[track_caller]
fn list(admin: &Path, volume: &str) -> Vec<Snapshot> {
    let (code, out, err) = cli(admin, &["snapshot", "list", volume, "--json"]);
    assert_eq!(code, 0, "snapshot list failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out:?} is no list: {e}"))
}

/// `mirrorblk changes VOLUME --since LSN --json`, parsed.
#[track_caller]
fn changes(admin: &Path, volume: &str, since: u64) -> Changes {
    let (code, out, err) = cli(
        admin,
        &["changes", volume, "--since", &since.to_string(), "--json"],
    );
    assert_eq!(code, 0, "changes failed: {err}");
    serde_json::from_str(&out).expect("changes JSON")
}

/// `mirrorblk events --json`, parsed.
fn events(admin: &Path) -> Vec<EventKind> {
    let (code, out, err) = cli(admin, &["events", "--json"]);
    assert_eq!(code, 0, "events failed: {err}");
    out.lines()
        .map(|l| {
            Event::from_line(l)
                .unwrap_or_else(|e| panic!("{l:?}: {e}"))
                .kind
        })
        .collect()
}

/// A file of `len` bytes of pseudo-random data from `seed`, each 4 KiB
/// block different (a block read from the wrong place or time shows).
fn pattern(dir: &TestDir, name: &str, len: u64, seed: u64) -> PathBuf {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut data = Vec::with_capacity(len as usize);
    while (data.len() as u64) < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let path = dir.join(name);
    std::fs::write(&path, &data).expect("write pattern");
    path
}

/// Copies `from` to `to` with nbdcopy (either may be a URI or a file).
#[track_caller]
fn nbdcopy(from: &str, to: &str) {
    tools::run(Tool::NbdCopy, [from, to], TOOL_TIMEOUT).expect_success();
}

/// Reads export `uri` whole into a file of `dir` and returns its bytes.
#[track_caller]
fn read_all(dir: &TestDir, uri: &str, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    let _ = std::fs::remove_file(&out);
    nbdcopy(uri, out.to_str().expect("utf-8 path"));
    std::fs::read(&out).expect("read copy")
}

/// The 64 KiB regions where `a` and `b` differ (offsets).
fn differing_regions(a: &[u8], b: &[u8]) -> Vec<u64> {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.chunks(K64 as usize)
        .zip(b.chunks(K64 as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64 * K64)
        .collect()
}

#[track_caller]
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    let bad = differing_regions(got, want);
    assert!(
        bad.is_empty(),
        "{what}: {} of {} regions differ, first at {:?}",
        bad.len(),
        got.len() as u64 / K64,
        &bad[..bad.len().min(8)]
    );
}

/// qemu-io `commands` on read-only `uri`; panics unless all succeed.
#[track_caller]
fn read_only_ok(uri: &str, commands: &[&str]) {
    let out = tools::qemu_io_opts(uri, true, commands);
    assert!(
        out.success()
            && !out.combined().contains("error")
            && !out.combined().contains("Pattern verification failed"),
        "{out}"
    );
}

/// fio's random writes (4 KiB, and 256 KiB ones that would go to the store
/// in place) on `uri` for [`FIO_SECS`], in the background.
fn fio_load(uri: &str, size: &str) -> tools::Background {
    tools::spawn(
        Tool::Fio,
        [
            "--name=load".to_string(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=randwrite".into(),
            "--bssplit=4k/70:256k/30".into(),
            "--iodepth=16".into(),
            format!("--size={size}"),
            format!("--runtime={FIO_SECS}"),
            "--time_based".into(),
            "--randrepeat=0".into(),
        ],
    )
}

/// On a primary: a snapshot taken while fio writes reads the same before
/// and after the writes stop, and equals the volume wherever `changes`
/// says nothing changed since its LSN; a snapshot of pattern A reads A
/// exactly while fio and then nbdcopy overwrite the volume (B), which
/// reads B.
#[test]
fn a_snapshot_is_the_volume_as_of_its_lsn_while_writes_go_on() {
    let dir = TestDir::new();
    let size = 32 * MIB;
    let d = Daemon::start(dir.volume_args("vol", "32M"));
    let admin = d.admin_socket();
    let uri = d.uri("vol");
    let a = pattern(&dir, "a", size, 1);
    let b = pattern(&dir, "b", size, 2);
    let want_a = std::fs::read(&a).expect("a");
    nbdcopy(a.to_str().expect("path"), &uri);

    // Taken under fio's writes.
    let fio = fio_load(&uri, "32M");
    std::thread::sleep(Duration::from_secs(2));
    let s2 = create(&admin, "vol", "under-load", None);
    let during = read_all(&dir, &d.uri("vol@under-load"), "during");
    fio.wait(Duration::from_secs(FIO_SECS + 30))
        .expect_success();
    let after = read_all(&dir, &d.uri("vol@under-load"), "after");
    assert_same(
        "the snapshot read during and after the writes",
        &after,
        &during,
    );
    let volume = read_all(&dir, &uri, "volume");
    let changed = changes(&admin, "vol", s2.lsn);
    assert!(changed.complete);
    let mut unchanged = differing_regions(&after, &volume);
    unchanged.retain(|&off| {
        !changed
            .ranges
            .iter()
            .any(|r| r.offset <= off && off < r.offset + r.length)
    });
    assert!(
        unchanged.is_empty(),
        "regions that no record after LSN {} changed differ between snapshot and volume: {unchanged:?}",
        s2.lsn
    );
    assert!(changed.bytes > 0, "fio wrote after the snapshot");
    assert!(
        list(&admin, "vol")[0].used > 0,
        "old data was kept aside: {:?}",
        list(&admin, "vol")
    );

    // Pattern A, snapshot, then B over it under fio's load.
    nbdcopy(a.to_str().expect("path"), &uri);
    let s1 = create(&admin, "vol", "a", None);
    assert!(s1.lsn > s2.lsn, "{s1:?} {s2:?}");
    let fio = fio_load(&uri, "32M");
    for round in 0..2 {
        let got = read_all(&dir, &d.uri("vol@a"), "snap-a");
        assert_same(&format!("snapshot read {round} under fio"), &got, &want_a);
    }
    fio.wait(Duration::from_secs(FIO_SECS + 30))
        .expect_success();
    let copy_b = tools::spawn(Tool::NbdCopy, [b.to_str().expect("path"), &uri]);
    let got = read_all(&dir, &d.uri("vol@a"), "snap-a2");
    copy_b.wait(TOOL_TIMEOUT).expect_success();
    assert_same("snapshot read while B was written", &got, &want_a);
    assert_same(
        "snapshot after B",
        &read_all(&dir, &d.uri("vol@a"), "snap-a3"),
        &want_a,
    );
    let want_b = std::fs::read(&b).expect("b");
    assert_same(
        "the volume after B",
        &read_all(&dir, &uri, "vol-b"),
        &want_b,
    );
    // Every region was overwritten after the snapshot: all kept aside.
    let s1 = list(&admin, "vol")
        .into_iter()
        .find(|s| s.name == "a")
        .expect("listed");
    assert_eq!(s1.used, size, "{s1:?}");
    assert!(s1.broken.is_none(), "{s1:?}");
}

/// On a replica: a snapshot of its copy of the volume reads exactly pattern
/// A while the primary overwrites the volume with B (and the replica
/// applies B).
#[test]
fn a_snapshot_on_a_replica_is_exact_while_it_applies_writes() {
    use mirrorblk_tests::cluster::{write_secret, Node, EXPORT, VOLUME_BYTES};
    let dir = TestDir::new();
    let secret = write_secret(&dir, "secret");
    let sparse = ["--preallocate", "sparse"];
    let r = Node::start_replica(&dir, "n2", &secret, "64M", &sparse);
    let mut extra = vec!["--mode", "sync"];
    extra.extend(sparse);
    let p = Node::start_primary(&dir, "n1", &secret, &[&r], "64M", &extra);
    p.wait_replicas_in_sync(Duration::from_secs(60));
    let a = pattern(&dir, "a", VOLUME_BYTES, 3);
    let b = pattern(&dir, "b", VOLUME_BYTES, 4);
    let uri = p.daemon.uri(EXPORT);
    nbdcopy(a.to_str().expect("path"), &uri);
    // Sync mode: the replica has every acknowledged write durably.
    let s = create(&r.files.admin, EXPORT, "r1", None);
    assert_eq!(s.export, format!("{EXPORT}@r1"));
    let on_primary = changes(&p.files.admin, EXPORT, 0);
    assert_eq!(s.uuid, on_primary.uuid, "the volume's UUID");
    assert_eq!(
        s.lsn, on_primary.lsn,
        "the replica has every acknowledged record"
    );
    let snap_uri = r.daemon.uri(&format!("{EXPORT}@r1"));
    let want_a = std::fs::read(&a).expect("a");
    let copy_b = tools::spawn(Tool::NbdCopy, [b.to_str().expect("path"), &uri]);
    let fio = fio_load(&uri, "256M");
    let got = read_all(&dir, &snap_uri, "snap-during");
    copy_b.wait(TOOL_TIMEOUT).expect_success();
    fio.wait(Duration::from_secs(FIO_SECS + 30))
        .expect_success();
    assert_same("replica snapshot during B and fio", &got, &want_a);
    assert_same(
        "replica snapshot after",
        &read_all(&dir, &snap_uri, "snap-after"),
        &want_a,
    );
    let listed = list(&r.files.admin, EXPORT);
    assert!(
        listed[0].used > 0 && listed[0].broken.is_none(),
        "{listed:?}"
    );
    // The replica serves no client the volume itself, only the snapshot.
    assert!(!tools::qemu_io_opts(&r.daemon.uri(EXPORT), true, &["read 0 4k"]).success());
}

/// A snapshot with a small space bound breaks once the old data it must
/// keep passes it: the event log and `snapshot list` say so, its reads
/// fail with an NBD error, and every write that overflowed it succeeded
/// and reads back.
#[test]
fn a_snapshot_past_its_space_bound_breaks_never_the_writes() {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol", "16M"));
    let admin = d.admin_socket();
    let uri = d.uri("vol");
    qemu_io_ok(&uri, &["write -P 0xa 0 16M"]);
    let s = create(&admin, "vol", "small", Some("1M"));
    assert_eq!(s.space, MIB);
    let snap_uri = d.uri("vol@small");
    read_only_ok(&snap_uri, &["read -P 0xa 0 16M"]);
    // 16 regions fit; the 4 MiB of writes need 64.
    let writes: Vec<String> = (0..64)
        .map(|i| format!("write -P 0xb {} 64k", i * K64))
        .collect();
    let out = qemu_io_ok(&uri, &writes);
    assert!(!out.combined().contains("error"), "{out}");
    qemu_io_ok(&uri, &["read -P 0xb 0 4M", "read -P 0xa 4M 12M"]);
    let listed = list(&admin, "vol");
    let why = listed[0]
        .broken
        .clone()
        .unwrap_or_else(|| panic!("not broken: {listed:?}"));
    assert!(why.contains("space bound"), "{why}");
    assert_eq!(listed[0].used, 0, "the side file is released: {listed:?}");
    let read = tools::qemu_io_opts(&snap_uri, true, &["read 8M 4k"]);
    assert!(
        read.combined().contains("Input/output error"),
        "a broken snapshot's read must fail with EIO: {read}"
    );
    let evs = events(&admin);
    assert!(
        evs.iter().any(|e| matches!(e, EventKind::SnapshotBroken { name, reason, .. } if name == "small" && reason.contains("space bound"))),
        "no snapshot-broken event: {evs:?}"
    );
    // The side file stays, cut to its header (which says broken), so a
    // restart lists the snapshot broken too, until it is deleted.
    let side = dir.join("vol.journal.snap-small");
    let len = std::fs::metadata(&side).map(|m| m.len());
    assert_eq!(len.ok(), Some(8192), "side file cut to its header");
}

/// The CLI: create, list and delete with --json and without, the admin
/// socket flag before or after the subcommand, clear errors (exit 1) for
/// a duplicate name, an unknown volume or snapshot and a bad name; delete
/// removes the export and the side file.
#[test]
fn the_snapshot_cli_creates_lists_and_deletes() {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol", "4M"));
    let admin = d.admin_socket();
    let sock = admin.to_str().expect("utf-8 path");
    qemu_io_ok(&d.uri("vol"), &["write -P 7 0 1M"]);
    // --admin-socket after `create`.
    let out = Command::new(mirrorblk_cli())
        .args([
            "snapshot",
            "create",
            "--admin-socket",
            sock,
            "vol",
            "s1",
            "--json",
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s1: Snapshot = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (s1.volume.as_str(), s1.name.as_str(), s1.export.as_str()),
        ("vol", "s1", "vol@s1")
    );
    assert_eq!((s1.size, s1.space, s1.used), (4 * MIB, 1 << 30, 0));
    assert!(
        s1.lsn >= 1 && s1.broken.is_none() && s1.created_ms > 0,
        "{s1:?}"
    );
    let side = dir.join("vol.journal.snap-s1");
    assert!(side.exists(), "side file beside the journal");
    let (code, text, _) = cli(
        &admin,
        &["snapshot", "create", "vol", "s2", "--space", "2M"],
    );
    assert_eq!(code, 0);
    assert!(text.starts_with("created: vol@s2 "), "{text}");
    let names: Vec<String> = list(&admin, "vol").into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s1", "s2"]);
    let (code, all, _) = cli(&admin, &["snapshot", "list"]);
    assert_eq!(code, 0);
    assert_eq!(all.lines().count(), 2, "{all}");

    // The export is listed and reads the snapshot; writes are refused.
    let info = tools::run(
        Tool::NbdInfo,
        ["--list", "--json", &d.uri("")],
        TOOL_TIMEOUT,
    )
    .expect_success();
    assert!(info.stdout.contains("\"vol@s1\""), "{info}");
    read_only_ok(&d.uri("vol@s1"), &["read -P 7 0 1M", "read -P 0 1M 3M"]);
    let w = tools::qemu_io_opts(&d.uri("vol@s1"), false, &["write -P 1 0 4k"]);
    assert!(!w.success(), "{w}");
    let mut c = d.connect_structured("vol@s1");
    assert_eq!(c.info().size, 4 * MIB);
    let refused = c
        .write(0, &[1; 4096], false)
        .expect_err("a write must be refused");
    assert_eq!(
        refused.server_code(),
        Some(nbd::ErrorCode::Perm.code()),
        "{refused}"
    );
    assert_eq!(c.read(0, 4096).expect("read"), vec![7; 4096]);

    for (args, says) in [
        (
            vec!["snapshot", "create", "vol", "s1"],
            "already has a snapshot 's1'",
        ),
        (vec!["snapshot", "create", "nope", "x"], "no volume 'nope'"),
        (vec!["snapshot", "create", "vol", "a/b"], "is not 1 to 64"),
        (
            vec!["snapshot", "delete", "vol", "zz"],
            "has no snapshot 'zz'",
        ),
        (vec!["snapshot", "list", "nope"], "no volume 'nope'"),
    ] {
        let (code, _, err) = cli(&admin, &args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }

    let (code, out, err) = cli(&admin, &["snapshot", "delete", "vol", "s1", "--json"]);
    assert_eq!(code, 0, "{err}");
    let gone: Snapshot = serde_json::from_str(&out).expect("json");
    assert_eq!(gone.name, "s1");
    assert!(!side.exists(), "side file removed");
    let info = tools::run(
        Tool::NbdInfo,
        ["--list", "--json", &d.uri("")],
        TOOL_TIMEOUT,
    )
    .expect_success();
    assert!(!info.stdout.contains("\"vol@s1\""), "{info}");
    assert!(!tools::qemu_io_opts(&d.uri("vol@s1"), true, &["read 0 4k"]).success());
    let names: Vec<String> = list(&admin, "vol").into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s2"]);
    let evs = events(&admin);
    for want in ["snapshot-created", "snapshot-deleted"] {
        assert!(evs.iter().any(|e| e.name() == want), "no {want}: {evs:?}");
    }
}

/// Fills `vol` with pattern A, takes snapshot `name`, then overwrites the
/// first `regions` 64 KiB regions with 0xee: returns A's bytes.
fn pattern_then_snapshot_then_overwrite(
    dir: &TestDir,
    d: &Daemon,
    size: u64,
    name: &str,
    regions: u64,
) -> Vec<u8> {
    let a = pattern(dir, "a", size, 7);
    nbdcopy(a.to_str().expect("path"), &d.uri("vol"));
    let s = create(&d.admin_socket(), "vol", name, None);
    assert!(s.broken.is_none(), "{s:?}");
    let writes: Vec<String> = (0..regions)
        .map(|i| format!("write -P 0xee {} 64k", i * 2 * K64))
        .collect();
    qemu_io_ok(&d.uri("vol"), &writes);
    std::fs::read(&a).expect("a")
}

/// A snapshot survives a clean stop: after the restart its export reads
/// exactly what it read before (the old data of every region overwritten
/// after it comes from the side file), `snapshot list` shows it with the
/// same LSN and kept bytes, and it keeps working (regions overwritten after
/// the restart are kept too).
#[test]
fn a_snapshot_survives_a_clean_stop_and_start() {
    let dir = TestDir::new();
    let size = 16 * MIB;
    let mut d = Daemon::start(dir.volume_args("vol", "16M"));
    let want = pattern_then_snapshot_then_overwrite(&dir, &d, size, "keep", 64);
    let before = read_all(&dir, &d.uri("vol@keep"), "before");
    assert_same("the snapshot before the stop", &before, &want);
    let listed = list(&d.admin_socket(), "vol");
    assert_eq!(listed[0].used, 64 * K64, "{listed:?}");
    let st = d.terminate();
    assert!(st.success(), "{st}");
    d.restart();
    let admin = d.admin_socket();
    let again = list(&admin, "vol");
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(
        (
            again[0].name.as_str(),
            again[0].lsn,
            again[0].used,
            again[0].size
        ),
        ("keep", listed[0].lsn, listed[0].used, size),
        "{again:?}"
    );
    assert!(again[0].broken.is_none(), "{again:?}");
    assert_same(
        "the snapshot after the restart",
        &read_all(&dir, &d.uri("vol@keep"), "after"),
        &want,
    );
    // Still copy-on-write after the restart.
    qemu_io_ok(&d.uri("vol"), &["write -P 0xdd 8M 8M"]);
    assert_same(
        "the snapshot after writes following the restart",
        &read_all(&dir, &d.uri("vol@keep"), "after2"),
        &want,
    );
    qemu_io_ok(&d.uri("vol"), &["read -P 0xee 0 64k", "read -P 0xdd 8M 8M"]);
}

/// The writes a [`crash_writer`] got acknowledged: block → bytes, and the
/// one in flight at the kill (it may or may not have landed).
#[derive(Default)]
struct Acked {
    blocks: std::collections::HashMap<u64, Vec<u8>>,
    in_flight: Option<(u64, Vec<u8>)>,
    count: u64,
}

/// Writes 4 KiB blocks at pseudo-random places of the first `size` bytes
/// (each block's content unique) until the server goes away or `limit`
/// passes; what was acknowledged. `count` follows the acknowledged writes
/// as they come, for the test to pick its crash moment.
fn crash_writer(
    mut c: nbd::Client<std::net::TcpStream>,
    size: u64,
    limit: Duration,
    count: &std::sync::atomic::AtomicU64,
) -> Acked {
    let mut acked = Acked::default();
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let end = std::time::Instant::now() + limit;
    for n in 0..1_000_000u64 {
        if std::time::Instant::now() >= end {
            break;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let block = x % (size / 4096);
        let mut data = vec![0u8; 4096];
        for (i, w) in data.chunks_mut(8).enumerate() {
            w.copy_from_slice(&(n << 20 | block << 8 | i as u64).to_le_bytes());
        }
        acked.in_flight = Some((block, data.clone()));
        if c.write(block * 4096, &data, false).is_err() {
            return acked;
        }
        acked.blocks.insert(block, data);
        acked.in_flight = None;
        acked.count += 1;
        count.store(acked.count, std::sync::atomic::Ordering::Relaxed);
    }
    acked
}

/// A snapshot survives `kill -9` under writes: the writes after it keep
/// regions aside (some batches of them torn or not yet applied at the
/// kill); after the restart (the journal replayed, copying for the
/// snapshot as the applier does) the snapshot reads exactly pattern A and
/// the volume holds every acknowledged write. Twice, the second time over
/// the first restart's state.
#[test]
fn a_snapshot_survives_kill_9_under_writes() {
    let dir = TestDir::new();
    let size = 64 * MIB;
    let mut args = dir.volume_args("vol", "64M");
    // Old checkpoints: replay re-applies much (and regions it keeps).
    args.extend(["--checkpoint-interval".into(), "1h".into()]);
    let mut d = Daemon::start(&args);
    let want = pattern_then_snapshot_then_overwrite(&dir, &d, size, "crash", 4);
    let mut volume = want.clone();
    for i in 0..4 {
        let at = (i * 2 * K64) as usize;
        volume[at..at + K64 as usize].fill(0xee);
    }
    for round in 0..2 {
        let client = d.connect("vol");
        let count = std::sync::atomic::AtomicU64::new(0);
        let acked = std::thread::scope(|s| {
            let w = s.spawn(|| crash_writer(client, size, Duration::from_secs(20), &count));
            // The crash moment: while the writer is going, once it has had
            // enough writes acknowledged to prove something (a loaded
            // machine may take seconds for them), within a bound.
            let since = std::time::Instant::now();
            while count.load(std::sync::atomic::Ordering::Relaxed) < 150
                && since.elapsed() < Duration::from_secs(15)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            d.kill9();
            w.join().expect("writer")
        });
        assert!(
            acked.count > 100,
            "round {round}: too few writes: {}",
            acked.count
        );
        d.restart();
        assert_same(
            &format!("round {round}: the snapshot after kill -9 and restart"),
            &read_all(&dir, &d.uri("vol@crash"), &format!("snap{round}")),
            &want,
        );
        let got = read_all(&dir, &d.uri("vol"), &format!("vol{round}"));
        for (&block, data) in &acked.blocks {
            let at = (block * 4096) as usize;
            volume[at..at + 4096].copy_from_slice(data);
        }
        if let Some((block, data)) = &acked.in_flight {
            let at = (block * 4096) as usize;
            if got[at..at + 4096] == data[..] {
                volume[at..at + 4096].copy_from_slice(data);
            }
        }
        assert_same(
            &format!(
                "round {round}: the volume after kill -9 ({} acknowledged writes)",
                acked.count
            ),
            &got,
            &volume,
        );
        let l = list(&d.admin_socket(), "vol");
        assert!(l[0].broken.is_none() && l[0].used > 0, "{l:?}");
    }
}

/// A damaged map entry of a side file found at start-up breaks that
/// snapshot (listed broken, reads fail with EIO, a `snapshot-broken`
/// event, a log line naming the entry) and nothing else: the volume and
/// another snapshot read exactly.
#[test]
fn a_damaged_side_file_breaks_its_snapshot_at_start_up() {
    let dir = TestDir::new();
    let size = 16 * MIB;
    let mut d = Daemon::start(dir.volume_args("vol", "16M"));
    let want = pattern_then_snapshot_then_overwrite(&dir, &d, size, "bad", 8);
    create(&d.admin_socket(), "vol", "good", None);
    qemu_io_ok(&d.uri("vol"), &["write -P 0xcc 0 1M"]);
    let volume = read_all(&dir, &d.uri("vol"), "volume");
    let good = read_all(&dir, &d.uri("vol@good"), "good");
    assert!(d.terminate().success());
    // Map entry 3 (of 8, all sealed by the stop's checkpoint): one bit.
    let side = dir.join("vol.journal.snap-bad");
    let mut bytes = std::fs::read(&side).expect("side file");
    bytes[8192 + 3 * 32 + 9] ^= 0x10;
    std::fs::write(&side, &bytes).expect("damage");
    d.restart();
    let admin = d.admin_socket();
    let l = list(&admin, "vol");
    let bad = l.iter().find(|s| s.name == "bad").expect("listed");
    let why = bad
        .broken
        .clone()
        .unwrap_or_else(|| panic!("not broken: {l:?}"));
    assert!(
        why.contains("map entry 3") && why.contains("damaged"),
        "{why}"
    );
    assert!(
        d.log().contains("snapshot 'bad'") && d.log().contains("map entry 3"),
        "{}",
        d.log()
    );
    let read = tools::qemu_io_opts(&d.uri("vol@bad"), true, &["read 0 4k"]);
    assert!(read.combined().contains("Input/output error"), "{read}");
    let evs = events(&admin);
    assert!(
        evs.iter().any(|e| matches!(e, EventKind::SnapshotBroken { name, reason, .. } if name == "bad" && reason.contains("map entry 3"))),
        "no snapshot-broken event: {evs:?}"
    );
    assert_same(
        "the volume",
        &read_all(&dir, &d.uri("vol"), "volume2"),
        &volume,
    );
    assert_same(
        "the other snapshot",
        &read_all(&dir, &d.uri("vol@good"), "good2"),
        &good,
    );
    assert_ne!(good, want);
    // Delete removes the broken one's file.
    let (code, _, err) = cli(&admin, &["snapshot", "delete", "vol", "bad"]);
    assert_eq!(code, 0, "{err}");
    assert!(!side.exists());
}

/// A live restart (`mirrorblk restart`) keeps the snapshot: the new
/// process loads it from its side file and serves its export.
#[test]
fn a_snapshot_survives_a_live_restart() {
    Daemon::become_subreaper();
    let dir = TestDir::new();
    let size = 16 * MIB;
    let mut d = Daemon::start(dir.volume_args("vol", "16M"));
    let want = pattern_then_snapshot_then_overwrite(&dir, &d, size, "live", 16);
    let admin = d.admin_socket();
    let (code, out, err) = cli(&admin, &["restart", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("restart json");
    let pid = v["pid"].as_u64().expect("pid") as u32;
    assert!(d.follow_successor(pid, Duration::from_secs(30)).success());
    let l = list(&admin, "vol");
    assert!(
        l.len() == 1 && l[0].broken.is_none() && l[0].used == 16 * K64,
        "{l:?}"
    );
    assert_same(
        "the snapshot after a live restart",
        &read_all(&dir, &d.uri("vol@live"), "live"),
        &want,
    );
}
