//! The local data store: a regular file or a raw block device, accessed with
//! `O_DIRECT` through the core's io_uring.
//!
//! Opening (and creating) happens synchronously at start-up, where a wrong
//! path or size must stop the daemon with one clear sentence; the async
//! [`Store`] then lives on the volume's core.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tokio_uring::buf::BoundedBuf;

use crate::units::{is_aligned, ByteSize, BLOCK};

/// Why a data store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The path does not exist and no size was given to create it.
    #[error("data file {path} does not exist; give --size to create it")]
    Missing {
        /// The path.
        path: PathBuf,
    },
    /// The data file or device is smaller than the configured size.
    #[error("data file {path} holds {actual} bytes, less than the volume size {wanted}; grow it (e.g. truncate -s {wanted} {path}) or lower --size")]
    TooSmall {
        /// The path.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The configured size.
        wanted: ByteSize,
    },
    /// A size that is not a whole number of 4 KiB blocks.
    #[error("volume size {0} bytes is not a multiple of 4 KiB; choose e.g. {1}")]
    Unaligned(u64, ByteSize),
    /// A device path that does not exist (never created as a file).
    #[error("device {path} does not exist; check the path (ls -l /dev/disk/by-id/) or attach the device")]
    MissingDevice {
        /// The path.
        path: PathBuf,
    },
    /// Neither a regular file nor a block device.
    #[error("{path} is neither a regular file nor a block device")]
    BadKind {
        /// The path.
        path: PathBuf,
    },
    /// An I/O error while opening.
    #[error("cannot open {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// A data store opened at start-up, not yet bound to a core.
#[derive(Debug)]
pub struct OpenedStore {
    /// The file, opened with `O_DIRECT` when the filesystem supports it.
    pub file: File,
    /// The same file opened again with `O_DSYNC` as well (None when read
    /// only): large writes go in place through it, each durable (a FUA
    /// write on a disk with a volatile cache) when it completes.
    pub durable_file: Option<File>,
    /// A buffered, read-only handle that reads go through when the page
    /// cache serves them (see [`OpenedStore::cache_reads`]).
    pub cached_file: Option<File>,
    /// Volume size in bytes.
    pub size: u64,
    /// Whether it is a block device (no holes, no `SEEK_HOLE`).
    pub block_device: bool,
    /// Whether `O_DIRECT` is in effect.
    pub direct: bool,
    /// Where it is.
    pub path: PathBuf,
    /// Created (all zeroes) by this open.
    pub created: bool,
}

mod ioctl {
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
}
use ioctl::blkgetsize64;

/// The size of an open block device.
pub fn block_device_size(f: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    unsafe { blkgetsize64(f.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

/// Opens `path` for read-write (or read-only) with `O_DIRECT`, falling back
/// to buffered I/O (with a warning) where the filesystem refuses `O_DIRECT`,
/// e.g. tmpfs. `extra_flags` are added (the journal adds `O_DSYNC`).
pub fn open_direct(path: &Path, read_only: bool, extra_flags: i32) -> io::Result<(File, bool)> {
    let mut o = OpenOptions::new();
    o.read(true).write(!read_only);
    match o
        .clone()
        .custom_flags(libc::O_DIRECT | extra_flags)
        .open(path)
    {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(
                "{} does not support O_DIRECT; using buffered I/O (still durable through fsync)",
                path.display()
            );
            Ok((o.custom_flags(extra_flags).open(path)?, false))
        }
        Err(e) => Err(e),
    }
}

/// How a newly created data file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preallocate {
    /// Write zeroes over the whole file once. Later `O_DIRECT` writes are
    /// plain overwrites: no block allocation, no filesystem-journal commit
    /// coupled to the mirrorblk journal's flushes (several times faster).
    #[default]
    Full,
    /// A sparse file: instant to create, slower to write until filled.
    Sparse,
}

/// Fills `[0, size)` of a new file with zeroes, logging progress for large files.
fn zero_fill(f: &File, path: &Path, size: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let chunk = crate::buffer::AlignedBuf::new(crate::buffer::MAX_CHUNK);
    let started = std::time::Instant::now();
    let mut next_report = size / 10;
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(chunk.capacity() as u64) as usize;
        f.write_all_at(&chunk.as_slice()[..n], pos)?;
        pos += n as u64;
        if size >= (4 << 30) && pos >= next_report {
            tracing::info!(
                "preallocating {}: {}% ({:.0?})",
                path.display(),
                pos * 100 / size,
                started.elapsed()
            );
            next_report += size / 10;
        }
    }
    f.sync_all()
}

