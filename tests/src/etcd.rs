//! A real etcd for the failover tests: Debian's `etcd-server` (`/usr/bin/etcd`,
//! 3.4) started on free loopback ports in a data directory of the test's,
//! killed with `-9` and restarted on the same ports and data, stopped by PID
//! when dropped.
//!
//! The tests read the coordinator's keys (`/mirrorblk/<volume>/leader` and
//! the like) with the daemon's own etcd client and records
//! (`mirrorblk-etcd`, over etcd's JSON gateway); readiness is a v3 range
//! through that gateway answering.
//!
//! An etcd started inside a network namespace ([`Etcd::start_in_netns`]) is
//! talked to from a thread that joined that namespace (`setns(2)` moves the
//! calling thread only), so the test process stays in the host's.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mirrorblk_etcd::records::{decode, LeaderRecord, VolumeKeys};
use mirrorblk_etcd::{Client, EtcdError, KeyValue};

/// The binary, as Debian's `etcd-server` installs it.
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// How long etcd may take from exec to answering `/health` (a loaded
/// 2-core machine, a data directory to replay after a restart).
pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one request to etcd may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times etcd is started on new ports when the ones picked were
/// taken between the probe and its bind.
const PORT_ATTEMPTS: usize = 5;
/// How many lines of etcd's log a failing test shows.
const LOG_TAIL_LINES: usize = 40;

/// Why a request to the test's etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdCallError {
    /// etcd answered with an error or did not answer.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The thread that joins the network namespace failed.
    #[error("network namespace {ns}: {why}")]
    Netns {
        /// The namespace.
        ns: String,
        /// What failed.
        why: String,
    },
}

/// A running (or killed) etcd of this test's.
#[derive(Debug)]
pub struct Etcd {
    data_dir: PathBuf,
    log_path: PathBuf,
    client: SocketAddr,
    peer: SocketAddr,
    /// The network namespace it runs in (None: the host's).
    netns: Option<String>,
    child: Option<Child>,
}

/// Fails the test with how to get etcd when it is not installed.
#[track_caller]
fn require_binary() {
    assert!(
        Path::new(ETCD_BIN).exists(),
        "{ETCD_BIN} not found: the failover tests need a real etcd; apt-get install etcd-server"
    );
}

