//! The engine driven in-process on temporary files: no daemon, no
//! replication, milliseconds per test.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use super::write::Change;
use super::*;
use crate::buffer::{BufPool, Payload, PoolConfig};
use crate::journal::recovery::{open_and_recover, FileReplay, JournalSpec};
use crate::store::{open_store, Allocation, Preallocate};
use crate::units::{align_down, align_up};

const SIZE: u64 = 4 << 20;
const JOURNAL: u64 = 8 << 20;

/// Opens (recovering) the engine of the volume in `dir`.
fn open(dir: &Path, pool: &Rc<BufPool>) -> Rc<Engine> {
    open_with(dir, pool, crate::journal::Durability::PerWrite)
}

/// Opens (recovering) the engine of the volume in `dir` with `durability`,
/// a checkpoint interval of a minute and nothing written in place.
pub(super) fn open_with(
    dir: &Path,
    pool: &Rc<BufPool>,
    durability: crate::journal::Durability,
) -> Rc<Engine> {
    let opts = Opts {
        durability,
        ..Opts::default()
    };
    open_opts(dir, pool, &opts)
}

/// How a test opens its engine.
pub(super) struct Opts {
    pub durability: crate::journal::Durability,
    pub journal_size: u64,
    pub flush_sync_interval: Duration,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            durability: crate::journal::Durability::PerWrite,
            journal_size: JOURNAL,
            flush_sync_interval: super::FLUSH_MODE_SYNC_INTERVAL,
        }
    }
}

/// Opens (recovering) the engine of the volume in `dir` as `opts` say, with
/// a checkpoint interval of a minute and nothing written in place.
pub(super) fn open_opts(dir: &Path, pool: &Rc<BufPool>, opts: &Opts) -> Rc<Engine> {
    let data = dir.join("data");
    let store = open_store(&data, Some(SIZE), false, Preallocate::Sparse).expect("store");
    let replay = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&data)
        .expect("data file");
    let mut target = FileReplay {
        file: &replay,
        block_device: false,
    };
    let spec = JournalSpec {
        path: &dir.join("journal"),
        size: opts.journal_size,
        volume_name: "v",
        volume_size: SIZE,
        durability: opts.durability,
    };
    let journal = open_and_recover(&spec, &mut target).expect("journal");
    let info = VolumeInfo {
        name: "v".into(),
        description: String::new(),
        size: crate::units::SharedSize::new(SIZE),
        read_only: false,
        journal: dir.join("journal"),
    };
    let tuning = Tuning {
        checkpoint_interval: Duration::from_secs(60),
        in_place_min: 0,
        flush_sync_interval: opts.flush_sync_interval,
    };
    Engine::start(
        info,
        crate::store::Store::new(store),
        crate::journal::Journal::new(journal),
        pool.clone(),
        tuning,
        Vec::new(),
    )
}

fn pool() -> Rc<BufPool> {
    Rc::new(BufPool::new(&PoolConfig::from_budget(48 << 20)))
}

async fn payload(pool: &BufPool, len: usize, byte: u8) -> Payload {
    let mut p = pool.payload(len).await;
    let mut chunks = p.take_chunks();
    for c in &mut chunks {
        c.iter_mut().for_each(|b| *b = byte);
    }
    p.put_chunks(chunks);
    p
}

async fn read(e: &Engine, offset: u64, len: u64) -> Vec<u8> {
    let data = e.read(offset, len).await.expect("read");
    let mut out = Vec::new();
    for (b, s, end) in &data.parts {
        out.extend_from_slice(&b[*s..*end]);
    }
    out
}

