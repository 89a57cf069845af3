//! `mirrorblk backup restore --repo REPO ID --to TARGET`: writes one backup
//! onto a file, a block device or an NBD export. The repository checks every
//! chunk against its SHA-256 name before it is written
//! (`Repository::restore`); this module opens the target, writes what it is
//! given (all-zero stretches as holes or NBD write-zeroes), makes it
//! durable, and reports.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use backup::{BackupId, RepoError, Repository};
use indicatif::{ProgressBar, ProgressStyle};
use nbd::client::{Client, ClientError};
use nbd::{Command, CommandFlags, Request};

/// The NBD port when a URI names none.
const NBD_PORT: u16 = 10809;
/// Longest single NBD write: well under every server's limit we know
/// (the NBD spec's default maximum is 32 MiB; mirrorblk's is a quarter of
/// its journal), and large enough that a request's overhead is noise.
const NBD_PIECE: usize = 4 << 20;
/// Bound on connecting to the NBD server and on every reply.
pub(crate) const NBD_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection to an NBD server, over TCP or a Unix socket.
pub(crate) enum Stream {
    Tcp(std::net::TcpStream),
    Unix(UnixStream),
}

impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Where a backup is restored to.
enum Sink {
    /// A file or block device. `fresh`: created (or emptied) for this
    /// restore, so its unwritten bytes already read as zeros.
    File { file: File, fresh: bool },
    /// An NBD export.
    Nbd {
        client: Box<Client<Stream>>,
        write_zeroes: bool,
        can_flush: bool,
    },
}

/// Where TARGET points, parsed.
#[derive(Debug, PartialEq, Eq)]
enum TargetSpec {
    Path(String),
    Tcp {
        host: String,
        port: u16,
        export: String,
    },
    Unix {
        socket: String,
        export: String,
    },
}

/// Parses `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`, or
/// a path.
fn parse_target(target: &str) -> Result<TargetSpec, String> {
    if let Some(rest) = target.strip_prefix("nbd://") {
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p
                    .parse()
                    .map_err(|_| format!("{target}: {p:?} is not a port number"))?;
                (h, port)
            }
            _ => (authority, NBD_PORT),
        };
        if host.is_empty() {
            return Err(format!("{target}: no host (nbd://HOST[:PORT]/EXPORT)"));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        return Ok(TargetSpec::Tcp {
            host: host.into(),
            port,
            export: export.into(),
        });
    }
    if let Some(rest) = target.strip_prefix("nbd+unix://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let export = path.strip_prefix('/').unwrap_or(path);
        let socket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .ok_or_else(|| format!("{target}: no ?socket=PATH"))?;
        return Ok(TargetSpec::Unix {
            socket: socket.into(),
            export: export.into(),
        });
    }
    if target.contains("://") {
        return Err(format!(
            "{target}: unsupported URI scheme (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, or a path; TLS targets are not supported by restore yet)"
        ));
    }
    Ok(TargetSpec::Path(target.into()))
}

/// Opens `target` for a backup of `size` bytes.
fn open_sink(target: &str, size: u64, force: bool) -> Result<Sink, String> {
    match parse_target(target)? {
        TargetSpec::Path(p) => open_path(Path::new(&p), size, force),
        TargetSpec::Tcp { host, port, export } => {
            let s = std::net::TcpStream::connect((host.as_str(), port))
                .map_err(|e| format!("{target}: cannot connect: {e}"))?;
            let _ = s.set_nodelay(true);
            s.set_read_timeout(Some(NBD_TIMEOUT))
                .map_err(|e| e.to_string())?;
            open_nbd(target, Stream::Tcp(s), &export, size)
        }
        TargetSpec::Unix { socket, export } => {
            let s = UnixStream::connect(&socket)
                .map_err(|e| format!("{target}: cannot connect to {socket}: {e}"))?;
            s.set_read_timeout(Some(NBD_TIMEOUT))
                .map_err(|e| e.to_string())?;
            open_nbd(target, Stream::Unix(s), &export, size)
        }
    }
}

