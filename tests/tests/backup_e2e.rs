//! `mirrorblk backup create` end to end (issue 15): a full and two
//! incremental backups of a volume taken while a client writes to it, each
//! restored and compared with a snapshot taken at the same LSN; the middle
//! one pruned; a damaged repository refused by verify and restore.
//!
//! The writer (fio with its nbd engine in the main test) pauses, with no
//! request left at the server, only while the test's reference snapshot and
//! the backup's own snapshot are taken, so both hold the same LSN
//! (asserted); the backup then reads its snapshot while the writer goes on.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mirrorblk_admin as admin;
use mirrorblk_tests::cluster::mirrorblk_cli;
use mirrorblk_tests::tools::{self, Tool};
use mirrorblk_tests::util::{assert_bytes_eq, pattern, Rng, MIB};
use mirrorblk_tests::{Daemon, TestDir};
use nbd::Client;

const SIZE: u64 = 64 * MIB;
/// The writer changes only the first WRITE_SPAN bytes, so an incremental
/// reads a few 4 MiB chunks of the sixteen.
const WRITE_SPAN: u64 = 8 * MIB;
const BLOCK: u64 = 64 << 10;
/// Bound on one CLI run.
const CLI_LIMIT: Duration = Duration::from_secs(120);

/// Runs `mirrorblk ARGS` with a bound; returns (exit code, stdout, stderr).
fn cli(args: &[&str]) -> (i32, String, String) {
    cli_env(args, &[])
}

/// [`cli`] with extra environment variables.
fn cli_env(args: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let mut child = Command::new(mirrorblk_cli())
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mirrorblk");
    let deadline = Instant::now() + CLI_LIMIT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mirrorblk {args:?} ran past {CLI_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// fio (nbd engine, libnbd) writing 64 KiB blocks at random offsets of the
/// first WRITE_SPAN bytes, 4 in flight, until stopped. It pauses with
/// SIGSTOP (its own PID), and a pause returns once the requests it had sent
/// are all journaled: the volume's last LSN holds still.
struct FioWriter {
    fio: tools::Background,
    admin: std::path::PathBuf,
}

impl FioWriter {
    fn start(d: &Daemon) -> FioWriter {
        let fio = tools::spawn(
            Tool::Fio,
            [
                "--name=writer".to_string(),
                "--ioengine=nbd".into(),
                format!("--uri={}", d.uri("vol0")),
                "--rw=randwrite".into(),
                "--bs=64k".into(),
                "--iodepth=4".into(),
                format!("--size={WRITE_SPAN}"),
                "--time_based".into(),
                "--runtime=300".into(),
                "--randrepeat=0".into(),
                "--refill_buffers".into(),
                // The job runs as a thread of this process, not a forked
                // child, so SIGSTOP to fio's PID stops its writes.
                "--thread".into(),
            ],
        );
        FioWriter {
            fio,
            admin: d.admin_socket(),
        }
    }

    /// The volume's last assigned LSN.
    fn last_lsn(&self) -> u64 {
        let r = admin::call(&self.admin, &admin::Request::Status).expect("status");
        let vol = r.volumes.iter().find(|v| v.name == "vol0");
        vol.expect("vol0 in the status").last_lsn
    }

    /// Waits until fio has made `n` more writes (LSNs).
    fn wait_writes(&self, n: u64) {
        let from = self.last_lsn();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.last_lsn() < from + n {
            assert!(Instant::now() < deadline, "fio made no {n} writes in 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.fio.pid() as libc::pid_t, sig) };
        assert_eq!(r, 0, "signal {sig} to fio");
    }

    /// Stops fio and returns once the server holds no request of it.
    fn pause(&self) {
        self.signal(libc::SIGSTOP);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = self.last_lsn();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.last_lsn();
            if now == last {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "writes went on 30 s after SIGSTOP"
            );
            last = now;
        }
    }

    fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Ends fio (SIGTERM: it stops and reports) and checks that none of its
    /// writes failed.
    fn finish(self) {
        self.resume();
        self.signal(libc::SIGTERM);
        let out = self.fio.wait(Duration::from_secs(60));
        let text = out.combined();
        assert!(
            text.contains("err= 0") && !text.contains("error"),
            "fio's writes failed while backups ran:\n{text}"
        );
    }
}

/// A client writing 64 KiB patterned blocks at random offsets of the first
/// WRITE_SPAN bytes, one at a time, until stopped; every write must succeed.
struct BusyWriter {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl BusyWriter {
    fn start(d: &Daemon, seed: u64) -> BusyWriter {
        let mut c = d.connect("vol0");
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (s, w) = (stop.clone(), writes.clone());
        let thread = std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let deadline = Instant::now() + Duration::from_secs(300);
            while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
                let at = rng.below(WRITE_SPAN / BLOCK) * BLOCK;
                let data = pattern(rng.next_u64(), BLOCK as usize);
                c.write(at, &data, false)
                    .expect("a write while backups run");
                w.fetch_add(1, Ordering::SeqCst);
            }
        });
        BusyWriter {
            stop,
            writes,
            thread: Some(thread),
        }
    }
}

impl Drop for BusyWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn snapshots(admin: &Path) -> Vec<admin::Snapshot> {
    let r = admin::call(admin, &admin::Request::SnapshotList { volume: None }).expect("list");
    assert!(r.ok, "snapshot_list: {:?}", r.error);
    r.snapshots.unwrap_or_default()
}

fn snapshot_create(admin: &Path, name: &str) -> admin::Snapshot {
    let req = admin::Request::SnapshotCreate {
        volume: "vol0".into(),
        name: name.into(),
        space: None,
    };
    let r = admin::call(admin, &req).expect("snapshot_create");
    assert!(r.ok, "snapshot_create: {:?}", r.error);
    r.snapshots
        .and_then(|s| s.into_iter().next())
        .expect("the snapshot")
}

fn snapshot_delete(admin: &Path, name: &str) {
    let req = admin::Request::SnapshotDelete {
        volume: "vol0".into(),
        name: name.into(),
    };
    let r = admin::call(admin, &req).expect("snapshot_delete");
    assert!(r.ok, "snapshot_delete: {:?}", r.error);
}

/// Every byte of export `name`.
fn read_export(d: &Daemon, name: &str) -> Vec<u8> {
    let mut c = Client::connect(d.tcp(), name, false).expect("connect to the export");
    let size = c.info().size;
    let mut out = Vec::with_capacity(size as usize);
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(4 * MIB);
        out.extend(c.read(pos, n as u32).expect("read the export"));
        pos += n;
    }
    out
}

