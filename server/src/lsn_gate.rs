//! Wake-ups in LSN order.
//!
//! Writers wait for a frontier to pass their LSN: the journal's durable LSN,
//! the replicas' acknowledged LSN. A broadcast (`Notify::notify_waiters`, a
//! `watch` channel) wakes every waiting writer on every advance; at queue
//! depth 32 that was ~3 wake-ups per write that found their record not yet
//! covered and went back to sleep. An [`LsnGate`] keeps its waiters sorted by
//! LSN and wakes only those an advance covers.
//!
//! Single-threaded (one per core, like everything it serves). A waiter
//! re-checks its own condition after each wake-up: the gate only decides
//! *when* that is worth doing, so an extra wake-up is harmless and a missing
//! one is what the callers' pattern rules out (check, then wait, with no
//! await in between: the first poll registers before anyone else runs).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::units::Lsn;

/// Waiters keyed by (LSN, registration number), woken in LSN order.
#[derive(Default)]
pub struct LsnGate {
    waiters: RefCell<BTreeMap<(Lsn, u64), Waker>>,
    next_id: Cell<u64>,
}

impl LsnGate {
    /// An empty gate.
    pub fn new() -> LsnGate {
        LsnGate::default()
    }

    /// Wakes every waiter whose LSN is below `frontier`.
    pub fn release_below(&self, frontier: Lsn) {
        let ready = {
            let mut w = self.waiters.borrow_mut();
            let rest = w.split_off(&(frontier, 0));
            std::mem::replace(&mut *w, rest)
        };
        // Woken outside the borrow: a waker may run code that waits again.
        for (_, waker) in ready {
            waker.wake();
        }
    }

    /// Wakes every waiter (the condition changed in a way that is not an
    /// advance: a failure, a rebase, a replica leaving).
    pub fn release_all(&self) {
        let ready = std::mem::take(&mut *self.waiters.borrow_mut());
        for (_, waker) in ready {
            waker.wake();
        }
    }

    /// Resolves once a release covers `lsn`. The caller checks its
    /// condition before and after.
    pub fn wait(&self, lsn: Lsn) -> Wait<'_> {
        Wait {
            gate: self,
            lsn,
            id: None,
        }
    }

    /// Number of waiting tasks (for tests and assertions).
    pub fn waiting(&self) -> usize {
        self.waiters.borrow().len()
    }
}

/// The future of [`LsnGate::wait`].
pub struct Wait<'a> {
    gate: &'a LsnGate,
    lsn: Lsn,
    /// Set once registered.
    id: Option<u64>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let lsn = self.lsn;
        match self.id {
            None => {
                let id = self.gate.next_id.get();
                self.gate.next_id.set(id + 1);
                let old = self
                    .gate
                    .waiters
                    .borrow_mut()
                    .insert((lsn, id), cx.waker().clone());
                debug_assert!(old.is_none(), "registration numbers are unique");
                self.id = Some(id);
                Poll::Pending
            }
            Some(id) => {
                let mut w = self.gate.waiters.borrow_mut();
                match w.get_mut(&(lsn, id)) {
                    // Polled without being released (another future in the
                    // same task woke it): stay, with the current waker.
                    Some(slot) => {
                        if !slot.will_wake(cx.waker()) {
                            *slot = cx.waker().clone();
                        }
                        Poll::Pending
                    }
                    // Released: the entry went with the wake-up.
                    None => Poll::Ready(()),
                }
            }
        }
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.gate.waiters.borrow_mut().remove(&(self.lsn, id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn releases_only_the_covered_waiters_in_order() {
        tokio_uring::start(async {
            let gate = Rc::new(LsnGate::new());
            let done = Rc::new(RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            for lsn in [5u64, 1, 3, 3, 9] {
                let (g, d) = (gate.clone(), done.clone());
                tasks.push(tokio_uring::spawn(async move {
                    g.wait(Lsn(lsn)).await;
                    d.borrow_mut().push(lsn);
                }));
            }
            tokio::task::yield_now().await;
            assert_eq!(gate.waiting(), 5);
            // Frontier 4: LSNs 1 and both 3s are covered, 5 and 9 are not.
            gate.release_below(Lsn(4));
            tokio::task::yield_now().await;
            let mut got = done.borrow().clone();
            got.sort_unstable();
            assert_eq!(got, vec![1, 3, 3]);
            assert_eq!(gate.waiting(), 2);
            // A frontier equal to an LSN does not cover it.
            gate.release_below(Lsn(5));
            tokio::task::yield_now().await;
            assert_eq!(done.borrow().len(), 3);
            gate.release_all();
            for t in tasks {
                t.await.expect("waiter finished");
            }
            assert_eq!(done.borrow().len(), 5);
            assert_eq!(gate.waiting(), 0);
        });
    }

    #[test]
    fn a_dropped_waiter_leaves_no_entry() {
        tokio_uring::start(async {
            let gate = LsnGate::new();
            let timed_out =
                tokio::time::timeout(std::time::Duration::from_millis(5), gate.wait(Lsn(7))).await;
            assert!(timed_out.is_err());
            assert_eq!(gate.waiting(), 0);
            // Releasing with nobody waiting is a no-op.
            gate.release_below(Lsn(100));
        });
    }
}
