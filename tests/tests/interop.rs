//! Interoperability with real NBD clients: qemu-io, qemu-img, nbdinfo,
//! nbdcopy and fio, over TCP and Unix sockets, plus configuration shapes
//! (two volumes from TOML, read-only) and a clean restart.
//!
//! Every test checks real bytes: what a tool wrote is read back by another
//! process (or by the protocol crate's client) and compared with a model.

use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use mirrorblk_tests::daemon::{args, CLIENT_TIMEOUT};
use mirrorblk_tests::tools::{
    self, nbdinfo_json, qemu_io, qemu_io_ok, qemu_io_opts, Tool, TOOL_TIMEOUT,
};
use mirrorblk_tests::util::{assert_bytes_eq, pattern, poll_until, Rng, MIB};
use mirrorblk_tests::{Daemon, TestDir};
use nbd::{Client, CommandFlags, ErrorCode};

const SIZE: u64 = 64 * MIB;

/// Reads `[offset, offset+len)` in chunks of at most 4 MiB.
fn read_range<S: std::io::Read + std::io::Write>(
    c: &mut Client<S>,
    offset: u64,
    len: u64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(4 * MIB) as u32;
        out.extend(
            c.read(pos, n)
                .unwrap_or_else(|e| panic!("read {pos}+{n} failed: {e}")),
        );
        pos += u64::from(n);
    }
    out
}

/// Writes at many offsets and sizes, aligned or not, including the last
/// block and the very last byte, with qemu-io; a second qemu-io process reads
/// every range back with `read -P`, and a full read of the export through the
/// protocol client matches a byte model (so no neighbouring byte was touched
/// by the server's read-modify-write of partial blocks).
#[test]
fn qemu_io_patterns_at_many_offsets_read_back_exactly() {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "64M"));
    let uri = d.uri("vol0");
    // (offset, length); non-overlapping, so each range has one expected pattern.
    let ranges: &[(u64, u64)] = &[
        (0, 1),
        (1, 510),
        (4095, 2),
        (8191, 4097),
        (65536 + 100, 3000),
        (MIB - 7, 14),
        (2 * MIB + 4096, 4096),
        (3 * MIB + 1, 128 * 1024),
        (4 * MIB - 1, MIB + 2),
        (7 * MIB + 333, 65536 + 777),
        (16 * MIB, 4 * MIB),
        (32 * MIB - 4096 + 17, 9000),
        (SIZE - 3 * 4096 - 5, 4096),
        (SIZE - 8192, 4096),
        (SIZE - 4096, 4095),
        (SIZE - 1, 1),
    ];
    let mut model = vec![0u8; SIZE as usize];
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    for (i, &(off, len)) in ranges.iter().enumerate() {
        let p = (i as u8).wrapping_mul(13).wrapping_add(0x21); // distinct, never 0
        writes.push(format!("write -P {p} {off} {len}"));
        reads.push(format!("read -P {p} {off} {len}"));
        model[off as usize..(off + len) as usize].fill(p);
    }
    qemu_io_ok(&uri, &writes);
    qemu_io_ok(&uri, &reads);

    // The check can fail: a wrong pattern must be reported by qemu-io.
    let wrong = qemu_io(&uri, &[format!("read -P 0x77 {} 1", SIZE - 1)]);
    assert!(
        !wrong.success() || wrong.combined().contains("Pattern verification failed"),
        "qemu-io did not notice a wrong pattern: {wrong}"
    );

    let mut c = d.connect("vol0");
    let got = read_range(&mut c, 0, SIZE);
    assert_bytes_eq("export after qemu-io writes", 0, &model, &got);
}