/// One `backup create --json` answer.
#[derive(Debug)]
struct Created {
    id: String,
    lsn: u64,
    incremental: bool,
    bytes_read: u64,
    bytes_stored: u64,
    chunks_reused: u64,
    seconds: f64,
}

impl Created {
    /// Parses the one JSON object, which must hold exactly these fields.
    fn parse(line: &str) -> Created {
        let v: serde_json::Value =
            serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line}"));
        let obj = v.as_object().expect("one JSON object");
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "bytes_read",
                "bytes_stored",
                "chunks_reused",
                "id",
                "incremental",
                "lsn",
                "seconds"
            ]
        );
        let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {line}"));
        Created {
            id: v["id"].as_str().expect("id").to_owned(),
            lsn: n("lsn"),
            incremental: v["incremental"].as_bool().expect("incremental"),
            bytes_read: n("bytes_read"),
            bytes_stored: n("bytes_stored"),
            chunks_reused: n("chunks_reused"),
            seconds: v["seconds"].as_f64().expect("seconds"),
        }
    }
}

/// A backup taken while the writer writes, and the volume as of its LSN
/// (a reference snapshot taken while the writer is paused, together with
/// the backup's own snapshot).
fn backup_under_writes(d: &Daemon, w: &FioWriter, repo: &str, n: usize) -> (Created, Vec<u8>) {
    let admin = d.admin_socket();
    w.pause();
    let reference = snapshot_create(&admin, &format!("ref{n}"));
    let admin_arg = admin.to_string_lossy().into_owned();
    let repo = repo.to_owned();
    let child = std::thread::spawn(move || {
        cli(&[
            "--admin-socket",
            &admin_arg,
            "backup",
            "create",
            "--repo",
            &repo,
            "vol0",
            "--json",
        ])
    });
    // Resume once the backup's snapshot exists (or the command ended).
    let deadline = Instant::now() + CLI_LIMIT;
    while !child.is_finished()
        && !snapshots(&admin)
            .iter()
            .any(|s| s.name.starts_with("mirrorblk-backup-"))
    {
        assert!(Instant::now() < deadline, "no backup snapshot appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    w.resume();
    let (code, out, err) = child.join().expect("the backup thread");
    assert_eq!(code, 0, "backup create failed: {err}");
    let created = Created::parse(&out);
    assert_eq!(
        created.lsn, reference.lsn,
        "the reference is not at the backup's LSN"
    );
    let want = read_export(d, &format!("vol0@ref{n}"));
    snapshot_delete(&admin, &format!("ref{n}"));
    assert!(
        !snapshots(&admin)
            .iter()
            .any(|s| s.name.starts_with("mirrorblk-backup-")),
        "backup create left its snapshot behind"
    );
    (created, want)
}

fn restore(repo: &str, id: &str, to: &Path) -> (i32, String, String) {
    let to = to.to_string_lossy().into_owned();
    cli(&[
        "backup", "restore", "--repo", repo, id, "--to", &to, "--force",
    ])
}

/// Writes a distinct 4 MiB pattern (seeds `seed`, `seed + 1`, …) over the
/// whole volume, so a full backup has data everywhere.
fn fill(d: &Daemon, seed: u64) {
    let mut c = d.connect("vol0");
    for i in 0..SIZE / (4 * MIB) {
        c.write(i * 4 * MIB, &pattern(seed + i, (4 * MIB) as usize), false)
            .unwrap();
    }
}

fn assert_restores(repo: &str, id: &str, want: &[u8], file: &Path) {
    let (code, _, err) = restore(repo, id, file);
    assert_eq!(code, 0, "restore of {id} failed: {err}");
    let got = std::fs::read(file).expect("the restored file");
    assert_bytes_eq(&format!("restore of {id}"), 0, want, &got);
}

#[test]
fn full_and_incremental_backups_under_writes_restore_exactly() {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "64M"));
    // Data everywhere first, so the full backup has something to read.
    fill(&d, 100);
    let repo = dir.join("repo").to_string_lossy().into_owned();
    let w = FioWriter::start(&d);
    let mut taken = Vec::new();
    for n in 0..3 {
        // Let fio change a few blocks between backups.
        w.wait_writes(20);
        taken.push(backup_under_writes(&d, &w, &repo, n));
    }
    w.finish();
    let (full, inc1, inc2) = (&taken[0].0, &taken[1].0, &taken[2].0);
    eprintln!("full {full:?}\nincremental {inc1:?}\nincremental {inc2:?}");
    assert!(!full.incremental && inc1.incremental && inc2.incremental);
    assert_eq!(full.bytes_read, SIZE);
    for inc in [inc1, inc2] {
        assert!(
            inc.bytes_read <= WRITE_SPAN,
            "an incremental read {} bytes",
            inc.bytes_read
        );
        assert!(
            inc.chunks_reused >= (SIZE - WRITE_SPAN) / (4 * MIB),
            "{inc:?}"
        );
        assert!(inc.bytes_stored < full.bytes_stored, "{inc:?}");
    }
    assert!(inc1.seconds >= 0.0 && full.bytes_stored > 0);
    let file = dir.join("restored");
    for (created, want) in &taken {
        assert_restores(&repo, &created.id, want, &file);
    }
    // Drop the middle backup and collect its chunks: the latest still
    // restores exactly (every backup is logically full).
    let r = backup::Repository::open_location(&repo).expect("the repository");
    assert_eq!(r.config().chunk_size, 64 << 10, "the default for 64 MiB");
    let middle: backup::BackupId = inc1.id.parse().expect("an id");
    r.delete_backup(&middle).expect("delete the middle backup");
    let (code, _, err) = cli(&[
        "backup",
        "prune",
        "--repo",
        &repo,
        "--keep-last",
        "10",
        "--gc-margin",
        "0",
    ]);
    assert_eq!(code, 0, "prune: {err}");
    assert_restores(&repo, &inc2.id, &taken[2].1, &file);
    let (code, out, _) = cli(&["backup", "verify", "--repo", &repo]);
    assert_eq!(code, 0, "verify after prune: {out}");
}

