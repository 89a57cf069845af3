//! The group flush of `--durability flush`: journal records are written
//! without `O_DSYNC`, and one `fdatasync` makes everything written before
//! it durable. Whoever needs durability up to an LSN (a FLUSH, a FUA write,
//! the applier before it writes records home) asks for it; one syncer task
//! runs the `fdatasync`s, each covering every record written when it began,
//! so flushes that arrive together share one. Waiters only wait (on an
//! [`crate::lsn_gate::LsnGate`]), so a cancelled waiter leaves nothing
//! behind: the syncer is never cancelled.

use crate::units::Lsn;

pub use mirrorblk_admin::Durability;

/// The frontiers the syncer decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frontiers {
    /// Durability is asked for every LSN below this.
    pub requested: Lsn,
    /// Every LSN below this is durable.
    pub durable: Lsn,
    /// Every LSN below this is written (its journal write completed).
    pub written: Lsn,
}

/// What the syncer does next: `Some(covers)` to run an `fdatasync` that
/// makes every LSN below `covers` durable (everything written now, since
/// an `fdatasync` covers every write completed before it begins), or None
/// when nothing asked for is missing.
pub fn sync_plan(f: Frontiers) -> Option<Lsn> {
    // Invariant: only written records are asked for (a FLUSH covers the
    // writes already acknowledged, a FUA write asks once its record is
    // written, the applier once a batch is), so a sync always covers the
    // request and the syncer never spins.
    assert!(
        f.requested <= f.written,
        "durability asked for up to {:?}, beyond the written frontier {:?}",
        f.requested,
        f.written
    );
    debug_assert!(f.durable <= f.written, "durable beyond written");
    (f.requested > f.durable).then_some(f.written)
}

/// Whether a wait for durability of every LSN below `target` is over.
pub fn covered(target: Lsn, durable: Lsn) -> bool {
    durable >= target
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(requested: u64, durable: u64, written: u64) -> Frontiers {
        Frontiers {
            requested: Lsn(requested),
            durable: Lsn(durable),
            written: Lsn(written),
        }
    }

    #[test]
    fn a_sync_runs_only_when_asked_and_covers_everything_written() {
        let table = [
            // Nothing asked beyond what is durable: no sync.
            (f(0, 0, 0), None),
            (f(5, 5, 9), None),
            (f(3, 5, 9), None),
            // Asked beyond durable: one sync for everything written, so
            // writes that completed meanwhile share it.
            (f(6, 5, 9), Some(Lsn(9))),
            (f(9, 0, 9), Some(Lsn(9))),
            (f(1, 0, 1), Some(Lsn(1))),
        ];
        for (fr, want) in table {
            assert_eq!(sync_plan(fr), want, "{fr:?}");
        }
    }

    #[test]
    #[should_panic(expected = "beyond the written frontier")]
    fn asking_beyond_the_written_frontier_is_a_bug() {
        sync_plan(f(10, 5, 9));
    }

    #[test]
    fn a_wait_ends_once_the_durable_frontier_reaches_its_target() {
        let table = [
            (Lsn(0), Lsn(0), true),
            (Lsn(5), Lsn(4), false),
            (Lsn(5), Lsn(5), true),
            (Lsn(5), Lsn(9), true),
        ];
        for (target, durable, want) in table {
            assert_eq!(covered(target, durable), want, "{target:?} {durable:?}");
        }
    }
}