/// A block device (at least `size` bytes), or a regular file created or
/// emptied and sized to `size` (an existing one with data only with
/// `force`).
fn open_path(path: &Path, size: u64, force: bool) -> Result<Sink, String> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => {
            let mut file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| format!("{shown}: {e}"))?;
            let dev = file
                .seek(SeekFrom::End(0))
                .map_err(|e| format!("{shown}: {e}"))?;
            if dev < size {
                return Err(format!(
                    "{shown} holds {dev} bytes; the backup needs {size}"
                ));
            }
            Ok(Sink::File { file, fresh: false })
        }
        Ok(m) if !m.is_file() => Err(format!(
            "{shown} is neither a regular file nor a block device"
        )),
        Ok(m) if m.len() > 0 && !force => Err(format!(
            "{shown} exists and holds {} bytes: restore would replace them (add --force)",
            m.len()
        )),
        _ => {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|e| format!("{shown}: {e}"))?;
            file.set_len(size).map_err(|e| format!("{shown}: {e}"))?;
            Ok(Sink::File { file, fresh: true })
        }
    }
}

/// Negotiates `export` and checks it can take a backup of `size` bytes.
fn open_nbd(target: &str, stream: Stream, export: &str, size: u64) -> Result<Sink, String> {
    let client = Client::connect(stream, export, false)
        .map_err(|e| format!("{target}: NBD handshake: {e}"))?;
    let info = client.info().clone();
    if info.read_only {
        return Err(format!("{target}: the export is read-only"));
    }
    if info.size < size {
        return Err(format!(
            "{target}: the export holds {} bytes; the backup needs {size}",
            info.size
        ));
    }
    Ok(Sink::Nbd {
        client: Box::new(client),
        write_zeroes: info.can_write_zeroes,
        can_flush: info.can_flush,
    })
}

/// NBD writes kept in flight: 4 of up to 4 MiB, so the server always has
/// the next write while it applies one and the client sends the one after.
/// Bounded because the server holds each until it has applied it.
const NBD_WRITES_IN_FLIGHT: usize = 4;

/// Waits for one answer to a write in `in_flight` and drops it from there;
/// an error answer is the error, naming the write's offset.
fn settle_one(client: &mut Client<Stream>, in_flight: &mut Vec<(u64, u64)>) -> io::Result<()> {
    let r = client
        .receive()
        .map_err(|e| io::Error::other(format!("NBD write: {e}")))?;
    let Some(at) = in_flight.iter().position(|&(cookie, _)| cookie == r.cookie) else {
        return Err(io::Error::other(format!(
            "NBD answer to cookie {} that no write in flight has",
            r.cookie
        )));
    };
    let (_, off) = in_flight.swap_remove(at);
    match r.error {
        Some(code) => Err(io::Error::other(format!(
            "NBD write at {off}: {}",
            ClientError::Server(code)
        ))),
        None => Ok(()),
    }
}

/// The sink as the repository's `Write + Seek` target, counting progress.
struct Writer {
    sink: Sink,
    at: u64,
    /// NBD writes sent and not yet answered: cookie, offset.
    in_flight: Vec<(u64, u64)>,
    zeros: Vec<u8>,
    /// Contiguous NBD writes not sent yet (see [`Writer::stage_nbd`]).
    staged: Vec<u8>,
    /// Where they start.
    staged_at: u64,
    /// Whether they are all zero.
    staged_zero: bool,
    progress: ProgressBar,
}

impl Writer {
    fn write_file(file: &File, fresh: bool, at: u64, data: &[u8], zeros: &[u8]) -> io::Result<()> {
        for (i, piece) in data.chunks(zeros.len()).enumerate() {
            // A fresh file reads as zeros where nothing was written: leave
            // holes.
            if fresh && piece == &zeros[..piece.len()] {
                continue;
            }
            file.write_all_at(piece, at + (i * zeros.len()) as u64)?;
        }
        Ok(())
    }