/// Exit 1 with a clear message, and no backup written, for an unknown
/// volume and an unreachable daemon.
#[test]
fn backup_create_fails_clearly() {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "16M"));
    let repo = dir.join("repo").to_string_lossy().into_owned();
    let admin = d.admin_socket().to_string_lossy().into_owned();
    let (code, _, err) = cli(&[
        "--admin-socket",
        &admin,
        "backup",
        "create",
        "--repo",
        &repo,
        "nope",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("refused snapshot_create"), "{err}");
    let gone = dir.join("no.sock").to_string_lossy().into_owned();
    let (code, _, err) = cli(&[
        "--admin-socket",
        &gone,
        "backup",
        "create",
        "--repo",
        &repo,
        "vol0",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach the daemon"), "{err}");
    let (code, out, _) = cli(&["backup", "list", "--repo", &repo]);
    assert_eq!((code, out.as_str()), (0, ""), "no backup was written");
}

/// `backup create --json` against the daemon at `admin`, parsed; a new
/// repository gets 4 MiB chunks (the callers count chunks of that size).
fn create_backup(admin: &Path, repo: &str) -> Created {
    let admin = admin.to_string_lossy().into_owned();
    let (code, out, err) = cli(&[
        "--admin-socket",
        &admin,
        "backup",
        "create",
        "--repo",
        repo,
        "--chunk-size",
        "4M",
        "vol0",
        "--json",
    ]);
    assert_eq!(code, 0, "backup create failed: {err}");
    Created::parse(&out)
}

/// `backup create --json --chunk-size SIZE` against the daemon at `admin`:
/// (exit code, stdout, stderr).
fn create_with_chunk_size(admin: &Path, repo: &str, size: &str) -> (i32, String, String) {
    let admin = admin.to_string_lossy().into_owned();
    cli(&[
        "--admin-socket",
        &admin,
        "backup",
        "create",
        "--repo",
        repo,
        "--chunk-size",
        size,
        "vol0",
        "--json",
    ])
}

/// `--chunk-size` picks a new repository's chunk size (64K, the daemon's
/// changed-block region: an incremental after one 64 KiB write reads just
/// that), is accepted again when it is the repository's, and is refused,
/// with no backup written, when it is not or is no chunk size at all.
#[test]
fn the_chunk_size_is_chosen_when_the_repository_is_created() {
    const VOL: u64 = 16 * MIB;
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "16M"));
    let mut c = d.connect("vol0");
    for i in 0..VOL / (4 * MIB) {
        c.write(i * 4 * MIB, &pattern(300 + i, (4 * MIB) as usize), false)
            .unwrap();
    }
    let repo = dir.join("repo").to_string_lossy().into_owned();
    let admin = d.admin_socket();
    let (code, _, err) = create_with_chunk_size(&admin, &repo, "3K");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("power of two from 4K to 16M"), "{err}");
    assert!(!Path::new(&repo).exists(), "a refused size creates nothing");
    let (code, out, err) = create_with_chunk_size(&admin, &repo, "64K");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("created the repository") && err.contains("64K chunks"),
        "{err}"
    );
    let full = Created::parse(&out);
    let r = backup::Repository::open_location(&repo).expect("the repository");
    assert_eq!(r.config().chunk_size, 64 << 10);
    let index = r
        .load_index(&full.id.parse().expect("an id"))
        .expect("index");
    assert_eq!((index.chunk_size, index.chunks.len()), (64 << 10, 256));
    // One 64 KiB write off any 4 MiB boundary: the incremental reads 64 KiB.
    c.write(5 * MIB + (128 << 10), &pattern(999, 64 << 10), false)
        .unwrap();
    let (code, out, err) = create_with_chunk_size(&admin, &repo, "64K");
    assert_eq!(code, 0, "{err}");
    let inc = Created::parse(&out);
    assert!(inc.incremental, "{inc:?}");
    assert_eq!(
        (inc.bytes_read, inc.chunks_reused),
        (64 << 10, 255),
        "{inc:?}"
    );
    let file = dir.join("restored");
    assert_restores(&repo, &inc.id, &read_export(&d, "vol0"), &file);
    for size in ["4M", "128K"] {
        let (code, _, err) = create_with_chunk_size(&admin, &repo, size);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("has 64K chunks, fixed when it was created")
                && err.contains(&format!("not the {size} asked for")),
            "{err}"
        );
    }
    assert_eq!(r.backups().expect("backups").len(), 2, "no backup written");
    assert!(snapshots(&admin).is_empty(), "no snapshot left");
}

