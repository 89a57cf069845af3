//! Power cuts (DESIGN.md invariant 1 at the power level): mirrorblkd runs in
//! a Linux guest, its data and journal files on ext4 on a disk with a
//! volatile write cache ([`VolatileDisk`]). A host client pipelines
//! versioned writes with FUA and FLUSH ([`crash_model`]); at a random moment
//! the disk loses power (every sector not flushed keeps its old contents or
//! any version written since, at random) and qemu is killed. The next boot
//! mounts what the disk kept and starts mirrorblkd, whose journal recovery
//! must give back what its replies promised: in the default mode every
//! acknowledged write; under the NBD contract every write acknowledged with
//! FUA or before a FLUSH that completed. Page cache is not durable, and
//! neither is the disk's cache: only the disk's medium survives here.
//!
//! [`crash_model`]: mirrorblk_tests::crash_model

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use mirrorblk_tests::crash_model::{
    verify, writer_until, writer_with, CycleStats, Mix, Model, Promise, BLOCKS, BS,
    WRITER_SAFETY_NET,
};
use mirrorblk_tests::kernel::{Boot, Guest, GUEST_PORT};
use mirrorblk_tests::util::{Rng, MIB};
use mirrorblk_tests::volatile_disk::VolatileDisk;
use mirrorblk_tests::TestDir;
use nbd::Client;

/// The guest's disk: ext4 holding the 16 MiB volume and its 16 MiB journal.
const DISK_BYTES: u64 = 96 * MIB;
/// Power cuts per test (one boot more than that).
const CUTS: usize = 3;
/// One boot, to mirrorblkd serving (TCG on a loaded 2-core machine).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// A whole test must end within this, well inside nextest's limit.
const BUDGET: Duration = Duration::from_secs(600);

/// An unused port on 127.0.0.1 for qemu's host forward.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address").port()
}