/// Opens (creating if missing and `size` is given) the data store of a volume.
pub fn open_store(
    path: &Path,
    size: Option<u64>,
    read_only: bool,
    prealloc: Preallocate,
) -> Result<OpenedStore, StoreError> {
    let io_err = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(s) = size {
        check_requested_size(s)?;
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(e)),
    };
    let (block_device, actual) = match &meta {
        None => (false, create_missing_store(path, size, prealloc)?),
        Some(m) => existing_store_size(path, m)?,
    };
    let size = settle_size(path, size, actual)?;
    let (file, direct) = open_direct(path, read_only, 0).map_err(io_err)?;
    let durable_file = if read_only {
        None
    } else {
        Some(open_direct(path, false, libc::O_DSYNC).map_err(io_err)?.0)
    };
    Ok(OpenedStore {
        file,
        durable_file,
        cached_file: None,
        size,
        block_device,
        direct,
        path: path.to_path_buf(),
        created: meta.is_none(),
    })
}

/// A size asked for must be a non-zero multiple of the block size.
fn check_requested_size(s: u64) -> Result<(), StoreError> {
    if !is_aligned(s) || s == 0 {
        return Err(StoreError::Unaligned(
            s,
            ByteSize(crate::units::align_up(s.max(1))),
        ));
    }
    Ok(())
}

/// Whether `path` is in `/dev`'s device file system, where a file mirrorblk
/// created would be lost at reboot and is never what the operator meant.
/// `/dev/shm` is excluded: a tmpfs for shared memory that benchmarks and
/// tests choose on purpose, as they would `/tmp`.
pub(crate) fn in_device_dir(path: &Path) -> bool {
    path.starts_with("/dev") && !path.starts_with("/dev/shm")
}

/// Creates the missing data file of `size` bytes and returns its size; with
/// no size, or in `/dev` ([`in_device_dir`]), a missing store is an error.
fn create_missing_store(
    path: &Path,
    size: Option<u64>,
    prealloc: Preallocate,
) -> Result<u64, StoreError> {
    let io_err = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    if in_device_dir(path) {
        return Err(StoreError::MissingDevice {
            path: path.to_path_buf(),
        });
    }
    let Some(s) = size else {
        return Err(StoreError::Missing {
            path: path.to_path_buf(),
        });
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err)?;
    }
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err)?;
    f.set_len(s).map_err(io_err)?;
    match prealloc {
        Preallocate::Full => {
            if let Err(e) = zero_fill(&f, path, s) {
                // Leave nothing half-made behind: the next start would take it as a volume.
                let _ = std::fs::remove_file(path);
                return Err(io_err(e));
            }
        }
        Preallocate::Sparse => f.sync_all().map_err(io_err)?,
    }
    tracing::info!(
        "created data file {} ({}, {:?} preallocation)",
        path.display(),
        ByteSize(s),
        prealloc
    );
    Ok(s)
}

