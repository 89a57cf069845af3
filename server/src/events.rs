//! The node's event log: every role change, lease, fence, election, resync,
//! peer and client connection and admin command, as JSON lines (see
//! [`mirrorblk_admin::events`]) appended durably to a bounded, rotated file.
//!
//! [`emit`] may be called from any thread, io_uring cores included: it only
//! stamps the event and hands it to one writer thread through a bounded
//! queue, never waiting (a full queue drops the event, counted and logged).
//! The writer appends what it has and fdatasyncs once per batch; [`flush`]
//! waits until everything emitted before it is durable. Before [`init`]
//! (unit tests, tools) emitting does nothing.
//!
//! When the file would pass its bound it becomes `PATH.1` (the older `.1`
//! becomes `.2`, and so on; [`KEEP`] old files stay). A line torn by a crash
//! is cut off when the log is opened again, so it never glues onto the next.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

pub use mirrorblk_admin::events::{Event, EventKind};

/// Rotated files kept besides the live one (`PATH.1` … `PATH.3`).
pub const KEEP: u32 = 3;
/// Events waiting for the writer at most; more are dropped.
const QUEUE: usize = 4096;
/// How long [`flush`] waits for the writer.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// How far back a torn or last line is looked for at a time.
const TAIL_CHUNK: u64 = 64 << 10;

/// Where and how the log is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLogConfig {
    /// The live file.
    pub path: PathBuf,
    /// The most bytes the live file holds before it is rotated (a single
    /// line longer than this still gets a file of its own).
    pub max_bytes: u64,
    /// The node name each event carries.
    pub node: String,
}

/// Why the event log cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    /// A file operation failed.
    #[error("event log {}: {what}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// [`init`] was called twice.
    #[error("the event log is already open")]
    AlreadyOpen,
    /// The writer thread could not start.
    #[error("cannot start the event log writer: {0}")]
    Thread(std::io::Error),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EventLogError {
    let path = path.to_path_buf();
    move |source| EventLogError::Io { what, path, source }
}

/// What travels to the writer thread.
enum Msg {
    /// An event, stamped with its time.
    Event(String, EventKind),
    /// Answer once everything before this is durable.
    Flush(SyncSender<()>),
}

/// The open log of this process.
struct Log {
    tx: SyncSender<Msg>,
    path: PathBuf,
}

static LOG: OnceLock<Log> = OnceLock::new();

/// Opens (or creates) the log and starts its writer. Once per process.
pub fn init(cfg: EventLogConfig) -> Result<(), EventLogError> {
    if LOG.get().is_some() {
        return Err(EventLogError::AlreadyOpen);
    }
    let path = cfg.path.clone();
    let writer = EventWriter::open(cfg)?;
    let (tx, rx) = sync_channel(QUEUE);
    std::thread::Builder::new()
        .name("events".into())
        .spawn(move || write_loop(writer, rx))
        .map_err(EventLogError::Thread)?;
    LOG.set(Log { tx, path })
        .map_err(|_| EventLogError::AlreadyOpen)
}

/// The log's file, once [`init`] opened it.
pub fn path() -> Option<PathBuf> {
    LOG.get().map(|l| l.path.clone())
}

/// Records `kind` as happening now. Never blocks: a full queue drops it
/// (counted in `mirrorblk_events_dropped_total`).
pub fn emit(kind: EventKind) {
    let Some(log) = LOG.get() else {
        return;
    };
    crate::telemetry::event_emitted(kind.name());
    hand_over(&log.tx, kind);
}

/// Queues `kind`, stamped now, for the writer; drops it (counted and
/// logged) rather than wait when the queue is full. Returns whether it
/// was queued.
fn hand_over(tx: &SyncSender<Msg>, kind: EventKind) -> bool {
    let ts = mirrorblk_admin::events::rfc3339_millis(SystemTime::now());
    match tx.try_send(Msg::Event(ts, kind)) {
        Ok(()) => true,
        Err(TrySendError::Full(Msg::Event(_, kind))) => {
            crate::telemetry::event_dropped();
            tracing::warn!("event log queue full: dropped a {} event", kind.name());
            false
        }
        Err(_) => {
            crate::telemetry::event_dropped();
            tracing::warn!("event log writer is gone: dropped an event");
            false
        }
    }
}

/// Waits until every event emitted so far is durable (at most 5 s);
/// returns whether it is. Call before a restart and at exit.
pub fn flush() -> bool {
    let Some(log) = LOG.get() else {
        return true;
    };
    let (ack_tx, ack_rx) = sync_channel(1);
    let deadline = Instant::now() + FLUSH_WAIT;
    let mut msg = Msg::Flush(ack_tx);
    // Poll rather than block on a full queue: a hung disk must not hang
    // the shutdown past the deadline.
    loop {
        match log.tx.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return false,
        }
    }
    let left = deadline.saturating_duration_since(Instant::now());
    ack_rx.recv_timeout(left).is_ok()
}