/// `discard` and `write -z` (with and without unmap, aligned and not) read
/// back as zeroes while the bytes around them keep their data, before and
/// after a clean restart (so the journaled trims and zeroes replay right).
#[test]
fn discard_and_write_zeroes_read_back_as_zeroes() {
    let dir = TestDir::new();
    let mut d = Daemon::start(dir.volume_args("vol0", "64M"));
    let uri = d.uri("vol0");
    qemu_io_ok(&uri, &["write -P 0xaa 0 8M"]);
    // (command, offset, length)
    let zeroed: &[(&str, u64, u64)] = &[
        ("discard", MIB, MIB),
        ("write -z", 3 * MIB + 100, 5000),
        ("write -z -u", 5 * MIB, 512 * 1024),
        ("write -z", 6 * MIB + 4095, 4098),
        ("discard", 7 * MIB, 64 * 1024),
    ];
    let mut model = vec![0xaau8; (8 * MIB) as usize];
    let mut cmds: Vec<String> = Vec::new();
    for &(cmd, off, len) in zeroed {
        cmds.push(format!("{cmd} {off} {len}"));
        model[off as usize..(off + len) as usize].fill(0);
    }
    qemu_io_ok(&uri, &cmds);

    let check = |d: &Daemon| {
        let uri = d.uri("vol0");
        let mut reads: Vec<String> = zeroed
            .iter()
            .map(|&(_, off, len)| format!("read -P 0 {off} {len}"))
            .collect();
        // The neighbours on both sides of every zeroed range keep 0xaa.
        for &(_, off, len) in zeroed {
            reads.push(format!("read -P 0xaa {} 1", off - 1));
            reads.push(format!("read -P 0xaa {} 1", off + len));
        }
        qemu_io_ok(&uri, &reads);
        let mut c = d.connect("vol0");
        let got = read_range(&mut c, 0, 8 * MIB);
        assert_bytes_eq("first 8 MiB after discard/write -z", 0, &model, &got);
    };
    check(&d);
    assert!(d.terminate().success(), "clean stop failed:\n{}", d.log());
    d.restart();
    check(&d);
}

/// nbdcopy a reference image (random data, sparse gaps, last block) into the
/// export; `qemu-img compare` says identical; nbdcopy out gives a byte-identical
/// file. Then one byte changed through NBD makes `qemu-img compare` report a
/// mismatch at exactly that offset (the comparison can fail).
#[test]
fn nbdcopy_in_qemu_img_compare_and_nbdcopy_out() {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "64M"));
    let uri = d.uri("vol0");
    let reference = dir.join("ref.raw");
    let mut img = vec![0u8; SIZE as usize];
    let mut rng = Rng::new(0x1234_5678);
    for &(off, len) in &[
        (0u64, 256 * 1024u64),
        (MIB + 12345, 300_000),
        (9 * MIB, 2 * MIB),
        (40 * MIB + 1, 4096),
        (SIZE - 4096, 4096),
    ] {
        rng.fill(&mut img[off as usize..(off + len) as usize]);
    }
    std::fs::write(&reference, &img).unwrap();

    tools::run(
        Tool::NbdCopy,
        args([reference.as_os_str(), uri.as_ref()]),
        TOOL_TIMEOUT,
    )
    .expect_success();
    let cmp = tools::run(
        Tool::QemuImg,
        args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            reference.to_str().unwrap(),
            &uri,
        ]),
        TOOL_TIMEOUT,
    );
    assert!(
        cmp.success() && cmp.stdout.contains("Images are identical"),
        "qemu-img compare after nbdcopy: {cmp}"
    );

    let out = dir.join("out.raw");
    tools::run(
        Tool::NbdCopy,
        args([uri.as_ref(), out.as_os_str()]),
        TOOL_TIMEOUT,
    )
    .expect_success();
    let copied = std::fs::read(&out).unwrap();
    assert_bytes_eq("nbdcopy out vs reference image", 0, &img, &copied);

    let changed_at = 9 * MIB + 777;
    let mut c = d.connect("vol0");
    c.write(changed_at, &[!img[changed_at as usize]], true)
        .unwrap();
    let cmp = tools::run(
        Tool::QemuImg,
        args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            reference.to_str().unwrap(),
            &uri,
        ]),
        TOOL_TIMEOUT,
    );
    assert_eq!(
        cmp.status.code(),
        Some(1),
        "qemu-img compare must report the changed byte: {cmp}"
    );
    // qemu-img compares in chunks that start at block-status extent
    // boundaries and reports either the chunk's start (when its first sector
    // differs) or the first differing 512-byte sector within it. Our extents
    // may start at the written byte itself while that write is still only in
    // the journal, so either the byte's own offset or its sector is exact.
    let sector = changed_at & !511;
    let reported = cmp
        .stdout
        .split("Content mismatch at offset ")
        .nth(1)
        .and_then(|rest| rest.split('!').next())
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(
        matches!(reported, Some(at) if (sector..=changed_at).contains(&at)),
        "wrong mismatch offset (want {sector}..={changed_at}): {cmp}"
    );
}

