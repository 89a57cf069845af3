//! A bounded, ordered parallel map: one thread produces jobs, a few workers
//! turn them into results, and the caller consumes the results in job order.
//! Backup creation uses it to overlap reading the source with hashing and
//! compressing (and both with storing); restore to overlap fetching,
//! checking and decompressing chunks with writing the target.
//!
//! Memory is bounded by [`Window`]: the producer blocks once that many jobs
//! are waiting to be consumed. When the consumer stops early (an error),
//! every thread winds down on its own: the producer's next hand-over fails,
//! the workers finish the few jobs queued and find their queue closed.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;
use std::thread;

/// The most jobs between the producer and the consumer (queued, being
/// worked on, or done and waiting for their turn). Each holds a chunk, so
/// this times the chunk size is the pipeline's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window(pub usize);

/// How many worker threads to run: the machine's parallelism, at least one,
/// at most `max` (the work is CPU-bound hashing and compression; more
/// threads than cores only add switching).
pub(crate) fn worker_count(max: usize) -> usize {
    let cores = thread::available_parallelism().map_or(1, usize::from);
    cores.clamp(1, max.max(1))
}

/// Runs `work` over the jobs `produce` yields, on `workers` threads, and
/// hands each result to `consume` in the order the jobs were produced.
/// Stops at the first error `consume` returns, and returns it.
pub(crate) fn ordered_map<J, T, E, P, W, C>(
    produce: P,
    workers: usize,
    window: Window,
    work: W,
    mut consume: C,
) -> Result<(), E>
where
    J: Send,
    T: Send,
    P: Iterator<Item = J> + Send,
    W: Fn(J) -> T + Sync,
    C: FnMut(T) -> Result<(), E>,
{
    assert!(
        workers > 0 && window.0 > 0,
        "a pipeline needs a worker and a slot"
    );
    // Jobs wait here for a worker; the window bounds them anyway, this only
    // keeps the hand-over cheap.
    let (job_tx, job_rx) = sync_channel::<(J, SyncSender<T>)>(window.0);
    // One receiver per job, in job order; its bound is the window.
    let (order_tx, order_rx) = sync_channel::<Receiver<T>>(window.0);
    let job_rx = Mutex::new(job_rx);
    thread::scope(|s| {
        s.spawn(move || feed(produce, &job_tx, &order_tx));
        for _ in 0..workers {
            s.spawn(|| serve(&job_rx, &work));
        }
        // Ends when the producer is done and every result is consumed, or at
        // the first error; dropping `order_rx` then stops the producer.
        for result in order_rx {
            let Ok(value) = result.recv() else {
                // A worker died (panicked) without answering; the scope
                // re-raises its panic.
                break;
            };
            consume(value)?;
        }
        Ok(())
    })
}

/// The producer: hands each job to the workers and its result slot to the
/// consumer; stops when either side is gone.
fn feed<J, T, P: Iterator<Item = J>>(
    produce: P,
    job_tx: &SyncSender<(J, SyncSender<T>)>,
    order_tx: &SyncSender<Receiver<T>>,
) {
    for job in produce {
        // One answer per slot, so a worker's send never blocks.
        let (slot_tx, slot_rx) = sync_channel(1);
        // The slot first: the window then bounds the jobs handed out.
        if order_tx.send(slot_rx).is_err() || job_tx.send((job, slot_tx)).is_err() {
            return;
        }
    }
}

/// A worker: takes jobs until the producer is done.
fn serve<J, T, W: Fn(J) -> T>(jobs: &Mutex<Receiver<(J, SyncSender<T>)>>, work: &W) {
    loop {
        let next = match jobs.lock() {
            Ok(rx) => rx.recv(),
            // Another worker panicked holding the lock: stop too.
            Err(_) => return,
        };
        let Ok((job, slot)) = next else { return };
        // The consumer may have stopped: nobody wants the answer then.
        let _ = slot.send(work(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn results_come_in_job_order() {
        let mut got = Vec::new();
        let r: Result<(), ()> = ordered_map(
            0..200u64,
            3,
            Window(4),
            |j| {
                // Uneven work, so workers finish out of order.
                std::thread::sleep(std::time::Duration::from_micros((j * 7919) % 300));
                j * 2
            },
            |v| {
                got.push(v);
                Ok(())
            },
        );
        assert_eq!(r, Ok(()));
        assert_eq!(got, (0..200).map(|j| j * 2).collect::<Vec<_>>());
    }

    #[test]
    fn an_error_stops_the_producer_within_the_window() {
        let produced = AtomicUsize::new(0);
        let jobs = (0..10_000).inspect(|_| {
            produced.fetch_add(1, Ordering::SeqCst);
        });
        let r = ordered_map(
            jobs,
            2,
            Window(4),
            |j| j,
            |v| if v == 10 { Err(v) } else { Ok(()) },
        );
        assert_eq!(r, Err(10));
        let n = produced.load(Ordering::SeqCst);
        // 11 consumed, at most a window (plus the one in the producer's
        // hand and one per worker) beyond.
        assert!(n <= 11 + 4 + 1 + 2, "produced {n} jobs after the error");
    }

    #[test]
    fn worker_count_is_bounded() {
        assert_eq!(worker_count(1), 1);
        assert!((1..=4).contains(&worker_count(4)));
        assert_eq!(worker_count(0), 1);
    }
}
