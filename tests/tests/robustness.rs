//! Robustness against misbehaving clients (DESIGN.md invariant 4): bad input
//! yields a precise error or a closed connection, never a crash, a hang of
//! other clients, or corrupted data. Every test keeps a second, already
//! connected "witness" client and checks that it still works, and that the
//! data it wrote before is intact, after the bad client is done.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirrorblk_tests::daemon::args;
use mirrorblk_tests::util::{assert_bytes_eq, pattern, Rng, MIB};
use mirrorblk_tests::{Daemon, TestDir};
use nbd::client::encode_request;
use nbd::{Client, Command, CommandFlags, ErrorCode, Request};

const SIZE: u64 = 64 * MIB;

/// Regions the witness writes before the bad client arrives. Region 0 starts
/// at offset 0, where most bad requests point.
const REGIONS: [(u64, usize); 4] = [
    (0, 65536),
    (MIB + 17, 100_000),
    (8 * MIB, 4096),
    (SIZE - 8192, 8192),
];

/// A client connected before the misbehaving one; it must keep working.
struct Witness {
    c: Client<TcpStream>,
    round: u64,
}

impl Witness {
    /// Connects and writes the known regions (FUA, so they are durable).
    fn new(d: &Daemon) -> Witness {
        let mut c = d.connect("vol0");
        for (i, &(off, len)) in REGIONS.iter().enumerate() {
            c.write(off, &pattern(100 + i as u64, len), true)
                .expect("witness setup write");
        }
        Witness { c, round: 0 }
    }

    /// Reads the regions back, then writes and reads a fresh block.
    #[track_caller]
    fn check(&mut self) {
        for (i, &(off, len)) in REGIONS.iter().enumerate() {
            let got = self
                .c
                .read(off, len as u32)
                .unwrap_or_else(|e| panic!("witness read failed: {e}"));
            assert_bytes_eq(
                &format!("witness region {i}"),
                off,
                &pattern(100 + i as u64, len),
                &got,
            );
        }
        self.round += 1;
        let off = 16 * MIB + self.round * 4096;
        let data = pattern(5000 + self.round, 4096);
        self.c
            .write(off, &data, false)
            .unwrap_or_else(|e| panic!("witness write failed: {e}"));
        assert_bytes_eq(
            "witness fresh write",
            off,
            &data,
            &self.c.read(off, 4096).unwrap(),
        );
    }
}

/// Reads from `s` until the server closes the connection; panics if it is
/// still open after `timeout` (a bad client must not be kept forever).
#[track_caller]
fn expect_closed(s: &mut TcpStream, timeout: Duration, what: &str) {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return, // reset: closed too
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the server kept the connection open for {timeout:?}"
        );
    }
}

fn start() -> (TestDir, Daemon) {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "64M"));
    (dir, d)
}

/// Random bytes instead of the client's handshake (both before and after
/// reading the server greeting): the server closes that connection quickly.
#[test]
fn garbage_instead_of_handshake() {
    let (_dir, mut d) = start();
    let mut w = Witness::new(&d);
    let mut rng = Rng::new(1);
    for read_greeting in [false, true] {
        let mut s = d.tcp();
        if read_greeting {
            let mut g = [0u8; 18];
            s.read_exact(&mut g).expect("server greeting");
        }
        let mut junk = vec![0u8; 4096];
        rng.fill(&mut junk);
        // The server may close as soon as the first bytes are wrong.
        let _ = s.write_all(&junk);
        expect_closed(&mut s, Duration::from_secs(10), "garbage handshake");
        d.assert_running();
        w.check();
    }
}

