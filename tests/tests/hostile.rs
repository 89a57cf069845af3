//! Hostile crowds cannot lock legitimate clients out (issue 18): 3,000
//! connections that never negotiate and 300 that trickle a byte a second,
//! from 100 loopback source addresses, against the NBD port and against a
//! replica's replication port. The daemon's thread count must not grow with
//! them, its memory grows by at most 32 MiB, a new client negotiates and
//! completes a 4 KiB write and read in under a second, and a killed replica
//! reconnects to its primary in about its usual time.

mod hostile {
    use std::time::{Duration, Instant};

    use mirrorblk_admin::ReplicaState;
    use mirrorblk_tests::cluster::{write_secret, Node, EXPORT};
    use mirrorblk_tests::daemon::args;
    use mirrorblk_tests::flood::{raise_nofile, threads, Flood};
    use mirrorblk_tests::util::{assert_bytes_eq, pattern, MIB};
    use mirrorblk_tests::{Daemon, TestDir};
    use nbd::client::encode_request;
    use nbd::{Command, CommandFlags, Request};
    use std::io::Write;
    use std::net::TcpStream;

    const IDLE: usize = 3000;
    const SLOW: usize = 300;
    /// Bound on opening the whole crowd.
    const OPEN_LIMIT: Duration = Duration::from_secs(30);
    /// Most RSS growth allowed under the crowd.
    const RSS_GROWTH: u64 = 32 * MIB;
    /// Most threads the daemon may gain under the crowd (none expected; a
    /// runtime may start one helper lazily).
    const THREAD_SLACK: u64 = 2;
    /// Clients in the memory test that never read their replies.
    const HOGS: usize = 24;
    /// How long each of them keeps sending.
    const HOG_TIME: Duration = Duration::from_secs(4);
    /// The per-connection term of the bound in docs/OPERATIONS.md.
    const RSS_PER_CONNECTION: u64 = MIB;
    /// A little over the primary's longest reconnect interval.
    const BACKOFF: Duration = Duration::from_millis(2500);

    /// Negotiates, writes 4 KiB and reads it back through `d`; answers how
    /// long that took.
    fn legitimate_round(d: &Daemon, export: &str, seed: u64) -> Duration {
        let t = Instant::now();
        let mut c = d.connect(export);
        let data = pattern(seed, 4096);
        let off = seed * 4096;
        c.write(off, &data, true).expect("legitimate write");
        let got = c.read(off, 4096).expect("legitimate read");
        assert!(got == data, "the legitimate client read back other data");
        t.elapsed()
    }

    #[test]
    fn a_crowd_on_the_nbd_port_locks_nobody_out() {
        raise_nofile(16384);
        let dir = TestDir::new();
        let d = Daemon::start(dir.volume_args("vol0", "64M"));
        legitimate_round(&d, "vol0", 1);
        let (threads0, rss0) = (threads(d.pid()), d.rss_bytes());
        let flood = Flood::open(d.addr(), IDLE, SLOW, OPEN_LIMIT);
        eprintln!("crowd of {} connections open", flood.opened);
        let mut worst = Duration::ZERO;
        for round in 0..3 {
            worst = worst.max(legitimate_round(&d, "vol0", 10 + round));
            std::thread::sleep(Duration::from_secs(1));
        }
        let (threads1, rss1) = (threads(d.pid()), d.rss_bytes());
        eprintln!(
            "legitimate rounds: worst {worst:?}; threads {threads0} -> {threads1}; RSS {} -> {} MiB",
            rss0 / MIB,
            rss1 / MIB
        );
        assert!(
            worst < Duration::from_secs(1),
            "a legitimate client took {worst:?}"
        );
        assert!(
            threads1 <= threads0 + THREAD_SLACK,
            "threads grew with the crowd: {threads0} -> {threads1}"
        );
        assert!(
            rss1.saturating_sub(rss0) <= RSS_GROWTH,
            "RSS grew by {} MiB",
            (rss1 - rss0) / MIB
        );
        let dropped = d
            .log_lines()
            .iter()
            .filter(|l| l.contains("dropped a connection"))
            .count();
        assert!(dropped > 0, "no drop was logged");
        drop(flood);
    }

    /// Kills the replica, lets the primary see it gone and back off to its
    /// longest retry interval, restarts it, and answers how long until the
    /// primary has it in sync again; `crowd` opens a crowd on its
    /// replication port as soon as it listens (while the primary waits out
    /// its backoff).
    fn replica_comeback(p: &Node, r: &mut Node, crowd: bool) -> (Duration, Option<Flood>) {
        r.daemon.kill9();
        p.wait_status(Duration::from_secs(10), "the replica seen gone", |s| {
            s.replicas.iter().all(|v| v.state != ReplicaState::InSync)
        });
        std::thread::sleep(BACKOFF);
        r.daemon.restart();
        let t = Instant::now();
        let addr = r.replication.expect("replica listens");
        let opener =
            crowd.then(|| std::thread::spawn(move || Flood::open(addr, IDLE, SLOW, OPEN_LIMIT)));
        p.wait_replicas_in_sync(Duration::from_secs(60));
        let took = t.elapsed();
        (took, opener.map(|o| o.join().expect("crowd opener")))
    }

