//! The live network fuzzer (issue 18): a running daemon driven with mutated
//! NBD byte streams over many connections — raw handshakes, and request
//! streams (with and without payload) after a real negotiation — seeded
//! from the cargo-fuzz corpora (`nbd/fuzz/corpus/*` when a fuzz run left
//! them, and always the seeds `nbd/fuzz/run.sh` plants), while fio writes
//! and verifies its data through another export of the same daemon. No
//! crash, no hang, fio unaffected, nothing acknowledged lost.
//!
//! `MIRRORBLK_NETFUZZ_SECS` sets the length (60 s by default, as in CI);
//! `MIRRORBLK_TEST_SEED` replays a run.

mod netfuzz {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use mirrorblk_tests::daemon::args;
    use mirrorblk_tests::tools::{self, Tool};
    use mirrorblk_tests::util::Rng;
    use mirrorblk_tests::{Daemon, TestDir};
    use nbd::client::encode_request;
    use nbd::{Client, Command, CommandFlags, Request};

    /// Fuzzing connections at once.
    const THREADS: usize = 4;
    /// Per-connection socket timeout (a fuzz case that hangs its connection
    /// is simply dropped by the fuzzer, not waited for).
    const IO_TIMEOUT: Duration = Duration::from_millis(100);
    /// Most reply bytes a fuzz connection reads before it closes.
    const READ_CAP: usize = 4 << 20;
    /// Bound on one fio round (16 MiB written and verified).
    const FIO_ROUND: Duration = Duration::from_secs(120);

