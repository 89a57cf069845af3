//! Typed quantities that carry their unit: sequence numbers, epochs, sizes.
//!
//! Plain `u64` byte offsets are used inside the data path where the name says
//! what they are; the types here guard the values that are easy to confuse.

use std::fmt;
use std::str::FromStr;

/// The block size every on-disk structure and every `O_DIRECT` transfer is
/// aligned to. 4 KiB is the logical block size of every device we target.
pub const BLOCK: u64 = 4096;

/// Rounds `v` down to a multiple of [`BLOCK`].
pub fn align_down(v: u64) -> u64 {
    v & !(BLOCK - 1)
}

/// Rounds `v` up to a multiple of [`BLOCK`] (saturating at the top of `u64`).
pub fn align_up(v: u64) -> u64 {
    v.saturating_add(BLOCK - 1) & !(BLOCK - 1)
}

/// Whether `v` is a multiple of [`BLOCK`].
pub fn is_aligned(v: u64) -> bool {
    v % BLOCK == 0
}

/// Log sequence number: the gap-free number the primary gives each mutating
/// request. LSN 0 is never assigned; the first record is LSN 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The LSN after this one.
    pub fn next(self) -> Lsn {
        Lsn(self.0 + 1)
    }

    /// The last LSN below this exclusive frontier (`durable_next`,
    /// `applied_next` …): the LSN status and the wire report, 0 for none.
    pub fn last(self) -> u64 {
        self.0.saturating_sub(1)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Promotion counter: grows by one at every promotion, fences stale primaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A volume's size in bytes, shared between its core (which changes it at
/// a resize) and the acceptors (a new NBD connection negotiates the
/// current size; an existing one keeps the size it negotiated).
#[derive(Debug, Clone, Default)]
pub struct SharedSize(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl SharedSize {
    /// A size of `bytes`.
    pub fn new(bytes: u64) -> SharedSize {
        SharedSize(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
            bytes,
        )))
    }

    /// The size now.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Changes it (on the volume's core, at a resize).
    pub fn set(&self, bytes: u64) {
        self.0.store(bytes, std::sync::atomic::Ordering::Release);
    }
}

/// A size in bytes, parsed from text with optional binary suffixes
/// (`K`, `M`, `G`, `T`, each a power of 1024; `1G` is 1 GiB). A trailing `B`
/// or `iB` is accepted (`4KiB`, `1GB` both mean powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// Why a size string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ByteSizeError {
    /// Nothing was given.
    #[error("empty size")]
    Empty,
    /// The number part is not a non-negative integer.
    #[error("'{0}' is not a size: expected a whole number with an optional K, M, G or T suffix (powers of 1024), e.g. 1G")]
    Invalid(String),
    /// The value does not fit in 64 bits.
    #[error("'{0}' is too large")]
    Overflow(String),
}

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.is_empty() {
            return Err(ByteSizeError::Empty);
        }
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, suffix) = t.split_at(digits_end);
        if num.is_empty() {
            return Err(ByteSizeError::Invalid(s.to_string()));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| ByteSizeError::Overflow(s.to_string()))?;
        let suffix = suffix.trim().to_ascii_uppercase();
        let unit_part = suffix
            .strip_suffix("IB")
            .or_else(|| suffix.strip_suffix('B'))
            .unwrap_or(&suffix);
        let shift = match unit_part {
            "" => 0,
            "K" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            _ => return Err(ByteSizeError::Invalid(s.to_string())),
        };
        n.checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| ByteSizeError::Overflow(s.to_string()))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if v != 0 && v % (1u64 << shift) == 0 {
                return write!(f, "{}{}", v >> shift, unit);
            }
        }
        write!(f, "{v}")
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(ByteSize(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Parses a duration like `250ms`, `2s`, `5m` or `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration: expected e.g. 250ms, 2s, 5m or 1h"))?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => {
            return Err(format!(
                "'{s}' is not a duration: expected e.g. 250ms, 2s, 5m or 1h"
            ))
        }
    };
    ms.map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("'{s}' is too long"))
}

/// A span of time as operators write it (`250ms`, `2s`, `5m`, `1h`): parsed
/// by [`parse_duration`] and shown in the largest whole unit, so a shown
/// value parses back to itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Interval(pub std::time::Duration);

impl FromStr for Interval {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(Interval)
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return write!(f, "0s");
        }
        for (unit_ms, unit) in [(3_600_000, "h"), (60_000, "m"), (1000, "s")] {
            if ms % unit_ms == 0 {
                return write!(f, "{}{unit}", ms / unit_ms);
            }
        }
        write!(f, "{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("250ms"),
            Ok(std::time::Duration::from_millis(250))
        );
        assert_eq!(parse_duration("2s"), Ok(std::time::Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(std::time::Duration::from_secs(3)));
        assert_eq!(
            parse_duration("1h"),
            Ok(std::time::Duration::from_secs(3600))
        );
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    use super::*;

    #[test]
    fn parses_binary_suffixes() {
        assert_eq!("1G".parse::<ByteSize>(), Ok(ByteSize(1 << 30)));
        assert_eq!("4k".parse::<ByteSize>(), Ok(ByteSize(4096)));
        assert_eq!("4KiB".parse::<ByteSize>(), Ok(ByteSize(4096)));
        assert_eq!("2T".parse::<ByteSize>(), Ok(ByteSize(2 << 40)));
        assert_eq!("512".parse::<ByteSize>(), Ok(ByteSize(512)));
        assert_eq!("64MB".parse::<ByteSize>(), Ok(ByteSize(64 << 20)));
    }

    #[test]
    fn rejects_garbage() {
        assert!("".parse::<ByteSize>().is_err());
        assert!("G".parse::<ByteSize>().is_err());
        assert!("1X".parse::<ByteSize>().is_err());
        assert!("-1".parse::<ByteSize>().is_err());
        assert!("99999999999T".parse::<ByteSize>().is_err());
    }

    #[test]
    fn intervals_display_round_trip() {
        for s in ["250ms", "1s", "5s", "90s", "2m", "1h", "1500ms"] {
            let v: Interval = s.parse().unwrap();
            assert_eq!(v.to_string(), s);
        }
        assert_eq!(Interval(std::time::Duration::ZERO).to_string(), "0s");
    }

    #[test]
    fn displays_round_trip() {
        for s in ["1G", "4K", "3M", "5T", "4097"] {
            let v: ByteSize = s.parse().unwrap();
            assert_eq!(v.to_string(), s);
        }
    }

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_down(4097), 4096);
        assert_eq!(align_up(4097), 8192);
        assert_eq!(align_up(0), 0);
        assert!(is_aligned(8192));
        assert!(!is_aligned(1));
    }
}
