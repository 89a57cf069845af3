//! `mirrorblk backup create --repo REPO VOLUME`: a snapshot of VOLUME
//! through the admin socket, read through its read-only NBD export
//! `VOLUME@NAME` into the repository; full the first time, incremental
//! (only the regions changed since the base's LSN are read) after that.
//!
//! The changed regions come from the admin request `changes --since LSN`
//! rather than from the export's `qemu:dirty-bitmap:since-LSN` context:
//! one request answers the whole volume and says whether the node's table
//! reaches back to the base's LSN (`complete`), and the snapshot is taken
//! first, so the answer (covering every record up to at least the
//! snapshot's LSN) is a superset of what the snapshot changed.

use std::collections::VecDeque;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use backup::{BackupId, BackupSpec, BackupStats, RepoError, Repository};
use indicatif::{ProgressBar, ProgressStyle};
use mirrorblk_admin as admin;
use mirrorblk_server::units::ByteSize;
use nbd::client::{Client, ClientError};
use nbd::{Command, CommandFlags, Request};

use crate::restore::{Stream, NBD_TIMEOUT};

/// Longest single NBD read (a repository chunk is 4 MiB by default; the
/// server's maximum is a quarter of its journal, at least that).
const READ_PIECE: u64 = 4 << 20;
/// Snapshot names this command takes start with this.
pub const SNAPSHOT_PREFIX: &str = "mirrorblk-backup-";

/// Why a backup failed (exit 1), with context.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The admin socket did not answer.
    #[error("cannot reach the daemon at {socket}: {reason}")]
    Daemon { socket: String, reason: String },
    /// The daemon refused a request (unknown volume, …).
    #[error("the daemon refused {what}: {reason}")]
    Refused { what: &'static str, reason: String },
    /// The repository could not be opened or written.
    #[error("repository {repo}: {source}")]
    Repo { repo: String, source: RepoError },
    /// `--chunk-size` differs from the existing repository's.
    #[error("repository {repo} has {existing} chunks, fixed when it was created, not the {asked} asked for: leave --chunk-size out, or give it to a new repository")]
    ChunkSize {
        repo: String,
        existing: ByteSize,
        asked: ByteSize,
    },
    /// The snapshot's export could not be read.
    #[error("snapshot export {export}: {reason}")]
    Export { export: String, reason: String },
    /// The snapshot broke while it was read: the backup is not written.
    #[error("snapshot {export} broke ({reason}); no backup was written")]
    Broken { export: String, reason: String },
}

/// Full or incremental: the decision, from what the repository and the
/// node know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Read everything.
    Full {
        /// Why not incremental (for the log line).
        why: String,
    },
    /// Read only `changed`; take the rest from `base`.
    Incremental {
        /// The base backup.
        base: BackupId,
        /// Its LSN.
        base_lsn: u64,
        /// The byte ranges changed after `base_lsn`.
        changed: Vec<Range<u64>>,
    },
}

/// A base candidate: the newest backup of the volume with its UUID and LSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseCandidate {
    /// The backup.
    pub id: BackupId,
    /// Its volume's UUID.
    pub uuid: [u8; 16],
    /// Its LSN.
    pub lsn: u64,
}

/// Decides the plan (pure). `changes` is the node's answer since the
/// base's LSN: its UUID, whether it is complete, and its ranges.
pub fn plan(
    base: Option<&BaseCandidate>,
    snapshot_lsn: u64,
    volume_uuid: [u8; 16],
    changes: Option<(bool, Vec<Range<u64>>)>,
) -> Plan {
    let full = |why: &str| Plan::Full { why: why.into() };
    let Some(base) = base else {
        return full("no earlier backup of this volume in the repository");
    };
    if base.uuid != volume_uuid {
        return full("the newest backup is of another volume UUID");
    }
    if base.lsn > snapshot_lsn {
        return full("the newest backup is newer than this node's snapshot");
    }
    match changes {
        Some((true, changed)) => Plan::Incremental {
            base: base.id.clone(),
            base_lsn: base.lsn,
            changed,
        },
        Some((false, _)) => {
            full("the node's changed-block table does not reach back to the base's LSN")
        }
        None => full("no changed-block answer"),
    }
}