/// nbdinfo reports the size, block sizes (1 / 4096 / a maximum that is at
/// most a quarter of the journal) and the capability flags; the advertised
/// maximum request is really accepted, for a write and a read.
#[test]
fn nbdinfo_reports_size_block_sizes_and_flags() {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "64M"));
    let j = nbdinfo_json(&d.uri("vol0"));
    let e = &j["exports"][0];
    assert_eq!(e["export-name"], "vol0", "{j:#}");
    assert_eq!(e["export-size"].as_u64(), Some(SIZE), "{j:#}");
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{j:#}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{j:#}");
    let max = e["block_size_maximum"]
        .as_u64()
        .expect("block_size_maximum");
    let journal = 64 * MIB;
    // --help: "the largest request accepted is a quarter of [the journal] (at most 32M)".
    assert!(
        max <= journal / 4 && max >= journal / 4 - 64 * 1024 && max % 4096 == 0,
        "block_size_maximum {max} for a 64M journal: {j:#}"
    );
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag} should be true: {j:#}");
    }
    assert_eq!(e["is_read_only"], false, "{j:#}");
    assert!(
        e["contexts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|x| x == "base:allocation")),
        "no base:allocation: {j:#}"
    );

    // The protocol client sees the same maximum, and a request of exactly
    // that size works both ways.
    let mut c = d.connect("vol0");
    assert_eq!(u64::from(c.info().max_payload), max);
    let data = pattern(7, max as usize);
    c.write(4096, &data, false)
        .expect("a write of the advertised maximum size");
    let got = c
        .read(4096, max as u32)
        .expect("a read of the advertised maximum size");
    assert_bytes_eq("maximum-size request", 4096, &data, &got);
}