/// The writer thread: appends each batch of events, makes it durable with
/// one fdatasync, then answers the flushes that waited for it.
fn write_loop(mut w: EventWriter, rx: Receiver<Msg>) {
    let mut acks = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut wrote = false;
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(msg) = next {
            match msg {
                Msg::Event(ts, kind) => match w.append(ts, kind) {
                    Ok(_) => wrote = true,
                    Err(e) => tracing::error!("{e}; the event is lost"),
                },
                Msg::Flush(ack) => acks.push(ack),
            }
            taken += 1;
            next = if taken < QUEUE {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if wrote {
            if let Err(e) = w.sync() {
                tracing::error!("{e}");
            }
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
}

/// The live file of the log, appended to by one owner.
pub struct EventWriter {
    cfg: EventLogConfig,
    file: File,
    /// Bytes in the live file.
    size: u64,
    /// The sequence number of the next event.
    next_seq: u64,
}

impl EventWriter {
    /// Opens the live file (created with its directory when missing), cuts
    /// off a torn last line, and continues the sequence where the log left it.
    pub fn open(cfg: EventLogConfig) -> Result<EventWriter, EventLogError> {
        let dir = parent(&cfg.path);
        std::fs::create_dir_all(&dir).map_err(io_err("cannot create the directory", &dir))?;
        let (file, size) = open_live(&cfg.path)?;
        let last = match last_line(&file, size) {
            Some(line) => Some(line),
            None => last_line_of(&rotated(&cfg.path, 1)),
        };
        let next_seq = last
            .and_then(|l| Event::from_line(&l).ok())
            .map_or(1, |e| e.seq + 1);
        Ok(EventWriter {
            cfg,
            file,
            size,
            next_seq,
        })
    }

    /// Appends one event (rotating first if it would pass the bound); returns
    /// its sequence number. Durable only after [`EventWriter::sync`].
    pub fn append(&mut self, ts: String, kind: EventKind) -> Result<u64, EventLogError> {
        let event = Event {
            ts,
            seq: self.next_seq,
            node: self.cfg.node.clone(),
            kind,
        };
        let mut line = event.to_line();
        line.push('\n');
        let len = line.len() as u64;
        if self.size > 0 && self.size + len > self.cfg.max_bytes {
            self.rotate()?;
        }
        self.file
            .write_all(line.as_bytes())
            .map_err(io_err("cannot append", &self.cfg.path))?;
        self.size += len;
        self.next_seq += 1;
        Ok(event.seq)
    }

    /// Makes everything appended durable.
    pub fn sync(&mut self) -> Result<(), EventLogError> {
        self.file
            .sync_data()
            .map_err(io_err("cannot fdatasync", &self.cfg.path))
    }

    /// Moves the live file to `PATH.1` (shifting the older ones, the oldest
    /// dropped) and starts an empty one; both names are durable before
    /// anything is written to the new file.
    fn rotate(&mut self) -> Result<(), EventLogError> {
        let path = self.cfg.path.clone();
        self.sync()?;
        for i in (1..KEEP).rev() {
            let from = rotated(&path, i);
            match std::fs::rename(&from, rotated(&path, i + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_err("cannot rotate", &from)(e));
                }
                _ => {}
            }
        }
        std::fs::rename(&path, rotated(&path, 1)).map_err(io_err("cannot rotate", &path))?;
        let (file, size) = open_live(&path)?;
        self.file = file;
        self.size = size;
        Ok(())
    }
}

/// `PATH.n`, the `n`th newest rotated file.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Opens the live file for appending, creating it (and making its name
/// durable) when missing; a torn last line is cut off. Returns its size.
fn open_live(path: &Path) -> Result<(File, u64), EventLogError> {
    let existed = path.exists();
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(io_err("cannot open", path))?;
    let len = file.metadata().map_err(io_err("cannot stat", path))?.len();
    let complete = complete_len(&file, len).map_err(io_err("cannot read", path))?;
    if complete < len {
        tracing::warn!(
            "event log {}: cutting off a torn last line ({} bytes) left by a crash",
            path.display(),
            len - complete
        );
        file.set_len(complete)
            .map_err(io_err("cannot cut the torn line", path))?;
        file.sync_data().map_err(io_err("cannot fdatasync", path))?;
    }
    if !existed {
        let dir = parent(path);
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("cannot fsync the directory", &dir))?;
    }
    Ok((file, complete))
}

/// The length of the file's complete lines (up to and with its last newline).
fn complete_len(file: &File, len: u64) -> std::io::Result<u64> {
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(TAIL_CHUNK);
        let mut buf = vec![0; (end - start) as usize];
        file.read_exact_at(&mut buf, start)?;
        if let Some(at) = buf.iter().rposition(|&b| b == b'\n') {
            return Ok(start + at as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// The last line of the first `len` bytes of `file` (which end with a
/// newline), if there is one.
fn last_line(file: &File, len: u64) -> Option<String> {
    if len == 0 {
        return None;
    }
    let body = len - 1;
    let start = complete_len(file, body).ok()?;
    let mut buf = vec![0; (body - start) as usize];
    file.read_exact_at(&mut buf, start).ok()?;
    String::from_utf8(buf).ok()
}

/// The last complete line of the file at `path`, if it has one.
fn last_line_of(path: &Path) -> Option<String> {
    let file = File::open(path).ok()?;
    let len = complete_len(&file, file.metadata().ok()?.len()).ok()?;
    last_line(&file, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, max_bytes: u64) -> EventLogConfig {
        EventLogConfig {
            path: dir.join("log").join("node.events.jsonl"),
            max_bytes,
            node: "n1".into(),
        }
    }

    fn kind(i: u64) -> EventKind {
        EventKind::WritesResumed {
            volume: "vol0".into(),
            held_ms: i,
        }
    }

    fn events_in(path: &Path) -> Vec<Event> {
        let text = std::fs::read(path).unwrap_or_default();
        let (lines, used) = mirrorblk_admin::events::parse_lines(&text);
        assert_eq!(used, text.len(), "{} ends with a newline", path.display());
        lines
            .into_iter()
            .map(|l| l.expect("an event").event)
            .collect()
    }

    #[test]
    fn rotation_keeps_the_bound_and_three_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1000);
        let mut w = EventWriter::open(cfg.clone()).unwrap();
        for i in 0..200 {
            w.append("2026-12-04T20:30:16.123Z".into(), kind(i))
                .unwrap();
        }
        w.sync().unwrap();
        let mut seqs = Vec::new();
        for n in (1..=KEEP).rev() {
            let old = rotated(&cfg.path, n);
            let len = std::fs::metadata(&old).expect("rotated file kept").len();
            assert!(len <= 1000 && len > 900, "{}: {len} bytes", old.display());
            seqs.extend(events_in(&old).into_iter().map(|e| e.seq));
        }
        assert!(!rotated(&cfg.path, KEEP + 1).exists(), "only {KEEP} kept");
        assert!(std::fs::metadata(&cfg.path).unwrap().len() <= 1000);
        seqs.extend(events_in(&cfg.path).into_iter().map(|e| e.seq));
        let first = seqs[0];
        assert_eq!(
            seqs,
            (first..=200).collect::<Vec<_>>(),
            "no gap, newest last"
        );
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_sequence_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1 << 20);
        let mut w = EventWriter::open(cfg.clone()).unwrap();
        for i in 0..3 {
            w.append("t".into(), kind(i)).unwrap();
        }
        w.sync().unwrap();
        drop(w);
        let mut f = OpenOptions::new().append(true).open(&cfg.path).unwrap();
        f.write_all(br#"{"ts":"t","seq":4,"node":"n1","ev"#)
            .unwrap();
        drop(f);
        let mut w = EventWriter::open(cfg.clone()).unwrap();
        assert_eq!(w.append("t".into(), kind(9)).unwrap(), 4);
        w.sync().unwrap();
        let seqs: Vec<u64> = events_in(&cfg.path).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
    }

    #[test]
    fn the_sequence_goes_on_after_a_rotation_left_an_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1 << 20);
        let mut w = EventWriter::open(cfg.clone()).unwrap();
        w.append("t".into(), kind(1)).unwrap();
        w.append("t".into(), kind(2)).unwrap();
        w.rotate().unwrap();
        drop(w);
        let mut w = EventWriter::open(cfg).unwrap();
        assert_eq!(w.append("t".into(), kind(3)).unwrap(), 3);
    }

    #[test]
    fn a_full_queue_drops_instead_of_blocking() {
        let (tx, rx) = sync_channel(1);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // On a thread: a hand-over that blocked would hang this test, so
        // it is given 5 s.
        std::thread::spawn(move || {
            let queued = [hand_over(&tx, kind(1)), hand_over(&tx, kind(2))];
            let _ = done_tx.send(queued);
        });
        let queued = done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("handing an event over blocked on a full queue");
        assert_eq!(queued, [true, false]);
        assert!(matches!(rx.try_recv(), Ok(Msg::Event(_, k)) if k == kind(1)));
    }

    #[test]
    fn flush_answers_once_the_events_before_it_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1 << 20);
        let w = EventWriter::open(cfg.clone()).unwrap();
        let (tx, rx) = sync_channel(QUEUE);
        let writer = std::thread::spawn(move || write_loop(w, rx));
        for i in 0..50 {
            assert!(hand_over(&tx, kind(i)));
        }
        let (ack_tx, ack_rx) = sync_channel(1);
        tx.send(Msg::Flush(ack_tx)).unwrap();
        ack_rx.recv_timeout(FLUSH_WAIT).expect("flush answered");
        assert_eq!(events_in(&cfg.path).len(), 50);
        drop(tx);
        writer.join().unwrap();
    }

    #[test]
    fn emit_and_flush_before_init_are_harmless() {
        // No test in this binary calls init: the log stays closed.
        emit(kind(1));
        assert!(flush());
        assert_eq!(path(), None);
    }
}
