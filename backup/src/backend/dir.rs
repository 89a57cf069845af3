//! The directory backend: one file per object, written to a temporary name,
//! made durable, renamed over its key and the rename made durable, so a
//! kill -9 or a full disk leaves at most a temporary file (which GC removes),
//! never half an object under its final name.
//!
//! A single put fsyncs its file and its directory. A batch (the chunks of a
//! backup) is made durable as [`SyncLevel`] says: by default its files are
//! staged under temporary names and [`Backend::publish`] makes every staged
//! batch durable at once, one `syncfs` before the renames and one after
//! (Proxmox Backup Server's `filesystem` sync level, with the names held
//! back until the data is durable), so small chunks do not cost an fsync
//! each, nor a batch a wait of its own.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

use super::{check_key, Backend, BackendError, LockMode, ObjectInfo, RepoLock, Staged};

/// The marker in a temporary file's name; such files are never objects.
pub const TEMP_MARK: &str = ".tmp-";
/// Threads a batch put writes and syncs on: fsync waits on the disk, not
/// the CPU, so a few more than the cores, to keep the device's queue fed.
const PUT_THREADS: usize = 4;
/// The repository lock file, at the root.
const LOCK_FILE: &str = ".lock";

/// How [`Backend::put_batch`] and [`Backend::touch_batch`] make a batch
/// durable (Proxmox Backup Server's datastore `sync-level`). Either way no
/// object is renamed to its key before its data is durable, and the call
/// returns only once every rename is durable too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncLevel {
    /// fsync every file (on a few threads), rename, fsync every directory
    /// touched once: cost grows with the number of objects.
    File,
    /// Write every file, one `syncfs` of the repository's filesystem,
    /// rename, one more `syncfs`: two syncs per publish (any number of
    /// staged batches) whatever the object count. It also flushes whatever else is dirty on that filesystem
    /// (other programs' writes), so it suits a filesystem given to
    /// backups best.
    #[default]
    Filesystem,
}

/// The environment variable that picks a directory repository's
/// [`SyncLevel`] (`file` or `filesystem`), like Proxmox Backup Server's
/// datastore option: `file` for a repository on a filesystem that busy
/// programs share, where a `syncfs` would flush their writes too.
pub const SYNC_LEVEL_ENV: &str = "MIRRORBLK_BACKUP_SYNC_LEVEL";

impl SyncLevel {
    /// `file` or `filesystem`.
    pub fn parse(text: &str) -> Option<SyncLevel> {
        match text {
            "file" => Some(SyncLevel::File),
            "filesystem" => Some(SyncLevel::Filesystem),
            _ => None,
        }
    }
}

/// What a batch's filesystem sync calls: `syncfs` on the repository's root
/// in production; tests put a recording or failing one here.
type FsSync = Arc<dyn Fn(&File) -> std::io::Result<()> + Send + Sync>;

/// The real filesystem sync: `syncfs(2)`, which since Linux 5.8 also reports
/// a writeback error seen on the filesystem since `root` was opened.
fn syncfs(root: &File) -> std::io::Result<()> {
    nix::unistd::syncfs(root.as_raw_fd()).map_err(std::io::Error::from)
}

/// A repository in a local directory.
pub struct DirBackend {
    root: PathBuf,
    /// The root, open for the backend's lifetime: `syncfs` reports a
    /// writeback error only to descriptors opened before it happened, so a
    /// fresh descriptor per sync could miss one from an earlier batch.
    root_fd: File,
    /// Makes temporary names unique within this process.
    temp_seq: AtomicU64,
    /// This process, in temporary names (one `getpid` instead of one each).
    pid: u32,
    sync: SyncLevel,
    sync_fs: FsSync,
}

impl std::fmt::Debug for DirBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirBackend")
            .field("root", &self.root)
            .field("sync", &self.sync)
            .finish_non_exhaustive()
    }
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> BackendError {
    BackendError::Io {
        op,
        key: path.display().to_string(),
        source,
    }
}

