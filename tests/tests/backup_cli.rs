//! `mirrorblk backup list|verify|restore|prune` on a directory repository made with
//! the backup library: list prints every backup, verify exits 1 naming each
//! damaged backup and byte range, restore writes a backup onto a file or a
//! running mirrorblkd's export (naming the ranges it could not restore),
//! prune keeps the newest and collects.

use std::io::Cursor;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backup::{BackupSpec, DirBackend, RepoConfig, Repository};
use mirrorblk_tests::cluster::mirrorblk_cli;

const CHUNK: usize = 64 << 10;

/// Runs the CLI with a 60 s bound; returns (exit code, stdout).
fn cli(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(mirrorblk_cli())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run mirrorblk");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mirrorblk {args:?} ran past 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn spec(size: usize, lsn: u64) -> BackupSpec {
    BackupSpec {
        volume_uuid: [5; 16],
        volume_name: "vol".into(),
        size: size as u64,
        lsn,
    }
}

#[test]
fn backup_list_verify_prune() {
    let dir = tempfile::tempdir().unwrap();
    let config = RepoConfig {
        chunk_size: CHUNK as u32,
        ..RepoConfig::default()
    };
    let repo = Repository::create(Box::new(DirBackend::new(dir.path()).unwrap()), config).unwrap();
    let mut data: Vec<u8> = (0..8 * CHUNK)
        .map(|i| (i / 8 % 251) as u8 ^ (i / CHUNK) as u8)
        .collect();
    let id1 = repo
        .backup(spec(data.len(), 1), None, None, &mut Cursor::new(&data))
        .unwrap()
        .id
        .unwrap();
    data[0] ^= 0xFF;
    let changed = [0..1u64, 5..6u64];
    let id2 = repo
        .backup(
            spec(data.len(), 2),
            Some(&id1),
            Some(&changed),
            &mut Cursor::new(&data),
        )
        .unwrap()
        .id
        .unwrap();
    let root = dir.path().to_str().unwrap();

    let (code, out) = cli(&["backup", "list", "--repo", root, "--json"]);
    assert_eq!(code, 0);
    let ids: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids, vec![id1.to_string(), id2.to_string()]);
    assert_eq!(
        cli(&["backup", "verify", "--repo", root]).0,
        0,
        "a sound repository verifies"
    );

    // Delete chunk 3, shared by both backups.
    let victim = repo.load_index(&id2).unwrap().chunks[3].unwrap();
    std::fs::remove_file(dir.path().join(victim.key())).unwrap();
    let (code, out) = cli(&["backup", "verify", "--repo", root]);
    assert_eq!(code, 1, "damage exits 1:\n{out}");
    let range = format!("bytes {}..{}", 3 * CHUNK, 4 * CHUNK);
    for id in [&id1, &id2] {
        let line = format!("DAMAGED {id}: {range} (chunk {victim}): missing");
        assert!(out.contains(&line), "verify names {line:?}:\n{out}");
    }

    let (code, out) = cli(&[
        "backup",
        "prune",
        "--repo",
        root,
        "--keep-last",
        "1",
        "--gc-margin",
        "0",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("pruned {id1}")), "{out}");
    assert!(
        out.contains("gc: 1 chunk(s) removed"),
        "the chunk only the pruned backup had goes:\n{out}"
    );
    assert_eq!(repo.backups().unwrap(), vec![id2]);
}

/// A backup of 8 chunks, two of them all zero: the data and its id.
fn one_backup(repo: &Repository) -> (Vec<u8>, backup::BackupId) {
    let mut data: Vec<u8> = (0..8 * CHUNK)
        .map(|i| (i % 253) as u8 ^ (i / CHUNK) as u8 ^ 0x5A)
        .collect();
    for zero in [2, 6] {
        data[zero * CHUNK..(zero + 1) * CHUNK].fill(0);
    }
    let id = repo
        .backup(spec(data.len(), 7), None, None, &mut Cursor::new(&data))
        .unwrap()
        .id
        .unwrap();
    (data, id)
}

/// Fills the first `len` bytes of the export with 0xEE (what a restore
/// must overwrite, or leave where it cannot restore).
fn prefill(d: &mirrorblk_tests::Daemon, len: usize) {
    let mut c = d.connect("vol0");
    c.write(0, &vec![0xEE; len], true).unwrap();
}

