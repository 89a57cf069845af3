//! Admission of connections that have not proved anything yet (an NBD
//! client still negotiating, a primary that has not sent its HELLO): a
//! bounded pool with a per-source share, where a newcomer is never refused
//! because of idle strangers — the one that has gone longest without
//! progress is dropped to make room instead.
//!
//! The pool is shared by every task of one acceptor (they run on one
//! thread, on the acceptor's own runtime, so the lock is never contended).
//! Each drop is counted in `mirrorblk_connections_dropped_total{port,reason}`,
//! recorded as a `connection-dropped` event and logged with the peer's
//! address; events and log lines are rate-limited (at most
//! [`REPORTS_PER_SECOND`] a second, the rest counted as `suppressed` in the
//! next one) so that a flood cannot flush the event log or the journal of
//! the operating system.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Most drop reports (event + log line) per second and port.
pub const REPORTS_PER_SECOND: u32 = 10;

/// The bounds of one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connections in the pool at once.
    pub max_pending: usize,
    /// Most of them from one source address.
    pub per_source: usize,
    /// Longest time a connection may spend in the pool.
    pub deadline: Duration,
    /// Most bytes read from a connection while it is in the pool.
    pub max_bytes: usize,
}

/// Where a connection comes from, for the per-source share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// A network peer.
    Ip(IpAddr),
    /// A Unix-socket peer (local; exempt from the per-source share).
    Local,
}

/// Why a connection left the pool without being admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Made room for a newcomer: the pool was full.
    Evicted,
    /// Made room for a newcomer from the same source: its share was full.
    SourceShare,
    /// Did not finish within the deadline.
    Deadline,
    /// Sent more than the byte bound before finishing.
    TooManyBytes,
    /// Finished, but every serving slot is taken.
    ServingFull,
}

impl DropReason {
    /// Its metric label and event word.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Evicted => "evicted",
            DropReason::SourceShare => "source-share",
            DropReason::Deadline => "deadline",
            DropReason::TooManyBytes => "too-many-bytes",
            DropReason::ServingFull => "serving-full",
        }
    }
}

struct Entry {
    source: Source,
    peer: String,
    progress: Instant,
    evict: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    pending: HashMap<u64, Entry>,
    per_source: HashMap<Source, usize>,
    window: Option<Instant>,
    reported: u32,
    suppressed: u64,
}

/// One acceptor's pool of connections on probation.
pub struct Pool {
    port: &'static str,
    limits: Limits,
    inner: Mutex<Inner>,
}