impl DirBackend {
    /// Opens (creating if needed) a directory backend rooted at `root`, at
    /// the sync level [`SYNC_LEVEL_ENV`] names (`file` or `filesystem`, the
    /// default when unset).
    pub fn new(root: impl Into<PathBuf>) -> Result<DirBackend, BackendError> {
        let root = root.into();
        let sync = match std::env::var(SYNC_LEVEL_ENV) {
            Err(_) => SyncLevel::default(),
            Ok(text) => SyncLevel::parse(&text).ok_or_else(|| BackendError::InvalidLocation {
                location: root.display().to_string(),
                reason: format!("{SYNC_LEVEL_ENV}={text:?}: expected file or filesystem"),
            })?,
        };
        fs::create_dir_all(&root).map_err(|e| io_err("create", &root, e))?;
        let root_fd = File::open(&root).map_err(|e| io_err("open", &root, e))?;
        Ok(DirBackend {
            root,
            root_fd,
            temp_seq: AtomicU64::new(0),
            pid: std::process::id(),
            sync,
            sync_fs: Arc::new(syncfs),
        })
    }

    /// The same backend making batches durable as `sync` says.
    pub fn with_sync_level(mut self, sync: SyncLevel) -> DirBackend {
        self.sync = sync;
        self
    }

    /// The same backend with `sync_fs` in place of `syncfs(2)`, so a test
    /// can watch or fail a batch's syncs.
    #[cfg(test)]
    pub(crate) fn with_fs_sync(mut self, sync_fs: FsSync) -> DirBackend {
        self.sync = SyncLevel::Filesystem;
        self.sync_fs = sync_fs;
        self
    }

    /// One filesystem sync of the repository's filesystem.
    fn sync_filesystem(&self) -> Result<(), BackendError> {
        (self.sync_fs)(&self.root_fd).map_err(|e| io_err("syncfs", &self.root, e))
    }

    /// The directory the repository lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, BackendError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Creates `dir` and its missing parents. With `sync_parents`, fsyncs
    /// each parent so the new directory entries are as durable as the object
    /// put into them; without, the caller's filesystem sync covers them.
    fn create_dirs(&self, dir: &Path, sync_parents: bool) -> Result<(), BackendError> {
        let mut created = Vec::new();
        self.make_dirs(dir, &mut created)?;
        if sync_parents {
            for parent in &created {
                sync_dir(parent)?;
            }
        }
        Ok(())
    }

