//! Live restart: a daemon hands its listeners and its NBD connections
//! (stopped at a request boundary, every reply written, volumes closed
//! durably) to a new process of a given binary, which recovers the journals
//! and serves the same sockets. Clients see a pause, never a disconnect.
//! See docs/RESTART.md for the sequence and its reasons.
//!
//! This module is the conversation between the two processes over a
//! [`channel::Channel`]: [`Successor`] is the old process's side,
//! [`Predecessor`] the new one's.

pub mod channel;
pub mod wire;

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use channel::{Channel, Frame, END, FAILED, FDS, HELLO, MAX_FDS_PER_FRAME, SERVING, STATE};

/// The environment variable naming the successor's end of the channel.
pub const HANDOVER_FD_ENV: &str = "MIRRORBLK_HANDOVER_FD";

/// How long a new process may take to parse its configuration and say
/// HELLO; the old one serves meanwhile.
pub const HELLO_LIMIT: Duration = Duration::from_secs(15);
/// How long a successor may take from receiving the state to serving
/// (journal recovery of checkpointed volumes is quick).
pub const SERVE_LIMIT: Duration = Duration::from_secs(60);
/// How long a successor waits for the state after its HELLO (the old
/// process drains and checkpoints meanwhile).
pub const STATE_LIMIT: Duration = Duration::from_secs(90);

/// Why a restart did not happen (or not with the asked binary).
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    /// The binary could not be started.
    #[error("cannot start {}: {source}", binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// What exec said.
        source: std::io::Error,
    },
    /// It exited before serving.
    #[error("{} exited ({status}) before serving; its log says why", binary.display())]
    Exited {
        /// The binary.
        binary: PathBuf,
        /// Its exit status.
        status: ExitStatus,
    },
    /// It said nothing in time.
    #[error("{} did not {what} within {} s; it was killed", binary.display(), limit.as_secs())]
    Silent {
        /// The binary.
        binary: PathBuf,
        /// What it did not do.
        what: &'static str,
        /// The bound.
        limit: Duration,
    },
    /// It said it cannot serve.
    #[error("{} gave up: {why}", binary.display())]
    Refused {
        /// The binary.
        binary: PathBuf,
        /// Its reason.
        why: String,
    },
    /// The channel failed or carried something unexpected.
    #[error("the hand-over channel failed: {0}")]
    Channel(String),
}

/// A new daemon process being started to take over (the old process's
/// side of the conversation).
pub struct Successor {
    binary: PathBuf,
    child: Child,
    chan: Channel,
}

/// What the successor reported once it serves.
#[derive(Debug, Clone, Copy)]
pub struct Served {
    /// Its process id.
    pub pid: u32,
}

