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

fn sync_dir(dir: &Path) -> Result<(), BackendError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync dir", dir, e))
}

impl Backend for DirBackend {
    fn put(&self, key: &str, data: &[u8]) -> Result<(), BackendError> {
        let path = self.path(key)?;
        let dir = path
            .parent()
            .expect("a key has a parent: the root")
            .to_path_buf();
        self.create_dirs(&dir)?;
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let name = path
            .file_name()
            .expect("a key names a file")
            .to_string_lossy();
        let temp = dir.join(format!("{name}{TEMP_MARK}{}-{seq}", std::process::id()));
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
        if let Err(e) = fs::rename(&temp, &path) {
            let _ = fs::remove_file(&temp);
            return Err(io_err("rename", &path, e));
        }
        sync_dir(&dir)
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
            Ok(()) => Ok(true),
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