#[test]
fn writes_read_back_before_and_after_apply_and_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    tokio_uring::start(async {
        let pool = pool();
        let e = open(dir.path(), &pool);
        let a = Change::write(4096, payload(&pool, 8192, 0xaa).await);
        let b = Change::write(4096 + 100, payload(&pool, 10, 0xbb).await);
        assert_eq!(e.mutate(a).await.expect("write a"), Some(Lsn(1)));
        assert_eq!(e.mutate(b).await.expect("write b"), Some(Lsn(2)));
        let z = Change::write_zeroes(4096 + 8192 - 512, 512, false);
        assert_eq!(e.mutate(z).await.expect("zeroes"), Some(Lsn(3)));
        // Newest wins, whether or not the applier got there yet.
        let check = |got: Vec<u8>| {
            assert!(got[..100].iter().all(|&x| x == 0xaa));
            assert!(got[100..110].iter().all(|&x| x == 0xbb));
            assert!(got[110..8192 - 512].iter().all(|&x| x == 0xaa));
            assert!(got[8192 - 512..].iter().all(|&x| x == 0));
        };
        check(read(&e, 4096, 8192).await);
        assert!(e.shutdown(Duration::from_secs(10)).await, "drained");
        let s = e.status();
        assert_eq!(s.applied_next, Lsn(4));
        assert_eq!(s.journal_used, 0, "checkpointed on shutdown");
        check(read(&e, 4096, 8192).await);
    });
    // A restart replays nothing and reads the same.
    tokio_uring::start(async {
        let pool = pool();
        let e = open(dir.path(), &pool);
        assert_eq!(e.status().next_lsn, Lsn(4), "LSNs continue");
        let got = read(&e, 4096 + 100, 10).await;
        assert!(got.iter().all(|&x| x == 0xbb));
    });
}

#[test]
fn a_replicated_record_must_carry_the_next_lsn_and_fit_the_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    tokio_uring::start(async {
        let pool = pool();
        let e = open(dir.path(), &pool);
        let err = e
            .append_replicated(Lsn(2), Change::trim(0, 4096))
            .await
            .expect_err("LSN 2 before LSN 1");
        assert!(
            matches!(
                err,
                EngineError::OutOfOrder {
                    got: 2,
                    want: Lsn(1)
                }
            ),
            "{err}"
        );
        let err = e
            .append_replicated(Lsn(1), Change::trim(SIZE - 4096, 8192))
            .await
            .expect_err("past the end");
        assert!(matches!(err, EngineError::OutOfRange { .. }), "{err}");
        let lsn = e.append_replicated(Lsn(1), Change::trim(0, 4096)).await;
        assert_eq!(lsn.expect("in order"), Lsn(1));
    });
}

/// Records what the engine tells replication, and holds records back.
#[derive(Default)]
struct Recorder {
    reserved: RefCell<Vec<Lsn>>,
    applied: RefCell<Vec<Lsn>>,
    released: RefCell<Vec<Lsn>>,
    floor: std::cell::Cell<Option<Lsn>>,
}

impl ReplicationHooks for Recorder {
    fn reserved(&self, rec: &Rc<Record>) {
        self.reserved.borrow_mut().push(rec.lsn);
    }
    fn applied(&self, applied_next: Lsn, _: &Journal) {
        self.applied.borrow_mut().push(applied_next);
    }
    fn retention_floor(&self) -> Option<Lsn> {
        self.floor.get()
    }
    fn before_release(&self, target: Lsn, _: &Journal) -> io::Result<()> {
        self.released.borrow_mut().push(target);
        Ok(())
    }
}