    /// Gathers contiguous NBD writes into pieces of up to [`NBD_PIECE`]
    /// (with small chunks each would otherwise be one NBD request): the
    /// piece is sent when a write does not continue it, would overflow it,
    /// or differs from it in being all zero (so zero runs still go as
    /// `WRITE_ZEROES`).
    fn stage_nbd(&mut self, data: &[u8]) -> io::Result<()> {
        let zero = data.len() <= NBD_PIECE && data == &self.zeros[..data.len()];
        let continues = !self.staged.is_empty()
            && self.staged_at + self.staged.len() as u64 == self.at
            && self.staged.len() + data.len() <= NBD_PIECE
            && self.staged_zero == zero;
        if !continues {
            self.send_staged()?;
        }
        if data.len() >= NBD_PIECE {
            return self.write_nbd(self.at, data);
        }
        if self.staged.is_empty() {
            self.staged_at = self.at;
            self.staged_zero = zero;
        }
        self.staged.extend_from_slice(data);
        Ok(())
    }

    /// Sends the piece [`Writer::stage_nbd`] gathered, if any.
    fn send_staged(&mut self) -> io::Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let mut staged = std::mem::take(&mut self.staged);
        let sent = self.write_nbd(self.staged_at, &staged);
        // `submit` copied the payload: keep the buffer for the next piece.
        staged.clear();
        self.staged = staged;
        sent
    }

    fn write_nbd(&mut self, at: u64, data: &[u8]) -> io::Result<()> {
        let Sink::Nbd {
            client,
            write_zeroes,
            ..
        } = &mut self.sink
        else {
            unreachable!("write_nbd on a file sink");
        };
        for (i, piece) in data.chunks(NBD_PIECE).enumerate() {
            let off = at + (i * NBD_PIECE) as u64;
            if self.in_flight.len() >= NBD_WRITES_IN_FLIGHT {
                settle_one(client, &mut self.in_flight)?;
            }
            let zero = *write_zeroes && piece == &self.zeros[..piece.len()];
            let (command, payload) = if zero {
                (Command::WriteZeroes, None)
            } else {
                (Command::Write, Some(piece))
            };
            let mut flags = CommandFlags::empty();
            if payload.is_some() && client.extended_headers() {
                flags |= CommandFlags::PAYLOAD_LEN;
            }
            let cookie = client.next_cookie();
            let req = Request {
                flags,
                command,
                cookie,
                offset: off,
                length: piece.len() as u64,
            };
            client
                .submit(&req, payload)
                .map_err(|e| io::Error::other(format!("NBD write at {off}: {e}")))?;
            self.in_flight.push((cookie, off));
        }
        Ok(())
    }

    /// Waits for every NBD write in flight; the first that failed is the
    /// error, naming its offset.
    fn settle_all(&mut self) -> io::Result<()> {
        self.send_staged()?;
        if let Sink::Nbd { client, .. } = &mut self.sink {
            while !self.in_flight.is_empty() {
                settle_one(client, &mut self.in_flight)?;
            }
        }
        Ok(())
    }

    /// Makes everything written durable: fsync, or an NBD FLUSH once every
    /// write in flight is answered.
    fn finish(mut self) -> io::Result<()> {
        self.progress.finish_and_clear();
        self.settle_all()?;
        match self.sink {
            Sink::File { file, .. } => file.sync_all(),
            Sink::Nbd {
                mut client,
                can_flush,
                ..
            } => {
                if can_flush {
                    client
                        .flush()
                        .map_err(|e| io::Error::other(format!("NBD flush: {e}")))?;
                }
                client
                    .disconnect()
                    .map_err(|e| io::Error::other(format!("NBD disconnect: {e}")))
            }
        }
    }
}

impl Write for Writer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match &self.sink {
            Sink::File { file, fresh } => {
                Writer::write_file(file, *fresh, self.at, data, &self.zeros)?
            }
            Sink::Nbd { .. } => self.stage_nbd(data)?,
        }
        self.at += data.len() as u64;
        self.progress.inc(data.len() as u64);
        Ok(data.len())
    }

    /// Waits for the NBD writes in flight (durability is [`Writer::finish`]'s).
    fn flush(&mut self) -> io::Result<()> {
        self.settle_all()
    }
}

impl Seek for Writer {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.at = match to {
            SeekFrom::Start(at) => at,
            SeekFrom::Current(d) => self.at.checked_add_signed(d).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "seek before the start")
            })?,
            SeekFrom::End(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "restore targets seek from the start only",
                ))
            }
        };
        Ok(self.at)
    }
}

