use std::time::Duration;

use super::*;

const MIB: u64 = 1 << 20;

#[test]
fn class_choice() {
    assert_eq!(BufPool::class_for(1), 4096);
    assert_eq!(BufPool::class_for(4096), 4096);
    assert_eq!(BufPool::class_for(4097), 16 << 10);
    assert_eq!(BufPool::class_for(MAX_CHUNK), MAX_CHUNK);
}

/// How a budget is split: the small classes their shares, the 1 MiB class
/// the rest, never over the budget, never below 40 chunks at a budget the
/// configuration accepts (48 MiB and up).
#[test]
fn a_budget_is_split_by_bytes_within_the_budget() {
    // (budget, counts of 4K, 16K, 64K, 256K, 1M)
    let table = [
        // The default: 4,096 4 KiB buffers (the old split had 384, and
        // 864 buffers in all under tokio-uring's 1,024).
        (128 * MIB, [4096, 256, 128, 32, 92]),
        (64 * MIB, [2048, 128, 64, 16, 46]),
        // The smallest accepted budget: the small classes shrink so that
        // 40 chunks fit.
        (48 * MIB, [910, 56, 28, 7, 40]),
        (48 * MIB + 12345, [911, 56, 28, 7, 40]),
        // Large budgets are spent, not capped at what a ring registers.
        (1 << 30, [32768, 2048, 1024, 256, 736]),
        // Below the minimum (tests only): chunks alone, within the budget.
        (40 * MIB, [0, 0, 0, 0, 40]),
        (8 * MIB, [0, 0, 0, 0, 8]),
        (0, [0, 0, 0, 0, 0]),
    ];
    for (budget, counts) in table {
        let cfg = PoolConfig::from_budget(budget);
        assert_eq!(cfg.counts, counts, "budget {budget}");
    }
    let min = crate::config::defaults::MIN_BUFFER_MEMORY.0;
    for budget in (min..=4 << 30).step_by(7 * MIB as usize + 4097) {
        let cfg = PoolConfig::from_budget(budget);
        assert!(cfg.total_bytes() <= budget, "{cfg:?} over {budget}");
        assert!(cfg.counts[4] >= MIN_CHUNKS, "{cfg:?} at {budget}");
        // Nearly all of it is spent (less than one buffer of each class
        // left over).
        let slack: u64 = CLASSES.iter().map(|c| *c as u64).sum();
        assert!(budget - cfg.total_bytes() < slack, "{cfg:?} at {budget}");
    }
}

/// Whole classes are registered, largest first, while they fit under the
/// ring's limit; the rest are plain memory.
#[test]
fn the_largest_classes_that_fit_are_registered() {
    let cfg = |counts| PoolConfig { counts };
    // (counts, registered per class)
    let table = [
        // The default budget: all but the 4,096 4 KiB buffers.
        ([4096, 256, 128, 32, 92], [false, true, true, true, true]),
        // Exactly the limit.
        ([0, 0, 0, 24, 1000], [true, true, true, true, true]),
        ([1, 0, 0, 24, 1000], [false, true, true, true, true]),
        // A class too large is skipped; a smaller one may still fit.
        ([10, 2000, 1, 1, 1], [true, false, true, true, true]),
        ([0, 0, 0, 0, 1025], [true, true, true, true, false]),
        (
            [32768, 2048, 1024, 256, 736],
            [false, false, false, true, true],
        ),
    ];
    for (counts, want) in table {
        let c = cfg(counts);
        assert_eq!(c.registered_classes(), want, "{counts:?}");
        let n: usize = (0..5).filter(|&i| want[i]).map(|i| counts[i]).sum();
        assert!(n <= MAX_REGISTERED);
    }
}

