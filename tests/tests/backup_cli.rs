//! `mirrorblk backup list|verify|prune` on a directory repository made with
//! the backup library: list prints every backup, verify exits 1 naming each
//! damaged backup and byte range, prune keeps the newest and collects.

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