impl Etcd {
    /// Starts etcd with its data in `dir/etcd` on two free loopback ports
    /// (client and peer) and waits until it answers a range; panics with
    /// its log otherwise.
    #[track_caller]
    pub fn start(dir: &Path) -> Etcd {
        require_binary();
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let client = SocketAddr::new(ip, crate::cluster::pick_port());
            let peer = SocketAddr::new(ip, crate::cluster::pick_port());
            if client == peer {
                continue;
            }
            let mut e = Etcd::new(dir, client, peer, None);
            match e.spawn() {
                Ok(()) => return e,
                Err(why) if why.contains("address already in use") => {
                    // A fresh member again: the data directory names its ports.
                    let _ = std::fs::remove_dir_all(&e.data_dir);
                    last = why;
                }
                Err(why) => panic!("etcd did not start: {why}"),
            }
        }
        panic!("etcd could not bind free ports in {PORT_ATTEMPTS} attempts; last failure: {last}");
    }

    /// Starts etcd inside network namespace `ns` on `ip` (an address of that
    /// namespace), client port 2379 and peer port 2380 there.
    #[track_caller]
    pub fn start_in_netns(dir: &Path, ns: &str, ip: IpAddr) -> Etcd {
        require_binary();
        let mut e = Etcd::new(
            dir,
            SocketAddr::new(ip, 2379),
            SocketAddr::new(ip, 2380),
            Some(ns.to_string()),
        );
        e.spawn()
            .unwrap_or_else(|why| panic!("etcd did not start in {ns}: {why}"));
        e
    }

    fn new(dir: &Path, client: SocketAddr, peer: SocketAddr, netns: Option<String>) -> Etcd {
        let home = dir.join("etcd");
        std::fs::create_dir_all(&home).unwrap_or_else(|e| panic!("create {}: {e}", home.display()));
        Etcd {
            data_dir: home.join("data"),
            log_path: home.join("etcd.log"),
            client,
            peer,
            netns,
            child: None,
        }
    }

    /// The client URL, for `--etcd`.
    pub fn url(&self) -> String {
        format!("http://{}", self.client)
    }

    /// Its client address.
    pub fn client_addr(&self) -> SocketAddr {
        self.client
    }

    /// PID of the running etcd.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("etcd is not running").id()
    }

    /// Whether it runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Starts the process and waits until it is healthy; the reason
    /// (with its log's tail) if it is not.
    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "etcd is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| format!("open {}: {e}", self.log_path.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("dup the log file: {e}"))?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, ETCD_BIN]);
                c
            }
            None => Command::new(ETCD_BIN),
        };
        let child = cmd
            .args(self.flags())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot run {ETCD_BIN}: {e}"))?;
        self.child = Some(child);
        self.wait_healthy()
    }

    /// A single-member cluster on its two addresses; a restart finds the
    /// member in its data directory and ignores the `--initial-*` flags.
    fn flags(&self) -> Vec<String> {
        let (c, p) = (self.url(), format!("http://{}", self.peer));
        vec![
            "--name".into(),
            "test".into(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--listen-client-urls".into(),
            c.clone(),
            "--advertise-client-urls".into(),
            c,
            "--listen-peer-urls".into(),
            p.clone(),
            "--initial-advertise-peer-urls".into(),
            p.clone(),
            "--initial-cluster".into(),
            format!("test={p}"),
            // Keeps the data directory small and the tests' disk use bounded.
            "--quota-backend-bytes".into(),
            (256u64 << 20).to_string(),
        ]
    }

    /// Polls a v3 range every 50 ms until it answers, the process exits or
    /// [`ETCD_START_TIMEOUT`] passes (then it is killed).
    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + ETCD_START_TIMEOUT;
        loop {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!("etcd exited with {st}; {}", self.log_tail()));
            }
            if let Ok(Ok(_)) = self.call(|c| c.get("/mirrorblk/")) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill9();
                return Err(format!(
                    "etcd did not answer a range within {ETCD_START_TIMEOUT:?} (killed); {}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9` (by PID) and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the PID of our own unreaped child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and data directory (it must be
    /// stopped) and waits until it is healthy; panics with its log otherwise.
    #[track_caller]
    pub fn restart(&mut self) {
        if let Err(why) = self.spawn() {
            panic!("etcd did not restart: {why}");
        }
    }

    /// The last lines of its log (all runs), headed for a failure message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(LOG_TAIL_LINES);
        format!(
            "last lines of {}:\n{}",
            self.log_path.display(),
            lines[from..].join("\n")
        )
    }

    /// A client of it (from the host's network namespace).
    pub fn client(&self) -> Client {
        Client::new(&[self.url()], REQUEST_TIMEOUT).expect("a valid etcd URL")
    }

    /// Runs `f` with a client of it, from inside its network namespace
    /// when it has one.
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Client) -> T + Send + 'static,
    ) -> Result<T, EtcdCallError> {
        let client = self.client();
        match &self.netns {
            None => Ok(f(&client)),
            Some(ns) => in_netns(ns, move || f(&client)),
        }
    }

    /// The key `key`, if it exists.
    pub fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdCallError> {
        let key = key.to_string();
        Ok(self.call(move |c| c.get(&key))??)
    }

    /// The leader record of `volume`, if a primary holds it (panics on a
    /// value that is not one).
    #[track_caller]
    pub fn leader(&self, volume: &str) -> Result<Option<LeaderRecord>, EtcdCallError> {
        let kv = self.get(&VolumeKeys::new(volume).leader())?;
        Ok(kv.map(|kv| decode(&kv).unwrap_or_else(|e| panic!("{e}"))))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!("etcd at {}: {}", self.client, self.log_tail());
        }
        self.kill9();
    }
}