#[test]
fn replication_hooks_see_every_record_in_order_and_hold_the_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    tokio_uring::start(async {
        let pool = pool();
        let e = open(dir.path(), &pool);
        let hooks = Rc::new(Recorder::default());
        // A replica still needs LSN 2 and after.
        hooks.floor.set(Some(Lsn(2)));
        e.set_hooks(hooks.clone());
        for i in 0..3u64 {
            let m = Change::write(i * 4096, payload(&pool, 4096, i as u8).await);
            e.mutate(m).await.expect("write");
        }
        assert!(e.shutdown(Duration::from_secs(10)).await, "drained");
        assert_eq!(*hooks.reserved.borrow(), [Lsn(1), Lsn(2), Lsn(3)]);
        let applied = hooks.applied.borrow();
        assert_eq!(applied.last(), Some(&Lsn(4)));
        assert!(applied.windows(2).all(|w| w[0] <= w[1]), "{applied:?}");
        // Everything is applied, but the journal keeps what the replica needs.
        assert_eq!(e.status().applied_next, Lsn(4));
        assert_eq!(e.journal().checkpoint_lsn(), Lsn(2));
        assert!(e.status().journal_used > 0);
        assert!(hooks.released.borrow().iter().all(|&t| t <= Lsn(2)));
        assert!(!hooks.released.borrow().is_empty(), "told before releasing");
    });
}

/// A mutation of the model test, and what it does to a byte image.
#[derive(Debug, Clone, Copy)]
enum ModelOp {
    Write(u64, u64, u8),
    Zeroes(u64, u64),
    Trim(u64, u64),
}

impl ModelOp {
    fn apply(self, image: &mut [u8]) {
        let fill = |image: &mut [u8], a: u64, b: u64, v: u8| {
            if a < b {
                image[a as usize..b as usize].fill(v);
            }
        };
        match self {
            ModelOp::Write(o, l, v) => fill(image, o, o + l, v),
            ModelOp::Zeroes(o, l) => fill(image, o, o + l, 0),
            // Only the whole blocks inside a trim read as zeroes.
            ModelOp::Trim(o, l) => fill(image, align_up(o), align_down(o + l), 0),
        }
    }
}

/// A random mutation from `x` (xorshift state): unaligned small writes,
/// aligned large ones, write-zeroes and trims.
fn model_op(x: &mut u64) -> ModelOp {
    let mut next = || {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    };
    let kind = next() % 10;
    let len = if kind < 5 {
        1 + next() % 9000
    } else {
        4096 * (1 + next() % 64)
    };
    let off = (next() % (SIZE - len)) & if kind < 5 { !0 } else { !4095 };
    match kind {
        0..=7 => ModelOp::Write(off, len, (next() % 255 + 1) as u8),
        8 => ModelOp::Zeroes(off, len),
        _ => ModelOp::Trim(off, len),
    }
}

/// The image after every logged mutation up to LSN `upto`.
fn model_at(log: &[(Lsn, ModelOp)], upto: u64) -> Vec<u8> {
    let mut ops: Vec<&(Lsn, ModelOp)> = log.iter().filter(|(l, _)| l.0 <= upto).collect();
    ops.sort_by_key(|(l, _)| *l);
    assert_eq!(ops.len() as u64, upto, "every LSN up to {upto} logged");
    let mut image = vec![0u8; SIZE as usize];
    for (_, op) in ops {
        op.apply(&mut image);
    }
    image
}

async fn read_snapshot(e: &Engine, s: &snapshot::Snapshot) -> Result<Vec<u8>, nbd::ErrorCode> {
    let data = e.read_snapshot(s, 0, SIZE).await?;
    let mut out = Vec::new();
    for (b, st, end) in &data.parts {
        out.extend_from_slice(&b[*st..*end]);
    }
    Ok(out)
}

