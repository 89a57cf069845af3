//! Snapshot ordering rules in the engine, in-process on temporary files,
//! with the interleavings that break them made to happen on purpose:
//!
//! - the applier never applies a batch that straddles a snapshot's start
//!   (its copy-on-write must see the store with every record before the
//!   start applied, and none after);
//! - a snapshot read checks a region's mark after its store read
//!   completed, so a region the applier kept and overwrote meanwhile is
//!   read again from the side file.

use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use super::snapshot::{Snapshot, REGION};
use super::write::Change;
use super::*;
use crate::buffer::PoolBuf;
use crate::buffer::{BufPool, Payload, PoolConfig};

fn pool() -> Rc<BufPool> {
    Rc::new(BufPool::new(&PoolConfig::from_budget(48 << 20)))
}

fn open(dir: &Path, pool: &Rc<BufPool>) -> Rc<Engine> {
    super::tests::open_with(dir, pool, crate::journal::Durability::PerWrite)
}

/// A 4 KiB payload of `byte`.
async fn block(pool: &BufPool, byte: u8) -> Payload {
    let mut p = pool.payload(4096).await;
    let mut chunks = p.take_chunks();
    chunks.iter_mut().for_each(|c| c.fill(byte));
    p.put_chunks(chunks);
    p
}

/// Waits (bounded) until every record below `next` is applied.
async fn applied(e: &Engine, next: Lsn) {
    e.wait_applied(next, Duration::from_secs(10))
        .await
        .unwrap_or_else(|err| panic!("records below {next:?} not applied: {err}"));
}

/// `[offset, offset + len)` of snapshot `s`, or why not.
async fn read_snapshot(
    e: &Engine,
    s: &Snapshot,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, nbd::ErrorCode> {
    let data = e.read_snapshot(s, offset, len).await?;
    let mut out = Vec::new();
    for (b, st, end) in &data.parts {
        out.extend_from_slice(&b[*st..*end]);
    }
    Ok(out)
}

/// One group commit carries a record before the snapshot's start and one
/// at it, in the same region but on other blocks (so nothing else keeps
/// them out of one apply batch). The applier must apply the first before
/// it keeps the region for the second: the snapshot then holds the first
/// record's data. Without the cut at the start, the region is kept from a
/// store that lacks it, and the snapshot reads zeroes there.
#[test]
fn a_batch_is_cut_at_a_snapshot_start_so_the_records_before_it_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    tokio_uring::start(async {
        let pool = pool();
        let e = open(dir.path(), &pool);
        let (before, after) = (block(&pool, 0xbb).await, block(&pool, 0xaa).await);
        // From here to the reservation of `after`, nothing awaits that can
        // yield: the appender and the applier run only once both records
        // are reserved, with the snapshot between them.
        let first = e.reserve(Change::write(0, before)).await.expect("before");
        let mut create = std::pin::pin!(e.create_snapshot("s", e.size()));
        assert!(
            futures_util::poll!(create.as_mut()).is_pending(),
            "the snapshot waits for LSN {:?} to be applied",
            first.lsn
        );
        let second = e.reserve(Change::write(4096, after)).await.expect("after");
        let snap = create.await.expect("snapshot");
        assert_eq!(
            snap.start(),
            second.lsn,
            "the snapshot starts at the second record"
        );
        applied(&e, second.lsn.next()).await;
        assert_eq!(
            e.status().journal_batches,
            1,
            "both records in one group commit: one apply batch unless cut"
        );
        let got = read_snapshot(&e, &snap, 0, REGION).await.expect("read");
        assert!(
            got[..4096].iter().all(|&b| b == 0xbb),
            "the record before the start is missing from the snapshot (first bytes {:x?})",
            &got[..8]
        );
        assert!(
            got[4096..].iter().all(|&b| b == 0),
            "the record at the start shows in the snapshot"
        );
        assert_eq!(snap.info().used, REGION, "region 0 was kept");
    });
}

/// A snapshot read whose store read is held until the applier has kept
/// region 0 for the snapshot and overwritten it in the store: the read
/// then returns the new data, and only the region's mark, checked after
/// the store read completed, sends the reader to the side file for the
/// snapshot's data. Checked before the store read (or not at all), the
/// mark is still absent and the snapshot read returns the newer write.
#[test]
fn a_snapshot_read_checks_marks_after_its_store_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    tokio_uring::start(async {
        let pool = pool();
        let e = open(dir.path(), &pool);
        let old = e.mutate(Change::write(0, block(&pool, 0x11).await)).await;
        let old = old.expect("old").expect("an LSN");
        let snap = e.create_snapshot("s", e.size()).await.expect("snapshot");
        assert_eq!(snap.start(), old.next());
        let buf = e.piece_buffers(&[(0, 4096)]).await.remove(0);
        let (open_gate, gate) = tokio::sync::oneshot::channel::<()>();
        let engine: &Engine = &e;
        let held_read = |buf: PoolBuf, at: u64, n: usize| async move {
            gate.await.expect("the gate opens");
            engine.store.read_into(buf, at, n).await
        };
        let mut reader = std::pin::pin!(e.snapshot_piece_via(&snap, (0, 4096), buf, held_read));
        assert!(futures_util::poll!(reader.as_mut()).is_pending(), "held");
        let new = e.mutate(Change::write(0, block(&pool, 0x22).await)).await;
        let new = new.expect("new").expect("an LSN");
        applied(&e, new.next()).await;
        assert_eq!(snap.info().used, REGION, "region 0 kept for the snapshot");
        let now = e.read(0, 1).await.expect("volume read");
        let (b, at, _) = &now.parts[0];
        assert_eq!(b[*at], 0x22, "the store holds the write after the snapshot");
        open_gate.send(()).expect("the reader waits");
        let (buf, s, end) = reader.await.expect("snapshot read");
        let got = &buf[s..end];
        assert!(
            got.iter().all(|&b| b == 0x11),
            "the snapshot read returned data written after it (first bytes {:x?})",
            &got[..8]
        );
    });
}
