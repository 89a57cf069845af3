//! A hostile crowd on loopback: connections that never negotiate, and
//! "slowloris" connections that send one byte a second, from many source
//! addresses (127.0.0.2 and up), to check that a daemon keeps serving its
//! legitimate clients with a constant number of threads and bounded memory.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Source addresses the crowd connects from (127.0.0.2 ..).
pub const SOURCES: u8 = 100;

/// What a slowloris connection trickles: NBD client flags, then an option
/// header announcing a large payload (the same bytes delay a replication
/// HELLO).
const TRICKLE: &[u8] = &[
    0, 0, 0, 3, b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', 0, 0, 0, 3, 0, 0, 0xff, 0xff,
];

/// Raises this process's open-file limit to at least `n` (children inherit
/// it); panics when the hard limit cannot be raised that far.
pub fn raise_nofile(n: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        if r.rlim_cur >= n {
            return;
        }
        r.rlim_cur = n;
        r.rlim_max = r.rlim_max.max(n);
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &r),
            0,
            "cannot raise RLIMIT_NOFILE to {n}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The thread count of process `pid` (from /proc).
pub fn threads(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads: in /proc/PID/status")
}

/// A TCP connection to `to` from `from` (port chosen by the kernel).
pub fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(to) = to else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket owned by the TcpStream below (or closed on error);
    // the addresses are valid sockaddr_in structs of `len` bytes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = TcpStream::from_raw_fd(fd);
        let a = sin(from, 0);
        if libc::bind(fd, (&a as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let b = sin(*to.ip(), to.port());
        if libc::connect(fd, (&b as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }
}

/// A crowd of hostile connections; dropping it closes them all.
pub struct Flood {
    idle: Vec<TcpStream>,
    stop: Arc<AtomicBool>,
    trickler: Option<JoinHandle<()>>,
    /// Connections opened (idle + slow).
    pub opened: usize,
}

impl Flood {
    /// Opens `idle` silent connections and `slow` slowloris ones to `to`,
    /// round-robin over [`SOURCES`] source addresses; gives up on opening
    /// after `limit`. Connections the server refuses or drops at once count
    /// as opened all the same: the crowd keeps coming.
    pub fn open(to: SocketAddr, idle: usize, slow: usize, limit: Duration) -> Flood {
        let deadline = Instant::now() + limit;
        let mut conns = Vec::with_capacity(idle + slow);
        for i in 0..idle + slow {
            if Instant::now() >= deadline {
                break;
            }
            let from = Ipv4Addr::new(127, 0, 0, 2 + (i % SOURCES as usize) as u8);
            match connect_from(from, to) {
                Ok(s) => conns.push(s),
                Err(e) => eprintln!("flood: connection {i} failed: {e}"),
            }
        }
        let opened = conns.len();
        let slow_conns = conns.split_off(conns.len().saturating_sub(slow));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let trickler = std::thread::spawn(move || trickle(slow_conns, &flag));
        Flood {
            idle: conns,
            stop,
            trickler: Some(trickler),
            opened,
        }
    }
}

/// One byte a second on each slow connection until `stop` (bounded: the
/// prefix is sent once, then the connections just stay open).
fn trickle(mut conns: Vec<TcpStream>, stop: &AtomicBool) {
    for s in &conns {
        let _ = s.set_nonblocking(true);
    }
    let mut at = 0;
    while !stop.load(Ordering::Acquire) {
        if at < TRICKLE.len() {
            for s in conns.iter_mut() {
                let _ = s.write(&TRICKLE[at..at + 1]);
            }
            at += 1;
        }
        for _ in 0..10 {
            if stop.load(Ordering::Acquire) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.trickler.take() {
            let _ = t.join();
        }
        self.idle.clear();
    }
}