/// Whether an existing store is a block device, and its size; warns about
/// a sparse data file.
fn existing_store_size(path: &Path, m: &std::fs::Metadata) -> Result<(bool, u64), StoreError> {
    if m.file_type().is_file() {
        use std::os::unix::fs::MetadataExt;
        if m.blocks() * 512 < m.len() / 2 {
            tracing::warn!(
                "data file {} is sparse ({} of {} allocated): writes into its holes are slower until they are filled (new volumes avoid this with --preallocate full)",
                path.display(),
                ByteSize(crate::units::align_down(m.blocks() * 512)),
                ByteSize(m.len())
            );
        }
        return Ok((false, m.len()));
    }
    if m.file_type().is_block_device() {
        let io_err = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        let f = File::open(path).map_err(io_err)?;
        return Ok((true, block_device_size(&f).map_err(io_err)?));
    }
    Err(StoreError::BadKind {
        path: path.to_path_buf(),
    })
}

/// The volume's size: the one asked for, which the store must hold, or
/// else the store's own, which must be a non-zero multiple of the block size.
fn settle_size(path: &Path, wanted: Option<u64>, actual: u64) -> Result<u64, StoreError> {
    match wanted {
        Some(s) if actual < s => Err(StoreError::TooSmall {
            path: path.to_path_buf(),
            actual,
            wanted: ByteSize(s),
        }),
        Some(s) => Ok(s),
        None => {
            if !is_aligned(actual) || actual == 0 {
                return Err(StoreError::Unaligned(
                    actual,
                    ByteSize(crate::units::align_down(actual).max(BLOCK)),
                ));
            }
            Ok(actual)
        }
    }
}

impl OpenedStore {
    /// Serves reads through the page cache from now on (writes stay
    /// direct: the kernel drops cached pages a direct write or a hole punch
    /// overwrites, so a cached read never returns stale data).
    pub fn cache_reads(&mut self) -> io::Result<()> {
        self.cached_file = Some(File::open(&self.path)?);
        Ok(())
    }
}

/// The data store bound to a core's io_uring.
pub struct Store {
    file: tokio_uring::fs::File,
    durable: Option<tokio_uring::fs::File>,
    cached: Option<tokio_uring::fs::File>,
    fd: RawFd,
    /// The volume size (a resize changes it on the volume's core).
    size: std::cell::Cell<u64>,
    block_device: bool,
}

/// How a range of the store is allocated, for BLOCK_STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Length in bytes.
    pub length: u64,
    /// True for a hole (reads as zeroes, no storage behind it).
    pub hole: bool,
    /// True when the range reads as zeroes (always so for a hole).
    pub zero: bool,
}

impl Allocation {
    /// A run of data (or of bytes not known to be zero).
    pub fn data(length: u64) -> Allocation {
        Allocation {
            length,
            hole: false,
            zero: false,
        }
    }

    /// A run of a hole, which reads as zeroes.
    pub fn hole(length: u64) -> Allocation {
        Allocation {
            length,
            hole: true,
            zero: true,
        }
    }

    /// A run that reads as zeroes but has storage behind it (or may).
    pub fn zero(length: u64) -> Allocation {
        Allocation {
            length,
            hole: false,
            zero: true,
        }
    }

    /// Whether `other` describes bytes the same way.
    pub fn same_state(&self, other: &Allocation) -> bool {
        self.hole == other.hole && self.zero == other.zero
    }
}

impl Store {
    /// Binds an opened store to the current core. Must run inside the core's runtime.
    pub fn new(opened: OpenedStore) -> Store {
        let fd = opened.file.as_raw_fd();
        Store {
            file: tokio_uring::fs::File::from_std(opened.file),
            durable: opened.durable_file.map(tokio_uring::fs::File::from_std),
            cached: opened.cached_file.map(tokio_uring::fs::File::from_std),
            fd,
            size: std::cell::Cell::new(opened.size),
            block_device: opened.block_device,
        }
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size.get()
    }

    /// The bytes the file or device holds now.
    fn capacity(&self) -> io::Result<u64> {
        // SAFETY: the descriptor stays open while `self.file` lives; the
        // borrowed File is never closed (ManuallyDrop).
        let f = std::mem::ManuallyDrop::new(unsafe {
            <File as std::os::fd::FromRawFd>::from_raw_fd(self.fd)
        });
        if self.block_device {
            block_device_size(&f)
        } else {
            Ok(f.metadata()?.len())
        }
    }