/// A try takes all or nothing and never waits: a size the pool cannot
/// serve now gives back what was taken for the others.
#[test]
fn a_try_takes_all_or_nothing() {
    tokio_uring::start(async {
        let pool = BufPool::new(&PoolConfig {
            counts: [1, 0, 0, 0, 2],
        });
        let a = pool.try_take_many(&[MAX_CHUNK]).expect("one of two free");
        assert!(
            pool.try_take_many(&[MAX_CHUNK, MAX_CHUNK]).is_none(),
            "only one 1 MiB buffer is free"
        );
        // The failed try gave its buffer back: it can be taken again.
        let b = pool.try_take_many(&[MAX_CHUNK]).expect("the second one");
        assert!(pool.try_take_many(&[MAX_CHUNK]).is_none(), "none left");
        // A small size borrows a larger class only when its own is empty.
        let small = pool.try_take_many(&[100]).expect("the 4 KiB one");
        assert_eq!(small[0].bytes_total(), 4096);
        assert!(pool.try_take_many(&[100]).is_none(), "nothing to borrow");
        drop(b);
        let borrowed = pool.try_take_many(&[100]).expect("borrows 1 MiB");
        assert_eq!(borrowed[0].bytes_total(), MAX_CHUNK);
        drop((a, small, borrowed));
        assert_eq!(
            pool.try_take_many(&[MAX_CHUNK, MAX_CHUNK]).map(|v| v.len()),
            Some(2)
        );
    });
}

/// The default pool holds thousands of 4 KiB buffers at once (tokio-uring
/// alone would give at most 1,024 slots of any size), each its own aligned,
/// zeroed 4 KiB, and counts what is out.
#[test]
fn the_default_pool_lends_thousands_of_separate_small_buffers() {
    tokio_uring::start(async {
        let pool = BufPool::new(&PoolConfig::from_budget(128 * MIB));
        assert_eq!(pool.buffers(), 4604);
        let mut bufs = pool
            .try_take_many(&[4096; 4096])
            .expect("4,096 small buffers");
        assert_eq!(pool.in_use(), 4096);
        for (i, b) in bufs.iter_mut().enumerate() {
            assert_eq!(b.bytes_total(), 4096, "a 4 KiB buffer, not a borrowed one");
            assert_eq!(b.stable_ptr() as usize % 4096, 0);
            assert!(b.iter().all(|&x| x == 0), "zeroed");
            b.fill(i as u8);
        }
        // Each is its own memory.
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8), "buffer {i} overwritten");
        }
        // The next borrows a larger class.
        let more = pool.get(100).await;
        assert_eq!(more.bytes_total(), 16 << 10);
        bufs.truncate(1000);
        assert_eq!(pool.in_use(), 1001);
        drop((bufs, more));
        assert_eq!(pool.in_use(), 0);
    });
}

/// A request waiting on a plain class gets the next buffer of it that comes
/// back, and counts as waiting (starved) meanwhile.
#[test]
fn a_wait_on_a_plain_class_ends_when_one_comes_back() {
    tokio_uring::start(async {
        // 2,000 4 KiB buffers are too many to register: a plain class.
        let cfg = PoolConfig {
            counts: [2000, 0, 0, 0, 1],
        };
        assert_eq!(cfg.registered_classes(), [false, true, true, true, true]);
        let pool = Rc::new(BufPool::new(&cfg));
        let mut all = pool.try_take_many(&[4096; 2001]).expect("all of them");
        assert_eq!(all[2000].bytes_total(), MAX_CHUNK, "the last borrowed");
        let starved = pool.wait_starved();
        let waiter = tokio_uring::spawn({
            let pool = pool.clone();
            async move { pool.get(4096).await }
        });
        starved.await;
        assert!(pool.starved());
        // A 1 MiB buffer coming back does not serve a 4 KiB wait…
        drop(all.pop());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(pool.starved(), "served by another class");
        // …a 4 KiB one does.
        let back = all.pop().expect("a 4 KiB buffer").stable_ptr();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter was not woken")
            .expect("waiter task");
        assert_eq!(got.stable_ptr(), back, "the buffer that came back");
        assert!(!pool.starved());
        // 2,001 taken, two back, one to the waiter.
        assert_eq!(pool.in_use(), 2000);
        drop((got, all));
        assert_eq!(pool.in_use(), 0);
    });
}
