//! Busy polling: a core that started or ended a request moments ago keeps
//! its thread running for a bounded time instead of sleeping in the kernel.
//!
//! Why: a durable write at queue depth 1 wakes the core's thread twice (the
//! client's request, the journal commit's completion), and waking a halted
//! CPU costs 50–60 µs on a virtual machine whose idle CPUs do not poll
//! (`guest_halt_poll_ns=0`), or a C-state exit on bare metal
//! (docs/OPERATIONS.md, "Idle CPUs and latency"). Polling, the core sees
//! both events at once: QD1 p50 latency fell by 17–20 % on this project's
//! machine, at the price of up to one CPU kept busy while a client keeps
//! its queue that short (docs/PERFORMANCE.md, 2026-12-07 session 23).
//! qemu's IOThreads poll for the same reason (`poll-max-ns`).
//!
//! It is off unless `--busy-poll-us` is given, and it polls only while at
//! most [`MAX_IN_FLIGHT`] requests are in flight on the core: with more,
//! the core is rarely idle long, and polling only took CPU from the client
//! and the kernel's workers (same A/B).
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

/// The longest `--busy-poll-us` accepted: polling longer than this between
/// two requests only burns the CPU.
pub const MAX_WINDOW: Duration = Duration::from_millis(10);

/// Whether a core keeps polling: its last request started or ended
/// `since_activity` ago (`None`: never), `in_flight` requests are being
/// served, and it polls for `window` after activity.
pub fn keep_polling(since_activity: Option<Duration>, in_flight: u32, window: Duration) -> bool {
    match since_activity {
        Some(since) => since < window && in_flight <= MAX_IN_FLIGHT,
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
    in_flight: Cell<u32>,
    /// The poller waits for activity.
    asleep: Cell<bool>,
    /// Wakes the poller.
    wake: Rc<tokio::sync::Notify>,
}

thread_local! {
    static STATE: State = State {
        enabled: Cell::new(false),
        last: Cell::new(None),
        in_flight: Cell::new(0),
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

/// A request starts on this thread's core; it ends when the guard drops.
pub fn request_started() -> InFlight {
    STATE.with(|s| {
        if s.enabled.get() {
            s.in_flight.set(s.in_flight.get() + 1);
            s.activity();
        }
    });
    InFlight {
        _not_send: std::marker::PhantomData,
    }
}

/// A request in flight on this thread's core (see [`request_started`]).
#[must_use = "the request ends when this drops"]
pub struct InFlight {
    /// Dropped on the thread that counted it.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        STATE.with(|s| {
            if s.enabled.get() {
                // Counted only if polling was on when it started: it turns
                // on before the core serves anything.
                s.in_flight.set(s.in_flight.get().saturating_sub(1));
                s.activity();
            }
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
        let in_flight = STATE.with(|s| s.in_flight.get());
        if !keep_polling(since, in_flight, window) {
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
    fn polls_only_soon_after_activity_and_with_a_short_queue() {
        let w = Duration::from_micros(300);
        let us = Duration::from_micros;
        // (since the last start or end, in flight, polls?)
        let table = [
            (None, 0, false),
            (Some(us(0)), 0, true),
            (Some(us(299)), 0, true),
            (Some(us(300)), 0, false),
            (Some(us(10_000)), 1, false),
            (Some(us(100)), 1, true),
            (Some(us(100)), 2, false),
            (Some(us(0)), 32, false),
        ];
        for (since, in_flight, want) in table {
            assert_eq!(
                keep_polling(since, in_flight, w),
                want,
                "since {since:?}, {in_flight} in flight"
            );
        }
    }
}
