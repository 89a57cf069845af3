//! `--durability flush` in the engine, in-process on temporary files: the
//! applier does not drive journal syncs itself but on its interval (or
//! under pressure), and a FLUSH covers what was acknowledged before it.

use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::tests::{open_opts, Opts};
use super::write::Change;
use super::*;
use crate::buffer::{BufPool, PoolConfig};
use crate::journal::Durability;

/// Opens (recovering) the flush-mode engine of the volume in `dir`, with a
/// checkpoint interval far longer than the applier's sync interval.
fn open_flush_mode(dir: &Path, pool: &Rc<BufPool>) -> Rc<Engine> {
    super::tests::open_with(dir, pool, Durability::Flush)
}

async fn write(e: &Engine, pool: &BufPool, offset: u64, byte: u8) -> Lsn {
    let mut p = pool.payload(4096).await;
    let mut chunks = p.take_chunks();
    chunks.iter_mut().for_each(|c| c.fill(byte));
    p.put_chunks(chunks);
    let lsn = e.mutate(Change::write(offset, p)).await.expect("write");
    lsn.expect("a write of 4 KiB has an LSN")
}

async fn read_byte(e: &Engine, offset: u64) -> u8 {
    let data = e.read(offset, 1).await.expect("read");
    let (b, s, _) = &data.parts[0];
    b[*s]
}

/// Waits (bounded) until `lsn` is applied; returns when it was seen applied.
async fn applied(e: &Engine, lsn: Lsn) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.status().applied_next <= lsn {
        assert!(Instant::now() < deadline, "LSN {lsn:?} not applied in 10 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Instant::now()
}

#[test]
fn without_a_flush_the_applier_syncs_only_after_its_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    tokio_uring::start(async {
        let pool = Rc::new(BufPool::new(&PoolConfig::from_budget(48 << 20)));
        let e = open_flush_mode(dir.path(), &pool);
        let began = Instant::now();
        let lsn = write(&e, &pool, 8192, 0x5a).await;
        // Acknowledged, not yet durable nor applied: reads see the overlay.
        assert_eq!(read_byte(&e, 8192).await, 0x5a);
        tokio::time::sleep(FLUSH_MODE_SYNC_INTERVAL / 4).await;
        if began.elapsed() < FLUSH_MODE_SYNC_INTERVAL {
            assert_eq!(e.journal().syncs(), 0, "the applier asked for a sync early");
            assert!(e.status().applied_next <= lsn, "applied before durable");
        }
        let seen = applied(&e, lsn).await;
        assert!(
            seen - began >= FLUSH_MODE_SYNC_INTERVAL,
            "applied {:?} after the write, before the interval",
            seen - began
        );
        assert_eq!(e.journal().syncs(), 1, "one sync for the interval");
        let asks = e.status().stats.sync_asks;
        assert_eq!(asks.of(SyncAsk::Interval), 1, "{asks:?}");
        assert_eq!(read_byte(&e, 8192).await, 0x5a);
        assert!(e.shutdown(Duration::from_secs(10)).await, "drained");
        assert_eq!(e.status().journal_used, 0, "checkpointed on shutdown");
    });
}

#[test]
fn a_flush_makes_the_written_records_durable_with_one_sync_and_the_applier_follows() {
    let dir = tempfile::tempdir().expect("tempdir");
    tokio_uring::start(async {
        let pool = Rc::new(BufPool::new(&PoolConfig::from_budget(48 << 20)));
        let e = open_flush_mode(dir.path(), &pool);
        let began = Instant::now();
        let mut last = Lsn(0);
        for i in 0..8u64 {
            last = write(&e, &pool, i * 4096, i as u8 + 1).await;
        }
        e.flush().await.expect("flush");
        let quick = began.elapsed() < FLUSH_MODE_SYNC_INTERVAL;
        assert!(
            e.status().durable_next > last,
            "the FLUSH covers every write before it"
        );
        // The applier's batches are all covered: it asks for nothing more
        // (unless its interval passed before the FLUSH, on a slow machine).
        applied(&e, last).await;
        let syncs = e.journal().syncs();
        assert!(syncs == 1 || (!quick && syncs == 2), "{syncs} syncs");
        for i in 0..8u64 {
            assert_eq!(read_byte(&e, i * 4096).await, i as u8 + 1);
        }
    });
}

/// Thousands of 4 KiB writes held unapplied in flush mode, with no FLUSH
/// and an interval that never passes: the applier asks for no journal sync
/// while fewer than half the default pool's buffers are out, far past the
/// old bound (a pool of 864 buffers asked at 432 records), and asks, for
/// buffers, once half are out; then everything is applied.
#[test]
fn small_writes_wait_unapplied_until_half_the_default_pool_is_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    tokio_uring::start(async {
        let pool = Rc::new(BufPool::new(&PoolConfig::from_budget(128 << 20)));
        let opts = Opts {
            durability: Durability::Flush,
            journal_size: 64 << 20,
            flush_sync_interval: Duration::from_secs(600),
        };
        let e = open_opts(dir.path(), &pool, &opts);
        let half = pool.buffers() / 2;
        // Past the old bound (432 records at 128M), under half the pool
        // (2,302).
        let held = 1500u64;
        let writes = (0..held).map(|i| write(&e, &pool, (i % 1024) * 4096, i as u8));
        let lsns = futures_util::future::join_all(writes).await;
        // Let the applier weigh what is held.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let asks = e.status().stats.sync_asks;
        assert_eq!(asks, SyncAsks::default(), "asked with {held} records held");
        assert_eq!(pool.in_use(), held as usize, "each write holds its buffer");
        assert_eq!(e.journal().syncs(), 0);
        assert!(e.status().applied_next <= lsns[0], "applied before durable");
        // Past half the pool: a sync for buffers, then the backlog applied.
        let more = (held..half as u64 + 10).map(|i| write(&e, &pool, (i % 1024) * 4096, i as u8));
        let last = futures_util::future::join_all(more).await;
        applied(&e, *last.last().expect("writes")).await;
        let asks = e.status().stats.sync_asks;
        assert!(asks.of(SyncAsk::Buffers) >= 1, "{asks:?}");
        assert_eq!(
            asks.of(SyncAsk::Interval) + asks.of(SyncAsk::Journal),
            0,
            "{asks:?}"
        );
        assert_eq!(read_byte(&e, 1023 * 4096).await, 1023u64 as u8);
        assert!(e.shutdown(Duration::from_secs(10)).await, "drained");
    });
}
