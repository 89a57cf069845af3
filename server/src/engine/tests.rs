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
use crate::store::{open_store, Preallocate};

const SIZE: u64 = 4 << 20;
const JOURNAL: u64 = 8 << 20;

/// Opens (recovering) the engine of the volume in `dir`.
fn open(dir: &Path, pool: &Rc<BufPool>) -> Rc<Engine> {
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
        size: JOURNAL,
        volume_name: "v",
        volume_size: SIZE,
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
    };
    Engine::start(
        info,
        crate::store::Store::new(store),
        crate::journal::Journal::new(journal),
        pool.clone(),
        tuning,
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
