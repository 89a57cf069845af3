//! `mirrorblk backup list|verify|prune`: the repository side of backups
//! (docs/BACKUP.md); `restore` is in `restore.rs`, `create` in
//! `backup_create.rs`.

use std::process::ExitCode;
use std::time::Duration;

use backup::{BackupId, GcOptions, RepoError, Repository, VerifyReport};

/// Opens the repository, or says why not (exit 1).
fn open(repo: &str) -> Result<Repository, ExitCode> {
    Repository::open_location(repo).map_err(|e| {
        eprintln!("mirrorblk backup: cannot open the repository {repo}: {e}");
        ExitCode::FAILURE
    })
}

fn fail(what: &str, e: &RepoError) -> ExitCode {
    eprintln!("mirrorblk backup {what}: {e}");
    ExitCode::FAILURE
}

/// `backup list`: one line (or JSON object) per backup.
pub fn list(repo: &str, json: bool) -> ExitCode {
    let repo = match open(repo) {
        Ok(repo) => repo,
        Err(code) => return code,
    };
    let ids = match repo.backups() {
        Ok(ids) => ids,
        Err(e) => return fail("list", &e),
    };
    for id in ids {
        let index = match repo.load_index(&id) {
            Ok(index) => index,
            Err(e) => {
                println!("{id}  UNREADABLE: {e}");
                continue;
            }
        };
        let zero = index.chunks.iter().filter(|c| c.is_none()).count();
        if json {
            let line = serde_json::json!({
                "id": id.to_string(), "volume": id.volume, "created_ms": id.created_ms,
                "lsn": index.lsn, "size": index.size, "chunks": index.chunks.len(), "zero_chunks": zero,
            });
            println!("{line}");
        } else {
            println!(
                "{id}  lsn {}  {} bytes  {} chunks ({zero} zero)",
                index.lsn,
                index.size,
                index.chunks.len()
            );
        }
    }
    ExitCode::SUCCESS
}

/// `backup verify [ID]`: exit 0 when every chunk is present and sound, 1
/// naming each damaged backup and byte range.
pub fn verify(repo: &str, id: Option<&str>) -> ExitCode {
    let repo = match open(repo) {
        Ok(repo) => repo,
        Err(code) => return code,
    };
    let id = match id.map(str::parse::<BackupId>).transpose() {
        Ok(id) => id,
        Err(e) => return fail("verify", &e),
    };
    match repo.verify(id.as_ref()) {
        Ok(report) => print_report(&report),
        Err(e) => fail("verify", &e),
    }
}

fn print_report(report: &VerifyReport) -> ExitCode {
    for damaged in &report.damaged {
        if let Some(e) = &damaged.index_error {
            println!("DAMAGED {}: index unreadable: {e}", damaged.id);
        }
        for range in &damaged.ranges {
            println!("DAMAGED {}: {range}", damaged.id);
        }
    }
    println!(
        "{} backup(s), {} chunk(s) checked, {} damaged backup(s)",
        report.backups_checked,
        report.chunks_checked,
        report.damaged.len()
    );
    if report.damaged.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `backup prune --keep-last N`: deletes older backups, then collects the
/// chunks no backup references (safe while backups run).
pub fn prune(repo: &str, volume: Option<&str>, keep_last: usize, margin: Duration) -> ExitCode {
    let repo = match open(repo) {
        Ok(repo) => repo,
        Err(code) => return code,
    };
    let removed = match repo.prune(volume, keep_last) {
        Ok(removed) => removed,
        Err(e) => return fail("prune", &e),
    };
    for id in &removed {
        println!("pruned {id}");
    }
    let options = GcOptions {
        margin,
        ..GcOptions::default()
    };
    match repo.gc(&options) {
        Ok(gc) => {
            println!(
                "gc: {} chunk(s) removed ({} bytes), {} kept for running backups or younger than the cutoff, {} chunk(s) ({} bytes) in use",
                gc.chunks_removed, gc.bytes_removed, gc.chunks_kept_young, gc.chunks_remaining, gc.bytes_remaining
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail("prune (gc)", &e),
    }
}