    #[test]
    fn a_crowd_on_the_replication_port_keeps_the_link() {
        raise_nofile(16384);
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let mut r = Node::start_replica(&dir, "n2", &secret, "32M", &[]);
        let p = Node::start_primary(&dir, "n1", &secret, &[&r], "32M", &[]);
        p.wait_replicas_in_sync(Duration::from_secs(30));
        let (usual, _) = replica_comeback(&p, &mut r, false);
        legitimate_round(&p.daemon, EXPORT, 1);
        let (threads0, rss0) = (threads(r.daemon.pid()), r.daemon.rss_bytes());
        let flood = Flood::open(r.replication.expect("listens"), IDLE, SLOW, OPEN_LIMIT);
        for round in 0..3 {
            let took = legitimate_round(&p.daemon, EXPORT, 10 + round);
            assert!(
                took < Duration::from_secs(1),
                "a synchronous write round took {took:?}"
            );
        }
        p.wait_replicas_in_sync(Duration::from_secs(5));
        let (threads1, rss1) = (threads(r.daemon.pid()), r.daemon.rss_bytes());
        eprintln!(
            "replica under the crowd: threads {threads0} -> {threads1}; RSS {} -> {} MiB",
            rss0 / MIB,
            rss1 / MIB
        );
        assert!(
            threads1 <= threads0 + THREAD_SLACK,
            "threads grew: {threads0} -> {threads1}"
        );
        assert!(
            rss1.saturating_sub(rss0) <= RSS_GROWTH,
            "RSS grew by {} MiB",
            (rss1 - rss0) / MIB
        );
        drop(flood);
        let (flooded, flood) = replica_comeback(&p, &mut r, true);
        eprintln!("replica back in sync after {usual:?} alone, {flooded:?} under a crowd");
        assert!(
            flooded <= usual * 2 + Duration::from_secs(3),
            "the crowd delayed the replica's return: {flooded:?} (usually {usual:?})"
        );
        legitimate_round(&p.daemon, EXPORT, 20);
        drop(flood);
    }

    /// Sends `reqs` headers (and `payload` bytes after each) on `s` without
    /// reading a reply, until the server stops taking them or `limit`
    /// passes; answers the bytes sent.
    fn pipeline(s: &mut TcpStream, reqs: &[Request], payload: usize, limit: Duration) -> usize {
        s.set_nonblocking(true).expect("nonblocking");
        let body = vec![0x5au8; payload.min(1 << 20)];
        let deadline = Instant::now() + limit;
        let mut sent = 0;
        'all: for r in reqs.iter().cycle() {
            let hdr = encode_request(r);
            let mut parts: Vec<&[u8]> = vec![&hdr];
            let mut left = payload;
            while left > 0 {
                let n = left.min(body.len());
                parts.push(&body[..n]);
                left -= n;
            }
            for part in parts {
                let mut at = 0;
                while at < part.len() {
                    if Instant::now() >= deadline {
                        break 'all;
                    }
                    match s.write(&part[at..]) {
                        Ok(n) => at += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Err(_) => break 'all,
                    }
                }
                sent += part.len();
            }
        }
        sent
    }

    fn request(command: Command, offset: u64, length: u32) -> Request {
        Request {
            flags: CommandFlags::empty(),
            command,
            cookie: 1,
            offset,
            length: u64::from(length),
        }
    }

    /// Clients that pipeline the most requests of the largest size and
    /// never read a reply, a client that spams requests answered with an
    /// error, and a read of the whole volume: RSS stays within the bound
    /// docs/OPERATIONS.md computes from the configuration, and a client
    /// already attached is served again once the stalled ones are dropped.
    #[test]
    fn clients_that_never_read_cannot_grow_memory() {
        raise_nofile(4096);
        let dir = TestDir::new();
        let mut a = dir.volume_args("vol0", "64M");
        a.extend(args(["--cores", "1", "--buffer-memory", "64M"]));
        let d = Daemon::start(a);
        let mut witness = d.connect("vol0");
        let max = witness.info().max_payload;
        witness
            .write(0, &pattern(1, 4096), true)
            .expect("witness write");
        let rss0 = d.rss_bytes();
        eprintln!("largest request: {max} bytes");
        let mut hogs = Vec::new();
        let mut threads = Vec::new();
        for i in 0..HOGS {
            let mut s = d.connect("vol0").into_inner();
            hogs.push(s.try_clone().expect("clone"));
            threads.push(std::thread::spawn(move || match i % 3 {
                // Reads of the largest size.
                0 => pipeline(&mut s, &[request(Command::Read, 0, max)], 0, HOG_TIME),
                // Writes of the largest size.
                1 => pipeline(
                    &mut s,
                    &[request(Command::Write, 32 * MIB, max)],
                    max as usize,
                    HOG_TIME,
                ),
                // Requests answered at once with an error (out of range).
                _ => pipeline(
                    &mut s,
                    &[request(Command::Read, 1 << 40, 4096)],
                    0,
                    HOG_TIME,
                ),
            }));
        }
        let sent: usize = threads.into_iter().map(|t| t.join().expect("hog")).sum();
        let rss1 = d.rss_bytes();
        let bound = RSS_PER_CONNECTION * (HOGS as u64 + 1) + 16 * MIB;
        eprintln!(
            "{HOGS} clients sent {} MiB without reading; RSS {} -> {} MiB (bound: +{} MiB)",
            sent as u64 / MIB,
            rss0 / MIB,
            rss1 / MIB,
            bound / MIB
        );
        assert!(
            rss1.saturating_sub(rss0) <= bound,
            "RSS grew by {} MiB with {HOGS} clients that never read (bound {} MiB)",
            (rss1 - rss0) / MIB,
            bound / MIB
        );
        let t = Instant::now();
        witness
            .write(4096, &pattern(2, 4096), true)
            .expect("witness served again");
        let got = witness.read(0, 4096).expect("witness read");
        assert_bytes_eq("witness block", 0, &pattern(1, 4096), &got);
        eprintln!("the witness was served after {:?}", t.elapsed());
        drop(hogs);
    }
}
