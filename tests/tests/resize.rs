//! Online resize (`mirrorblk resize VOLUME SIZE [--force]`, docs/OPERATIONS.md):
//! a grow under fio load reaches both replicas through the replication
//! stream, new NBD connections see the new size, the grown part is written
//! and read back, `mirrorblk verify` finds all identical, and a shrink
//! without `--force` is refused; a forced shrink reaches the replicas too,
//! and a primary killed with `kill -9` right after a resize recovers the
//! new size from its journal; a replica that missed a resize gets it from
//! the journal or takes the size in a resync.

mod resize {
    use std::time::Duration;

    use mirrorblk_tests::cluster::{
        assert_stores_identical, write_secret, Node, EXPORT, VOLUME_BYTES,
    };
    use mirrorblk_tests::tools::{self, Tool};
    use mirrorblk_tests::util::MIB;
    use mirrorblk_tests::TestDir;

    const IN_SYNC_TIMEOUT: Duration = Duration::from_secs(20);
    const CLI_TIMEOUT: Duration = Duration::from_secs(60);
    const GROWN: u64 = 2 * VOLUME_BYTES;

    fn three_nodes(dir: &TestDir) -> (Node, Node, Node) {
        let secret = write_secret(dir, "secret");
        // Sparse stores: writing 3 × 256M of zeroes is most of a start.
        let sparse = ["--preallocate", "sparse"];
        let r2 = Node::start_replica(dir, "n2", &secret, "64M", &sparse);
        let r3 = Node::start_replica(dir, "n3", &secret, "64M", &sparse);
        let p = Node::start_primary(
            dir,
            "n1",
            &secret,
            &[&r2, &r3],
            "64M",
            &["--mode", "sync", "--preallocate", "sparse"],
        );
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);
        (p, r2, r3)
    }

    /// The size a new NBD connection negotiates.
    fn negotiated_size(node: &Node) -> u64 {
        let info = tools::nbdinfo_json(&node.daemon.uri(EXPORT));
        info["exports"][0]["export-size"]
            .as_u64()
            .unwrap_or_else(|| panic!("nbdinfo reported no size: {info:#}"))
    }

    #[track_caller]
    fn assert_size(nodes: &[&Node], size: u64, when: &str) {
        for n in nodes {
            n.wait_status(Duration::from_secs(10), when, |s| s.size == size);
        }
    }

    /// Grow 256M → 512M with two replicas while fio writes (random sizes,
    /// crc32c-verified) through a connection opened before the resize.
    #[test]
    fn grow_under_fio_load_then_verify_identical_and_refuse_a_shrink_without_force() {
        let dir = TestDir::new();
        let (mut p, mut r2, mut r3) = three_nodes(&dir);
        let json = dir.join("fio.json");
        let mut args = vec![
            "--name=resize".to_string(),
            "--ioengine=nbd".into(),
            format!("--uri={}", p.daemon.uri(EXPORT)),
            "--rw=randwrite".into(),
            "--size=256m".into(),
            "--bsrange=4k-256k".into(),
            "--iodepth=8".into(),
            "--time_based".into(),
            "--runtime=4".into(),
        ];
        args.extend(tools::fio_json_args(&json));
        let fio = tools::spawn(Tool::Fio, &args);
        std::thread::sleep(Duration::from_millis(1500));
        let grow = p.cli(&["resize", EXPORT, "512M"], CLI_TIMEOUT);
        assert_eq!(grow.code, 0, "resize under load failed: {grow:#?}");
        assert!(
            grow.stdout.contains("resized from 256M to 512M"),
            "{grow:#?}"
        );
        let run = fio.wait(Duration::from_secs(30));
        let report = tools::fio_report(&json, &run);
        assert_eq!(
            report["jobs"][0]["error"].as_i64(),
            Some(0),
            "fio failed: {report:#}"
        );
        assert!(report["jobs"][0]["write"]["io_bytes"].as_u64().unwrap_or(0) > 0);

        assert_size(&[&p, &r2, &r3], GROWN, "every node at the new size");
        assert_eq!(
            negotiated_size(&p),
            GROWN,
            "a new connection must see the new size"
        );
        // The grown part takes writes and reads them back (a new connection).
        let uri = p.daemon.uri(EXPORT);
        let at = VOLUME_BYTES + 37 * MIB;
        tools::qemu_io_ok(
            &uri,
            &[
                format!("write -P 0xa7 {at} 1M"),
                format!("read -P 0xa7 {at} 1M"),
            ],
        );
        tools::qemu_io_ok(&uri, &[format!("read -P 0 {} 1M", GROWN - MIB)]);

        let v = p.cli(&["verify"], CLI_TIMEOUT);
        assert_eq!(v.code, 0, "verify after the resize: {v:#?}");
        for r in ["vol0/n2: identical", "vol0/n3: identical"] {
            assert!(v.stdout.contains(r), "verify report lacks {r:?}: {v:#?}");
        }

        let shrink = p.cli(&["resize", EXPORT, "256M"], CLI_TIMEOUT);
        assert_eq!(
            shrink.code, 1,
            "a shrink without --force must fail: {shrink:#?}"
        );
        assert!(
            shrink.stderr.contains("pass --force") && shrink.stderr.contains("discards"),
            "the refusal must say why and what to do: {shrink:#?}"
        );
        let unaligned = p.cli(&["resize", EXPORT, "1000000"], CLI_TIMEOUT);
        assert_eq!(
            unaligned.code, 2,
            "an unaligned size is a usage error: {unaligned:#?}"
        );
        assert_size(&[&p, &r2, &r3], GROWN, "nothing changed by the refusals");

        p.stop();
        r2.stop();
        r3.stop();
        assert_stores_identical(&[&p, &r2, &r3]);
        assert_eq!(
            std::fs::metadata(&r3.files.data).map(|m| m.len()).ok(),
            Some(GROWN)
        );
    }

    /// A forced shrink reaches both replicas (their files are cut), a
    /// connection opened before it is refused past the new end, and a
    /// primary killed with `kill -9` right after a grow comes back at the
    /// grown size with the data written past the old end.
    #[test]
    fn forced_shrink_and_a_kill_after_a_grow_keep_every_node_at_the_journaled_size() {
        let dir = TestDir::new();
        let (mut p, mut r2, mut r3) = three_nodes(&dir);
        let uri = p.daemon.uri(EXPORT);
        let small = VOLUME_BYTES / 2;
        tools::qemu_io_ok(&uri, &[format!("write -P 0x5c {} 1M", small - MIB)]);
        let mut old = p.daemon.connect(EXPORT);
        let shrink = p.cli(&["resize", EXPORT, "128M", "--force"], CLI_TIMEOUT);
        assert_eq!(shrink.code, 0, "forced shrink: {shrink:#?}");
        assert_size(&[&p, &r2, &r3], small, "every node shrunk");
        let past = old.read(small, 4096);
        assert!(
            past.is_err(),
            "a read past the shrunk end must fail: {past:?}"
        );
        tools::qemu_io_ok(&uri, &[format!("read -P 0x5c {} 1M", small - MIB)]);

        // Grow again (the cut part reads as zeroes), write past the old
        // end, and kill -9 the primary before any checkpoint could help.
        let grow = p.cli(&["resize", EXPORT, "384M"], CLI_TIMEOUT);
        assert_eq!(grow.code, 0, "grow: {grow:#?}");
        let at = small + 64 * MIB;
        tools::qemu_io_ok(
            &uri,
            &[
                format!("write -P 0x3d {at} 1M"),
                format!("read -P 0 {small} 1M"),
            ],
        );
        p.daemon.kill9();
        p.daemon.restart();
        assert_eq!(
            p.status().size,
            384 * MIB,
            "the restarted primary lost the resize"
        );
        let uri = p.daemon.uri(EXPORT);
        tools::qemu_io_ok(&uri, &[format!("read -P 0x3d {at} 1M")]);
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);
        assert_size(&[&r2, &r3], 384 * MIB, "the replicas at the grown size");
        p.stop();
        r2.stop();
        r3.stop();
        assert_stores_identical(&[&p, &r2, &r3]);
    }

    /// A replica away during a resize gets it on its return: from the
    /// journal when the primary still holds the record (the handshake
    /// accepts the differing size), or, after losing its journal, by a full
    /// checksum resync that first takes the primary's size.
    #[test]
    fn a_replica_that_missed_a_resize_catches_up_or_takes_the_size_in_a_resync() {
        let dir = TestDir::new();
        let (mut p, mut r2, mut r3) = three_nodes(&dir);
        let uri = p.daemon.uri(EXPORT);
        tools::qemu_io_ok(&uri, &["write -P 0x60 0 1M"]);
        r3.stop();
        let grow = p.cli(&["resize", EXPORT, "384M"], CLI_TIMEOUT);
        assert_eq!(grow.code, 0, "grow with n3 away: {grow:#?}");
        // Small writes: a large one goes in place, and catch-up cannot
        // resend those from the journal (a bitmap resync would).
        tools::qemu_io_ok(&uri, &["write -P 0x61 300M 64k"]);
        r3.daemon.restart();
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);
        assert_size(&[&r3], 384 * MIB, "n3 caught up with the resize");
        // (The log of n3's current run.)
        assert_eq!(
            r3.log_lines_with("resyncing from the primary"),
            Vec::<String>::new(),
            "n3 should catch up from the journal, not resync"
        );

        r3.stop();
        std::fs::remove_file(&r3.files.journal).expect("remove n3's journal");
        let grow = p.cli(&["resize", EXPORT, "512M"], CLI_TIMEOUT);
        assert_eq!(grow.code, 0, "second grow with n3 away: {grow:#?}");
        tools::qemu_io_ok(&uri, &["write -P 0x62 450M 1M"]);
        // n3 comes back with a new journal at its configured 256M.
        r3.daemon.restart();
        p.wait_status(Duration::from_secs(60), "n3 resynced", |s| {
            s.replicas.iter().all(|r| r.is_settled())
        });
        assert_size(&[&r3], GROWN, "n3 took the primary's size for its resync");
        let v = p.cli(&["verify"], CLI_TIMEOUT);
        assert_eq!(v.code, 0, "verify after n3's resync: {v:#?}");
        p.stop();
        r2.stop();
        r3.stop();
        assert_stores_identical(&[&p, &r2, &r3]);
    }
}
