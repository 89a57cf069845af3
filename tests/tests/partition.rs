//! A network partition between a primary and its replicas, made with
//! network namespaces this test creates: the primary lives in one, both
//! replicas in another, joined by a veth pair whose primary end is set down
//! (the partition) and up again (the heal) under write load.
//!
//! Addresses are only ever assigned inside those two private namespaces.
//! Clients reach the primary through its Unix socket (a path on the shared
//! filesystem), so the test process itself stays in the host's namespace.
//! Where namespaces cannot be created (no root, no iproute2), the test
//! prints `SKIP:` with the reason; nextest shows that output (see
//! `.config/nextest.toml`).

mod partition {
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use mirrorblk_admin::ReplicaState;
    use mirrorblk_tests::cluster::{
        assert_stores_identical, view_of, write_secret, Node, NodeFiles, EXPORT, VOLUME_BYTES,
    };
    use mirrorblk_tests::daemon::{Daemon, CLIENT_TIMEOUT};
    use mirrorblk_tests::netns::{Net, REPLICA_IP};
    use mirrorblk_tests::util::{pattern, Rng, KIB4, MIB};
    use mirrorblk_tests::TestDir;
    use nbd::{Client, Command as NbdCommand, CommandFlags, Request};

    /// One acknowledged write.
    #[derive(Debug, Clone, Copy)]
    struct Region {
        offset: u64,
        len: u32,
        seed: u64,
    }

    fn connect(socket: &Path) -> Client<UnixStream> {
        let s = UnixStream::connect(socket).expect("connect to the primary's Unix socket");
        s.set_read_timeout(Some(CLIENT_TIMEOUT)).ok();
        s.set_write_timeout(Some(CLIENT_TIMEOUT)).ok();
        Client::connect(s, EXPORT, false).expect("NBD handshake with the primary")
    }

    /// Sequential 4k-64k patterned writes, 4 in flight, paced to about 8
    /// MiB/s, until `stop` (or 60 s); returns the acknowledged ones. Any
    /// error reply or broken connection fails the test.
    fn writer(socket: &Path, stop: &AtomicBool, acked_count: &AtomicUsize) -> Vec<Region> {
        let mut c = connect(socket);
        let mut rng = Rng::new(0x7061_7274);
        let mut inflight = std::collections::HashMap::new();
        let mut acked = Vec::new();
        let mut end = 0u64;
        let started = Instant::now();
        let mut sent_bytes = 0u64;
        let mut index = 0u64;
        while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
            while inflight.len() < 4 && end + 64 * 1024 < VOLUME_BYTES {
                // Pace: at most 8 MiB per elapsed second.
                if sent_bytes > (started.elapsed().as_secs_f64() * 8.0 * MIB as f64) as u64 {
                    break;
                }
                let len = (rng.next_u64() % 16 + 1) * KIB4;
                let r = Region {
                    offset: end,
                    len: len as u32,
                    seed: index << 8,
                };
                index += 1;
                end += len;
                sent_bytes += len;
                let cookie = c.next_cookie();
                let req = Request {
                    flags: CommandFlags::empty(),
                    command: NbdCommand::Write,
                    cookie,
                    offset: r.offset,
                    length: u64::from(r.len),
                };
                c.submit(&req, Some(&pattern(r.seed, len as usize)))
                    .unwrap_or_else(|e| panic!("submit {r:?}: {e}"));
                inflight.insert(cookie, r);
            }
            if inflight.is_empty() {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let reply = c
                .receive()
                .unwrap_or_else(|e| panic!("the primary stopped answering: {e}"));
            let r = inflight
                .remove(&reply.cookie)
                .unwrap_or_else(|| panic!("reply for unknown cookie {}", reply.cookie));
            assert!(
                reply.error.is_none(),
                "write {r:?} failed: {:?}",
                reply.error
            );
            acked.push(r);
            acked_count.fetch_add(1, Ordering::Relaxed);
        }
        while !inflight.is_empty() {
            let reply = c.receive().expect("reply");
            let r = inflight.remove(&reply.cookie).expect("known cookie");
            assert!(
                reply.error.is_none(),
                "write {r:?} failed: {:?}",
                reply.error
            );
            acked.push(r);
        }
        acked
    }