/// The byte ranges of backup `id` whose chunk is `digest`, as verify
/// prints them (`bytes A..B`).
fn ranges_of(repo: &backup::Repository, id: &str, digest: &backup::Digest) -> Vec<String> {
    let index = repo
        .load_index(&id.parse().expect("an id"))
        .expect("the index");
    (0..index.chunks.len())
        .filter(|&i| index.chunks[i].as_ref() == Some(digest))
        .map(|i| {
            let r = index.chunk_range(i);
            format!("bytes {}..{}", r.start, r.end)
        })
        .collect()
}

/// One chunk corrupted and one deleted in a repository `backup create`
/// wrote: verify exits 1 naming each backup and byte range; restore exits
/// 1 naming exactly the ranges it did not restore, and every other byte it
/// wrote is right.
#[test]
fn a_damaged_repository_is_named_by_verify_and_restore() {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "64M"));
    let mut c = d.connect("vol0");
    for i in 0..4 {
        c.write(i * 4 * MIB, &pattern(200 + i, (4 * MIB) as usize), true)
            .unwrap();
    }
    let repo = dir.join("repo").to_string_lossy().into_owned();
    let full = create_backup(&d.admin_socket(), &repo);
    c.write(4 * MIB + 4096, &pattern(300, 4096), true).unwrap();
    let inc = create_backup(&d.admin_socket(), &repo);
    assert!(inc.incremental && inc.bytes_read == 4 * MIB, "{inc:?}");
    let want = read_export(&d, "vol0");

    let r = backup::Repository::open_location(&repo).expect("the repository");
    let index = r.load_index(&full.id.parse().unwrap()).unwrap();
    let (gone, bad) = (index.chunks[0].unwrap(), index.chunks[2].unwrap());
    let path = |dg: &backup::Digest| dir.join("repo").join(dg.key());
    std::fs::remove_file(path(&gone)).expect("delete a chunk");
    let mut blob = std::fs::read(path(&bad)).unwrap();
    let mid = blob.len() / 2;
    blob[mid] ^= 0x40;
    std::fs::write(path(&bad), blob).unwrap();

    let (code, out, _) = cli(&["backup", "verify", "--repo", &repo]);
    assert_eq!(code, 1, "verify must fail: {out}");
    for id in [&full.id, &inc.id] {
        for dg in [&gone, &bad] {
            for range in ranges_of(&r, id, dg) {
                assert!(
                    out.contains(&format!("DAMAGED {id}: {range}")),
                    "verify does not name {id} {range}: {out}"
                );
            }
        }
    }
    assert_eq!(
        out.lines().filter(|l| l.starts_with("DAMAGED")).count(),
        4,
        "{out}"
    );

    let file = dir.join("restored");
    let (code, out, err) = restore(&repo, &inc.id, &file);
    assert_eq!(code, 1, "restore must fail: {err}");
    let named: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("NOT RESTORED"))
        .collect();
    assert_eq!(named.len(), 2, "{out}");
    assert!(
        out.contains("bytes 0..4194304") && out.contains("bytes 8388608..12582912"),
        "{out}"
    );
    let got = std::fs::read(&file).unwrap();
    let (lo, hi) = ((4 * MIB) as usize, (8 * MIB) as usize);
    assert_bytes_eq(
        "restored outside the damage",
        lo as u64,
        &want[lo..hi],
        &got[lo..hi],
    );
    let rest = (12 * MIB) as usize;
    assert_bytes_eq(
        "restored outside the damage",
        rest as u64,
        &want[rest..],
        &got[rest..],
    );
}