/// `backup restore` onto a new file (byte-identical, sparse where the
/// backup is zero, JSON report), refusing to replace that file without
/// --force, and onto a mirrorblk export over nbd:// (every byte of the
/// backup written over what was there, the rest of the export untouched).
#[test]
fn backup_restore_to_a_file_and_an_nbd_export() {
    let dir = tempfile::tempdir().unwrap();
    let config = RepoConfig {
        chunk_size: CHUNK as u32,
        ..RepoConfig::default()
    };
    let repo = Repository::create(Box::new(DirBackend::new(dir.path()).unwrap()), config).unwrap();
    let (data, id) = one_backup(&repo);
    let (root, id_text) = (dir.path().to_str().unwrap(), id.to_string());
    let out_path = dir.path().join("restored.raw");
    let out_file = out_path.to_str().unwrap();
    let (code, out) = cli(&[
        "backup", "restore", "--repo", root, &id_text, "--to", out_file, "--json",
    ]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["bytes_written"], data.len() as u64, "{v}");
    assert_eq!(v["chunks_restored"], 6, "{v}");
    assert_eq!(v["chunks_zero"], 2, "{v}");
    assert!(
        std::fs::read(&out_path).unwrap() == data,
        "the file differs from the backup"
    );
    let allocated =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&out_path).unwrap()) * 512;
    assert!(
        allocated <= (data.len() - 2 * CHUNK) as u64,
        "zero chunks are holes: {allocated} bytes allocated"
    );
    let (code, _) = cli(&[
        "backup", "restore", "--repo", root, &id_text, "--to", out_file,
    ]);
    assert_eq!(
        code, 1,
        "an existing file with data is not replaced without --force"
    );

    let tdir = mirrorblk_tests::TestDir::new();
    let d = mirrorblk_tests::Daemon::start(tdir.volume_args("vol0", "64M"));
    prefill(&d, 2 * data.len());
    let (code, out) = cli(&[
        "backup",
        "restore",
        "--repo",
        root,
        &id_text,
        "--to",
        &d.uri("vol0"),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("restored {id}")), "{out}");
    let mut c = d.connect("vol0");
    let back = c.read(0, 2 * data.len() as u32).unwrap();
    assert!(
        back[..data.len()] == data[..],
        "the export differs from the backup"
    );
    assert!(
        back[data.len()..].iter().all(|&b| b == 0xEE),
        "bytes past the backup's size are left as they were"
    );
}

/// A corrupted chunk: `backup restore` onto an export exits 1 naming
/// exactly its range, writes every other range, and leaves that range as
/// the export had it — never unchecked data.
#[test]
fn backup_restore_names_the_ranges_it_could_not_restore() {
    let dir = tempfile::tempdir().unwrap();
    let config = RepoConfig {
        chunk_size: CHUNK as u32,
        ..RepoConfig::default()
    };
    let repo = Repository::create(Box::new(DirBackend::new(dir.path()).unwrap()), config).unwrap();
    let (data, id) = one_backup(&repo);
    // Chunk 4: between two data chunks, so a restore that gathers
    // contiguous NBD writes must not join 3 and 5 across the gap.
    let victim = repo.load_index(&id).unwrap().chunks[4].unwrap();
    let blob = dir.path().join(victim.key());
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&blob, &bytes).unwrap();

    let tdir = mirrorblk_tests::TestDir::new();
    let d = mirrorblk_tests::Daemon::start(tdir.volume_args("vol0", "64M"));
    prefill(&d, data.len());
    let root = dir.path().to_str().unwrap();
    let (code, out) = cli(&[
        "backup",
        "restore",
        "--repo",
        root,
        &id.to_string(),
        "--to",
        &d.uri("vol0"),
    ]);
    assert_eq!(code, 1, "{out}");
    let range = 4 * CHUNK..5 * CHUNK;
    let line = format!("NOT RESTORED {id}: bytes {}..{}", range.start, range.end);
    assert!(out.contains(&line), "restore names {line:?}:\n{out}");
    assert_eq!(out.matches("NOT RESTORED").count(), 1, "{out}");
    let mut c = d.connect("vol0");
    let back = c.read(0, data.len() as u32).unwrap();
    assert!(
        back[range.clone()].iter().all(|&b| b == 0xEE),
        "the damaged range is left as it was"
    );
    assert!(
        back[..range.start] == data[..range.start],
        "ranges before it are restored"
    );
    assert!(
        back[range.end..] == data[range.end..],
        "ranges after it are restored"
    );
}
