//! The etcd of `mirrorblk demo --auto-failover`: Debian's `etcd-server`
//! (`/usr/bin/etcd`) as a single member on two loopback ports, its data and
//! log in the demo directory, stopped by its PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The binary, as Debian's `etcd-server` installs it.
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// How long etcd may take to answer after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the demo's etcd is not running.
#[derive(Debug)]
pub enum EtcdStartError {
    /// `/usr/bin/etcd` is not installed.
    Missing,
    /// It could not be run, or exited, or did not answer in time.
    Failed(String),
}

impl std::fmt::Display for EtcdStartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EtcdStartError::Missing => write!(
                f,
                "{ETCD_BIN} not found: --auto-failover needs etcd; install it with: sudo apt-get install etcd-server"
            ),
            EtcdStartError::Failed(why) => write!(f, "etcd did not start: {why}"),
        }
    }
}

/// A running etcd of the demo's.
pub struct DemoEtcd {
    child: Child,
    url: String,
    log: PathBuf,
}

impl DemoEtcd {
    /// Starts etcd with its data in `dir/etcd` and its log in
    /// `dir/etcd.log`, clients on `host:client_port` and peers on
    /// `host:peer_port`, and waits until it answers.
    pub fn start(
        dir: &Path,
        host: &str,
        client_port: u16,
        peer_port: u16,
    ) -> Result<DemoEtcd, EtcdStartError> {
        if !Path::new(ETCD_BIN).exists() {
            return Err(EtcdStartError::Missing);
        }
        let url = format!("http://{host}:{client_port}");
        let peer = format!("http://{host}:{peer_port}");
        let log = dir.join("etcd.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| EtcdStartError::Failed(format!("open {}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| EtcdStartError::Failed(e.to_string()))?;
        let data = dir.join("etcd");
        let child = Command::new(ETCD_BIN)
            .arg("--name=demo")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=demo={peer}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| EtcdStartError::Failed(format!("cannot run {ETCD_BIN}: {e}")))?;
        let mut etcd = DemoEtcd { child, url, log };
        etcd.wait_answering()?;
        Ok(etcd)
    }

    /// Polls a range every 100 ms until etcd answers; stops it on failure.
    fn wait_answering(&mut self) -> Result<(), EtcdStartError> {
        let client = mirrorblk_etcd::Client::new(&[self.url.as_str()], Duration::from_secs(1))
            .map_err(|e| EtcdStartError::Failed(e.to_string()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if client.get("/mirrorblk/").is_ok() {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(EtcdStartError::Failed(format!(
                    "it exited ({st}); see {}",
                    self.log.display()
                )));
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(EtcdStartError::Failed(format!(
                    "no answer within {START_TIMEOUT:?}; see {}",
                    self.log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its client URL, for `--etcd`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// SIGTERM (by PID) and wait; whether it ended as asked (etcd ends
    /// by the signal it got, not with status 0).
    pub fn stop(&mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        if let Ok(Some(st)) = self.child.try_wait() {
            return st.success();
        }
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        match self.child.wait() {
            Ok(st) if st.success() || st.signal() == Some(libc::SIGTERM) => true,
            Ok(st) => {
                eprintln!(
                    "mirrorblk: etcd stopped with {st}; see {}",
                    self.log.display()
                );
                false
            }
            Err(e) => {
                eprintln!("mirrorblk: waiting for etcd failed: {e}");
                false
            }
        }
    }
}