    /// 1 primary + 2 replicas (sync mode, degrade on loss, heartbeat 2 s)
    /// across a veth link, under paced write load: the link goes down for
    /// 4 s (both replicas are marked out of sync and writes go on), then up
    /// again; both replicas return to in-sync. Every acknowledged write reads
    /// back from the primary, and after a clean stop the three data stores
    /// are byte-identical.
    #[test]
    fn partition_under_load_loses_nothing_and_converges() {
        let net = match Net::create("a") {
            Ok(n) => n,
            Err(why) => {
                println!("SKIP: cannot create network namespaces here: {why}");
                return;
            }
        };
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let start_replica = |name: &str, port: u16| {
            let files = NodeFiles::new(&dir, name);
            let addr = format!("{REPLICA_IP}:{port}").parse().expect("address");
            let daemon = Daemon::try_start_in_netns(
                &net.replica_ns,
                files.replica_args(&secret, addr, "32M", &["--heartbeat-timeout", "2s"]),
            )
            .unwrap_or_else(|e| panic!("replica {name}: {e}"));
            Node {
                files,
                daemon,
                replication: Some(addr),
            }
        };
        let mut r2 = start_replica("n2", 7102);
        let mut r3 = start_replica("n3", 7103);
        let socket = dir.join("n1.sock");
        let socket_arg = socket.display().to_string();
        let files = NodeFiles::new(&dir, "n1");
        let peers = [
            format!("n2={REPLICA_IP}:7102"),
            format!("n3={REPLICA_IP}:7103"),
        ];
        let daemon = Daemon::try_start_in_netns(
            &net.primary_ns,
            files.primary_args(
                &secret,
                &peers,
                "32M",
                &[
                    "--mode",
                    "sync",
                    "--heartbeat-timeout",
                    "2s",
                    "--on-replica-loss",
                    "degrade",
                    "--unix",
                    &socket_arg,
                ],
            ),
        )
        .unwrap_or_else(|e| panic!("primary: {e}"));
        let mut p = Node {
            files,
            daemon,
            replication: None,
        };
        p.wait_replicas_in_sync(Duration::from_secs(30));

        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let load = {
            let (socket, stop, acked) = (socket.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || writer(&socket, &stop, &acked))
        };
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            acked.load(Ordering::Relaxed) > 0,
            "no write acknowledged before the partition"
        );

        net.set_link(false);
        let cut = Instant::now();
        p.wait_status(
            Duration::from_secs(15),
            "both replicas marked out of sync",
            |s| s.replicas.iter().all(|r| r.state != ReplicaState::InSync),
        );
        let during = acked.load(Ordering::Relaxed);
        std::thread::sleep(
            Duration::from_secs(4)
                .saturating_sub(cut.elapsed())
                .max(Duration::from_secs(1)),
        );
        let after = acked.load(Ordering::Relaxed);
        assert!(
            after > during,
            "writes stopped during the partition (degrade policy must go on without the replicas)"
        );
        let lost = p.status();
        for peer in ["n2", "n3"] {
            let v = view_of(&lost, peer);
            assert!(
                v.state != ReplicaState::InSync,
                "{peer} still in-sync during the partition: {v:#?}"
            );
        }

        net.set_link(true);
        let healed = Instant::now();
        p.wait_status(
            Duration::from_secs(60),
            "both replicas in sync again after the heal",
            |s| {
                s.replicas
                    .iter()
                    .all(|r| r.state == ReplicaState::InSync && r.resync.is_none())
            },
        );
        eprintln!("replicas in sync {:.1?} after the heal", healed.elapsed());
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        let regions = load.join().expect("the writer panicked");
        eprintln!(
            "{} writes acknowledged ({} during the partition)",
            regions.len(),
            after - during
        );
        p.wait_status(
            Duration::from_secs(30),
            "replicas durable at the primary's last LSN",
            |s| {
                s.replicas.iter().all(|r| {
                    r.state == ReplicaState::InSync
                        && r.durable_lsn == s.last_lsn
                        && r.out_of_sync_bytes == 0
                })
            },
        );

        let mut c = connect(&socket);
        for r in &regions {
            let got = c.read(r.offset, r.len).expect("read back");
            assert!(
                got == pattern(r.seed, r.len as usize),
                "acknowledged write {r:?} does not read back from the primary"
            );
        }
        drop(c);
        p.stop();
        r2.stop();
        r3.stop();
        assert_stores_identical(&[&p, &r2, &r3]);
        drop(net);
    }
}
