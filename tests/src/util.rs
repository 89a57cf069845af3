//! Small helpers shared by the tests: a seedable random generator, data
//! patterns that can be told apart, and polling with a deadline.

use std::time::{Duration, Instant};

/// SplitMix64: a tiny, fast, seedable generator. Tests print their seed so a
/// failing random run can be replayed exactly (`MIRRORBLK_TEST_SEED=<seed>`).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator with a fixed seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// A generator seeded from `MIRRORBLK_TEST_SEED` if set, else from the
    /// clock and pid. The seed is printed (nextest shows it on failure).
    pub fn from_env_or_time(test: &str) -> Rng {
        let seed = match std::env::var("MIRRORBLK_TEST_SEED") {
            Ok(s) => s
                .parse()
                .unwrap_or_else(|_| panic!("MIRRORBLK_TEST_SEED={s:?} is not a u64")),
            Err(_) => {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
            }
        };
        eprintln!("{test}: random seed {seed} (replay with MIRRORBLK_TEST_SEED={seed})");
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `[0, n)` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        self.next_u64() % n
    }

    /// A number in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` pseudo-random bytes determined by `seed`: distinct seeds give
/// distinct contents, so a read shows exactly which write it came from.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed ^ 0x6d69_7272_6f72_626c).fill(&mut v);
    v
}

/// Where two buffers first differ, as a message naming offsets (`base` is
/// added to every offset shown); `None` if they are equal.
pub fn first_difference(base: u64, want: &[u8], got: &[u8]) -> Option<String> {
    if want.len() != got.len() {
        return Some(format!(
            "length differs at {base}: want {} bytes, got {}",
            want.len(),
            got.len()
        ));
    }
    let i = want.iter().zip(got).position(|(a, b)| a != b)?;
    let bad = want.iter().zip(got).filter(|(a, b)| a != b).count();
    Some(format!(
        "first difference at byte {} (want {:#04x}, got {:#04x}); {bad} differing bytes in [{base}, {})",
        base + i as u64,
        want[i],
        got[i],
        base + want.len() as u64
    ))
}

/// Asserts two buffers are equal, reporting the first differing offset
/// instead of dumping megabytes.
#[track_caller]
pub fn assert_bytes_eq(what: &str, base: u64, want: &[u8], got: &[u8]) {
    if let Some(d) = first_difference(base, want, got) {
        panic!("{what}: {d}");
    }
}

/// Calls `probe` every 20 ms until it returns `Some`, and returns that; panics
/// naming `what` if `timeout` passes first. Used instead of fixed sleeps.
#[track_caller]
pub fn poll_until<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 1 MiB, for readable sizes.
pub const MIB: u64 = 1 << 20;
/// 4 KiB, the volume block size.
pub const KIB4: u64 = 4096;