    /// The seeds `nbd/fuzz/run.sh` plants: handshakes (after the client's
    /// flags) and requests.
    fn builtin_seeds() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let opt = |code: u32, data: &[u8]| {
            let mut v = b"IHAVEOPT".to_vec();
            v.extend_from_slice(&code.to_be_bytes());
            v.extend_from_slice(&(data.len() as u32).to_be_bytes());
            v.extend_from_slice(data);
            v
        };
        let flags = [0u8, 0, 0, 3];
        let meta = b"\x00\x00\x00\x04fuzz\x00\x00\x00\x01\x00\x00\x00\x0fbase:allocation";
        let cat = |parts: &[&[u8]]| parts.concat();
        let handshakes = vec![
            cat(&[
                &flags,
                &opt(3, b""),
                &opt(8, b""),
                &opt(10, meta),
                &opt(7, b"\x00\x00\x00\x04fuzz\x00\x00"),
            ]),
            cat(&[
                &flags,
                &opt(6, b"\x00\x00\x00\x00\x00\x01\x00\x03"),
                &opt(1, b"fuzz"),
            ]),
            cat(&[&flags, &opt(3, b""), &opt(2, b"")]),
            cat(&[&flags, &opt(9, b"\x00\x00\x00\x04fuzz\x00\x00\x00\x00")]),
        ];
        let req = |command, offset, length| {
            encode_request(&Request {
                flags: CommandFlags::empty(),
                command,
                cookie: offset ^ 0x5eed,
                offset,
                length,
            })
            .to_vec()
        };
        let mut write = req(Command::Write, 8192, 4096);
        write.extend(std::iter::repeat_n(0xa5, 4096));
        let requests = vec![
            req(Command::Read, 0, 512),
            write,
            req(Command::Flush, 0, 0),
            req(Command::Trim, 4096, 65536),
            req(Command::WriteZeroes, 0, 1 << 20),
            req(Command::BlockStatus, 0, 1 << 20),
            req(Command::Cache, 0, 4096),
            req(Command::Disc, 0, 0),
        ];
        (handshakes, requests)
    }

    /// The files of one cargo-fuzz corpus directory, if a fuzz run left it.
    fn corpus(target: &str) -> Vec<Vec<u8>> {
        let dir =
            mirrorblk_tests::daemon::workspace_root().join(format!("nbd/fuzz/corpus/{target}"));
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .take(2000)
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter(|b| b.len() <= 64 << 10)
            .collect()
    }

    /// A few random edits of `seed`, sometimes spliced with `other`.
    fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..1 + rng.below(6) {
            let at = if v.is_empty() {
                0
            } else {
                rng.below(v.len() as u64) as usize
            };
            match rng.below(7) {
                0 if !v.is_empty() => v[at] ^= 1 << rng.below(8),
                1 if !v.is_empty() => v[at] = rng.next_u64() as u8,
                2 => {
                    let mut b = vec![0u8; 1 + rng.below(16) as usize];
                    rng.fill(&mut b);
                    v.splice(at..at, b);
                }
                3 if !v.is_empty() => {
                    let end = (at + 1 + rng.below(16) as usize).min(v.len());
                    v.drain(at..end);
                }
                4 if v.len() >= at + 4 => {
                    let words = [0u32, 1, 0x7fff_ffff, 0x8000_0000, u32::MAX, 4096, 1 << 25];
                    let w = words[rng.below(words.len() as u64) as usize];
                    v[at..at + 4].copy_from_slice(&w.to_be_bytes());
                }
                5 => {
                    let from = rng.below(other.len() as u64 + 1) as usize;
                    v.extend_from_slice(&other[from..]);
                }
                _ => v.truncate(at),
            }
        }
        v
    }

    /// Sends `bytes` in random pieces, then reads what comes back until
    /// EOF, the timeout or [`READ_CAP`].
    fn exchange(rng: &mut Rng, s: &mut TcpStream, bytes: &[u8]) {
        let mut at = 0;
        while at < bytes.len() {
            let n = (1 + rng.below(4096) as usize).min(bytes.len() - at);
            if s.write_all(&bytes[at..at + n]).is_err() {
                return;
            }
            at += n;
        }
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while got < READ_CAP {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    }

    fn connect(d: &Daemon) -> Option<TcpStream> {
        let s = TcpStream::connect(d.addr()).ok()?;
        s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
        s.set_write_timeout(Some(IO_TIMEOUT)).ok()?;
        Some(s)
    }

    /// One fuzz case: a mutated handshake, or a mutated request stream
    /// after a real negotiation (simple or structured replies).
    fn one_case(rng: &mut Rng, d: &Daemon, hs: &[Vec<u8>], reqs: &[Vec<u8>]) {
        let pick =
            |rng: &mut Rng, set: &[Vec<u8>]| set[rng.below(set.len() as u64) as usize].clone();
        let Some(mut s) = connect(d) else { return };
        if rng.chance(1, 3) {
            let (a, b) = (pick(rng, hs), pick(rng, hs));
            let mut greeting = [0u8; 18];
            if s.read_exact(&mut greeting).is_ok() {
                let bytes = mutate(rng, &a, &b);
                exchange(rng, &mut s, &bytes);
            }
            return;
        }
        let structured = rng.chance(1, 2);
        let Ok(c) = Client::connect(s, "fuzz", structured) else {
            return;
        };
        let mut s = c.into_inner();
        let mut stream = Vec::new();
        for _ in 0..1 + rng.below(8) {
            let (a, b) = (pick(rng, reqs), pick(rng, reqs));
            stream.extend(if rng.chance(1, 4) {
                a
            } else {
                mutate(rng, &a, &b)
            });
        }
        exchange(rng, &mut s, &stream);
    }

    /// fio through `uri`: 16 MiB of 4 KiB random writes at queue depth 8,
    /// every block verified with crc32c; panics unless it all checks.
    fn fio_round(dir: &TestDir, uri: &str, round: usize) {
        let out = dir.join(&format!("fio-{round}.json"));
        let mut a: Vec<String> = [
            "--name=netfuzz",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--size=16m",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(format!("--uri={uri}"));
        a.extend(tools::fio_json_args(&out));
        let run = tools::spawn(Tool::Fio, &a).wait(FIO_ROUND);
        let v = tools::fio_report(&out, &run);
        let job = &v["jobs"][0];
        assert_eq!(job["error"].as_i64(), Some(0), "fio round {round}: {job:#}");
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap_or(0) >= 16 << 20,
            "fio round {round} did not verify everything: {job:#}"
        );
    }

    #[test]
    fn mutated_streams_on_many_connections_leave_fio_unharmed() {
        let secs: u64 = std::env::var("MIRRORBLK_NETFUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60);
        let dir = TestDir::new();
        let vol = |name: &str| {
            format!(
                "[[volume]]\nname = \"{name}\"\ndata = \"{}\"\njournal = \"{}\"\nsize = \"64M\"\njournal_size = \"64M\"\n",
                dir.join(&format!("{name}.data")).display(),
                dir.join(&format!("{name}.journal")).display()
            )
        };
        // "fuzz" first: it is the default export a mutated empty name gets.
        let cfg = dir.join("node.toml");
        std::fs::write(
            &cfg,
            format!("listen = \"127.0.0.1:0\"\n{}{}", vol("fuzz"), vol("data")),
        )
        .expect("write config");
        let mut d = Daemon::start(args(["--config".as_ref(), cfg.as_os_str()]));
        let (mut hs, mut reqs) = builtin_seeds();
        hs.extend(corpus("handshake"));
        reqs.extend(corpus("request"));
        eprintln!("{} handshake and {} request seeds", hs.len(), reqs.len());
        let mut rng = Rng::from_env_or_time("netfuzz");
        let deadline = Instant::now() + Duration::from_secs(secs);
        let cases = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..THREADS)
                .map(|_| {
                    let mut rng = Rng::new(rng.next_u64());
                    let (d, hs, reqs) = (&d, &hs, &reqs);
                    scope.spawn(move || {
                        let mut n = 0u64;
                        while Instant::now() < deadline {
                            one_case(&mut rng, d, hs, reqs);
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            let mut round = 0;
            while Instant::now() < deadline {
                fio_round(&dir, &d.uri("data"), round);
                round += 1;
            }
            eprintln!("{round} fio rounds verified");
            workers
                .into_iter()
                .map(|w| w.join().expect("fuzz worker"))
                .sum::<u64>()
        });
        eprintln!("{cases} fuzz cases in {secs} s");
        d.assert_running();
        let mut c = d.connect("data");
        c.write(0, &[7u8; 4096], true)
            .expect("a client after the fuzzing");
        assert_eq!(c.read(0, 4096).expect("read back"), vec![7u8; 4096]);
        assert!(cases > 100, "the fuzzer ran only {cases} cases");
    }
}
