//! Busy polling: a core that started or ended a request moments ago keeps
//! its thread running for a bounded time instead of sleeping in the kernel.
//!
//! Why: a durable write at queue depth 1 wakes the core's thread twice (the
//! client's request, the journal commit's completion), and waking a halted
//! CPU costs 50–60 µs on a virtual machine whose idle CPUs do not poll
//! (`guest_halt_poll_ns=0`), or a C-state exit on bare metal
//! (docs/OPERATIONS.md, "Idle CPUs and latency"). Polling, the core sees
//! both events at once: 4k QD1 p50 latency fell from 212 to 153 µs and from
//! 247 to 188 µs in two A/Bs on this project's machine, at the price of up
//! to one CPU kept busy while a client keeps its queue that short
//! (docs/PERFORMANCE.md, 2026-12-08). qemu's IOThreads poll for the same
//! reason (`poll-max-ns`).
//!
//! It is off unless `--busy-poll-us` is given, and it polls only while at
//! most [`MAX_IN_FLIGHT`] requests, none larger than [`MAX_REQUEST`], are
//! in flight on the core: with more, the core is rarely idle long and
//! polling only took CPU from the client and the kernel's workers; with
//! large ones, see [`MAX_REQUEST`].
//!
//! How: tokio-uring submits queued operations only when its thread parks,
//! and a polling thread never parks. So each round of the poller submits
//! the ring's queue itself (`io_uring_enter`), which also runs the kernel's
//! pending completion work, then yields, so the runtime polls its other
//! tasks and its event sources without blocking.

use std::cell::Cell;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Requests in flight on a core above which it does not poll.
pub const MAX_IN_FLIGHT: u32 = 1;

/// The largest request (bytes) a core polls for. A larger one takes long
/// enough that a wake-up is a small part of it, and polling while 1 MiB
/// payloads arrived cost 1 MiB writes at QD8 19 % (probably because each
/// receive then completes early with less data).
pub const MAX_REQUEST: u64 = 64 << 10;

/// The longest `--busy-poll-us` accepted: polling longer than this between
/// two requests only burns the CPU.
pub const MAX_WINDOW: Duration = Duration::from_millis(10);

/// What a core is serving, as polling sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    /// Requests in flight (from their header to their end).
    pub requests: u32,
    /// Of those, requests larger than [`MAX_REQUEST`].
    pub large: u32,
}

/// Whether a core keeps polling: its last request started or ended
/// `since_activity` ago (`None`: never), it serves `load`, and it polls
/// for `window` after activity.
pub fn keep_polling(since_activity: Option<Duration>, load: Load, window: Duration) -> bool {
    debug_assert!(load.large <= load.requests);
    match since_activity {
        Some(since) => since < window && load.requests <= MAX_IN_FLIGHT && load.large == 0,
        None => false,
    }
}

/// One core thread's polling state.
struct State {
    /// Polling configured on this thread.
    enabled: Cell<bool>,
    /// When a request last started or ended.
    last: Cell<Option<Instant>>,
    /// Requests being served.
    load: Cell<Load>,
    /// The poller waits for activity.
    asleep: Cell<bool>,
    /// Wakes the poller.
    wake: Rc<tokio::sync::Notify>,
}

thread_local! {
    static STATE: State = State {
        enabled: Cell::new(false),
        last: Cell::new(None),
        load: Cell::new(Load { requests: 0, large: 0 }),
        asleep: Cell::new(false),
        wake: Rc::new(tokio::sync::Notify::new()),
    };
}

/// Poll rounds, all cores (for the metrics).
static ROUNDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Poll rounds all cores ran since the process started.
pub fn rounds() -> u64 {
    ROUNDS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A request of `bytes` starts on this thread's core; it ends when the
/// guard drops.
pub fn request_started(bytes: u64) -> InFlight {
    let large = bytes > MAX_REQUEST;
    let counted = STATE.with(|s| {
        if !s.enabled.get() {
            return false;
        }
        let mut load = s.load.get();
        load.requests += 1;
        load.large += u32::from(large);
        s.load.set(load);
        s.activity();
        true
    });
    InFlight {
        counted,
        large,
        _not_send: std::marker::PhantomData,
    }
}

/// A request in flight on this thread's core (see [`request_started`]).
#[must_use = "the request ends when this drops"]
pub struct InFlight {
    /// It was counted (polling was on when it started).
    counted: bool,
    /// It is larger than [`MAX_REQUEST`].
    large: bool,
    /// Dropped on the thread that counted it.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        STATE.with(|s| {
            let mut load = s.load.get();
            assert!(load.requests > 0 && load.large >= u32::from(self.large));
            load.requests -= 1;
            load.large -= u32::from(self.large);
            s.load.set(load);
            s.activity();
        });
    }
}

impl State {
    /// Notes activity now and wakes the poller if it waits.
    fn activity(&self) {
        self.last.set(Some(Instant::now()));
        if self.asleep.replace(false) {
            self.wake.notify_one();
        }
    }
}

/// An io_uring instance's descriptor: the ring of the thread that owns it.
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    /// The ring's file descriptor.
    pub fd: RawFd,
    /// Its submission queue entries: at most that many wait to be submitted.
    pub entries: u32,
}

impl Ring {
    /// Submits what is queued and runs the kernel's pending completion work
    /// for this thread. Errors are left to the runtime's own submission at
    /// its next park (a full completion queue says `EBUSY` here too).
    fn submit(&self) {
        // SAFETY: `fd` is this thread's ring (see `core_runtime`), which
        // lives until the process ends; submitting only hands the kernel
        // entries the runtime already queued and published, as its own
        // park would, and on the same thread, so never concurrently with it.
        unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                self.fd,
                self.entries,
                0u32,
                0u32,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            );
        }
    }
}

/// Polls this core for `window` after each request's start or end, until
/// the runtime ends. Spawned once per core thread.
pub async fn run(ring: Ring, window: Duration) {
    assert!(window > Duration::ZERO && window <= MAX_WINDOW);
    let wake = STATE.with(|s| {
        s.enabled.set(true);
        s.wake.clone()
    });
    loop {
        let since = STATE.with(|s| s.last.get()).map(|t| t.elapsed());
        let load = STATE.with(|s| s.load.get());
        if !keep_polling(since, load, window) {
            STATE.with(|s| s.asleep.set(true));
            wake.notified().await;
            continue;
        }
        ring.submit();
        // Lets the kernel's workers and the client on this CPU run first.
        // SAFETY: no arguments; it cannot fail on Linux.
        unsafe { libc::sched_yield() };
        tokio::task::yield_now().await;
        ROUNDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_only_soon_after_activity_with_a_short_queue_of_small_requests() {
        let w = Duration::from_micros(300);
        let us = Duration::from_micros;
        let load = |requests, large| Load { requests, large };
        // (since the last start or end, load, polls?)
        let table = [
            (None, load(0, 0), false),
            (Some(us(0)), load(0, 0), true),
            (Some(us(299)), load(0, 0), true),
            (Some(us(300)), load(0, 0), false),
            (Some(us(10_000)), load(1, 0), false),
            (Some(us(100)), load(1, 0), true),
            (Some(us(100)), load(1, 1), false),
            (Some(us(100)), load(2, 0), false),
            (Some(us(0)), load(32, 0), false),
        ];
        for (since, load, want) in table {
            assert_eq!(
                keep_polling(since, load, w),
                want,
                "since {since:?}, {load:?}"
            );
        }
    }
}
