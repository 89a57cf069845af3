//! `mirrorblk events`: prints a node's event log, and with `--follow` the
//! events appended to it afterwards, across rotations.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use mirrorblk_admin as admin;
use mirrorblk_admin::events::{parse_lines, Line};

/// How often `--follow` looks for new events.
const POLL: Duration = Duration::from_millis(200);
/// Rotated files the daemon keeps (`PATH.1` … `PATH.3`).
const KEEP: u32 = 3;

/// What `mirrorblk events` was asked for.
pub struct Options {
    /// Keep printing new events until interrupted.
    pub follow: bool,
    /// Print the JSON lines instead of the one-line human form.
    pub json: bool,
    /// The log file; else the daemon's status says where it is.
    pub file: Option<PathBuf>,
}

/// Why printing stopped.
#[derive(Debug)]
enum Stop {
    /// A file could not be read.
    Read(PathBuf, std::io::Error),
    /// Standard output is closed (`| head`): a normal end.
    Closed,
}

/// Runs `mirrorblk events`.
pub fn run(socket: &Path, opts: &Options) -> ExitCode {
    let path = match &opts.file {
        Some(p) => p.clone(),
        None => match log_of_daemon(socket) {
            Ok(p) => p,
            Err(why) => {
                eprintln!("mirrorblk: {why}");
                return ExitCode::from(1);
            }
        },
    };
    match print_log(&path, opts) {
        Ok(()) | Err(Stop::Closed) => ExitCode::SUCCESS,
        Err(Stop::Read(file, e)) => {
            eprintln!(
                "mirrorblk: cannot read the event log {}: {e}",
                file.display()
            );
            ExitCode::from(1)
        }
    }
}

/// The event log the daemon behind `socket` writes.
fn log_of_daemon(socket: &Path) -> Result<PathBuf, String> {
    let resp = admin::call(socket, &admin::Request::Status).map_err(|e| {
        format!("{e}; or give the log with --file PATH (by default the first volume's journal path with .events.jsonl appended)")
    })?;
    match (resp.ok, resp.event_log) {
        (true, Some(p)) => Ok(p),
        (true, None) => Err("the daemon does not say where its event log is (it predates the event log); give --file PATH".into()),
        (false, _) => Err(resp.error.unwrap_or_else(|| "the daemon refused status".into())),
    }
}

/// Prints the rotated files, oldest first, then the live one, then (with
/// `--follow`) what is appended.
fn print_log(path: &Path, opts: &Options) -> Result<(), Stop> {
    let mut out = std::io::stdout().lock();
    for n in (1..=KEEP).rev() {
        let old = rotated(path, n);
        match std::fs::read(&old) {
            Ok(bytes) => print_whole(&old, &bytes, opts.json, &mut out)?,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(Stop::Read(old, e)),
        }
    }
    let mut tail = Tail::open(path)?;
    tail.poll(opts.json, &mut out)?;
    if !opts.follow {
        tail.warn_torn();
        return Ok(());
    }
    loop {
        std::thread::sleep(POLL);
        tail.poll(opts.json, &mut out)?;
    }
}

/// Prints a rotated file: it no longer changes, so an unfinished last
/// line is torn (a crash while writing it).
fn print_whole(file: &Path, bytes: &[u8], json: bool, out: &mut impl Write) -> Result<(), Stop> {
    let used = print_lines(file, bytes, json, out)?;
    if used < bytes.len() {
        warn_torn(file, bytes.len() - used);
    }
    Ok(())
}

/// Prints the complete lines of `bytes` (a bad one is skipped with a
/// warning); returns how many bytes they took.
fn print_lines(file: &Path, bytes: &[u8], json: bool, out: &mut impl Write) -> Result<usize, Stop> {
    let (lines, used) = parse_lines(bytes);
    for line in lines {
        match line {
            Ok(Line { event, text }) => {
                let written = if json {
                    writeln!(out, "{text}")
                } else {
                    writeln!(out, "{event}")
                };
                written.map_err(|_| Stop::Closed)?;
            }
            Err(bad) => eprintln!("mirrorblk: {}: skipping {bad}", file.display()),
        }
    }
    out.flush().map_err(|_| Stop::Closed)?;
    Ok(used)
}

fn warn_torn(file: &Path, bytes: usize) {
    eprintln!(
        "mirrorblk: {}: skipping a torn last line ({bytes} bytes, left by a crash while it was written)",
        file.display()
    );
}