/// Parses an 8-4-4-4-12 hex UUID.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: String = text.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// One admin request, its refusal as an error.
fn call(
    socket: &Path,
    req: &admin::Request,
    what: &'static str,
) -> Result<admin::Response, CreateError> {
    match admin::call(socket, req) {
        Ok(r) if r.ok => Ok(r),
        Ok(r) => Err(CreateError::Refused {
            what,
            reason: r.error.unwrap_or_else(|| "no reason given".into()),
        }),
        Err(e) => Err(CreateError::Daemon {
            socket: socket.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Deletes the snapshot when dropped: after a backup, and on every error.
struct SnapshotGuard<'a> {
    socket: &'a Path,
    volume: String,
    name: String,
}

impl Drop for SnapshotGuard<'_> {
    fn drop(&mut self) {
        let req = admin::Request::SnapshotDelete {
            volume: self.volume.clone(),
            name: self.name.clone(),
        };
        if let Err(e) = call(self.socket, &req, "snapshot_delete") {
            eprintln!(
                "mirrorblk backup create: could not delete snapshot {}@{}: {e} (delete it with mirrorblk snapshot delete)",
                self.volume, self.name
            );
        }
    }
}

/// Opens the repository at `location`, creating it when there is none
/// (with `chunk_size` when given, else 64 KiB chunks, larger for a volume
/// over 64 GiB: `RepoConfig::for_volume`); a `chunk_size` that is not an
/// existing repository's is refused.
fn open_or_create(
    location: &str,
    chunk_size: Option<u32>,
    volume_size: u64,
) -> Result<Repository, CreateError> {
    match Repository::open_or_create(location, chunk_size, volume_size) {
        Ok((repo, created)) => {
            if created {
                eprintln!(
                    "mirrorblk backup create: created the repository {location} ({} chunks)",
                    ByteSize(u64::from(repo.config().chunk_size))
                );
            }
            Ok(repo)
        }
        Err(RepoError::ChunkSizeMismatch { existing, asked }) => Err(CreateError::ChunkSize {
            repo: location.to_owned(),
            existing: ByteSize(existing.into()),
            asked: ByteSize(asked.into()),
        }),
        Err(source) => Err(CreateError::Repo {
            repo: location.to_owned(),
            source,
        }),
    }
}

/// The newest backup of `volume` in `repo` (with its index's UUID and LSN).
fn newest_backup(
    repo: &Repository,
    location: &str,
    volume: &str,
) -> Result<Option<BaseCandidate>, CreateError> {
    let err = |source| CreateError::Repo {
        repo: location.to_owned(),
        source,
    };
    let Some(id) = repo.latest(volume).map_err(err)? else {
        return Ok(None);
    };
    let index = repo.load_index(&id).map_err(err)?;
    Ok(Some(BaseCandidate {
        id,
        uuid: index.volume_uuid,
        lsn: index.lsn,
    }))
}

/// NBD reads kept in flight ahead of the one the backup waits for: with
/// 4 MiB pieces, 16 MiB requested ahead, which keeps the server reading
/// while the client copies the previous answer out. Bounded because every
/// answer is held in memory until the backup takes it.
const READS_IN_FLIGHT: usize = 4;

/// The snapshot export as a `Read + Seek` source for the backup writer,
/// reading ahead along the writer's schedule.
struct ExportReader {
    client: Client<Stream>,
    size: u64,
    pos: u64,
    progress: ProgressBar,
    /// Pieces (offset, length) still to be requested, in the order the
    /// writer will read them.
    schedule: VecDeque<(u64, u32)>,
    /// Pieces requested and not yet taken: offset, length, cookie.
    pending: VecDeque<(u64, u32, u64)>,
    /// The piece taken last (offset, data): the writer reads it a chunk at
    /// a time when chunks are smaller than a piece.
    current: (u64, Vec<u8>),
}

/// Splits the byte ranges a writer will read into NBD reads of at most
/// [`READ_PIECE`] bytes, in order, joining ranges that touch first (pure):
/// with small chunks a full backup then still reads in 4 MiB requests,
/// and an incremental reads each run of changed chunks in one.
fn read_pieces(ranges: &[Range<u64>]) -> VecDeque<(u64, u32)> {
    let mut runs: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges.iter().filter(|r| r.start < r.end) {
        match runs.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => runs.push(r.clone()),
        }
    }
    let mut pieces = VecDeque::new();
    for r in runs {
        let mut at = r.start;
        while at < r.end {
            let len = (r.end - at).min(READ_PIECE);
            pieces.push_back((at, len as u32));
            at += len;
        }
    }
    pieces
}

fn read_err(at: u64, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("NBD read at {at}: {e}"))
}