/// kill -9 of the primary between two backups, the replica promoted: the
/// next backup, taken on the new primary, is incremental from the backup
/// the old primary took, and restores exactly.
#[test]
fn after_a_failover_the_next_backup_is_incremental_and_exact() {
    use mirrorblk_tests::cluster::{write_secret, Node, EXPORT};
    assert_eq!(EXPORT, "vol0");
    let dir = TestDir::new();
    let secret = write_secret(&dir, "secret");
    let mut r = Node::start_replica(&dir, "n2", &secret, "64M", &[]);
    let mut p = Node::start_primary(&dir, "n1", &secret, &[&r], "64M", &["--mode", "sync"]);
    p.wait_replicas_in_sync(Duration::from_secs(60));
    let repo = dir.join("repo").to_string_lossy().into_owned();
    let mut c = p.daemon.connect(EXPORT);
    for i in 0..SIZE / (4 * MIB) {
        c.write(i * 4 * MIB, &pattern(400 + i, (4 * MIB) as usize), false)
            .unwrap();
    }
    c.flush().unwrap();
    let full = create_backup(&p.files.admin, &repo);
    assert!(!full.incremental);
    c.write(20 * MIB, &pattern(500, 65536), true).unwrap();
    drop(c);
    p.daemon.kill9();
    let before = r.daemon.ready().clone();
    let out = r.cli(&["promote"], Duration::from_secs(30));
    assert_eq!(out.code, 0, "mirrorblk promote failed: {out:#?}");
    r.daemon
        .wait_serving_again(&before, Duration::from_secs(30));
    r.wait_status(Duration::from_secs(30), "n2 primary", |s| {
        s.role == admin::Role::Primary
    });
    let mut c = r.daemon.connect(EXPORT);
    c.write(40 * MIB, &pattern(600, 65536), true).unwrap();
    let next = create_backup(&r.files.admin, &repo);
    assert!(next.incremental, "after the failover: {next:?}");
    assert_eq!(next.bytes_read, 8 * MIB, "two changed chunks: {next:?}");
    let want = read_export(&r.daemon, EXPORT);
    assert_restores(&repo, &next.id, &want, &dir.join("restored"));
}