/// Connects to `export` of the guest's mirrorblkd through the host forward, retrying
/// while it starts (qemu accepts the TCP connection before the guest does).
fn connect(guest: &Guest, port: u16, export: &str) -> Client<TcpStream> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let tried = TcpStream::connect(("127.0.0.1", port))
            .map_err(|e| e.to_string())
            .and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(30))).ok();
                Client::connect(s, export, false).map_err(|e| e.to_string())
            });
        match tried {
            Ok(c) => return c,
            Err(e) if Instant::now() >= deadline => panic!(
                "mirrorblkd in the guest did not serve within {BOOT_TIMEOUT:?}: {e}\nconsole:\n{}",
                guest.console()
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The host ports of one boot's forwards: the daemon's NBD port, and with
/// snapshots the guest's snapshot channel (`snapshot_server` in
/// `tests/kernel/workloads.sh`).
struct Ports {
    nbd: u16,
    snapshots: Option<u16>,
}

impl Ports {
    fn new(snapshots: bool) -> Ports {
        Ports {
            nbd: free_port(),
            snapshots: snapshots.then(free_port),
        }
    }
}

fn boot(dir: &TestDir, disk: &VolatileDisk, fresh: bool, daemon: &[&str], ports: &Ports) -> Guest {
    let mut params = vec![("mb.daemon", daemon.join(","))];
    if fresh {
        params.push(("mb.fresh", "1".to_string()));
    }
    let mut forwards = vec![(ports.nbd, GUEST_PORT)];
    if let Some(port) = ports.snapshots {
        params.push(("mb.snapshots", "1".to_string()));
        forwards.push((port, SNAPSHOT_PORT));
    }
    let mut guest = Guest::start(
        dir,
        &Boot {
            workload: "powercut",
            params,
            mirrorblk: ports.snapshots.is_some(),
            mirrorblkd: true,
            disk: Some(disk.uri()),
            forwards,
            ..Boot::default()
        },
    );
    if let Err(e) = guest.wait_for_line("PASS daemon-started", BOOT_TIMEOUT) {
        panic!("the guest did not start mirrorblkd: {e}");
    }
    guest
}

/// Checks what the volume kept through the last cut against the model,
/// then takes what it holds as the model's new truth.
fn check_volume(
    c: &mut Client<TcpStream>,
    model: &mut Model,
    guest: &Guest,
    cycle: usize,
    promise: Promise,
) {
    match verify(c, model) {
        Ok(seen) => {
            c.flush().expect("flush after verification");
            model.rebase(&seen);
        }
        Err(errors) => panic!(
            "after power cut {cycle}: {} blocks break the promise ({promise:?}), first ones:\n{}\nguest console (recovery):\n{}",
            errors.len(),
            errors.iter().take(10).cloned().collect::<Vec<_>>().join("\n"),
            guest.console()
        ),
    }
}

/// The guest's disk for the next boot: the image the last cut left, or a
/// blank one for the first.
fn next_disk(image: &mut Option<Vec<u8>>) -> VolatileDisk {
    match image.take() {
        None => VolatileDisk::blank(DISK_BYTES),
        Some(img) => VolatileDisk::serve(img),
    }
}

/// Writes until a random moment 0.3-2 s on, then cuts the disk's power
/// and kills qemu; returns what the writer did.
fn write_until_cut(
    c: Client<TcpStream>,
    model: &mut Model,
    rng: &mut Rng,
    (disk, guest): (&VolatileDisk, Guest),
    (promise, mix): (Promise, Mix),
    cycle: usize,
) -> CycleStats {
    let delay = Duration::from_millis(rng.range(300, 2000));
    let mut wrng = Rng::new(rng.next_u64());
    let st = std::thread::scope(|s| {
        let w = s.spawn(|| writer_with(c, model, &mut wrng, promise, mix, WRITER_SAFETY_NET));
        // Not a synchronisation sleep: this is the random moment of the cut.
        std::thread::sleep(delay);
        disk.cut(rng);
        drop(guest);
        w.join().expect("writer thread panicked")
    });
    assert!(
        st.server_errors.is_empty(),
        "cycle {cycle}: errors before the cut: {:?}",
        st.server_errors
    );
    assert!(
        disk.errors().is_empty(),
        "the disk's connections: {:?}",
        disk.errors()
    );
    eprintln!(
        "cut {cycle} after {delay:?}: {st:?}; disk {:?}",
        disk.stats()
    );
    st
}

/// Boots, checks what the last cut left against the model, writes until a
/// random moment, cuts the power; `CUTS` times, then checks once more.
fn power_cut_loop(test: &str, promise: Promise, mix: Mix, daemon: &[&str]) {
    let started = Instant::now();
    let mut rng = Rng::from_env_or_time(test);
    let mut model = Model::new();
    let mut image: Option<Vec<u8>> = None;
    let mut totals = CycleStats::default();
    for cycle in 0..=CUTS {
        assert!(
            started.elapsed() < BUDGET,
            "{test} exceeded {BUDGET:?} at cycle {cycle}"
        );
        let (dir, disk, ports) = (TestDir::new(), next_disk(&mut image), Ports::new(false));
        let guest = boot(&dir, &disk, cycle == 0, daemon, &ports);
        let mut c = connect(&guest, ports.nbd, "vol0");
        if cycle > 0 {
            check_volume(&mut c, &mut model, &guest, cycle, promise);
        }
        if cycle == CUTS {
            break;
        }
        let st = write_until_cut(
            c,
            &mut model,
            &mut rng,
            (&disk, guest),
            (promise, mix),
            cycle,
        );
        totals.add(&st, cycle);
        image = Some(disk.durable_image());
    }
    eprintln!("{CUTS} power cuts in {:?}: {totals:?}", started.elapsed());
    // Vacuous unless writes were really promised and then checked.
    assert!(
        totals.made_durable >= 30,
        "too few promised writes to prove anything: {totals:?}"
    );
}

/// The default mode's promise: every acknowledged write survives a power
/// cut, FUA and FLUSH or not (journal `O_DIRECT | O_DSYNC`).
#[test]
fn every_acknowledged_write_survives_power_cuts() {
    power_cut_loop(
        "every_acknowledged_write_survives_power_cuts",
        Promise::EveryReply,
        Mix::FREQUENT,
        &[],
    );
}

/// The same with writes of 2 and 3 blocks going to the data file in place
/// (`--in-place-min 8K`, their data `O_DSYNC` before the journal records
/// them) among journaled single-block writes on the same blocks.
#[test]
fn every_acknowledged_write_survives_power_cuts_with_in_place_writes() {
    power_cut_loop(
        "every_acknowledged_write_survives_power_cuts_with_in_place_writes",
        Promise::EveryReply,
        Mix::FREQUENT,
        &["--in-place-min", "8K"],
    );
}

/// `--durability flush` keeps NBD's contract through real power cuts: every
/// FUA write, and every write acknowledged before a FLUSH that completed,
/// survives (journal records without `O_DSYNC`, one group `fdatasync` per
/// FLUSH); writes no FLUSH covered may be lost. FLUSH and FUA are rare here
/// (and no write goes in place, whose `O_DSYNC` would flush the disk's
/// cache), so many acknowledged writes are in the cache at the cut: with
/// the per-write promise checked instead, this test fails.
#[test]
fn flushed_and_fua_writes_survive_power_cuts_with_flush_durability() {
    power_cut_loop(
        "flushed_and_fua_writes_survive_power_cuts_with_flush_durability",
        Promise::Nbd,
        Mix::RARE,
        &["--durability", "flush"],
    );
}

/// The same with writes of 2 and 3 blocks going to the data file in place.
#[test]
fn flushed_and_fua_writes_survive_power_cuts_with_flush_durability_in_place() {
    power_cut_loop(
        "flushed_and_fua_writes_survive_power_cuts_with_flush_durability_in_place",
        Promise::Nbd,
        Mix::FREQUENT,
        &["--durability", "flush", "--in-place-min", "8K"],
    );
}

/// The guest's port for taking snapshots (`snapshot_server` in
/// `tests/kernel/workloads.sh`).
const SNAPSHOT_PORT: u16 = 10810;
/// Power cuts in the snapshot test (a snapshot taken before each).
const SNAPSHOT_CUTS: usize = 3;

/// A snapshot taken in the guest: its name, and the version each block
/// held when it was taken (every write before it answered, none in flight,
/// each answered write durable: the model is exact then).
struct Taken {
    name: String,
    versions: Vec<u64>,
}

/// Writes for a random 0.2-0.8 s, waits for every reply, then takes
/// snapshot `name` in the guest through the snapshot channel.
fn take_snapshot(
    c: &mut Client<TcpStream>,
    model: &mut Model,
    rng: &mut Rng,
    (guest, port): (&Guest, u16),
    name: String,
) -> Taken {
    let stop = Instant::now() + Duration::from_millis(rng.range(200, 800));
    let mut wrng = Rng::new(rng.next_u64());
    let st = writer_until(
        c,
        model,
        &mut wrng,
        Promise::EveryReply,
        Mix::FREQUENT,
        stop,
    );
    assert!(
        st.server_errors.is_empty() && st.acked > 0,
        "writes before snapshot {name}: {st:?}"
    );
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let out = loop {
        // qemu accepts the connection before the guest listens: an empty
        // answer means try again.
        let tried = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            s.write_all(format!("{name}\n").as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        });
        match tried {
            Ok(out) if out.contains("rc=") => break out,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => panic!(
                "no answer from the guest's snapshot channel: {other:?}\nconsole:\n{}",
                guest.console()
            ),
        }
    };
    assert!(
        out.trim_end().ends_with("rc=0"),
        "snapshot create {name} in the guest failed: {out}\nconsole:\n{}",
        guest.console()
    );
    eprintln!("snapshot {name} after {st:?}: {}", out.trim());
    Taken {
        name,
        versions: model.floor.clone(),
    }
}

/// How a snapshot read back after a cut.
#[derive(Debug, PartialEq, Eq)]
enum SnapshotRead {
    /// Exactly as taken; `changed` blocks of it differ from the volume now
    /// (overwritten after it: their data came from the side file).
    Exact { changed: usize },
    /// Every read failed with EIO (the daemon found it broken).
    Broken,
}

/// Reads snapshot `t` back through `vol0@NAME`: exactly the versions it was
/// taken with, or broken (EIO); anything else fails the test. `now` is the
/// version each block of the volume holds now.
fn check_snapshot(
    guest: &Guest,
    port: u16,
    t: &Taken,
    zero: &std::collections::HashSet<u64>,
    now: &[u64],
) -> SnapshotRead {
    let mut c = connect(guest, port, &format!("vol0@{}", t.name));
    let model = Model {
        floor: t.versions.clone(),
        allowed: t.versions.iter().map(|&v| vec![v]).collect(),
        zero_versions: zero.clone(),
        next_version: u64::MAX,
    };
    let per_read = 256u64;
    let (mut read, mut failed, mut errors) = (0, 0, Vec::new());
    for first in (0..BLOCKS).step_by(per_read as usize) {
        match c.read(first * BS as u64, (per_read as usize * BS) as u32) {
            Ok(data) => {
                read += 1;
                for (i, blk) in data.chunks(BS).enumerate() {
                    if let Err(e) = model.classify(first + i as u64, blk) {
                        errors.push(e);
                    }
                }
            }
            Err(nbd::ClientError::Server(5)) => failed += 1,
            Err(e) => panic!("reading snapshot {}: {e}", t.name),
        }
    }
    assert!(
        errors.is_empty(),
        "snapshot {} reads data it was not taken with ({} blocks), first ones:\n{}\nguest console (recovery):\n{}",
        t.name,
        errors.len(),
        errors.iter().take(10).cloned().collect::<Vec<_>>().join("\n"),
        guest.console()
    );
    assert!(
        read == 0 || failed == 0,
        "snapshot {}: {read} reads worked, {failed} failed with EIO",
        t.name
    );
    if failed > 0 {
        return SnapshotRead::Broken;
    }
    let changed = t.versions.iter().zip(now).filter(|(a, b)| a != b).count();
    SnapshotRead::Exact { changed }
}

/// Snapshots through power cuts (the crash rule of
/// `server/src/engine/snapshot_file.rs`: a region's old data and map entry
/// are `fdatasync`ed before the store is overwritten there). Before each
/// cut, writes stop, every reply comes, and a snapshot is taken in the
/// guest (`mirrorblk snapshot create`); writes then go on, overwriting
/// regions, until the power is cut. After each boot the volume must keep
/// every acknowledged write, and every snapshot taken so far must read
/// exactly the volume as of its creation, or be broken (EIO): never other
/// data. Without the `fdatasync`, the cut loses map entries or kept data
/// of regions the store was overwritten in, replay keeps those regions
/// again from the overwritten store, and the snapshot reads newer data.
#[test]
fn snapshots_read_their_start_or_are_broken_after_power_cuts() {
    let test = "snapshots_read_their_start_or_are_broken_after_power_cuts";
    let started = Instant::now();
    let mut rng = Rng::from_env_or_time(test);
    let mut model = Model::new();
    let mut image: Option<Vec<u8>> = None;
    let mut taken: Vec<Taken> = Vec::new();
    let mut reads = Vec::new();
    for cycle in 0..=SNAPSHOT_CUTS {
        assert!(
            started.elapsed() < BUDGET,
            "{test} exceeded {BUDGET:?} at cycle {cycle}"
        );
        let (dir, disk, ports) = (TestDir::new(), next_disk(&mut image), Ports::new(true));
        let guest = boot(&dir, &disk, cycle == 0, &[], &ports);
        let mut c = connect(&guest, ports.nbd, "vol0");
        if cycle > 0 {
            check_volume(&mut c, &mut model, &guest, cycle, Promise::EveryReply);
            for t in &taken {
                let r = check_snapshot(&guest, ports.nbd, t, &model.zero_versions, &model.floor);
                eprintln!("after cut {cycle}: snapshot {}: {r:?}", t.name);
                reads.push(r);
            }
        }
        if cycle == SNAPSHOT_CUTS {
            break;
        }
        let port = ports.snapshots.expect("a snapshot channel");
        taken.push(take_snapshot(
            &mut c,
            &mut model,
            &mut rng,
            (&guest, port),
            format!("s{cycle}"),
        ));
        let mix = (Promise::EveryReply, Mix::FREQUENT);
        write_until_cut(c, &mut model, &mut rng, (&disk, guest), mix, cycle);
        image = Some(disk.durable_image());
    }
    eprintln!(
        "{SNAPSHOT_CUTS} power cuts in {:?}: snapshot reads {reads:?}",
        started.elapsed()
    );
    // Vacuous unless some snapshot read exactly with regions overwritten
    // after it (kept in its side file).
    assert!(
        reads
            .iter()
            .any(|r| matches!(r, SnapshotRead::Exact { changed } if *changed > 0)),
        "no snapshot read back with blocks changed after it: {reads:?}"
    );
}
