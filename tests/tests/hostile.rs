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
    use mirrorblk_tests::flood::{raise_nofile, threads, Flood};
    use mirrorblk_tests::util::{pattern, MIB};
    use mirrorblk_tests::{Daemon, TestDir};

    const IDLE: usize = 3000;
    const SLOW: usize = 300;
    /// Bound on opening the whole crowd.
    const OPEN_LIMIT: Duration = Duration::from_secs(30);
    /// Most RSS growth allowed under the crowd.
    const RSS_GROWTH: u64 = 32 * MIB;
    /// Most threads the daemon may gain under the crowd (none expected; a
    /// runtime may start one helper lazily).
    const THREAD_SLACK: u64 = 2;
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
}