/// Runs `f` on a thread that joined network namespace `ns` (by its
/// `/var/run/netns` name) and returns its result.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, EtcdCallError> {
    use std::os::fd::AsRawFd;
    let fail = |why: String| EtcdCallError::Netns {
        ns: ns.to_string(),
        why,
    };
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).map_err(|e| fail(format!("open {path}: {e}")))?;
    let joined = std::thread::spawn(move || {
        // SAFETY: setns(2) on a descriptor this thread keeps open; it moves
        // only the calling thread, which ends with `f`.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| fail("the thread in the namespace panicked".into()))?;
    joined.map_err(fail)
}

/// Answered keep-alives: how many, the last one's time, and a wake-up.
type Renewals = (Mutex<(u64, Option<Instant>)>, Condvar);

/// A TCP proxy in front of etcd for one node, which notes each answered
/// lease keep-alive of that node (etcd's client sends one HTTP request per
/// connection, so a connection whose request names `/v3/lease/keepalive`
/// is answered when etcd closes it). A test can then kill etcd right after
/// a renewal, when the node's lease has its whole TTL left: the moment its
/// fencing deadline is known to within a round trip.
pub struct KeepAliveWatch {
    addr: SocketAddr,
    answered: Arc<Renewals>,
    stop: Arc<AtomicBool>,
}

impl KeepAliveWatch {
    /// Listens on a free loopback port and relays each connection to `etcd`.
    pub fn start(etcd: SocketAddr) -> KeepAliveWatch {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = l.local_addr().expect("local address");
        l.set_nonblocking(true).expect("nonblocking listener");
        let answered = Arc::new((Mutex::new((0, None)), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (answered.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        let a = a.clone();
                        std::thread::spawn(move || relay(c, etcd, &a));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        KeepAliveWatch {
            addr,
            answered,
            stop,
        }
    }

    /// The URL to give the node as `--etcd`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many keep-alives were answered so far.
    pub fn count(&self) -> u64 {
        self.answered.0.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Waits (at most `timeout`) for a keep-alive answered after the
    /// `after`-th one and returns when it was answered.
    pub fn wait_answered(&self, after: u64, timeout: Duration) -> Option<Instant> {
        let (lock, cond) = &*self.answered;
        let deadline = Instant::now() + timeout;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        while g.0 <= after {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            g = cond
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        g.1
    }
}

impl Drop for KeepAliveWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Relays one connection; notes it when it carried an answered keep-alive.
fn relay(client: TcpStream, etcd: SocketAddr, answered: &Renewals) {
    let Ok(server) = TcpStream::connect_timeout(&etcd, REQUEST_TIMEOUT) else {
        return;
    };
    let (Ok(mut c_in), Ok(mut s_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let upstream = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut keepalive = false;
        while let Ok(n) = c_in.read(&mut buf) {
            if n == 0 || s_out.write_all(&buf[..n]).is_err() {
                break;
            }
            keepalive |= buf[..n].windows(19).any(|w| w == b"/v3/lease/keepalive");
        }
        let _ = s_out.shutdown(Shutdown::Write);
        keepalive
    });
    let (mut s_in, mut c_out) = (server, client);
    let mut buf = [0u8; 4096];
    let mut got = 0usize;
    while let Ok(n) = s_in.read(&mut buf) {
        if n == 0 || c_out.write_all(&buf[..n]).is_err() {
            break;
        }
        got += n;
    }
    let _ = c_out.shutdown(Shutdown::Both);
    if upstream.join().unwrap_or(false) && got > 0 {
        let (lock, cond) = answered;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        *g = (g.0 + 1, Some(Instant::now()));
        cond.notify_all();
    }
}
