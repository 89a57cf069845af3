//! `mirrorblk snapshot create|list|delete`: point-in-time snapshots served
//! as read-only NBD exports `VOLUME@NAME` (docs/OPERATIONS.md, "Snapshots").

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use mirrorblk_admin as admin;
use mirrorblk_server::units::ByteSize;

/// How long creating a snapshot may take (the daemon waits, bounded, for
/// the records before it to reach the data store).
const CREATE_LIMIT: Duration = Duration::from_secs(60);

/// The snapshot subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Take a snapshot of VOLUME as of now, served read-only on this node as
    /// the NBD export VOLUME@NAME while writes go on (on a primary or a
    /// replica). The old data of each 64 KiB region is kept aside the first
    /// time a write after the snapshot overwrites it, in a side file beside
    /// the journal; past --space the snapshot breaks (its reads fail with
    /// EIO), never the writes. Snapshots survive restarts of the daemon (a
    /// stop, a crash, a live restart): it reloads them from their side files.
    ///
    /// JSON (--json): {"volume", "name", "export", "uuid", "lsn", "size",
    /// "space", "used", "broken", "created_ms"}; "lsn" is the last LSN the
    /// snapshot includes (what `changes --since` takes next time).
    Create {
        /// The volume.
        volume: String,
        /// The snapshot's name: 1 to 64 characters of A-Z a-z 0-9 . _ -
        name: String,
        /// The most old data kept aside: bytes, or with a K, M, G or T suffix.
        #[arg(long, value_name = "SIZE", default_value = "1G")]
        space: ByteSize,
        /// Print the snapshot as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the snapshots of VOLUME (of every volume without it): name,
    /// export, LSN, space used and whether it broke. With --json, a JSON
    /// array of the objects `create --json` prints.
    List {
        /// The volume.
        volume: Option<String>,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot: its export goes (open connections get EIO), its
    /// side file is removed.
    Delete {
        /// The volume.
        volume: String,
        /// The snapshot's name.
        name: String,
        /// Print the deleted snapshot as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a snapshot subcommand against the daemon at `socket`.
pub fn run(socket: &Path, cmd: SnapshotCmd) -> ExitCode {
    match cmd {
        SnapshotCmd::Create {
            volume,
            name,
            space,
            json,
        } => {
            let req = admin::Request::SnapshotCreate {
                volume,
                name,
                space: Some(space.0),
            };
            one(socket, &req, json, "created")
        }
        SnapshotCmd::Delete { volume, name, json } => {
            let req = admin::Request::SnapshotDelete { volume, name };
            one(socket, &req, json, "deleted")
        }
        SnapshotCmd::List { volume, json } => {
            let req = admin::Request::SnapshotList { volume };
            let Ok(list) = call(socket, &req) else {
                return ExitCode::from(1);
            };
            if json {
                println!("{}", serde_json::to_string(&list).unwrap_or_default());
            } else {
                for s in &list {
                    println!("{}", line(s));
                }
            }
            ExitCode::SUCCESS
        }
    }
}

/// Sends a create or delete and prints the snapshot it answers with.
fn one(socket: &Path, req: &admin::Request, json: bool, done: &str) -> ExitCode {
    let Ok(list) = call(socket, req) else {
        return ExitCode::from(1);
    };
    let Some(s) = list.first() else {
        eprintln!("mirrorblk: the daemon answered without the snapshot");
        return ExitCode::from(1);
    };
    if json {
        println!("{}", serde_json::to_string(s).unwrap_or_default());
    } else {
        println!("{done}: {}", line(s));
    }
    ExitCode::SUCCESS
}

/// The snapshots a request answers with; errors are printed.
fn call(socket: &Path, req: &admin::Request) -> Result<Vec<admin::Snapshot>, ()> {
    match admin::call_within(socket, req, CREATE_LIMIT) {
        Ok(r) if r.ok => Ok(r.snapshots.unwrap_or_default()),
        Ok(r) => {
            eprintln!(
                "mirrorblk: {}",
                r.error.unwrap_or_else(|| "the daemon refused".into())
            );
            Err(())
        }
        Err(e) => {
            eprintln!("mirrorblk: {e}");
            Err(())
        }
    }
}

/// One snapshot on one line.
fn line(s: &admin::Snapshot) -> String {
    let state = match &s.broken {
        Some(why) => format!("BROKEN: {why}"),
        None => "ok".to_string(),
    };
    format!(
        "{} lsn={} size={} used={}/{} {state}",
        s.export,
        s.lsn,
        ByteSize(s.size),
        ByteSize(s.used),
        ByteSize(s.space)
    )
}
