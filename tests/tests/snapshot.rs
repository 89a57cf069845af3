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
    assert!(
        !dir.join("vol.journal.snap-small").exists(),
        "side file removed"
    );
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
