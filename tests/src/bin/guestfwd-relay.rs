//! The kernel tests' only network path out of the guest.
//!
//! qemu's user-mode network runs this once per guest TCP connection to the
//! forwarded endpoint (`guestfwd=tcp:10.0.2.100:10809-cmd:guestfwd-relay
//! PORT_FILE WAIT_SECS`), with the guest connection on stdin and stdout. It
//! reads a port number from PORT_FILE, connects to 127.0.0.1 on that port (a
//! fresh host connection for every guest connection, so the guest can
//! reconnect; qemu's plain `guestfwd=...-tcp:` would share one connection
//! opened at start-up), and copies bytes both ways until either side
//! closes, then exits.
//!
//! The test moves the guest to another server (failover) by rewriting
//! PORT_FILE; connections already open are not touched. While no server
//! accepts, the relay keeps trying for WAIT_SECS (re-reading PORT_FILE each
//! time), the way a client sees a floating address that is being moved: a
//! reconnect made during the failover waits for the new primary instead of
//! being refused. After WAIT_SECS it gives up and closes the guest's
//! connection, which is how a missing server shows up in the guest.
//!
//! Only 127.0.0.1 is ever reached.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args_os().skip(1);
    let (Some(port_file), wait, None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: guestfwd-relay PORT_FILE [WAIT_SECS]");
        std::process::exit(2);
    };
    let wait = wait
        .and_then(|w| w.to_str()?.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or_default();
    let deadline = Instant::now() + wait;
    let host = loop {
        let attempt = std::fs::read_to_string(&port_file)
            .map_err(|e| format!("cannot read {}: {e}", port_file.to_string_lossy()))
            .and_then(|s| {
                s.trim()
                    .parse::<u16>()
                    .map_err(|e| format!("bad port {s:?}: {e}"))
            })
            .and_then(|port| {
                TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))
                    .map_err(|e| format!("cannot connect to 127.0.0.1:{port}: {e}"))
            });
        match attempt {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                eprintln!("guestfwd-relay: {e}; giving up");
                std::process::exit(1);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let _ = host.set_nodelay(true);
    let host_r = host.try_clone().expect("clone the host socket");

    // SAFETY: fds 0 and 1 are the guest connection qemu gave this process;
    // each is owned by exactly one File from here on.
    let mut guest_in = unsafe { std::fs::File::from_raw_fd(0) };
    // SAFETY: as above, for fd 1.
    let mut guest_out = unsafe { std::fs::File::from_raw_fd(1) };

    // Guest to host on a thread, host to guest here; whichever direction
    // ends first ends the process, so a closed side never leaves the other
    // half-open (the guest must see a dead server as a closed connection).
    std::thread::spawn(move || {
        let mut host_w = host;
        let _ = copy(&mut guest_in, &mut host_w);
        let _ = host_w.shutdown(Shutdown::Both);
        std::process::exit(0);
    });
    let mut host_r = host_r;
    let _ = copy(&mut host_r, &mut guest_out);
    let _ = host_r.shutdown(Shutdown::Both);
    std::process::exit(0);
}

/// Copies until end of stream or an error, flushing every chunk.
fn copy(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}