    /// Creates `dir` and its missing parents, adding to `created` (once
    /// each) the parents whose entries changed: what must be fsynced for the
    /// new directories to be durable.
    fn make_dirs(&self, dir: &Path, created: &mut Vec<PathBuf>) -> Result<(), BackendError> {
        // mkdir first: most calls find the directory there (EEXIST) or only
        // it missing, so no stat before.
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound && dir != self.root => {
                self.make_dirs(parent(dir), created)?;
                return self.make_dirs(dir, created);
            }
            Err(e) => return Err(io_err("mkdir", dir, e)),
        }
        let parent = parent(dir).to_path_buf();
        if !created.contains(&parent) {
            created.push(parent);
        }
        Ok(())
    }

    /// A fresh temporary name beside `path`.
    fn temp_path(&self, path: &Path) -> PathBuf {
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let name = path
            .file_name()
            .expect("a key names a file")
            .to_string_lossy();
        parent(path).join(format!("{name}{TEMP_MARK}{}-{seq}", self.pid))
    }

    /// Writes `data` to a temporary file beside `path`, fsyncs it and renames
    /// it over `path`; the caller fsyncs the directory.
    fn write_and_rename(&self, path: &Path, data: &[u8]) -> Result<(), BackendError> {
        let temp = self.temp_path(path);
        write_temp(&temp, data, true)?;
        rename(&temp, path)
    }

    /// Writes every file of a batch to a temporary name beside its path
    /// (on up to `PUT_THREADS` threads), creating missing directories
    /// unsynced: the filesystem sync of [`Backend::publish`] covers both.
    /// On an error removes every temporary file it wrote.
    fn stage_files(&self, objects: &[(String, Vec<u8>)]) -> Result<Staged, BackendError> {
        let mut staged = Staged::default();
        for (key, _) in objects {
            let path = self.path(key)?;
            staged.waiting.push((self.temp_path(&path), path));
        }
        let mut dirs: Vec<&Path> = staged.waiting.iter().map(|(_, p)| parent(p)).collect();
        dirs.sort_unstable();
        dirs.dedup();
        // Made here, not by the writing threads: concurrent mkdirs in one
        // parent cost more system time than they save.
        for dir in &dirs {
            self.make_dirs(dir, &mut Vec::new())?;
        }
        let files: Vec<(&PathBuf, &[u8])> = staged
            .waiting
            .iter()
            .zip(objects)
            .map(|((temp, _), (_, data))| (temp, data.as_slice()))
            .collect();
        let written = for_each_parallel(&files, PUT_THREADS, |(temp, data)| {
            write_temp(temp, data, false)
        });
        if let Err(e) = written {
            self.discard(staged);
            return Err(e);
        }
        Ok(staged)
    }

    /// [`Backend::put_batch`] at [`SyncLevel::File`]: every file written
    /// and fsynced (on a few threads), renamed into place, then each
    /// directory touched fsynced once.
    fn put_batch_fsync(&self, objects: &[(String, Vec<u8>)]) -> Result<(), BackendError> {
        let paths = objects
            .iter()
            .map(|(key, _)| self.path(key))
            .collect::<Result<Vec<_>, _>>()?;
        let mut dirs: Vec<&Path> = paths.iter().map(|p| parent(p)).collect();
        dirs.sort_unstable();
        dirs.dedup();
        // A batch's new prefix directories share a parent: one fsync of it
        // covers them all.
        let mut created = Vec::new();
        for dir in &dirs {
            self.make_dirs(dir, &mut created)?;
        }
        for_each_parallel(&created, PUT_THREADS, |parent| sync_dir(parent))?;
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

/// Writes `data` to the new file `temp`, fsynced when `sync`; on an error
/// (a full disk) removes it, leaving nothing behind.
fn write_temp(temp: &Path, data: &[u8], sync: bool) -> Result<(), BackendError> {
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp)
        .and_then(|mut f| {
            f.write_all(data)?;
            if sync {
                f.sync_all()?;
            }
            Ok(())
        });
    written.map_err(|e| {
        let _ = fs::remove_file(temp);
        io_err("write", temp, e)
    })
}

/// Renames `temp` over `path`; on an error removes `temp`.
fn rename(temp: &Path, path: &Path) -> Result<(), BackendError> {
    fs::rename(temp, path).map_err(|e| {
        let _ = fs::remove_file(temp);
        io_err("rename", path, e)
    })
}

fn sync_dir(dir: &Path) -> Result<(), BackendError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync dir", dir, e))
}

/// Sets an object's times to now; false when it does not exist.
fn refresh(path: &Path) -> Result<bool, BackendError> {
    let now = TimeSpec::UTIME_NOW;
    match utimensat(None, path, &now, &now, UtimensatFlags::NoFollowSymlink) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ENOENT) => Ok(false),
        Err(e) => Err(io_err("touch", path, e.into())),
    }
}

impl Backend for DirBackend {
    fn put(&self, key: &str, data: &[u8]) -> Result<(), BackendError> {
        let path = self.path(key)?;
        let dir = parent(&path);
        self.create_dirs(dir, true)?;
        self.write_and_rename(&path, data)?;
        sync_dir(dir)
    }

    /// The same durability as one [`Backend::put`] per object, for much less
    /// waiting. At [`SyncLevel::Filesystem`]: the batch staged and
    /// published at once (two `syncfs` whatever its object count). At
    /// [`SyncLevel::File`]: writes and fsyncs the files on up to 4 threads,
    /// renames each into place, then fsyncs each directory once.
    fn put_batch(&self, objects: &[(String, Vec<u8>)]) -> Result<(), BackendError> {
        match self.sync {
            _ if objects.is_empty() => Ok(()),
            SyncLevel::Filesystem => {
                let staged = self.stage_files(objects)?;
                self.publish(staged)
            }
            SyncLevel::File => self.put_batch_fsync(objects),
        }
    }