/// moto's S3 server (from PyPI, in a venv under the target directory, as
/// backup/tests/s3.rs installs it) on loopback; killed by its PID when
/// dropped.
struct Moto {
    child: std::process::Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one HTTP request to moto and returns the status line.
fn http(port: u16, request_line: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "{request_line} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply.lines().next().unwrap_or_default().to_owned())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_moto() -> Result<Moto, String> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("moto-venv");
    let server = venv.join("bin/moto_server");
    if !server.exists() {
        let out = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .output();
        let ok = out.is_ok_and(|o| o.status.success())
            && Command::new("timeout")
                .arg("600")
                .arg(venv.join("bin/pip"))
                .args(["install", "-q", "moto[server]"])
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            return Err("cannot install moto[server] from PyPI".into());
        }
    }
    let port = free_port();
    let child = Command::new(server)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("moto_server: {e}"))?;
    let moto = Moto { child, port };
    let deadline = Instant::now() + Duration::from_secs(30);
    while http(port, "GET /").is_err() {
        if Instant::now() > deadline {
            return Err("moto_server did not answer within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(moto)
}

/// The AWS_* variables that point the CLI at an S3 server on `port`.
fn s3_env(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
    ]
}

/// The round trip on an S3 repository (moto): backup create makes the
/// repository, a full and an incremental backup restore exactly, verify
/// passes; an unreachable object store fails the backup (exit 1) and
/// leaves no snapshot behind. Prints SKIP when moto cannot be installed.
#[test]
fn backup_create_round_trip_on_s3() {
    let moto = match start_moto() {
        Ok(m) => m,
        Err(why) => {
            println!("SKIP backup_create_round_trip_on_s3: {why}");
            return;
        }
    };
    let status = http(moto.port, "PUT /backups").expect("create the bucket");
    assert!(status.contains(" 200 "), "creating the bucket: {status}");
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "64M"));
    let admin = d.admin_socket().to_string_lossy().into_owned();
    let mut c = d.connect("vol0");
    for i in 0..4 {
        c.write(i * 4 * MIB, &pattern(700 + i, (4 * MIB) as usize), true)
            .unwrap();
    }
    let repo = "s3://backups/site-a/repo";
    let env = s3_env(moto.port);
    let create = |env: &[(&str, String)]| {
        cli_env(
            &[
                "--admin-socket",
                &admin,
                "backup",
                "create",
                "--repo",
                repo,
                "vol0",
                "--json",
            ],
            env,
        )
    };
    let (code, out, err) = create(&env);
    assert_eq!(code, 0, "full backup on S3: {err}");
    let full = Created::parse(&out);
    let v1 = read_export(&d, "vol0");
    c.write(10 * MIB, &pattern(800, 65536), true).unwrap();
    let (code, out, err) = create(&env);
    assert_eq!(code, 0, "incremental backup on S3: {err}");
    let inc = Created::parse(&out);
    // The default 64 KiB chunks: just the region written.
    assert!(inc.incremental && inc.bytes_read == 64 << 10, "{inc:?}");
    let v2 = read_export(&d, "vol0");
    let file = dir.join("restored").to_string_lossy().into_owned();
    for (id, want) in [(&full.id, &v1), (&inc.id, &v2)] {
        let (code, _, err) = cli_env(
            &[
                "backup", "restore", "--repo", repo, id, "--to", &file, "--force",
            ],
            &env,
        );
        assert_eq!(code, 0, "restore of {id} from S3: {err}");
        assert_bytes_eq(
            &format!("restore of {id} from S3"),
            0,
            want,
            &std::fs::read(&file).unwrap(),
        );
    }
    let (code, out, _) = cli_env(&["backup", "verify", "--repo", repo], &env);
    assert_eq!(code, 0, "verify on S3: {out}");

    // The object store goes away: exit 1, no snapshot left behind.
    drop(moto);
    let (code, _, err) = create(&env);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("repository s3://backups/site-a/repo"), "{err}");
    assert!(
        snapshots(&d.admin_socket()).is_empty(),
        "a snapshot was left behind"
    );
}