/// A valid handshake followed by a request with a bad magic: that connection
/// is closed with a log line naming the violation; the others go on.
#[test]
fn bad_request_magic_after_handshake() {
    let (_dir, mut d) = start();
    let mut w = Witness::new(&d);
    let mut c = d.connect("vol0");
    let mut hdr = encode_request(&Request {
        flags: CommandFlags::empty(),
        command: Command::Read,
        cookie: 1,
        offset: 0,
        length: 4096,
    });
    hdr[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    c.get_mut().write_all(&hdr).unwrap();
    c.get_mut().write_all(&[0x55; 100]).unwrap();
    let mut s = c.into_inner();
    expect_closed(&mut s, Duration::from_secs(10), "bad request magic");
    let line = d.wait_for_log("closing connection", Duration::from_secs(5));
    assert!(
        line.contains("protocol violation"),
        "log line should name the violation: {line}"
    );
    d.assert_running();
    w.check();
}

/// Half a request header, then the client goes away.
#[test]
fn truncated_request_header_then_close() {
    let (_dir, mut d) = start();
    let mut w = Witness::new(&d);
    let mut c = d.connect("vol0");
    let hdr = encode_request(&Request {
        flags: CommandFlags::empty(),
        command: Command::Write,
        cookie: 7,
        offset: 0,
        length: 4096,
    });
    c.get_mut().write_all(&hdr[..10]).unwrap();
    c.get_mut().shutdown(Shutdown::Both).unwrap();
    drop(c);
    let line = d.wait_for_log("closing connection", Duration::from_secs(5));
    assert!(
        line.contains("request header"),
        "log line should say where the client stopped: {line}"
    );
    d.assert_running();
    w.check();
}

/// A WRITE header claiming 4 GiB (0xFFFFFFFF bytes), followed by 1 MiB of
/// it: far beyond the advertised maximum, so the server closes the
/// connection without buffering it (resident memory stays bounded) and
/// without touching offset 0.
#[test]
fn write_of_4_gib_is_refused_without_buffering() {
    let (_dir, mut d) = start();
    let mut w = Witness::new(&d);
    let rss_before = d.rss_bytes();
    let mut c = d.connect("vol0");
    let hdr = encode_request(&Request {
        flags: CommandFlags::empty(),
        command: Command::Write,
        cookie: 9,
        offset: 0,
        length: u64::from(u32::MAX),
    });
    c.get_mut().write_all(&hdr).unwrap();
    // The server may close before all of this arrives; that is the point.
    let junk = vec![0xeeu8; MIB as usize];
    let _ = c.get_mut().write_all(&junk);
    let mut s = c.into_inner();
    expect_closed(&mut s, Duration::from_secs(10), "4 GiB write");
    let rss_after = d.rss_bytes();
    assert!(
        rss_after < rss_before + 256 * MIB,
        "RSS grew from {rss_before} to {rss_after} bytes after a 4 GiB write header"
    );
    let line = d.wait_for_log("closing connection", Duration::from_secs(5));
    assert!(
        line.contains("protocol violation"),
        "log line should name the violation: {line}"
    );
    d.assert_running();
    w.check();
}

/// A WRITE of 1 MiB over a witness region whose payload stops after 100 KiB
/// (client gone): the partial write must not reach the volume.
#[test]
fn disconnect_in_the_middle_of_a_write_payload() {
    let (_dir, mut d) = start();
    let mut w = Witness::new(&d);
    let mut c = d.connect("vol0");
    let (off, _) = REGIONS[1];
    let hdr = encode_request(&Request {
        flags: CommandFlags::FUA,
        command: Command::Write,
        cookie: 3,
        offset: off,
        length: MIB,
    });
    c.get_mut().write_all(&hdr).unwrap();
    c.get_mut().write_all(&vec![0x99u8; 100 * 1024]).unwrap();
    c.get_mut().shutdown(Shutdown::Both).unwrap();
    drop(c);
    let line = d.wait_for_log("closing connection", Duration::from_secs(5));
    assert!(
        line.contains("write payload"),
        "log line should say the payload was cut: {line}"
    );
    d.assert_running();
    // check() verifies region 1 still holds the witness data, not 0x99.
    w.check();
}

/// 200 quick connections that give up at every stage (before the greeting,
/// mid-handshake, after GO with or without DISC, with a request in flight),
/// while a witness thread keeps doing verified I/O. With
/// `--max-connections 64`, connection slots leaked by the storm would show
/// as refused connections when 48 clients then attach at once.
#[test]
fn quick_connect_disconnect_cycles_while_another_client_works() {
    let dir = TestDir::new();
    let mut a = dir.volume_args("vol0", "64M");
    a.extend(args(["--max-connections", "64"]));
    let mut d = Daemon::start(a);
    let mut w = Witness::new(&d);
    let stop = Arc::new(AtomicBool::new(false));
    let witness = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                w.check();
                slowest = slowest.max(t.elapsed());
                rounds += 1;
            }
            (w, rounds, slowest)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..200u32 {
        assert!(
            Instant::now() < deadline,
            "connect/disconnect cycles took longer than 60 s (stopped at {i})"
        );
        match i % 6 {
            0 => drop(d.tcp()),
            1 => {
                let mut s = d.tcp();
                let mut g = [0u8; 18];
                s.read_exact(&mut g)
                    .unwrap_or_else(|e| panic!("cycle {i}: no greeting: {e}"));
            }
            2 => {
                let mut s = d.tcp();
                let mut g = [0u8; 18];
                s.read_exact(&mut g)
                    .unwrap_or_else(|e| panic!("cycle {i}: no greeting: {e}"));
                // Client flags, then half an option header.
                let _ = s.write_all(&[0, 0, 0, 3, 0x49, 0x48, 0x41, 0x56]);
            }
            3 => drop(d.connect("vol0")),
            4 => {
                let mut c = d.connect("vol0");
                c.read(0, 512)
                    .unwrap_or_else(|e| panic!("cycle {i}: read: {e}"));
                c.disconnect().unwrap();
            }
            _ => {
                // A write in flight when the client vanishes (its range is
                // not checked: it may or may not have been applied).
                let mut c = d.connect("vol0");
                let req = Request {
                    flags: CommandFlags::empty(),
                    command: Command::Write,
                    cookie: 1,
                    offset: 32 * MIB,
                    length: 65536,
                };
                c.submit(&req, Some(&[0x11; 65536])).unwrap();
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (mut w, rounds, slowest) = witness
        .join()
        .expect("the witness client failed during the connection storm");
    assert!(rounds > 0, "the witness made no progress");
    assert!(
        slowest < Duration::from_secs(5),
        "a witness round took {slowest:?} during the storm"
    );
    d.assert_running();
    // No slot leaked: 48 clients (plus the witness) fit under the limit of
    // 64 at the same time. Slots of the storm's connections are freed
    // asynchronously, so each attach is retried for a short while.
    let mut held = Vec::new();
    for i in 0..48 {
        let mut c = mirrorblk_tests::util::poll_until(
            Duration::from_secs(5),
            &format!("connection {i} of 48 held open after the storm"),
            || Client::connect(d.tcp(), "vol0", false).ok(),
        );
        c.read(0, 4096).expect("read after the storm");
        held.push(c);
    }
    w.check();
}

/// Requests outside the export get the NBD error the spec asks for (EINVAL
/// for reads/trims, ENOSPC for writes/zeroes), including offsets that would
/// overflow, with simple and structured replies; a rejected write's payload
/// is drained, and the connection stays usable after every error.
#[test]
fn out_of_range_requests_get_the_right_errors() {
    let (_dir, mut d) = start();
    let mut w = Witness::new(&d);
    let einval = Some(ErrorCode::Inval.code());
    let enospc = Some(ErrorCode::NoSpc.code());
    let mut wrong = Vec::new();
    for structured in [false, true] {
        let mut c = if structured {
            d.connect_structured("vol0")
        } else {
            d.connect("vol0")
        };
        let cases: Vec<(&str, Command, u64, u32, Option<u32>)> = vec![
            (
                "read across the end",
                Command::Read,
                SIZE - 4096,
                8192,
                einval,
            ),
            ("read at the end", Command::Read, SIZE, 1, einval),
            (
                "read with overflowing offset",
                Command::Read,
                u64::MAX - 10,
                100,
                einval,
            ),
            (
                "write across the end",
                Command::Write,
                SIZE - 4096,
                8192,
                enospc,
            ),
            ("write at the end", Command::Write, SIZE, 1, enospc),
            (
                "write with overflowing offset",
                Command::Write,
                u64::MAX - 100,
                4096,
                enospc,
            ),
            (
                "write-zeroes across the end",
                Command::WriteZeroes,
                SIZE - 4096,
                8192,
                enospc,
            ),
            (
                "trim across the end",
                Command::Trim,
                SIZE - 4096,
                8192,
                einval,
            ),
        ];
        for (what, cmd, off, len, want) in cases {
            let payload = (cmd == Command::Write).then(|| vec![0xabu8; len as usize]);
            let r = c
                .execute(
                    cmd,
                    CommandFlags::empty(),
                    off,
                    u64::from(len),
                    payload.as_deref(),
                )
                .unwrap_or_else(|e| {
                    panic!("{what} (structured={structured}): connection failed: {e}")
                });
            if r.error != want {
                wrong.push(format!(
                    "{what} (structured={structured}): want error {want:?}, got {:?}",
                    r.error
                ));
            }
            // Still usable, and nothing was written where it must not be.
            assert_bytes_eq(
                &format!("after {what}"),
                0,
                &pattern(100, 4096),
                &c.read(0, 4096).unwrap(),
            );
        }
        // The last valid byte is still readable (it belongs to witness region 3).
        assert_eq!(
            c.read(SIZE - 1, 1).unwrap(),
            pattern(103, 8192)[8191..].to_vec()
        );
    }
    d.assert_running();
    w.check();
    assert!(wrong.is_empty(), "wrong NBD errors:\n{}", wrong.join("\n"));
}

/// A tmpfs of a fixed size mounted in the test's directory (unmounted on drop).
struct SmallFs {
    path: std::path::PathBuf,
}

impl SmallFs {
    fn mount(path: std::path::PathBuf, size: &str) -> Result<SmallFs, String> {
        std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(SmallFs { path })
    }

    fn resize(&self, size: &str) {
        let st = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .expect("run mount");
        assert!(st.success(), "remounting the tmpfs with size {size} failed");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

/// A data store that fills up (a sparse 64 MiB file on a 24 MiB tmpfs; the
/// journal lives elsewhere): once the applier cannot write, new writes get
/// ENOSPC at once instead of hanging, every acknowledged write still reads
/// back (from the journal's overlay), and once the filesystem grows the
/// applier catches up, writes are accepted again, and a clean restart keeps
/// everything.
#[test]
fn full_data_store_refuses_writes_with_enospc_and_recovers() {
    let dir = TestDir::new();
    let fs = match SmallFs::mount(dir.join("small"), "24M") {
        Ok(fs) => fs,
        Err(why) => {
            println!("SKIP: cannot mount a small tmpfs here: {why}");
            return;
        }
    };
    let data = fs.path.join("vol0.data");
    let mut d = Daemon::start(args([
        "--export",
        "vol0",
        "--data",
        data.to_str().expect("utf-8 path"),
        "--journal",
        dir.join("vol0.journal").to_str().expect("utf-8 path"),
        "--size",
        "64M",
        "--journal-size",
        "16M",
        "--preallocate",
        "sparse",
        "--listen",
        "127.0.0.1:0",
    ]));
    let mut c = d.connect("vol0");
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..64u64 {
        match c.write(i * MIB, &pattern(i, MIB as usize), false) {
            Ok(()) => acked.push(i),
            Err(nbd::ClientError::Server(code)) => {
                refused = Some((i, code));
                break;
            }
            Err(e) => panic!("write {i}: {e} (the server must answer, not hang)"),
        }
    }
    let (at, code) =
        refused.unwrap_or_else(|| panic!("64 MiB written to a 24 MiB filesystem without ENOSPC"));
    assert_eq!(
        code,
        ErrorCode::NoSpc as u32,
        "write {at} failed with {code}, want ENOSPC"
    );
    assert!(
        acked.len() >= 8,
        "only {} writes acknowledged before ENOSPC",
        acked.len()
    );
    // The line is logged before the first refusal, but the harness reads
    // the daemon's stderr on its own thread: wait for it, bounded.
    d.wait_for_log("the data store is full", Duration::from_secs(5));
    // The 1 MiB writes went to the store in place until it filled; the one
    // that hit ENOSPC there was journaled instead (and acknowledged).
    d.wait_for_log("journaling its data instead", Duration::from_secs(5));
    for &i in &acked {
        assert!(
            c.read(i * MIB, MIB as u32).expect("read") == pattern(i, MIB as usize),
            "acknowledged MiB {i} lost"
        );
    }

    fs.resize("96M");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.write(at * MIB, &pattern(at, MIB as usize), false) {
            Ok(()) => break,
            Err(nbd::ClientError::Server(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("writes not accepted again after the filesystem grew: {e}"),
        }
    }
    acked.push(at);
    drop(c);
    let st = d.terminate();
    assert!(st.success(), "exit {st:?}");
    d.restart();
    let mut c = d.connect("vol0");
    for &i in &acked {
        assert!(
            c.read(i * MIB, MIB as u32).expect("read") == pattern(i, MIB as usize),
            "acknowledged MiB {i} lost after restart"
        );
    }
}