impl Pool {
    /// A pool for `port` (`nbd`, `replication`: the metric label).
    pub fn new(port: &'static str, limits: Limits) -> Arc<Pool> {
        assert!(limits.max_pending > 0 && limits.per_source > 0);
        Arc::new(Pool {
            port,
            limits,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Its bounds.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Connections in the pool now.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding it leaves plain counters: still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a newcomer in, first dropping the most stalled connection of
    /// its source (its share is full) or of the pool (the pool is full).
    pub fn admit(self: &Arc<Pool>, source: Source, peer: String) -> Ticket {
        let mut evicted = Vec::new();
        let id = {
            let mut g = self.lock();
            if source != Source::Local
                && g.per_source.get(&source).copied().unwrap_or(0) >= self.limits.per_source
            {
                if let Some(e) = evict_stalled(&mut g, Some(source)) {
                    evicted.push((e, DropReason::SourceShare));
                }
            }
            while g.pending.len() >= self.limits.max_pending {
                match evict_stalled(&mut g, None) {
                    Some(e) => evicted.push((e, DropReason::Evicted)),
                    None => break,
                }
            }
            let id = g.next_id;
            g.next_id += 1;
            *g.per_source.entry(source).or_insert(0) += 1;
            let evict = Arc::new(Notify::new());
            g.pending.insert(
                id,
                Entry {
                    source,
                    peer,
                    progress: Instant::now(),
                    evict: evict.clone(),
                },
            );
            metrics::gauge!("mirrorblk_pending_connections", "port" => self.port)
                .set(g.pending.len() as f64);
            (id, evict)
        };
        for (e, why) in evicted {
            e.evict.notify_one();
            self.report(&e.peer, why);
        }
        Ticket {
            pool: self.clone(),
            id: id.0,
            evict: id.1,
            read: std::cell::Cell::new(0),
        }
    }

    /// Counts, logs and records one dropped connection.
    pub fn report(&self, peer: &str, why: DropReason) {
        metrics::counter!("mirrorblk_connections_dropped_total", "port" => self.port, "reason" => why.label())
            .increment(1);
        let suppressed = {
            let mut g = self.lock();
            let now = Instant::now();
            if g.window
                .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
            {
                g.window = Some(now);
                g.reported = 0;
            }
            if g.reported >= REPORTS_PER_SECOND {
                g.suppressed += 1;
                return;
            }
            g.reported += 1;
            std::mem::take(&mut g.suppressed)
        };
        tracing::warn!(
            port = self.port,
            %peer,
            reason = why.label(),
            suppressed,
            "dropped a connection on probation ({} more dropped since the last report)",
            suppressed
        );
        crate::events::emit(crate::events::EventKind::ConnectionDropped {
            port: self.port.to_string(),
            peer: peer.to_string(),
            reason: why.label().to_string(),
            suppressed,
        });
    }

    fn remove(&self, id: u64) {
        let mut g = self.lock();
        if let Some(e) = g.pending.remove(&id) {
            release_source(&mut g, e.source);
        }
        metrics::gauge!("mirrorblk_pending_connections", "port" => self.port)
            .set(g.pending.len() as f64);
    }
}

fn release_source(g: &mut Inner, source: Source) {
    if let Some(n) = g.per_source.get_mut(&source) {
        *n -= 1;
        if *n == 0 {
            g.per_source.remove(&source);
        }
    }
}

/// Takes out of the pool the entry (of `source`, if given) that has gone
/// longest without progress.
fn evict_stalled(g: &mut Inner, source: Option<Source>) -> Option<Entry> {
    let id = g
        .pending
        .iter()
        .filter(|(_, e)| source.is_none_or(|s| e.source == s))
        .min_by_key(|(id, e)| (e.progress, **id))
        .map(|(id, _)| *id)?;
    let e = g.pending.remove(&id)?;
    release_source(g, e.source);
    Some(e)
}

/// A connection's place in the pool; dropping it leaves the pool.
pub struct Ticket {
    pool: Arc<Pool>,
    id: u64,
    evict: Arc<Notify>,
    read: std::cell::Cell<usize>,
}

impl Ticket {
    /// The connection moved forward (a message completed): it is no longer
    /// the first to go.
    pub fn progress(&self) {
        if let Some(e) = self.pool.lock().pending.get_mut(&self.id) {
            e.progress = Instant::now();
        }
    }

    /// Counts `n` bytes read; false once past the byte bound.
    pub fn read(&self, n: usize) -> bool {
        self.read.set(self.read.get().saturating_add(n));
        self.read.get() <= self.pool.limits.max_bytes
    }

    /// Resolves once the pool dropped this connection to make room (already
    /// reported).
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }

    /// The pool this ticket is in.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.pool.remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_pending: usize, per_source: usize) -> Limits {
        Limits {
            max_pending,
            per_source,
            deadline: Duration::from_secs(5),
            max_bytes: 100,
        }
    }

    fn ip(last: u8) -> Source {
        Source::Ip(IpAddr::from([127, 0, 0, last]))
    }

    #[test]
    fn a_full_pool_drops_the_most_stalled_for_a_newcomer() {
        let pool = Pool::new("test", limits(2, 10));
        let a = pool.admit(ip(1), "a".into());
        std::thread::sleep(Duration::from_millis(2));
        let b = pool.admit(ip(2), "b".into());
        std::thread::sleep(Duration::from_millis(2));
        a.progress();
        let _c = pool.admit(ip(3), "c".into());
        assert_eq!(pool.pending(), 2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), b.evicted())
                .await
                .expect("b (no progress) was dropped");
            assert!(
                tokio::time::timeout(Duration::from_millis(20), a.evicted())
                    .await
                    .is_err(),
                "a made progress and stays"
            );
        });
    }

    #[test]
    fn a_source_at_its_share_loses_its_own_connection_not_anothers() {
        let pool = Pool::new("test", limits(10, 2));
        let other = pool.admit(ip(9), "other".into());
        let _a = pool.admit(ip(1), "a1".into());
        let _b = pool.admit(ip(1), "a2".into());
        let _c = pool.admit(ip(1), "a3".into());
        assert_eq!(pool.pending(), 3, "one of ip 1's was dropped");
        drop(other);
        assert_eq!(pool.pending(), 2);
    }

    #[test]
    fn the_byte_bound_is_counted_per_ticket() {
        let pool = Pool::new("test", limits(10, 10));
        let t = pool.admit(Source::Local, "unix".into());
        assert!(t.read(60));
        assert!(t.read(40));
        assert!(!t.read(1));
    }
}
