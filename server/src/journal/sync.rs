//! The group flush of `--durability flush`: journal records are written
//! without `O_DSYNC`, and one `fdatasync` makes everything written before
//! it durable. Whoever needs durability up to an LSN (a FLUSH, a FUA write,
//! the applier under journal pressure or after its interval) asks for it,
//! unless the sync under way already covers it ([`covering`]); one syncer
//! task runs the `fdatasync`s, each covering every record written when it
//! began, so flushes that arrive together share one, and a FLUSH waits for
//! at most one sync that starts after it arrives. Waiters only wait (on an
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

/// Which sync a wait for durability of every LSN below `target` (a FLUSH,
/// a FUA write, the applier) ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Covering {
    /// Already durable: no wait.
    Done,
    /// The sync under way covers it: wait for it, ask for nothing (asking
    /// would queue a sync nobody needs).
    Running,
    /// Only a sync that has not started yet covers it: ask for one. The
    /// syncer starts it as soon as the running one (if any) ends, and it
    /// covers everything written by then, so the wait ends with the first
    /// sync that starts after it arrived, never a later one.
    Next,
}

/// The decision of a waiter for durability below `target` (only written
/// LSNs are asked for), given the durable frontier and what the running
/// sync, if any, covers.
pub fn covering(target: Lsn, durable: Lsn, running: Option<Lsn>) -> Covering {
    if covered(target, durable) {
        Covering::Done
    } else if running.is_some_and(|covers| covered(target, covers)) {
        Covering::Running
    } else {
        Covering::Next
    }
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
    fn a_waiter_asks_for_a_sync_only_when_none_under_way_covers_it() {
        use Covering::*;
        let l = |n| Lsn(n);
        // (target, durable, running sync covers, decision)
        let table = [
            (l(5), l(5), None, Done),
            (l(5), l(9), Some(l(12)), Done),
            (l(0), l(0), None, Done),
            // The running sync began after the target was written.
            (l(5), l(2), Some(l(5)), Running),
            (l(5), l(2), Some(l(9)), Running),
            // It began before: only the next sync covers the target.
            (l(5), l(2), Some(l(4)), Next),
            (l(5), l(2), None, Next),
        ];
        for (target, durable, running, want) in table {
            assert_eq!(
                covering(target, durable, running),
                want,
                "{target:?} {durable:?} {running:?}"
            );
        }
    }

    /// The syncer and its waiters on LSN frontiers alone, as
    /// `Journal::run_syncer` and `Journal::wait_synced` drive them.
    struct Model {
        written: Lsn,
        durable: Lsn,
        requested: Lsn,
        running: Option<Lsn>,
        started: u32,
    }

    impl Model {
        /// A waiter for everything below `target` decides (and asks).
        fn wait(&mut self, target: Lsn) -> Covering {
            let c = covering(target, self.durable, self.running);
            if c == Covering::Next {
                self.requested = self.requested.max(target);
            }
            c
        }
        /// The idle syncer plans; one sync at a time.
        fn plan(&mut self) {
            if self.running.is_none() {
                self.running = sync_plan(Frontiers {
                    requested: self.requested,
                    durable: self.durable,
                    written: self.written,
                });
                self.started += u32::from(self.running.is_some());
            }
        }
        /// The running sync ends; the syncer plans again at once.
        fn finish(&mut self) {
            if let Some(covers) = self.running.take() {
                self.durable = self.durable.max(covers);
            }
            self.plan();
        }
    }

    #[test]
    fn a_flush_waits_for_at_most_one_sync_that_starts_after_it_arrives() {
        // (durable, running sync covers, written when the FLUSH arrives,
        // writes completing while it waits, syncs started after it arrived)
        let table = [
            (0, None, 0, 0, 0),
            (3, None, 8, 0, 1),
            (3, None, 8, 4, 1),
            (3, Some(8), 8, 4, 0),
            (3, Some(5), 8, 0, 1),
            (3, Some(5), 8, 6, 1),
            (8, Some(10), 10, 3, 0),
        ];
        for (durable, running, written, more, want) in table {
            let mut m = Model {
                written: Lsn(written),
                durable: Lsn(durable),
                requested: Lsn(durable).max(running.map_or(Lsn(0), Lsn)),
                running: running.map(Lsn),
                started: 0,
            };
            // The FLUSH decides once: its gate wakes it only when a sync
            // that covers it ends (or the journal fails).
            let target = m.written;
            m.wait(target);
            m.plan();
            m.written = Lsn(written + more);
            let mut ends = 0;
            while !covered(target, m.durable) {
                assert!(
                    ends < 3,
                    "the FLUSH was never covered: {durable} {running:?} {written}"
                );
                m.finish();
                m.written = Lsn(m.written.0 + more);
                ends += 1;
            }
            assert_eq!(m.started, want, "{durable} {running:?} {written} {more}");
        }
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