impl Successor {
    /// Starts `binary` with `args` (without argv\[0\]) and the channel's
    /// other end inherited, named in [`HANDOVER_FD_ENV`].
    pub fn spawn(binary: &Path, args: &[OsString]) -> Result<Successor, RestartError> {
        let spawn_err = |source| RestartError::Spawn {
            binary: binary.to_path_buf(),
            source,
        };
        let (chan, theirs) = Channel::pair().map_err(spawn_err)?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .env(HANDOVER_FD_ENV, fd.to_string())
            // The watchdog is this process's until the new one becomes the
            // service's main process; then systemd takes its pings.
            .env_remove("WATCHDOG_PID")
            // The etcd lease travels in the state (this process's current
            // one), never as the role-change restart's stale variable.
            .env_remove(crate::lifecycle::LEASE_ENV)
            .stdin(Stdio::null());
        // SAFETY: fcntl is async-signal-safe, and `fd` is open in the child
        // (inherited across fork) until exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                let r = nix::fcntl::fcntl(
                    fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                );
                r.map(|_| ()).map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().map_err(spawn_err)?;
        // Ours closes, so the channel ends when the child does.
        drop(theirs);
        Ok(Successor {
            binary: binary.to_path_buf(),
            child,
            chan,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for its HELLO (it parsed its configuration and waits for the
    /// state); kills it if it says nothing in time.
    pub fn wait_hello(&mut self) -> Result<(), RestartError> {
        match self.next_frame(HELLO_LIMIT, "start")? {
            f if f.tag == HELLO => Ok(()),
            f => Err(self.unexpected(&f)),
        }
    }

    /// Sends the state and its descriptors, then waits until it serves.
    pub fn hand(
        &mut self,
        state: &wire::State,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Served, RestartError> {
        let bytes = state.encode();
        let chan_err = |e: std::io::Error| RestartError::Channel(e.to_string());
        for chunk in bytes.chunks(channel::MAX_FRAME - 1) {
            self.chan.send(STATE, chunk, &[]).map_err(chan_err)?;
        }
        for batch in fds.chunks(MAX_FDS_PER_FRAME) {
            self.chan.send(FDS, &[], batch).map_err(chan_err)?;
        }
        let mut end = (bytes.len() as u64).to_le_bytes().to_vec();
        end.extend_from_slice(&(fds.len() as u32).to_le_bytes());
        self.chan.send(END, &end, &[]).map_err(chan_err)?;
        match self.next_frame(SERVE_LIMIT, "serve")? {
            f if f.tag == SERVING => Ok(Served { pid: self.pid() }),
            f if f.tag == FAILED => {
                let why = String::from_utf8_lossy(&f.body).into_owned();
                let _ = self.reap(Duration::from_secs(5));
                Err(RestartError::Refused {
                    binary: self.binary.clone(),
                    why,
                })
            }
            f => Err(self.unexpected(&f)),
        }
    }

    /// Gives up on it: kills it (if still running) and reaps it.
    pub fn abandon(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Leaves it running (it serves; it outlives this process).
    pub fn release(self) {
        drop(self.chan);
    }

    fn next_frame(&mut self, limit: Duration, what: &'static str) -> Result<Frame, RestartError> {
        match self.chan.recv(limit) {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err(self.ended()),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(RestartError::Silent {
                    binary: self.binary.clone(),
                    what,
                    limit,
                })
            }
            Err(e) => Err(RestartError::Channel(e.to_string())),
        }
    }

    /// The channel closed: it exited (or closed the channel and will).
    fn ended(&mut self) -> RestartError {
        match self.reap(Duration::from_secs(5)) {
            Some(status) => RestartError::Exited {
                binary: self.binary.clone(),
                status,
            },
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                RestartError::Channel("the new process closed the channel without exiting".into())
            }
        }
    }

    fn reap(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn unexpected(&mut self, f: &Frame) -> RestartError {
        let _ = self.child.kill();
        let _ = self.child.wait();
        RestartError::Channel(format!("unexpected frame '{}'", f.tag as char))
    }
}

/// The old daemon, seen from its successor.
pub struct Predecessor {
    chan: Channel,
}

/// What the old daemon handed over.
pub struct Inherited {
    /// The message.
    pub state: wire::State,
    /// The descriptors it refers to, by index.
    pub fds: Vec<Option<OwnedFd>>,
}

impl Inherited {
    /// Takes the descriptor at `index` (once).
    pub fn take_fd(&mut self, index: u32) -> Option<OwnedFd> {
        self.fds.get_mut(index as usize).and_then(Option::take)
    }
}

/// Why a successor could not take over.
#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    /// The environment names no usable descriptor.
    #[error("{HANDOVER_FD_ENV}={0} is not an open descriptor")]
    BadFd(String),
    /// The channel failed.
    #[error("the hand-over channel failed: {0}")]
    Channel(#[from] std::io::Error),
    /// The old process went away before handing over.
    #[error("the old process closed the hand-over channel before handing over")]
    Gone,
    /// A frame out of order or malformed.
    #[error("hand-over protocol error: {0}")]
    Protocol(String),
    /// The state does not decode.
    #[error("the hand-over state does not decode: {0}")]
    Decode(#[from] wire::DecodeError),
}

impl Predecessor {
    /// The channel named in the environment, if this process was started to
    /// take over; the variable is removed (a later re-execution is a plain
    /// start).
    pub fn from_env() -> Option<Result<Predecessor, TakeOverError>> {
        let v = std::env::var(HANDOVER_FD_ENV).ok()?;
        std::env::remove_var(HANDOVER_FD_ENV);
        let fd: i32 = match v.parse() {
            Ok(fd) if fd > 2 => fd,
            _ => return Some(Err(TakeOverError::BadFd(v))),
        };
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            return Some(Err(TakeOverError::BadFd(v)));
        }
        // Close-on-exec again: a role change re-executes this process.
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        // SAFETY: the parent passed this descriptor for us alone; nothing
        // else in this process refers to it.
        let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Some(Ok(Predecessor {
            chan: Channel::from_fd(owned),
        }))
    }

    /// Says this process started and waits for the state.
    pub fn hello(&self) -> Result<(), TakeOverError> {
        self.chan
            .send(HELLO, &std::process::id().to_le_bytes(), &[])?;
        Ok(())
    }

    /// Receives the state and its descriptors.
    pub fn receive(&self) -> Result<Inherited, TakeOverError> {
        let deadline = Instant::now() + STATE_LIMIT;
        let mut bytes = Vec::new();
        let mut fds = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let f = self.chan.recv(left)?.ok_or(TakeOverError::Gone)?;
            match f.tag {
                STATE if bytes.len() + f.body.len() <= wire::MAX_MESSAGE && f.fds.is_empty() => {
                    bytes.extend_from_slice(&f.body)
                }
                FDS if f.body.is_empty()
                    && fds.len() + f.fds.len() <= wire::MAX_CONNS + wire::MAX_LISTENERS =>
                {
                    fds.extend(f.fds)
                }
                END if f.body.len() == 12 && f.fds.is_empty() => {
                    let mut len = [0u8; 8];
                    len.copy_from_slice(&f.body[..8]);
                    let mut n = [0u8; 4];
                    n.copy_from_slice(&f.body[8..]);
                    let (len, n) = (u64::from_le_bytes(len), u32::from_le_bytes(n));
                    if len != bytes.len() as u64 || n as usize != fds.len() {
                        return Err(TakeOverError::Protocol(format!(
                            "the end says {len} bytes and {n} descriptors; {} and {} arrived",
                            bytes.len(),
                            fds.len()
                        )));
                    }
                    let state = wire::State::decode(&bytes, fds.len())?;
                    return Ok(Inherited {
                        state,
                        fds: fds.into_iter().map(Some).collect(),
                    });
                }
                tag => {
                    return Err(TakeOverError::Protocol(format!(
                        "unexpected frame '{}' ({} bytes, {} descriptors)",
                        tag as char,
                        f.body.len(),
                        f.fds.len()
                    )))
                }
            }
        }
    }

    /// Tells the old process this one serves.
    pub fn serving(&self) -> Result<(), TakeOverError> {
        self.chan
            .send(SERVING, &std::process::id().to_le_bytes(), &[])?;
        Ok(())
    }

    /// Tells the old process this one gives up, and why.
    pub fn failed(&self, why: &str) {
        let mut b = why.as_bytes();
        if b.len() > 4000 {
            b = &b[..4000];
        }
        let _ = self.chan.send(FAILED, b, &[]);
    }
}

/// A live restart the admin socket asked for, for the main thread to carry
/// out: the started successor, and where to answer.
pub struct HandOverOrder {
    /// The new process, waiting for the state.
    pub successor: Successor,
    /// The binary it runs.
    pub binary: std::path::PathBuf,
    /// Where the outcome goes (the admin connection answers with it).
    pub answer: std::sync::mpsc::SyncSender<Result<mirrorblk_admin::RestartOutcome, String>>,
    /// Signalled once that answer is written (the process may then end).
    pub written: std::sync::mpsc::Receiver<()>,
}

static HAND_OVER: std::sync::Mutex<Option<HandOverOrder>> = std::sync::Mutex::new(None);

/// Asks the main thread to hand the node over to `order.successor`.
/// Refused (the order given back) while a role-change restart or another
/// hand-over is on its way.
pub fn request_hand_over(order: HandOverOrder) -> Result<(), Box<HandOverOrder>> {
    let mut h = HAND_OVER.lock().unwrap_or_else(|e| e.into_inner());
    if crate::lifecycle::take_restart().is_some() || h.is_some() {
        return Err(Box::new(order));
    }
    *h = Some(order);
    drop(h);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM);
    Ok(())
}

/// Whether a hand-over was asked for and not taken yet.
pub fn hand_over_pending() -> bool {
    HAND_OVER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some()
}

/// The hand-over asked for, if any.
pub fn take_hand_over() -> Option<HandOverOrder> {
    HAND_OVER.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// The binary at this process's own path: what `restart` starts by
/// default (an upgrade replaced the file; `/proc/self/exe` then reads
/// "PATH (deleted)").
pub fn own_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(p) => PathBuf::from(p),
        None => exe,
    }
}

/// The very binary this process runs, even if its file was replaced or
/// removed: the fallback when the asked binary fails after the hand-over.
pub fn running_binary() -> PathBuf {
    PathBuf::from("/proc/self/exe")
}

/// Borrows every descriptor of a list (for sending).
pub fn borrow_all(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}