impl ExportReader {
    /// Requests scheduled pieces until [`READS_IN_FLIGHT`] are in flight.
    fn read_ahead(&mut self) -> io::Result<()> {
        while self.pending.len() < READS_IN_FLIGHT {
            let Some((offset, len)) = self.schedule.pop_front() else {
                break;
            };
            let cookie = self.client.next_cookie();
            let req = Request {
                flags: CommandFlags::empty(),
                command: Command::Read,
                cookie,
                offset,
                length: u64::from(len),
            };
            self.client
                .submit(&req, None)
                .map_err(|e| read_err(offset, e))?;
            self.pending.push_back((offset, len, cookie));
        }
        Ok(())
    }

    /// Waits for the oldest piece read ahead.
    fn wait_oldest(&mut self) -> io::Result<(u64, Vec<u8>)> {
        let (offset, len, cookie) = self.pending.pop_front().expect("a piece is pending");
        let r = self
            .client
            .wait_for(cookie)
            .map_err(|e| read_err(offset, e))?;
        match r.error {
            Some(code) => Err(read_err(offset, ClientError::Server(code))),
            None if r.data.len() == len as usize => Ok((offset, r.data)),
            None => Err(read_err(
                offset,
                format!("{} bytes, not {len}", r.data.len()),
            )),
        }
    }

    /// Makes `current` the piece that holds `pos` when one read ahead
    /// does (dropping pieces the writer skipped); false when none does.
    fn find_piece(&mut self) -> io::Result<bool> {
        let at = self.pos;
        let holds = |offset: u64, len: u64| offset <= at && at < offset + len;
        loop {
            let (offset, ref data) = self.current;
            if holds(offset, data.len() as u64) {
                return Ok(true);
            }
            self.read_ahead()?;
            match self.pending.front() {
                Some(&(offset, len, _)) if offset <= at => {
                    let piece = self.wait_oldest()?;
                    // The piece let go of goes back to the client for a later
                    // read: no allocation per piece.
                    let done = if holds(offset, u64::from(len)) {
                        std::mem::replace(&mut self.current, piece).1
                    } else {
                        piece.1
                    };
                    self.client.recycle(done);
                }
                _ => return Ok(false),
            }
        }
    }
}

impl Read for ExportReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.size.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left).min(READ_PIECE) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = if self.find_piece()? {
            let (offset, data) = &self.current;
            let from = (self.pos - offset) as usize;
            let got = n.min(data.len() - from);
            buf[..got].copy_from_slice(&data[from..from + got]);
            got
        } else {
            // Off the schedule: a read of its own.
            let at = self.pos;
            let data = self
                .client
                .read(at, n as u32)
                .map_err(|e| read_err(at, e))?;
            if data.len() > n || data.is_empty() {
                return Err(read_err(at, format!("{} bytes for {n}", data.len())));
            }
            buf[..data.len()].copy_from_slice(&data);
            data.len()
        };
        self.pos += got as u64;
        self.progress.inc(got as u64);
        Ok(got)
    }
}

impl Seek for ExportReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
        };
        self.pos =
            pos.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))?;
        Ok(self.pos)
    }
}

/// Connects to the export `name` of the daemon whose status is `status`:
/// its NBD Unix socket if it has one, else its TCP address (loopback for
/// an unspecified one).
fn connect_export(status: &admin::Response, name: &str) -> Result<Client<Stream>, String> {
    let listen = status
        .listen
        .as_ref()
        .ok_or("the daemon reports no NBD listener")?;
    let stream = match &listen.unix {
        Some(path) => {
            let s = UnixStream::connect(path)
                .map_err(|e| format!("connect to {}: {e}", path.display()))?;
            s.set_read_timeout(Some(NBD_TIMEOUT))
                .map_err(|e| e.to_string())?;
            Stream::Unix(s)
        }
        None => {
            let mut addr = listen.nbd;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            let s = std::net::TcpStream::connect_timeout(&addr, NBD_TIMEOUT)
                .map_err(|e| format!("connect to {addr}: {e}"))?;
            let _ = s.set_nodelay(true);
            s.set_read_timeout(Some(NBD_TIMEOUT))
                .map_err(|e| e.to_string())?;
            Stream::Tcp(s)
        }
    };
    Client::connect(stream, name, false).map_err(|e| format!("NBD handshake: {e}"))
}