/// After a trim, `nbdinfo --map` (base:allocation) shows the trimmed range as
/// a hole (once the applier has punched it) while the written data around it
/// stays data, and the map covers exactly the export.
#[test]
fn nbdinfo_map_shows_holes_after_trim() {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "64M"));
    let uri = d.uri("vol0");
    let mut c = d.connect("vol0");
    c.write(0, &pattern(1, (4 * MIB) as usize), true).unwrap();
    c.trim(MIB, MIB).unwrap();
    assert_eq!(
        c.read(MIB, MIB as u32).unwrap(),
        vec![0u8; MIB as usize],
        "trimmed range must read as zeroes"
    );

    // (offset, length, type) triples; type bit 0 = hole, bit 1 = zero.
    let map = || -> Vec<(u64, u64, u64)> {
        let o = tools::run(Tool::NbdInfo, ["--map", "--json", &uri], TOOL_TIMEOUT).expect_success();
        let v: serde_json::Value = serde_json::from_str(&o.stdout)
            .unwrap_or_else(|e| panic!("bad JSON from nbdinfo --map ({e}): {}", o.stdout));
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| {
                (
                    x["offset"].as_u64().unwrap(),
                    x["length"].as_u64().unwrap(),
                    x["type"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let type_at = |m: &[(u64, u64, u64)], at: u64| {
        m.iter()
            .find(|&&(o, l, _)| o <= at && at < o + l)
            .map(|&(_, _, t)| t)
    };
    // Pending (journaled, not yet applied) extents are reported as data, which
    // is always allowed; the hole appears once the applier has run.
    let m = poll_until(
        Duration::from_secs(10),
        "the trimmed range to show as a hole in nbdinfo --map",
        || {
            let m = map();
            let all_hole =
                (0..256).all(|i| type_at(&m, MIB + i * 4096).is_some_and(|t| t & 1 == 1));
            all_hole.then_some(m)
        },
    );
    assert_eq!(
        m.iter().map(|&(_, l, _)| l).sum::<u64>(),
        SIZE,
        "map does not cover the export: {m:?}"
    );
    for at in [0, MIB - 1, 2 * MIB, 4 * MIB - 1] {
        assert_eq!(
            type_at(&m, at),
            Some(0),
            "offset {at} holds written data but the map says otherwise: {m:?}"
        );
    }
    // The hole is really zero.
    assert_eq!(c.read(MIB, MIB as u32).unwrap(), vec![0u8; MIB as usize]);
}

fn fio_json(dir: &TestDir, uri: &str, name: &str, extra: &[&str]) -> serde_json::Value {
    let out = dir.join(&format!("{name}.json"));
    let mut a = vec![
        "--name=mirrorblk".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=randwrite".into(),
        "--bsrange=4k-64k".into(),
        "--size=32m".into(),
        "--iodepth=8".into(),
        "--verify=crc32c".into(),
        "--verify_fatal=1".into(),
        // fio would otherwise drop a verify state file in the working directory.
        "--verify_state_save=0".into(),
        "--output-format=json".into(),
        format!("--output={}", out.display()),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    let o = tools::run(Tool::Fio, &a, TOOL_TIMEOUT);
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("fio wrote no valid JSON ({e}); {o}\n{text}"));
    assert!(o.success(), "fio failed: {o}\n{text}");
    v
}

/// fio's nbd engine: 32 MiB of random writes (4-64 KiB, queue depth 8)
/// verified with crc32c, zero errors. Then the daemon is killed with -9 and
/// restarted with direct (uncached) reads, and `--verify_only` checks every
/// block again.
#[test]
fn fio_randwrite_with_crc32c_verify_has_no_errors() {
    let dir = TestDir::new();
    let mut d = Daemon::start(dir.volume_args("vol0", "64M"));
    let v = fio_json(&dir, &d.uri("vol0"), "write", &["--do_verify=1"]);
    let job = &v["jobs"][0];
    assert_eq!(
        job["error"].as_i64(),
        Some(0),
        "fio reported an error: {job:#}"
    );
    assert_eq!(
        job["write"]["io_bytes"].as_u64(),
        Some(32 * MIB),
        "fio did not write everything: {job:#}"
    );
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(32 * MIB),
        "fio did not verify everything: {job:#}"
    );

    // Written while reads went through the page cache (the default);
    // verified after the crash with direct reads from the disk.
    assert!(
        d.log().contains("reads through the page cache"),
        "{}",
        d.log()
    );
    d.kill9();
    let mut a = dir.volume_args("vol0", "64M");
    a.extend(args(["--read-cache", "false"]));
    d.restart_with(a);
    assert!(d.log().contains("(O_DIRECT)"), "{}", d.log());
    let v = fio_json(&dir, &d.uri("vol0"), "verify", &["--verify_only=1"]);
    let job = &v["jobs"][0];
    assert_eq!(
        job["error"].as_i64(),
        Some(0),
        "verification after kill -9 failed: {job:#}"
    );
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(32 * MIB),
        "fio did not verify everything: {job:#}"
    );
}

/// `--unix PATH`: nbdinfo, qemu-io and the protocol client all work over the
/// Unix socket (`nbd+unix:///vol0?socket=PATH`), and see the same volume as
/// TCP clients.
#[test]
fn unix_socket_listener_serves_the_volume() {
    let dir = TestDir::new();
    let sock = dir.join("nbd.sock");
    let mut a = dir.volume_args("vol0", "64M");
    a.extend(args(["--unix".as_ref(), sock.as_os_str()]));
    let d = Daemon::start(a);
    let uri = format!("nbd+unix:///vol0?socket={}", sock.display());

    let j = nbdinfo_json(&uri);
    assert_eq!(j["exports"][0]["export-size"].as_u64(), Some(SIZE), "{j:#}");
    qemu_io_ok(
        &uri,
        &["write -P 0x5a 12345 100000", "read -P 0x5a 12345 100000"],
    );

    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    let mut c = Client::connect(s, "vol0", true).expect("handshake over the Unix socket");
    assert_eq!(c.size(), SIZE);
    assert_eq!(c.read(12345, 100_000).unwrap(), vec![0x5a; 100_000]);
    let data = pattern(3, 70_000);
    c.write(SIZE - 70_000, &data, true).unwrap();
    // A TCP client sees the write made over the Unix socket.
    let mut t = d.connect("vol0");
    assert_bytes_eq(
        "Unix write seen over TCP",
        SIZE - 70_000,
        &data,
        &t.read(SIZE - 70_000, 70_000).unwrap(),
    );
}

/// A TOML config with two volumes of different sizes: both are listed, both
/// serve at once from concurrent clients, and their data never mixes.
#[test]
fn toml_config_serves_two_volumes_at_once() {
    let dir = TestDir::new();
    let cfg = dir.join("node.toml");
    let vol = |name: &str, size: &str, descr: &str| {
        format!(
            "[[volume]]\nname = \"{name}\"\ndata = \"{}\"\njournal = \"{}\"\nsize = \"{size}\"\njournal_size = \"64M\"\ndescription = \"{descr}\"\n",
            dir.join(&format!("{name}.data")).display(),
            dir.join(&format!("{name}.journal")).display()
        )
    };
    let text = format!(
        "listen = \"127.0.0.1:0\"\n{}{}",
        vol("alpha", "64M", "first"),
        vol("beta", "128M", "second")
    );
    std::fs::write(&cfg, text).unwrap();
    let d = Daemon::start(args(["--config".as_ref(), cfg.as_os_str()]));

    let list = tools::run(
        Tool::NbdInfo,
        ["--list", "--json", &format!("nbd://{}", d.addr())],
        TOOL_TIMEOUT,
    )
    .expect_success();
    let v: serde_json::Value = serde_json::from_str(&list.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", list.stdout));
    let exports = v["exports"].as_array().expect("exports");
    let size_of = |n: &str| {
        exports
            .iter()
            .find(|e| e["export-name"] == n)
            .and_then(|e| e["export-size"].as_u64())
    };
    assert_eq!(exports.len(), 2, "{v:#}");
    assert_eq!(size_of("alpha"), Some(64 * MIB), "{v:#}");
    assert_eq!(size_of("beta"), Some(128 * MIB), "{v:#}");

    // Both volumes written at the same offsets at the same time.
    let threads: Vec<_> = [("alpha", 11u64), ("beta", 22u64)]
        .into_iter()
        .map(|(name, seed)| {
            let mut c = d.connect(name);
            std::thread::spawn(move || {
                for i in 0..32u64 {
                    c.write(i * MIB, &pattern(seed + i, 65536), false).unwrap();
                }
                c.flush().unwrap();
                for i in 0..32u64 {
                    let got = c.read(i * MIB, 65536).unwrap();
                    assert_bytes_eq(
                        &format!("{name} at {i} MiB"),
                        i * MIB,
                        &pattern(seed + i, 65536),
                        &got,
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a volume's client failed");
    }
    qemu_io_ok(
        &d.uri("beta"),
        &["write -P 0x42 100M 4096", "read -P 0x42 100M 4096"],
    );
}

/// A `--read-only` export serves reads (qemu-io -r, the protocol client) of
/// data written before, reports read-only in nbdinfo, and refuses every
/// mutation: qemu-io cannot open it for writing, and WRITE/TRIM/WRITE_ZEROES
/// fail with EPERM while the connection stays usable and data unchanged.
#[test]
fn read_only_export_refuses_writes_but_serves_reads() {
    let dir = TestDir::new();
    let mut d = Daemon::start(dir.volume_args("vol0", "64M"));
    let data = pattern(9, 200_000);
    d.connect("vol0").write(5000, &data, true).unwrap();
    assert!(d.terminate().success());
    let mut a = dir.volume_args("vol0", "64M");
    a.push("--read-only".into());
    d.restart_with(a);
    let uri = d.uri("vol0");

    let j = nbdinfo_json(&uri);
    let e = &j["exports"][0];
    assert_eq!(e["is_read_only"], true, "{j:#}");
    assert_eq!(e["can_trim"], false, "{j:#}");
    assert_eq!(e["can_zero"], false, "{j:#}");

    let w = qemu_io(&uri, &["write -P 1 0 4096"]);
    assert!(!w.success(), "qemu-io wrote to a read-only export: {w}");
    assert!(
        w.combined().contains("Permission denied") || w.combined().contains("read-only"),
        "unclear refusal: {w}"
    );
    let r = qemu_io_opts(&uri, true, &["read -P 0 0 5000"]);
    assert!(
        r.success() && !r.combined().contains("failed"),
        "qemu-io -r read on the read-only export: {r}"
    );

    let mut c = d.connect("vol0");
    let eperm = Some(ErrorCode::Perm.code());
    // Collect every refusal before asserting, so one run shows all wrong codes.
    let got = [
        (
            "WRITE",
            c.write(5000, b"nope", false).err().map(|e| e.server_code()),
        ),
        (
            "WRITE with FUA",
            c.write(0, &[1u8; 4096], true)
                .err()
                .map(|e| e.server_code()),
        ),
        ("TRIM", c.trim(0, 4096).err().map(|e| e.server_code())),
        (
            "WRITE_ZEROES",
            c.write_zeroes(0, 4096, CommandFlags::empty())
                .err()
                .map(|e| e.server_code()),
        ),
    ];
    // The connection stays usable after the refusals.
    c.flush().expect("FLUSH on a read-only export");
    assert_bytes_eq(
        "data on the read-only export",
        5000,
        &data,
        &c.read(5000, data.len() as u32).unwrap(),
    );
    let wrong: Vec<String> = got
        .iter()
        .filter(|(_, r)| *r != Some(eperm))
        .map(|(op, r)| {
            format!(
                "{op}: expected error EPERM (1), got {}",
                r.map_or("success".into(), |c| format!("{c:?}"))
            )
        })
        .collect();
    // `mirrorblkd --help`: "--read-only: writes, trims and zeroes fail with EPERM".
    assert!(
        wrong.is_empty(),
        "read-only export answered mutations wrongly:\n{}",
        wrong.join("\n")
    );
}

/// Writes acknowledged without FUA or FLUSH survive SIGTERM and a restart
/// (every reply is durable); the daemon exits 0 on SIGTERM and logs why.
#[test]
fn data_survives_a_clean_restart() {
    let dir = TestDir::new();
    let mut d = Daemon::start(dir.volume_args("vol0", "64M"));
    let mut c = d.connect("vol0");
    let mut rng = Rng::from_env_or_time("data_survives_a_clean_restart");
    let mut model = vec![0u8; (16 * MIB) as usize];
    for i in 0..64 {
        let off = rng.below(16 * MIB - 70_000);
        let len = rng.range(1, 70_000);
        let data = pattern(1000 + i, len as usize);
        c.write(off, &data, false).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    c.write_zeroes(MIB + 3, 10_000, CommandFlags::empty())
        .unwrap();
    model[(MIB + 3) as usize..(MIB + 10_003) as usize].fill(0);
    drop(c);
    let st = d.terminate();
    assert_eq!(
        st.code(),
        Some(0),
        "SIGTERM should stop cleanly:\n{}",
        d.log()
    );
    assert!(
        d.log().contains("received SIGTERM"),
        "no stop message:\n{}",
        d.log()
    );

    d.restart();
    let mut c = d.connect("vol0");
    assert_bytes_eq(
        "data after a clean restart",
        0,
        &model,
        &read_range(&mut c, 0, 16 * MIB),
    );
    // A second connection type, to be sure the data is in the export and not
    // in some per-connection state.
    let _: TcpStream = c.into_inner();
    qemu_io_ok(&d.uri("vol0"), &[format!("read -P 0 {} 10000", MIB + 3)]);
}

/// DESIGN.md (Operations): "SIGTERM drains in-flight requests and
/// checkpoints", so after a clean stop the journal holds nothing to replay.
#[test]
fn sigterm_checkpoints_so_a_restart_replays_nothing() {
    let dir = TestDir::new();
    let mut a = dir.volume_args("vol0", "64M");
    // A long interval, so only the stop itself can checkpoint.
    a.extend(args(["--checkpoint-interval", "1h"]));
    let mut d = Daemon::start(&a);
    let mut c = d.connect("vol0");
    for i in 0..32u64 {
        c.write(i * 65536, &pattern(i, 65536), false).unwrap();
    }
    drop(c);
    assert_eq!(
        d.terminate().code(),
        Some(0),
        "clean stop failed:\n{}",
        d.log()
    );
    d.restart();
    let line = d.wait_for_log("journal recovery replayed", Duration::from_secs(5));
    assert!(
        line.contains("replayed 0 records"),
        "a clean stop left records to replay: {line}"
    );
    let mut c = d.connect("vol0");
    for i in 0..32u64 {
        assert_bytes_eq(
            "data after SIGTERM",
            i * 65536,
            &pattern(i, 65536),
            &c.read(i * 65536, 65536).unwrap(),
        );
    }
}
