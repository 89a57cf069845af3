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

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use mirrorblk_tests::crash_model::{verify, writer_with, CycleStats, Mix, Model, Promise};
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

/// Connects to the guest's mirrorblkd through the host forward, retrying
/// while it starts (qemu accepts the TCP connection before the guest does).
fn connect(guest: &Guest, port: u16) -> Client<TcpStream> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let tried = TcpStream::connect(("127.0.0.1", port))
            .map_err(|e| e.to_string())
            .and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(30))).ok();
                Client::connect(s, "vol0", false).map_err(|e| e.to_string())
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

fn boot(dir: &TestDir, disk: &VolatileDisk, fresh: bool, daemon: &[&str], port: u16) -> Guest {
    let mut params = vec![("mb.daemon", daemon.join(","))];
    if fresh {
        params.push(("mb.fresh", "1".to_string()));
    }
    let mut guest = Guest::start(
        dir,
        &Boot {
            workload: "powercut",
            params,
            mirrorblkd: true,
            disk: Some(disk.uri()),
            forwards: vec![(port, GUEST_PORT)],
            ..Boot::default()
        },
    );
    if let Err(e) = guest.wait_for_line("PASS daemon-started", BOOT_TIMEOUT) {
        panic!("the guest did not start mirrorblkd: {e}");
    }
    guest
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
        let dir = TestDir::new();
        let disk = match image.take() {
            None => VolatileDisk::blank(DISK_BYTES),
            Some(img) => VolatileDisk::serve(img),
        };
        let port = free_port();
        let guest = boot(&dir, &disk, cycle == 0, daemon, port);
        let mut c = connect(&guest, port);
        if cycle > 0 {
            match verify(&mut c, &model) {
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
        if cycle == CUTS {
            break;
        }
        let delay = Duration::from_millis(rng.range(300, 2000));
        let mut wrng = Rng::new(rng.next_u64());
        let st = std::thread::scope(|s| {
            let w = s.spawn(|| writer_with(c, &mut model, &mut wrng, promise, mix));
            // Not a synchronisation sleep: this is the random moment of the cut.
            std::thread::sleep(delay);
            disk.cut(&mut rng);
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
        totals.submitted += st.submitted;
        totals.acked += st.acked;
        totals.made_durable += st.made_durable;
        totals.flushes += st.flushes;
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