/// A progress bar on a terminal (hidden otherwise) over `bytes` to read.
fn progress_bar(bytes: u64) -> ProgressBar {
    let bar = ProgressBar::new(bytes);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} backing up [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Bytes an incremental reads at most: every chunk a changed range touches.
fn bytes_to_read(plan: &Plan, size: u64, chunk: u64) -> u64 {
    match plan {
        Plan::Full { .. } => size,
        Plan::Incremental { changed, .. } => changed
            .iter()
            .map(|r| (r.end.div_ceil(chunk) - r.start / chunk) * chunk)
            .sum::<u64>()
            .min(size),
    }
}

/// `backup create`'s options.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// The bound on the snapshot's kept-aside data (the daemon's default
    /// when `None`).
    pub snapshot_space: Option<u64>,
    /// The chunk size of a repository this creates; refused when it is not
    /// an existing repository's.
    pub chunk_size: Option<u32>,
    /// One JSON object on stdout.
    pub json: bool,
}

/// What `create` reports.
struct Outcome {
    stats: BackupStats,
    lsn: u64,
    seconds: f64,
}

/// Takes the snapshot, plans, reads and writes the backup; the guard
/// deletes the snapshot on every path out.
fn run(
    socket: &Path,
    location: &str,
    volume: &str,
    opts: &CreateOptions,
) -> Result<Outcome, CreateError> {
    let started = Instant::now();
    // The daemon first, then the repository: neither is touched when the
    // other is unreachable.
    let status = call(socket, &admin::Request::Status, "status")?;
    let repo = open_or_create(location, opts.chunk_size, volume_size(&status, volume))?;
    let name = format!("{SNAPSHOT_PREFIX}{}", backup_now_ms());
    let created = call(
        socket,
        &admin::Request::SnapshotCreate {
            volume: volume.to_owned(),
            name: name.clone(),
            space: opts.snapshot_space,
        },
        "snapshot_create",
    )?;
    let _guard = SnapshotGuard {
        socket,
        volume: volume.to_owned(),
        name: name.clone(),
    };
    let export = format!("{volume}@{name}");
    let snap = created
        .snapshots
        .and_then(|s| s.into_iter().next())
        .ok_or_else(|| CreateError::Refused {
            what: "snapshot_create",
            reason: "the answer names no snapshot".into(),
        })?;
    let base = newest_backup(&repo, location, volume)?;
    let (plan, uuid) = plan_from_changes(socket, volume, base.as_ref(), snap.lsn)?;
    if let Plan::Full { why } = &plan {
        eprintln!("mirrorblk backup create: full backup of {volume}: {why}");
    }
    let spec = BackupSpec {
        volume_uuid: uuid,
        volume_name: volume.to_owned(),
        size: snap.size,
        lsn: snap.lsn,
    };
    // A read that fails because the snapshot broke (EIO) says so.
    let stats = read_and_write(&repo, location, &status, &export, spec, &plan).inspect_err(|_| {
        eprintln!("mirrorblk backup create: reading {export} failed; checking the snapshot")
    });
    check_not_broken(socket, volume, &name, &export)?;
    let stats = stats?;
    let stats = stats.finish().map_err(|source| CreateError::Repo {
        repo: location.to_owned(),
        source,
    })?;
    Ok(Outcome {
        stats,
        lsn: snap.lsn,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The size of `volume` as the daemon's status reports it; 0 for a volume
/// it does not serve (refused at the snapshot, so its size does not matter).
fn volume_size(status: &admin::Response, volume: &str) -> u64 {
    status
        .volumes
        .iter()
        .find(|v| v.name == volume)
        .map_or(0, |v| v.size)
}

/// Asks the node what changed since the base's LSN (or the snapshot's,
/// without a base) and decides the plan; also returns the volume's UUID.
fn plan_from_changes(
    socket: &Path,
    volume: &str,
    base: Option<&BaseCandidate>,
    snapshot_lsn: u64,
) -> Result<(Plan, [u8; 16]), CreateError> {
    let since = base.map_or(snapshot_lsn, |b| b.lsn.min(snapshot_lsn));
    let changes = changes_since(socket, volume, since)?;
    let uuid = parse_uuid(&changes.uuid).ok_or_else(|| CreateError::Refused {
        what: "changes",
        reason: format!("unreadable volume UUID {:?}", changes.uuid),
    })?;
    let ranges = changes
        .ranges
        .iter()
        .map(|r| r.offset..r.offset + r.length)
        .collect();
    let plan = plan(base, snapshot_lsn, uuid, Some((changes.complete, ranges)));
    Ok((plan, uuid))
}

fn backup_now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// `changes VOLUME --since LSN`.
fn changes_since(socket: &Path, volume: &str, since: u64) -> Result<admin::Changes, CreateError> {
    let req = admin::Request::Changes {
        volume: volume.to_owned(),
        since,
    };
    call(socket, &req, "changes")?
        .changes
        .ok_or_else(|| CreateError::Refused {
            what: "changes",
            reason: "the answer holds no changes".into(),
        })
}

/// Reads the snapshot export into a writer that has handled every chunk
/// (not finished: the caller checks the snapshot first).
fn read_and_write<'r>(
    repo: &'r Repository,
    location: &str,
    status: &admin::Response,
    export: &str,
    spec: BackupSpec,
    plan: &Plan,
) -> Result<backup::BackupWriter<'r>, CreateError> {
    let repo_err = |source| CreateError::Repo {
        repo: location.to_owned(),
        source,
    };
    let export_err = |reason: String| CreateError::Export {
        export: export.to_owned(),
        reason,
    };
    let client = connect_export(status, export).map_err(export_err)?;
    if client.info().size != spec.size {
        return Err(export_err(format!(
            "{} bytes, the snapshot {}",
            client.info().size,
            spec.size
        )));
    }
    let chunk = u64::from(repo.config().chunk_size);
    let progress = progress_bar(bytes_to_read(plan, spec.size, chunk));
    let size = spec.size;
    let (base, changed) = match plan {
        Plan::Full { .. } => (None, None),
        Plan::Incremental { base, changed, .. } => (Some(base), Some(changed.as_slice())),
    };
    let mut writer = repo.begin_backup(spec, base, changed).map_err(repo_err)?;
    let mut source = ExportReader {
        client,
        size,
        pos: 0,
        progress: progress.clone(),
        schedule: read_pieces(&writer.ranges_to_read()),
        pending: VecDeque::new(),
        current: (0, Vec::new()),
    };
    // Bounded: the chunk count is bounded by the repository
    // (MAX_INDEX_ENTRIES), each read by NBD_TIMEOUT.
    writer.run(&mut source).map_err(repo_err)?;
    progress.finish_and_clear();
    Ok(writer)
}

/// Fails when the snapshot broke before its last byte was read (its
/// export then fails reads with EIO, but a backup must never hold bytes
/// read after a break).
fn check_not_broken(
    socket: &Path,
    volume: &str,
    name: &str,
    export: &str,
) -> Result<(), CreateError> {
    let req = admin::Request::SnapshotList {
        volume: Some(volume.to_owned()),
    };
    let listed = call(socket, &req, "snapshot_list")?
        .snapshots
        .unwrap_or_default();
    match listed.into_iter().find(|s| s.name == name) {
        Some(s) => match s.broken {
            Some(reason) => Err(CreateError::Broken {
                export: export.to_owned(),
                reason,
            }),
            None => Ok(()),
        },
        None => Err(CreateError::Broken {
            export: export.to_owned(),
            reason: "it is gone".into(),
        }),
    }
}

/// `backup create`: exit 0 with the new backup's id (or one JSON object:
/// id, lsn, incremental, bytes_read, bytes_stored, chunks_reused,
/// seconds); exit 1 saying why no backup was written.
pub fn create(socket: &Path, repo: &str, volume: &str, opts: &CreateOptions) -> ExitCode {
    let json = opts.json;
    match run(socket, repo, volume, opts) {
        Ok(o) => {
            let id = o
                .stats
                .id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            if json {
                let line = serde_json::json!({
                    "id": id, "lsn": o.lsn, "incremental": o.stats.incremental,
                    "bytes_read": o.stats.bytes_read, "bytes_stored": o.stats.bytes_stored,
                    "chunks_reused": o.stats.chunks_reused, "seconds": o.seconds,
                });
                println!("{line}");
            } else {
                println!(
                    "{id}  lsn {}  {}  read {} bytes, stored {} bytes, {} chunks reused, {:.1} s",
                    o.lsn,
                    if o.stats.incremental {
                        "incremental"
                    } else {
                        "full"
                    },
                    o.stats.bytes_read,
                    o.stats.bytes_stored,
                    o.stats.chunks_reused,
                    o.seconds
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mirrorblk backup create: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64) -> BackupId {
        BackupId {
            volume: "vol0".into(),
            created_ms: ms,
        }
    }

    #[test]
    fn the_plan_is_incremental_only_from_a_same_volume_base_the_table_covers() {
        let u = [7; 16];
        let base = BaseCandidate {
            id: id(1),
            uuid: u,
            lsn: 40,
        };
        let changed = vec![0..65536, 1 << 20..(1 << 20) + 65536];
        let full = |p: &Plan| matches!(p, Plan::Full { .. });
        assert!(full(&plan(None, 50, u, Some((true, changed.clone())))));
        assert!(full(&plan(
            Some(&base),
            50,
            [8; 16],
            Some((true, changed.clone()))
        )));
        assert!(full(&plan(
            Some(&base),
            39,
            u,
            Some((true, changed.clone()))
        )));
        assert!(full(&plan(
            Some(&base),
            50,
            u,
            Some((false, changed.clone()))
        )));
        assert!(full(&plan(Some(&base), 50, u, None)));
        assert_eq!(
            plan(Some(&base), 50, u, Some((true, changed.clone()))),
            Plan::Incremental {
                base: id(1),
                base_lsn: 40,
                changed
            }
        );
    }

    #[test]
    fn uuids_parse_in_8_4_4_4_12_form() {
        let u = parse_uuid("00112233-4455-6677-8899-aabbccddeeff").unwrap();
        assert_eq!(u[0], 0x00);
        assert_eq!(u[15], 0xff);
        assert_eq!(parse_uuid("0011"), None);
        assert_eq!(parse_uuid("g0112233-4455-6677-8899-aabbccddeeff"), None);
    }

    #[test]
    fn touching_ranges_are_read_in_one_piece() {
        let k = 64 << 10;
        let chunks: Vec<Range<u64>> = (0..130).map(|i| i * k..(i + 1) * k).collect();
        let pieces = Vec::from(read_pieces(&chunks));
        assert_eq!(pieces[0], (0, READ_PIECE as u32));
        assert_eq!(pieces[1], (READ_PIECE, READ_PIECE as u32));
        assert_eq!(
            pieces[2],
            (2 * READ_PIECE, (130 * k - 2 * READ_PIECE) as u32)
        );
        assert_eq!(pieces.len(), 3);
        let scattered = [0..k, 5 * k..6 * k, 6 * k..7 * k, 9 * k..10 * k];
        assert_eq!(
            Vec::from(read_pieces(&scattered)),
            vec![(0, k as u32), (5 * k, 2 * k as u32), (9 * k, k as u32)]
        );
    }

    #[test]
    fn reads_ahead_in_pieces_of_at_most_read_piece() {
        let p = READ_PIECE;
        let pieces = read_pieces(&[0..p, 3 * p..5 * p + 10, 9 * p..9 * p + 1]);
        assert_eq!(
            Vec::from(pieces),
            vec![
                (0, p as u32),
                (3 * p, p as u32),
                (4 * p, p as u32),
                (5 * p, 10),
                (9 * p, 1)
            ]
        );
        assert!(read_pieces(&[]).is_empty());
    }

    #[test]
    fn an_incremental_reads_every_chunk_a_range_touches() {
        let k = 4 << 20;
        let p = Plan::Incremental {
            base: id(1),
            base_lsn: 1,
            changed: vec![1..2, k..k + 1, 3 * k - 1..3 * k],
        };
        assert_eq!(bytes_to_read(&p, 10 * k, k), 3 * k);
        assert_eq!(
            bytes_to_read(&Plan::Full { why: String::new() }, 10 * k, k),
            10 * k
        );
    }
}