/// A backup whose snapshot breaks (its space bound, 128 KiB here, is
/// exceeded by the writes that go on while it is read) fails with exit 1,
/// writes no index and leaves no snapshot; every write succeeds.
#[test]
fn a_broken_snapshot_fails_the_backup_and_never_the_writes() {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "64M"));
    fill(&d, 900);
    let repo = dir.join("repo").to_string_lossy().into_owned();
    let admin = d.admin_socket().to_string_lossy().into_owned();
    let mut w = BusyWriter::start(&d, 11);
    let (code, out, err) = cli(&[
        "--admin-socket",
        &admin,
        "backup",
        "create",
        "--repo",
        &repo,
        "vol0",
        "--snapshot-space",
        "128K",
        "--json",
    ]);
    let writes = w.writes.load(Ordering::SeqCst);
    w.stop.store(true, Ordering::SeqCst);
    let writer = w.thread.take().expect("the writer").join();
    assert!(writer.is_ok(), "a write failed while the snapshot broke");
    assert!(writes > 2, "the writer wrote {writes} blocks");
    assert_eq!(code, 1, "the backup must fail: {out} {err}");
    assert!(
        err.contains("broke"),
        "the error names the broken snapshot: {err}"
    );
    let (code, out, _) = cli(&["backup", "list", "--repo", &repo]);
    assert_eq!(
        (code, out.as_str()),
        (0, ""),
        "no backup index may be written"
    );
    assert!(
        snapshots(&d.admin_socket()).is_empty(),
        "a snapshot was left behind"
    );
}