    /// At [`SyncLevel::Filesystem`]: every file written to a temporary name
    /// and left to the kernel's writeback, so the batches of a whole backup
    /// share one wait. At [`SyncLevel::File`] the batch is stored now.
    fn stage_batch(&self, objects: &[(String, Vec<u8>)]) -> Result<Staged, BackendError> {
        match self.sync {
            _ if objects.is_empty() => Ok(Staged::default()),
            SyncLevel::Filesystem => self.stage_files(objects),
            SyncLevel::File => self.put_batch_fsync(objects).map(|()| Staged::default()),
        }
    }

    /// One filesystem sync (every staged byte durable), every rename, one
    /// more (every name durable). A failure before the renames leaves no
    /// object; after, only whole ones.
    fn publish(&self, mut staged: Staged) -> Result<(), BackendError> {
        if staged.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.sync_filesystem() {
            self.discard(staged);
            return Err(e);
        }
        // Only now is every byte durable: a name may point at the data.
        for (n, (temp, path)) in staged.waiting.iter().enumerate() {
            if let Err(e) = rename(temp, path) {
                // Those before are renamed (whole); remove those after.
                self.discard(Staged {
                    waiting: staged.waiting.split_off(n + 1),
                });
                return Err(e);
            }
        }
        self.sync_filesystem()
    }

    fn discard(&self, staged: Staged) {
        for (temp, _) in &staged.waiting {
            let _ = fs::remove_file(temp);
        }
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
        // The chunk may be another writer's, renamed into place but its
        // directory not yet synced: sync it, so this writer's index never
        // names a chunk whose name a crash could still undo.
        if refresh(&path)? {
            sync_dir(parent(&path)).map(|()| true)
        } else {
            Ok(false)
        }
    }

