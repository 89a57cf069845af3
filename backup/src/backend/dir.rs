//! The directory backend: one file per object, written to a temporary name,
//! fsynced, renamed over its key and the directory fsynced, so a kill -9 or a
//! full disk leaves at most a temporary file (which GC removes), never half an
//! object under its final name.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

use super::{check_key, Backend, BackendError, LockMode, ObjectInfo, RepoLock};

/// The marker in a temporary file's name; such files are never objects.
pub const TEMP_MARK: &str = ".tmp-";
/// Threads a batch put writes and syncs on: fsync waits on the disk, not
/// the CPU, so a few more than the cores, to keep the device's queue fed.
const PUT_THREADS: usize = 4;
/// The repository lock file, at the root.
const LOCK_FILE: &str = ".lock";

/// A repository in a local directory.
#[derive(Debug)]
pub struct DirBackend {
    root: PathBuf,
    /// Makes temporary names unique within this process.
    temp_seq: AtomicU64,
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> BackendError {
    BackendError::Io {
        op,
        key: path.display().to_string(),
        source,
    }
}

impl DirBackend {
    /// Opens (creating if needed) a directory backend rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Result<DirBackend, BackendError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| io_err("create", &root, e))?;
        Ok(DirBackend {
            root,
            temp_seq: AtomicU64::new(0),
        })
    }

    /// The directory the repository lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, BackendError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Creates `dir` and its missing parents, fsyncing each parent so the new
    /// directory entries are as durable as the object put into them.
    fn create_dirs(&self, dir: &Path) -> Result<(), BackendError> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            self.create_dirs(parent)?;
        }
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(io_err("mkdir", dir, e)),
        }
        sync_dir(dir.parent().unwrap_or(&self.root))
    }

    /// Writes `data` to a temporary file beside `path`, fsyncs it and renames
    /// it over `path`; the caller fsyncs the directory.
    fn write_and_rename(&self, path: &Path, data: &[u8]) -> Result<(), BackendError> {
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let name = path
            .file_name()
            .expect("a key names a file")
            .to_string_lossy();
        let temp = parent(path).join(format!("{name}{TEMP_MARK}{}-{seq}", std::process::id()));
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .and_then(|mut f| f.write_all(data).and_then(|()| f.sync_all()));
        if let Err(e) = written {
            // A full disk: leave nothing behind, not even the temporary file.
            let _ = fs::remove_file(&temp);
            return Err(io_err("write", &temp, e));
        }
        if let Err(e) = fs::rename(&temp, path) {
            let _ = fs::remove_file(&temp);
            return Err(io_err("rename", path, e));
        }
        Ok(())
    }

    fn walk(&self, dir: &Path, out: &mut Vec<ObjectInfo>) -> Result<(), BackendError> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("list", dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_err("list", dir, e))?;
            let path = entry.path();
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                // Removed between the listing and the stat: not there.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat", &path, e)),
            };
            if meta.is_dir() {
                self.walk(&path, out)?;
            } else if let Some(info) = self.info(&path, &meta)? {
                out.push(info);
            }
        }
        Ok(())
    }

    fn info(&self, path: &Path, meta: &fs::Metadata) -> Result<Option<ObjectInfo>, BackendError> {
        let Ok(rel) = path.strip_prefix(&self.root) else {
            return Ok(None);
        };
        let key = rel
            .to_string_lossy()
            .replace(std::path::MAIN_SEPARATOR, "/");
        if key == LOCK_FILE {
            return Ok(None);
        }
        let modified = meta.modified().map_err(|e| io_err("stat", path, e))?;
        Ok(Some(ObjectInfo {
            key,
            size: meta.len(),
            modified,
        }))
    }
}

/// The directory an object's path is in (a key always has one: the root).
fn parent(path: &Path) -> &Path {
    path.parent().expect("a key's path has a parent: the root")
}

/// Runs `f` over `items` on up to `threads` scoped threads, each taking
/// every `threads`-th item; the first error wins.
fn for_each_parallel<T: Sync>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<(), BackendError> + Sync,
) -> Result<(), BackendError> {
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().try_for_each(&f);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || items.iter().skip(t).step_by(threads).try_for_each(f))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect::<Result<Vec<()>, _>>()
            .map(drop)
    })
}

fn sync_dir(dir: &Path) -> Result<(), BackendError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync dir", dir, e))
}

impl Backend for DirBackend {
    fn put(&self, key: &str, data: &[u8]) -> Result<(), BackendError> {
        let path = self.path(key)?;
        let dir = parent(&path);
        self.create_dirs(dir)?;
        self.write_and_rename(&path, data)?;
        sync_dir(dir)
    }

    /// Writes and fsyncs the files on up to 4 (`PUT_THREADS`) threads, renames
    /// each into place, then fsyncs each directory once: the same
    /// durability as one [`Backend::put`] per object, for much less waiting.
    fn put_batch(&self, objects: &[(String, Vec<u8>)]) -> Result<(), BackendError> {
        let paths = objects
            .iter()
            .map(|(key, _)| self.path(key))
            .collect::<Result<Vec<_>, _>>()?;
        let mut dirs: Vec<&Path> = paths.iter().map(|p| parent(p)).collect();
        dirs.sort_unstable();
        dirs.dedup();
        for dir in &dirs {
            self.create_dirs(dir)?;
        }
        let files: Vec<(&PathBuf, &[u8])> = paths
            .iter()
            .zip(objects)
            .map(|(path, (_, data))| (path, data.as_slice()))
            .collect();
        for_each_parallel(&files, PUT_THREADS, |(path, data)| {
            self.write_and_rename(path, data)
        })?;
        // Only now are the new names durable: the batch is stored.
        for_each_parallel(&dirs, PUT_THREADS, |dir| sync_dir(dir))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let path = self.path(key)?;
        match fs::read(&path) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path, e)),
        }
    }

    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, BackendError> {
        let path = self.path(key)?;
        match fs::metadata(&path) {
            Ok(meta) => self.info(&path, &meta),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", &path, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let dir = self.path(prefix.trim_end_matches('/'))?;
        let mut out = Vec::new();
        self.walk(&dir, &mut out)?;
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete", &path, e)),
        }
    }

    fn touch(&self, key: &str, _data: &[u8]) -> Result<bool, BackendError> {
        let path = self.path(key)?;
        let now = TimeSpec::UTIME_NOW;
        match utimensat(None, &path, &now, &now, UtimensatFlags::NoFollowSymlink) {
            // The chunk may be another writer's, renamed into place but its
            // directory not yet synced: sync it, so this writer's index
            // never names a chunk whose name a crash could still undo.
            Ok(()) => sync_dir(parent(&path)).map(|()| true),
            Err(nix::errno::Errno::ENOENT) => Ok(false),
            Err(e) => Err(io_err("touch", &path, e.into())),
        }
    }

    fn lock(&self, mode: LockMode) -> Result<RepoLock, BackendError> {
        let path = self.root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_err("open lock", &path, e))?;
        let arg = match mode {
            LockMode::Shared => FlockArg::LockShared,
            LockMode::Exclusive => FlockArg::LockExclusive,
        };
        let flock = Flock::lock(file, arg).map_err(|(_, e)| io_err("lock", &path, e.into()))?;
        Ok(RepoLock {
            _flock: Some(flock),
        })
    }
}
