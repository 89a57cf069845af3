//! The fence between a coordinator's lease and the acknowledgements a
//! primary sends: with `--etcd`, a write (or flush, or read) is answered
//! only while this node's lease is known to be valid. The coordinator
//! thread moves the deadline forward after each successful keep-alive
//! (counting from when it *sent* the keep-alive, minus a margin), and a
//! core checks it before each reply. Past the deadline, replies are held —
//! never failed — until the lease is renewed, or the node learns it lost
//! and restarts as a replica (which closes the held connections without an
//! answer: nothing held was acknowledged).
//!
//! Without a coordinator the fence is open forever and costs one atomic
//! load per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How often a held reply looks at the deadline again even without a
/// wake-up (a bound, not the usual path: renewals wake the waiters).
const RECHECK: Duration = Duration::from_millis(100);

/// Acknowledgements are allowed until a deadline.
pub struct LeaseFence {
    /// The clock's origin for `until_ns`.
    base: Instant,
    /// Nanoseconds after `base` until which replies may be sent; `u64::MAX`
    /// without a coordinator, 0 when closed.
    until_ns: AtomicU64,
    /// Woken when the deadline moves forward.
    renewed: Notify,
}

impl LeaseFence {
    /// A fence that never holds anything (no coordinator).
    pub fn open() -> LeaseFence {
        LeaseFence {
            base: Instant::now(),
            until_ns: AtomicU64::new(u64::MAX),
            renewed: Notify::new(),
        }
    }

    /// A fence that holds everything until [`LeaseFence::extend_until`].
    pub fn closed() -> LeaseFence {
        LeaseFence {
            base: Instant::now(),
            until_ns: AtomicU64::new(0),
            renewed: Notify::new(),
        }
    }

    /// Allows replies until `t` (never moves the deadline back: a late,
    /// older renewal must not shorten a newer one).
    pub fn extend_until(&self, t: Instant) {
        let ns = t.saturating_duration_since(self.base).as_nanos();
        let ns = u64::try_from(ns).unwrap_or(u64::MAX - 1);
        assert!(ns < u64::MAX, "an open fence is not extended");
        self.until_ns.fetch_max(ns, Ordering::AcqRel);
        self.renewed.notify_waiters();
    }

    /// Holds every reply from now on (the lease is lost).
    pub fn close(&self) {
        self.until_ns.store(0, Ordering::Release);
    }

    /// Whether replies may be sent at `now`.
    pub fn valid_at(&self, now: Instant) -> bool {
        let until = self.until_ns.load(Ordering::Acquire);
        if until == u64::MAX {
            return true;
        }
        let now = now.saturating_duration_since(self.base).as_nanos();
        u128::from(until) > now
    }

    /// The deadline, if the fence is not open (for status).
    pub fn deadline(&self) -> Option<Instant> {
        match self.until_ns.load(Ordering::Acquire) {
            u64::MAX => None,
            ns => Some(self.base + Duration::from_nanos(ns)),
        }
    }

    /// Returns once replies may be sent.
    pub async fn wait_valid(&self) {
        if self.valid_at(Instant::now()) {
            return;
        }
        loop {
            let renewed = self.renewed.notified();
            if self.valid_at(Instant::now()) {
                return;
            }
            tokio::select! {
                _ = renewed => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_never_holds_closed_holds_until_extended() {
        let now = Instant::now();
        assert!(LeaseFence::open().valid_at(now + Duration::from_secs(3600)));
        let f = LeaseFence::closed();
        assert!(!f.valid_at(now));
        f.extend_until(now + Duration::from_secs(1));
        assert!(f.valid_at(now));
        assert!(
            !f.valid_at(now + Duration::from_secs(1)),
            "the deadline itself is past"
        );
        f.close();
        assert!(!f.valid_at(now));
    }

    #[test]
    fn an_older_renewal_never_shortens_the_deadline() {
        let now = Instant::now();
        let f = LeaseFence::closed();
        f.extend_until(now + Duration::from_secs(2));
        f.extend_until(now + Duration::from_secs(1));
        assert!(f.valid_at(now + Duration::from_millis(1500)));
    }
}