    /// Refreshes each, then makes the names of those that exist durable
    /// once for the batch (as [`DirBackend::touch`] does for one): one
    /// `syncfs`, or one fsync per directory at [`SyncLevel::File`].
    fn touch_batch(&self, objects: &[(String, Vec<u8>)]) -> Result<Vec<bool>, BackendError> {
        let paths = objects
            .iter()
            .map(|(key, _)| self.path(key))
            .collect::<Result<Vec<_>, _>>()?;
        let found = paths
            .iter()
            .map(|p| refresh(p))
            .collect::<Result<Vec<bool>, _>>()?;
        let mut dirs: Vec<&Path> = paths
            .iter()
            .zip(&found)
            .filter(|(_, &f)| f)
            .map(|(p, _)| parent(p))
            .collect();
        dirs.sort_unstable();
        dirs.dedup();
        match self.sync {
            _ if dirs.is_empty() => {}
            SyncLevel::Filesystem => self.sync_filesystem()?,
            SyncLevel::File => for_each_parallel(&dirs, PUT_THREADS, |dir| sync_dir(dir))?,
        }
        Ok(found)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// What the repository held when a filesystem sync was called:
    /// (objects under their final names, temporary files).
    type Seen = Arc<Mutex<Vec<(usize, usize)>>>;

    /// Counts the final and temporary files under `root`.
    fn census(root: &Path) -> (usize, usize) {
        let backend = DirBackend::new(root).unwrap();
        let all = backend.list(".chunks").unwrap();
        let temps = all.iter().filter(|o| o.key.contains(TEMP_MARK)).count();
        (all.len() - temps, temps)
    }

    /// A backend whose filesystem syncs record what they see and fail at
    /// call `fail_at` (1-based; 0 never).
    fn watched(root: &Path, fail_at: usize) -> (DirBackend, Seen) {
        let seen: Seen = Arc::default();
        let (log, dir) = (Arc::clone(&seen), root.to_path_buf());
        let sync: FsSync = Arc::new(move |fd: &File| {
            let mut log = log.lock().unwrap();
            log.push(census(&dir));
            if log.len() == fail_at {
                return Err(std::io::Error::other("injected sync failure"));
            }
            syncfs(fd)
        });
        (DirBackend::new(root).unwrap().with_fs_sync(sync), seen)
    }

    fn batch(n: u8) -> Vec<(String, Vec<u8>)> {
        (0..n)
            .map(|i| (format!(".chunks/{i:04x}/c{i}"), vec![i; 1000]))
            .collect()
    }

    #[test]
    fn a_batch_is_renamed_only_after_its_data_sync_and_returns_after_its_name_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, seen) = watched(dir.path(), 0);
        backend.put_batch(&batch(5)).unwrap();
        // Two syncs: the first with every file still temporary, the second
        // with every one renamed.
        assert_eq!(*seen.lock().unwrap(), vec![(0, 5), (5, 0)]);
        for (key, data) in batch(5) {
            assert_eq!(backend.get(&key).unwrap(), Some(data));
        }
    }

    #[test]
    fn a_failed_data_sync_leaves_no_object_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, seen) = watched(dir.path(), 1);
        assert!(backend.put_batch(&batch(5)).is_err());
        assert_eq!(seen.lock().unwrap().len(), 1, "stopped at the failed sync");
        assert_eq!(census(dir.path()), (0, 0));
    }

    #[test]
    fn a_failed_name_sync_fails_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, _) = watched(dir.path(), 2);
        assert!(backend.put_batch(&batch(5)).is_err());
        // Renamed (each whole: its data was synced), but not reported stored.
        assert_eq!(census(dir.path()), (5, 0));
    }

    #[test]
    fn staged_batches_wait_under_no_key_and_share_the_two_syncs_of_their_publish() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, seen) = watched(dir.path(), 0);
        let objects = batch(6);
        let mut staged = backend.stage_batch(&objects[..4]).unwrap();
        staged.append(backend.stage_batch(&objects[4..]).unwrap());
        assert_eq!(staged.len(), 6);
        assert!(seen.lock().unwrap().is_empty(), "staging waits for nothing");
        assert_eq!(census(dir.path()), (0, 6), "no object before the publish");
        backend.publish(staged).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![(0, 6), (6, 0)]);
        for (key, data) in objects {
            assert_eq!(backend.get(&key).unwrap(), Some(data));
        }
    }

    #[test]
    fn a_failed_publish_or_a_discard_leaves_no_object_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, _) = watched(dir.path(), 1);
        let staged = backend.stage_batch(&batch(5)).unwrap();
        assert!(backend.publish(staged).is_err());
        assert_eq!(census(dir.path()), (0, 0));
        let staged = backend.stage_batch(&batch(5)).unwrap();
        backend.discard(staged);
        assert_eq!(census(dir.path()), (0, 0));
    }

    #[test]
    fn at_the_file_level_a_staged_batch_is_stored_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = DirBackend::new(dir.path())
            .unwrap()
            .with_sync_level(SyncLevel::File);
        let staged = file.stage_batch(&batch(3)).unwrap();
        assert!(staged.is_empty());
        assert_eq!(census(dir.path()), (3, 0));
        file.publish(staged).unwrap();
    }

    #[test]
    fn touch_batch_says_which_exist_and_syncs_once_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, seen) = watched(dir.path(), 0);
        let objects = batch(4);
        backend.put_batch(&objects[..2]).unwrap();
        seen.lock().unwrap().clear();
        assert_eq!(
            backend.touch_batch(&objects).unwrap(),
            vec![true, true, false, false]
        );
        assert_eq!(seen.lock().unwrap().len(), 1, "one sync for the batch");
        seen.lock().unwrap().clear();
        assert_eq!(
            backend.touch_batch(&objects[2..]).unwrap(),
            vec![false, false]
        );
        assert!(seen.lock().unwrap().is_empty(), "nothing found, no sync");
        // The file level gives the same answers.
        let file = DirBackend::new(dir.path())
            .unwrap()
            .with_sync_level(SyncLevel::File);
        file.put_batch(&objects[2..3]).unwrap();
        assert_eq!(
            file.touch_batch(&objects).unwrap(),
            vec![true, true, true, false]
        );
    }
}