/// Mutations in concurrent batches run while snapshots are taken and read:
/// each snapshot reads exactly the model image at its LSN, during the
/// writes and after; one with a two-region bound breaks and fails reads.
#[test]
fn snapshots_read_the_model_at_their_lsn_while_mutations_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    tokio_uring::start(async {
        let pool = pool();
        let e = open(dir.path(), &pool);
        let log: Rc<RefCell<Vec<(Lsn, ModelOp)>>> = Rc::default();
        let writer = {
            let (e, pool, log) = (e.clone(), pool.clone(), log.clone());
            tokio_uring::spawn(async move {
                let mut x = 0x2545_f491_4f6c_dd1d_u64;
                for _ in 0..40 {
                    let ops: Vec<ModelOp> = (0..8).map(|_| model_op(&mut x)).collect();
                    let runs = ops.into_iter().map(|op| {
                        let (e, pool, log) = (e.clone(), pool.clone(), log.clone());
                        async move {
                            let m = match op {
                                ModelOp::Write(o, l, v) => {
                                    Change::write(o, payload(&pool, l as usize, v).await)
                                }
                                ModelOp::Zeroes(o, l) => Change::write_zeroes(o, l, false),
                                ModelOp::Trim(o, l) => Change::trim(o, l),
                            };
                            let lsn = e.mutate(m).await.expect("mutate").expect("an LSN");
                            log.borrow_mut().push((lsn, op));
                        }
                    });
                    // Each batch in flight while the next is reserved:
                    // the applier's queue holds records of several.
                    for run in runs {
                        tokio_uring::spawn(run);
                    }
                    tokio::task::yield_now().await;
                }
                while (log.borrow().len() as u64) < 40 * 8 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        let s1 = e.create_snapshot("s1", SIZE).await.expect("s1");
        let tight = e
            .create_snapshot("tight", 2 * snapshot::REGION)
            .await
            .expect("tight");
        let lsn = s1.info().lsn;
        assert!(lsn > 0, "taken after some writes");
        while (log.borrow().len() as u64) < lsn {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let want = model_at(&log.borrow(), lsn);
        let mut reads = 0;
        while !writer.is_finished() || reads < 3 {
            let got = read_snapshot(&e, &s1).await.expect("snapshot read");
            assert!(
                got == want,
                "snapshot read {reads} differs from the model at LSN {lsn}"
            );
            assert_zero_runs_read_zero(&e.snapshot_allocation(&s1, 0, SIZE), &want);
            reads += 1;
        }
        writer.await.expect("writer");
        let all = log.borrow().len() as u64;
        assert!(
            read(&e, 0, SIZE).await == model_at(&log.borrow(), all),
            "the volume"
        );
        assert!(
            read_snapshot(&e, &s1).await.expect("read") == want,
            "after the writes"
        );
        assert!(
            s1.info().used > 0 && s1.broken().is_none(),
            "{:?}",
            s1.info()
        );
        let why = tight.broken().expect("the tight one broke");
        assert!(why.contains("space bound"), "{why}");
        assert_eq!(read_snapshot(&e, &tight).await, Err(nbd::ErrorCode::Io));
        assert_eq!(e.snapshot_list().len(), 2);
        e.delete_snapshot("s1").expect("delete");
        assert!(read_snapshot(&e, &s1).await.is_err(), "deleted: reads fail");
        assert!(!snapshot::side_path(&dir.path().join("journal"), "s1").exists());
    });
}

/// Every run `runs` (from offset 0) calls zero reads as zeroes in `image`.
fn assert_zero_runs_read_zero(runs: &[crate::store::Allocation], image: &[u8]) {
    let mut pos = 0usize;
    for r in runs {
        let end = pos + r.length as usize;
        if r.zero {
            let bad = image[pos..end].iter().position(|&b| b != 0);
            assert!(
                bad.is_none(),
                "{r:?} at {pos} claims zero, byte {} is not",
                pos + bad.unwrap_or(0)
            );
        }
        pos = end;
    }
    assert_eq!(pos, image.len(), "the runs cover the image: {runs:?}");
}

/// A snapshot's allocation: its own holes and zeroes where nothing changed
/// after it, data where something did (a hole filled or data trimmed
/// after it must not show the volume's new state).
#[test]
fn a_snapshot_reports_its_own_holes_and_data_where_changed_after_it() {
    const R: u64 = snapshot::REGION;
    let dir = tempfile::tempdir().expect("tempdir");
    tokio_uring::start(async {
        let pool = pool();
        let e = open(dir.path(), &pool);
        let pool = &pool;
        let write =
            |at: u64| async move { Change::write(at * R, payload(pool, R as usize, 0x5a).await) };
        // Regions: 0 data; 1 data, trimmed before; 2 zeroes; 3 data,
        // trimmed after; 4 a hole, written after; 5.. never written.
        for m in [write(0).await, write(1).await, write(3).await] {
            e.mutate(m).await.expect("write");
        }
        e.mutate(Change::trim(R, R)).await.expect("trim 1");
        e.mutate(Change::write_zeroes(2 * R, R, false))
            .await
            .expect("zeroes 2");
        let snap = e.create_snapshot("s", SIZE).await.expect("snapshot");
        e.mutate(Change::trim(3 * R, R)).await.expect("trim 3");
        e.mutate(write(4).await).await.expect("write 4");
        for _ in 0..1000 {
            if e.status().applied_next == e.status().next_lsn {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let now = e.allocation(3 * R, R);
        assert!(now[0].hole, "the volume's region 3 is a hole now: {now:?}");

        let runs = e.snapshot_allocation(&snap, 0, SIZE);
        let at = |r: u64| {
            let mut pos = 0;
            let run = runs.iter().find(|a| {
                pos += a.length;
                pos > r * R
            });
            *run.unwrap_or_else(|| panic!("region {r} is not in {runs:?}"))
        };
        let (data, hole) = (Allocation::data(R), Allocation::hole(R));
        for (r, want) in [(0, data), (1, hole), (3, data), (4, data), (5, hole)] {
            assert!(
                at(r).same_state(&want),
                "region {r}: {:?} in {runs:?}",
                at(r)
            );
        }
        assert!(at(2).zero, "region 2 reads as zeroes: {runs:?}");
        let image = read_snapshot(&e, &snap).await.expect("snapshot read");
        assert_zero_runs_read_zero(&runs, &image);
    });
}

/// Buffers taken ahead ([`Engine::try_read_buffers`]) read exactly what a
/// plain read does, pending records included; with the pool's 1 MiB
/// buffers all held elsewhere, taking them fails at once instead of
/// waiting (a resync must not wait on buffers its own link pins).
#[test]
fn a_read_into_buffers_taken_ahead_reads_the_same_and_never_waits() {
    use crate::buffer::MAX_CHUNK;
    let dir = tempfile::tempdir().expect("tempdir");
    tokio_uring::start(async {
        let pool = pool();
        let e = open(dir.path(), &pool);
        let w = Change::write((1 << 20) + 4096, payload(&pool, 12288, 0x5c).await);
        e.mutate(w).await.expect("write");
        let want = read(&e, 1 << 20, 1 << 20).await;
        let bufs = e.try_read_buffers(1 << 20).expect("free buffers");
        let data = e.read_with(1 << 20, 1 << 20, bufs).await.expect("read");
        let mut got = Vec::new();
        for (b, s, end) in &data.parts {
            got.extend_from_slice(&b[*s..*end]);
        }
        assert!(got == want, "the same bytes as a plain read");
        // A shorter read (a volume's last region) fits the same buffers.
        let bufs = e.try_read_buffers(1 << 20).expect("free buffers");
        let short = e.read_with(1 << 20, 8192, bufs).await.expect("short read");
        assert_eq!(short.xxh3(), xxhash_rust::xxh3::xxh3_64(&want[..8192]));
        drop((data, short));
        let mut held = Vec::new();
        while let Some(b) = pool.try_take_many(&[MAX_CHUNK]) {
            held.extend(b);
        }
        assert!(!held.is_empty());
        assert!(
            e.try_read_buffers(1 << 20).is_none(),
            "no free 1 MiB buffer"
        );
        held.pop();
        assert!(e.try_read_buffers(1 << 20).is_some(), "one given back");
        drop(held);
        assert!(e.shutdown(Duration::from_secs(10)).await, "drained");
    });
}