    /// Makes the store ready, durably, to hold a volume grown from `old` to
    /// `new` bytes, before the resize record is journaled: the new part
    /// reads as zeroes (data a shrink cut off, or a device's old contents,
    /// never reappears), and a data file is extended. A block device must
    /// already be large enough.
    pub async fn grow(&self, old: u64, new: u64) -> io::Result<()> {
        assert!(is_aligned(old) && is_aligned(new) && new > old);
        let held = self.capacity()?;
        if self.block_device && held < new {
            return Err(io::Error::other(format!(
                "the data device holds {held} bytes ({}), less than {new} ({}): give the volume a larger device first",
                ByteSize(held),
                ByteSize(new)
            )));
        }
        let stale_end = held.min(new);
        if stale_end > old {
            self.zero(
                old,
                crate::units::align_up(stale_end) - old,
                !self.block_device,
            )
            .await?;
        }
        if held < new {
            // SAFETY: ftruncate on a descriptor we own.
            if unsafe { libc::ftruncate(self.fd, new as libc::off_t) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        self.sync().await?;
        self.size.set(new);
        Ok(())
    }

    /// A shrink to `new` bytes was applied: a data file is cut there (the
    /// space goes back to the filesystem); a device keeps its contents,
    /// which a later grow zeroes first.
    pub fn shrink(&self, new: u64) -> io::Result<()> {
        if !self.block_device && self.capacity()? > new {
            // SAFETY: ftruncate on a descriptor we own.
            if unsafe { libc::ftruncate(self.fd, new as libc::off_t) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        self.size.set(new);
        Ok(())
    }

    /// Reads `[pos, pos + len)` into the start of `buf` (block aligned).
    pub async fn read_into<T: tokio_uring::buf::IoBufMut>(
        &self,
        buf: T,
        pos: u64,
        len: usize,
    ) -> (io::Result<()>, T) {
        let file = self.cached.as_ref().unwrap_or(&self.file);
        self.read_from(file, buf, pos, len).await
    }

    /// A duplicate of the descriptor [`Store::read_into`] reads through
    /// (the buffered one when the page cache serves reads), for another
    /// core's reads.
    pub fn dup_read_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        let file = self.cached.as_ref().unwrap_or(&self.file);
        // SAFETY: the descriptor stays open while `file` lives, which is
        // longer than this borrow.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(file.as_raw_fd()) };
        fd.try_clone_to_owned()
    }

    /// Reads `[pos, pos + len)` into the start of `buf` (block aligned)
    /// past the page cache (the `O_DIRECT` handle; buffered only where the
    /// filesystem refuses `O_DIRECT`): for data read once, such as a
    /// snapshot export a backup streams, which a cached read would pull
    /// through the cache (pages filled, copied, then evicting what clients
    /// reread) for nothing.
    pub async fn read_direct<T: tokio_uring::buf::IoBufMut>(
        &self,
        buf: T,
        pos: u64,
        len: usize,
    ) -> (io::Result<()>, T) {
        self.read_from(&self.file, buf, pos, len).await
    }

    /// Reads `[pos, pos + len)` of `file` (one of this store's handles)
    /// into the start of `buf` (block aligned).
    async fn read_from<T: tokio_uring::buf::IoBufMut>(
        &self,
        file: &tokio_uring::fs::File,
        buf: T,
        pos: u64,
        len: usize,
    ) -> (io::Result<()>, T) {
        debug_assert!(is_aligned(pos) && is_aligned(len as u64));
        debug_assert!(pos + len as u64 <= self.size.get());
        let (res, slice) = file.read_exact_at(buf.slice(0..len), pos).await;
        (res, slice.into_inner())
    }

    /// Writes all of `buf` at `pos` (block aligned).
    pub async fn write_all<T: BoundedBuf>(&self, buf: T, pos: u64) -> (io::Result<()>, T) {
        debug_assert!(is_aligned(pos));
        let (res, buf) = self.file.write_all_at(buf, pos).await;
        (res, buf)
    }

    /// Writes all of `buf` at `pos` (block aligned) and returns once it is
    /// durable (`O_DSYNC`: no separate flush, no other write waits for it).
    pub async fn write_all_durable<T: BoundedBuf>(&self, buf: T, pos: u64) -> (io::Result<()>, T) {
        debug_assert!(is_aligned(pos));
        match &self.durable {
            Some(f) => f.write_all_at(buf, pos).await,
            None => (Err(io::Error::from_raw_os_error(libc::EROFS)), buf),
        }
    }

    /// Makes `[off, off + len)` (block aligned) read as zeroes: a hole if
    /// `punch`, otherwise zeroed but still allocated.
    pub async fn zero(&self, off: u64, len: u64, punch: bool) -> io::Result<()> {
        debug_assert!(is_aligned(off) && is_aligned(len));
        if len == 0 {
            return Ok(());
        }
        let mode = if punch {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.file.fallocate(off, len, mode).await {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                ) && punch =>
            {
                // Some filesystems cannot punch; zeroing keeps the promise.
                self.file
                    .fallocate(
                        off,
                        len,
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    )
                    .await
            }
            Err(e) => Err(e),
        }
    }

    /// Makes every completed write durable (flushes the device cache).
    pub async fn sync(&self) -> io::Result<()> {
        self.file.sync_data().await
    }

    /// The allocation map of `[off, off + len)`: holes and data, by
    /// `SEEK_DATA`/`SEEK_HOLE`. Block devices report everything as data.
    pub fn allocation(&self, off: u64, len: u64) -> Vec<Allocation> {
        let end = off.saturating_add(len).min(self.size.get());
        if self.block_device || off >= end {
            return vec![Allocation::data(end.saturating_sub(off))];
        }
        let mut out = Vec::new();
        let mut pos = off;
        while pos < end && out.len() < 1024 {
            // SAFETY: plain lseek on a file descriptor we own.
            let data = unsafe { libc::lseek(self.fd, pos as i64, libc::SEEK_DATA) };
            if data < 0 {
                // ENXIO: no data after pos, the rest is a hole. Any other
                // error: report data, which is always a safe answer.
                let hole = io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
                out.push(if hole {
                    Allocation::hole(end - pos)
                } else {
                    Allocation::data(end - pos)
                });
                break;
            }
            let data = (data as u64).max(pos);
            if data > pos {
                let n = data.min(end) - pos;
                out.push(Allocation::hole(n));
                pos += n;
                continue;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(self.fd, pos as i64, libc::SEEK_HOLE) };
            let hole_at = if hole < 0 {
                end
            } else {
                (hole as u64).max(pos + 1)
            };
            let n = hole_at.min(end) - pos;
            out.push(Allocation::data(n));
            pos += n;
        }
        if pos < end && out.len() >= 1024 {
            out.push(Allocation::data(end - pos));
        }
        out
    }
}

#[cfg(test)]
mod device_dir_tests {
    use super::in_device_dir;
    use std::path::Path;

    #[test]
    fn dev_is_the_device_file_system_but_dev_shm_is_not() {
        for (path, device) in [
            ("/dev/sdb", true),
            ("/dev/disk/by-id/nvme-x", true),
            ("/dev/mapper/vg-lv", true),
            ("/dev/shm/vol0.img", false),
            ("/dev/shm", false),
            ("/devices/x", false),
            ("/var/lib/mirrorblk/vol0.img", false),
            ("vol0.img", false),
        ] {
            assert_eq!(in_device_dir(Path::new(path)), device, "{path}");
        }
    }
}