/// `PATH.n`, as the daemon names its rotated files.
fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The live file as read so far.
struct Tail {
    path: PathBuf,
    /// The file being read (kept open across a rotation, so its last
    /// events are read before the new file's).
    file: Option<File>,
    ino: u64,
    /// Bytes of `file` read.
    offset: u64,
    /// Read bytes after the last newline: a line still being written.
    pending: Vec<u8>,
}

impl Tail {
    fn open(path: &Path) -> Result<Tail, Stop> {
        let mut t = Tail {
            path: path.to_path_buf(),
            file: None,
            ino: 0,
            offset: 0,
            pending: Vec::new(),
        };
        t.reopen()?;
        Ok(t)
    }

    /// Starts reading the file now at the path from its beginning (missing:
    /// none yet, the daemon creates it).
    fn reopen(&mut self) -> Result<(), Stop> {
        let read = |e| Stop::Read(self.path.clone(), e);
        let file = match File::open(&self.path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == ErrorKind::NotFound && self.file.is_some() => None,
            Err(e) => return Err(read(e)),
        };
        self.ino = match &file {
            Some(f) => f.metadata().map_err(read)?.ino(),
            None => 0,
        };
        self.file = file;
        self.offset = 0;
        self.pending.clear();
        Ok(())
    }

    /// Prints the events appended since the last poll. When the path now
    /// names another file (rotated), the old one is read to its end first.
    fn poll(&mut self, json: bool, out: &mut impl Write) -> Result<(), Stop> {
        let now = std::fs::metadata(&self.path).map(|m| m.ino()).ok();
        self.drain(json, out)?;
        if now.is_some_and(|ino| ino != self.ino) {
            self.warn_torn();
            self.reopen()?;
            self.drain(json, out)?;
        }
        Ok(())
    }

    /// Prints the complete lines appended to the current file.
    fn drain(&mut self, json: bool, out: &mut impl Write) -> Result<(), Stop> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let read = |e| Stop::Read(self.path.clone(), e);
        let len = file.metadata().map_err(read)?.len();
        if len < self.offset {
            // Cut (a torn line removed at the daemon's start): read anew.
            self.offset = 0;
            self.pending.clear();
        }
        let mut buf = vec![0; (len - self.offset) as usize];
        file.read_exact_at(&mut buf, self.offset).map_err(read)?;
        self.offset = len;
        self.pending.extend_from_slice(&buf);
        let used = print_lines(&self.path, &self.pending, json, out)?;
        self.pending.drain(..used);
        Ok(())
    }

    /// Says that the unfinished line read last will never be finished.
    fn warn_torn(&self) {
        if !self.pending.is_empty() {
            warn_torn(&self.path, self.pending.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrorblk_admin::{Event, EventKind};

    fn line(seq: u64) -> String {
        let e = Event {
            ts: "2026-12-04T20:30:16.123Z".into(),
            seq,
            node: "n1".into(),
            kind: EventKind::CoordinatorReachable {},
        };
        format!("{}\n", e.to_line())
    }

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open the log");
        f.write_all(text.as_bytes()).expect("append");
    }

    /// The sequence numbers of the JSON lines printed.
    fn seqs(out: &[u8]) -> Vec<u64> {
        String::from_utf8_lossy(out)
            .lines()
            .map(|l| Event::from_line(l).expect("an event").seq)
            .collect()
    }

    #[test]
    fn follow_reads_the_old_file_to_its_end_across_a_rotation() {
        let dir = std::env::temp_dir().join(format!("mirrorblk-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("n1.events.jsonl");
        let _ = std::fs::remove_file(&path);
        append(&path, &line(1));
        let mut tail = Tail::open(&path).expect("open");
        let mut out = Vec::new();
        tail.poll(true, &mut out).expect("poll");
        // A line being written shows only once complete.
        let second = line(2);
        let (head, rest) = second.split_at(10);
        append(&path, head);
        tail.poll(true, &mut out).expect("poll");
        assert_eq!(seqs(&out), [1]);
        append(&path, rest);
        append(&path, &line(3));
        // Rotated before the follower saw 3; then 4 goes to the new file.
        std::fs::rename(&path, rotated(&path, 1)).expect("rotate");
        append(&path, &line(4));
        tail.poll(true, &mut out).expect("poll");
        assert_eq!(seqs(&out), [1, 2, 3, 4]);
        append(&path, &line(5));
        tail.poll(false, &mut out).expect("poll");
        let text = String::from_utf8_lossy(&out);
        assert!(text.ends_with("n1 coordinator-reachable\n"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