/// A progress bar on a terminal (hidden otherwise) over `size` bytes.
fn progress_bar(size: u64) -> ProgressBar {
    let bar = ProgressBar::new(size);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} restoring [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// `backup restore`: exit 0 once the whole backup is on the target and
/// durable; 1 naming the ranges not restored (damaged or missing chunks:
/// the target keeps what it had there), or why nothing was.
pub fn restore(repo: &str, id: &str, target: &str, force: bool, json: bool) -> ExitCode {
    let fail = |why: String| {
        eprintln!("mirrorblk backup restore: {why}");
        ExitCode::FAILURE
    };
    let repository = match Repository::open_location(repo) {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot open the repository {repo}: {e}")),
    };
    let id: BackupId = match id.parse() {
        Ok(id) => id,
        Err(e) => return fail(format!("{e}")),
    };
    let size = match repository.load_index(&id) {
        Ok(index) => index.size,
        Err(e) => return fail(format!("{e}")),
    };
    let sink = match open_sink(target, size, force) {
        Ok(s) => s,
        Err(why) => return fail(why),
    };
    let started = Instant::now();
    let mut w = Writer {
        sink,
        at: 0,
        in_flight: Vec::new(),
        zeros: vec![0u8; NBD_PIECE],
        staged: Vec::new(),
        staged_at: 0,
        staged_zero: false,
        progress: progress_bar(size),
    };
    let outcome = repository.restore(&id, &mut w);
    // Durable even when some ranges were not restored: what was written is
    // right, and the report names the rest.
    if let Err(e) = w.finish() {
        return fail(format!("{target}: {e}"));
    }
    let seconds = started.elapsed().as_secs_f64();
    match outcome {
        Ok(stats) => {
            report(&id, target, size, &stats, seconds, json);
            ExitCode::SUCCESS
        }
        Err(RepoError::Damaged { id, ranges }) => {
            for r in &ranges {
                println!("NOT RESTORED {id}: {r}");
            }
            fail(format!(
                "{} range(s) of {id} were not restored (their chunks are damaged or missing); the target keeps what it had there. `mirrorblk backup verify --repo {repo} {id}` lists them",
                ranges.len()
            ))
        }
        Err(e) => fail(format!("{e}")),
    }
}

fn report(
    id: &BackupId,
    target: &str,
    size: u64,
    s: &backup::RestoreStats,
    seconds: f64,
    json: bool,
) {
    if json {
        let v = serde_json::json!({
            "id": id.to_string(), "target": target, "size": size,
            "bytes_written": s.bytes_written, "chunks_restored": s.chunks_restored,
            "chunks_zero": s.chunks_zero, "seconds": seconds,
        });
        println!("{v}");
    } else {
        let mib_s = s.bytes_written as f64 / (1 << 20) as f64 / seconds.max(1e-9);
        println!(
            "restored {id} onto {target}: {size} bytes ({} chunks checked and written, {} zero) in {seconds:.2} s ({mib_s:.0} MiB/s)",
            s.chunks_restored, s.chunks_zero
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = |s: &str| parse_target(s);
        assert_eq!(
            t("nbd://127.0.0.1:10810/vol0"),
            Ok(TargetSpec::Tcp {
                host: "127.0.0.1".into(),
                port: 10810,
                export: "vol0".into()
            })
        );
        assert_eq!(
            t("nbd://host/vol0"),
            Ok(TargetSpec::Tcp {
                host: "host".into(),
                port: NBD_PORT,
                export: "vol0".into()
            })
        );
        assert_eq!(
            t("nbd://[::1]:99/e"),
            Ok(TargetSpec::Tcp {
                host: "::1".into(),
                port: 99,
                export: "e".into()
            })
        );
        assert_eq!(
            t("nbd+unix:///vol0?socket=/run/x.sock"),
            Ok(TargetSpec::Unix {
                socket: "/run/x.sock".into(),
                export: "vol0".into()
            })
        );
        assert_eq!(t("/dev/sdz"), Ok(TargetSpec::Path("/dev/sdz".into())));
        assert!(t("nbds://h/e").is_err());
        assert!(t("nbd://h:port/e").is_err());
        assert!(t("nbd+unix:///e").is_err());
        assert!(t("nbd:///e").is_err());
    }
}
