//! The index of one backup: which volume, as of which LSN, and the digest of
//! every chunk in order. Every index is full, so a backup never depends on
//! another one.
//!
//! The format is binary and versioned, little-endian:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `MBKINDEX` |
//! | 8 | 4 | version, 1 |
//! | 12 | 4 | chunk size: a power of two in [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`] |
//! | 16 | 8 | volume size in bytes |
//! | 24 | 8 | the snapshot LSN the backup was read at |
//! | 32 | 8 | created, milliseconds since the Unix epoch |
//! | 40 | 16 | the volume's UUID |
//! | 56 | 8 | entry count: exactly ⌈size / chunk size⌉, at most [`MAX_INDEX_ENTRIES`] |
//! | 64 | 2 | volume name length, 1..=64 |
//! | 66 | n | volume name: ASCII letters, digits, `.`, `_`, `-`, not starting with `.` |
//! | 66+n | 32 × count | one SHA-256 per chunk; 32 zero bytes mark an all-zero chunk, which is never stored |
//! | end-32 | 32 | SHA-256 of every byte before it |
//!
//! Binary rather than JSON: fixed 32-byte entries make a 16 TiB volume's
//! index 128 MiB instead of ~300 MiB of hex, decode without a parser, and let
//! the length be checked exactly from the header before anything is
//! allocated. The trailing SHA-256 catches any change to the file.

use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::chunk::Digest;
use crate::{MAX_CHUNK_SIZE, MAX_INDEX_ENTRIES, MIN_CHUNK_SIZE};

/// The magic that starts every index.
pub const INDEX_MAGIC: [u8; 8] = *b"MBKINDEX";
/// The index format version this code writes and reads.
pub const INDEX_VERSION: u32 = 1;
/// The fixed part of the header, before the volume name.
const FIXED_HEADER: usize = 66;
/// The trailing checksum's length.
const TRAILER: usize = 32;
/// The longest volume name.
pub const MAX_NAME_LEN: usize = 64;
/// The digest that marks an all-zero chunk.
const ZERO_MARK: [u8; 32] = [0; 32];

/// One backup's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupIndex {
    /// The UUID of the backed-up volume.
    pub volume_uuid: [u8; 16],
    /// The volume's name.
    pub volume_name: String,
    /// The volume's size in bytes.
    pub size: u64,
    /// The chunk size: every chunk but the last covers exactly this much.
    pub chunk_size: u32,
    /// The snapshot LSN the backup was read at.
    pub lsn: u64,
    /// When the backup was created, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The chunks in order; `None` is an all-zero chunk (a hole, never stored).
    pub chunks: Vec<Option<Digest>>,
}

/// Why an index was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IndexError {
    /// Shorter than the smallest possible index.
    #[error("index of {len} bytes is shorter than the {need}-byte minimum")]
    TooShort {
        /// The length found.
        len: usize,
        /// The minimum length.
        need: usize,
    },
    /// Not an index.
    #[error("index magic {found:02x?} is not MBKINDEX")]
    BadMagic {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// A version this code does not read.
    #[error("index version {0} is not supported (only {INDEX_VERSION})")]
    UnsupportedVersion(u32),
    /// The name length is out of bounds.
    #[error("volume name length {0} is not in 1..={MAX_NAME_LEN}")]
    BadNameLength(u16),
    /// More entries than any index may have.
    #[error("{count} entries exceed the bound of {MAX_INDEX_ENTRIES}")]
    TooManyEntries {
        /// The entry count in the header.
        count: u64,
    },
    /// The file's length does not match its header.
    #[error("index is {got} bytes, its header implies {expected}")]
    LengthMismatch {
        /// The length the header implies.
        expected: u64,
        /// The length found.
        got: usize,
    },
    /// The trailing checksum does not match.
    #[error("index checksum does not match its contents")]
    ChecksumMismatch,
    /// The chunk size is not a power of two within bounds.
    #[error("chunk size {0} is not a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    BadChunkSize(u32),
    /// The entry count does not cover the volume size exactly.
    #[error("{count} entries do not cover {size} bytes in {chunk_size}-byte chunks")]
    EntryCountMismatch {
        /// The entry count.
        count: u64,
        /// The volume size.
        size: u64,
        /// The chunk size.
        chunk_size: u32,
    },
    /// The volume name has characters outside the allowed set.
    #[error("volume name {0:?} has characters outside [A-Za-z0-9._-] or starts with '.'")]
    BadName(String),
}

/// Checks a volume name: 1..=64 ASCII letters, digits, `.`, `_`, `-`, not
/// starting with `.` (names become path components and object keys).
pub fn valid_volume_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a chunk size against the bounds every index and repository obey.
pub fn valid_chunk_size(chunk_size: u32) -> bool {
    chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
}

/// The number of chunks that cover `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size))
}

impl BackupIndex {
    /// The byte range chunk `i` covers.
    pub fn chunk_range(&self, i: usize) -> std::ops::Range<u64> {
        let start = i as u64 * u64::from(self.chunk_size);
        start..(start + u64::from(self.chunk_size)).min(self.size)
    }

    /// Encodes the index. Panics if it breaks the format's invariants, which
    /// the writer establishes before it encodes.
    pub fn encode(&self) -> Vec<u8> {
        assert!(valid_volume_name(&self.volume_name), "invalid volume name");
        assert!(valid_chunk_size(self.chunk_size), "invalid chunk size");
        let count = self.chunks.len() as u64;
        assert_eq!(
            count,
            chunk_count(self.size, self.chunk_size),
            "entry count"
        );
        assert!(count <= MAX_INDEX_ENTRIES, "too many entries");
        let mut out = Vec::with_capacity(
            FIXED_HEADER + self.volume_name.len() + 32 * self.chunks.len() + TRAILER,
        );
        out.extend_from_slice(&INDEX_MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.lsn.to_le_bytes());
        out.extend_from_slice(&self.created_ms.to_le_bytes());
        out.extend_from_slice(&self.volume_uuid);
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&(self.volume_name.len() as u16).to_le_bytes());
        out.extend_from_slice(self.volume_name.as_bytes());
        for chunk in &self.chunks {
            out.extend_from_slice(&chunk.map_or(ZERO_MARK, |d| d.0));
        }
        let sum: [u8; 32] = Sha256::digest(&out).into();
        out.extend_from_slice(&sum);
        out
    }

    /// Decodes an index, refusing anything malformed with a precise error.
    /// Lengths are checked against the header before anything is allocated.
    pub fn decode(bytes: &[u8]) -> Result<BackupIndex, IndexError> {
        let header = Header::parse(bytes)?;
        let (body, sum) = bytes.split_at(bytes.len() - TRAILER);
        if Sha256::digest(body).as_slice() != sum {
            return Err(IndexError::ChecksumMismatch);
        }
        header.check_semantics()?;
        let name_end = FIXED_HEADER + usize::from(header.name_len);
        let name = std::str::from_utf8(&body[FIXED_HEADER..name_end])
            .ok()
            .filter(|n| valid_volume_name(n))
            .ok_or_else(|| {
                IndexError::BadName(
                    String::from_utf8_lossy(&body[FIXED_HEADER..name_end]).into_owned(),
                )
            })?;
        let chunks = body[name_end..]
            .chunks_exact(32)
            .map(|raw| {
                let raw: [u8; 32] = raw.try_into().expect("32-byte entry");
                (raw != ZERO_MARK).then_some(Digest(raw))
            })
            .collect();
        Ok(BackupIndex {
            volume_uuid: header.volume_uuid,
            volume_name: name.to_owned(),
            size: header.size,
            chunk_size: header.chunk_size,
            lsn: header.lsn,
            created_ms: header.created_ms,
            chunks,
        })
    }
}

/// The fixed header fields, read before the checksum is trusted.
struct Header {
    chunk_size: u32,
    size: u64,
    lsn: u64,
    created_ms: u64,
    volume_uuid: [u8; 16],
    count: u64,
    name_len: u16,
}

impl Header {
    /// Reads the fixed header and checks the file's length against it.
    fn parse(bytes: &[u8]) -> Result<Header, IndexError> {
        let need = FIXED_HEADER + TRAILER;
        if bytes.len() < need {
            return Err(IndexError::TooShort {
                len: bytes.len(),
                need,
            });
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let magic: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
        if magic != INDEX_MAGIC {
            return Err(IndexError::BadMagic { found: magic });
        }
        let version = u32_at(8);
        if version != INDEX_VERSION {
            return Err(IndexError::UnsupportedVersion(version));
        }
        let header = Header {
            chunk_size: u32_at(12),
            size: u64_at(16),
            lsn: u64_at(24),
            created_ms: u64_at(32),
            volume_uuid: bytes[40..56].try_into().expect("16 bytes"),
            count: u64_at(56),
            name_len: u16::from_le_bytes(bytes[64..66].try_into().expect("2")),
        };
        if !(1..=MAX_NAME_LEN).contains(&usize::from(header.name_len)) {
            return Err(IndexError::BadNameLength(header.name_len));
        }
        if header.count > MAX_INDEX_ENTRIES {
            return Err(IndexError::TooManyEntries {
                count: header.count,
            });
        }
        // Bounded above: count ≤ 2^22, so this cannot overflow.
        let expected = (need + usize::from(header.name_len)) as u64 + 32 * header.count;
        if expected != bytes.len() as u64 {
            return Err(IndexError::LengthMismatch {
                expected,
                got: bytes.len(),
            });
        }
        Ok(header)
    }

    /// Checks the fields whose meaning depends on each other.
    fn check_semantics(&self) -> Result<(), IndexError> {
        if !valid_chunk_size(self.chunk_size) {
            return Err(IndexError::BadChunkSize(self.chunk_size));
        }
        if self.count != chunk_count(self.size, self.chunk_size) {
            return Err(IndexError::EntryCountMismatch {
                count: self.count,
                size: self.size,
                chunk_size: self.chunk_size,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> BackupIndex {
        BackupIndex {
            volume_uuid: [9; 16],
            volume_name: "vol-0".into(),
            size: 3 * 65536 + 100,
            chunk_size: 65536,
            lsn: 42,
            created_ms: 1_700_000_000_000,
            chunks: vec![Some(Digest::of(b"a")), None, Some(Digest::of(b"b")), None],
        }
    }

    #[test]
    fn round_trip() {
        let index = sample();
        assert_eq!(BackupIndex::decode(&index.encode()).unwrap(), index);
        assert_eq!(index.chunk_range(3), 3 * 65536..3 * 65536 + 100);
    }

    #[test]
    fn every_refusal_is_precise() {
        let good = sample().encode();
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            BackupIndex::decode(&bad),
            Err(IndexError::BadMagic { .. })
        ));
        let mut bad = good.clone();
        bad[8] = 2;
        assert_eq!(
            BackupIndex::decode(&bad),
            Err(IndexError::UnsupportedVersion(2))
        );
        assert!(matches!(
            BackupIndex::decode(&good[..good.len() - 1]),
            Err(IndexError::LengthMismatch { .. })
        ));
        assert!(matches!(
            BackupIndex::decode(&good[..10]),
            Err(IndexError::TooShort { .. })
        ));
        let mut bad = good.clone();
        bad[100] ^= 1;
        assert_eq!(BackupIndex::decode(&bad), Err(IndexError::ChecksumMismatch));
        let mut bad = good.clone();
        bad[56..64].copy_from_slice(&(MAX_INDEX_ENTRIES + 1).to_le_bytes());
        assert!(matches!(
            BackupIndex::decode(&bad),
            Err(IndexError::TooManyEntries { .. })
        ));
        let mut bad = good;
        bad[64..66].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(BackupIndex::decode(&bad), Err(IndexError::BadNameLength(0)));
    }

    /// Re-signs a tampered body so the semantic checks behind the checksum
    /// are reached.
    fn resign(mut bytes: Vec<u8>) -> Vec<u8> {
        let end = bytes.len() - TRAILER;
        let sum: [u8; 32] = Sha256::digest(&bytes[..end]).into();
        bytes[end..].copy_from_slice(&sum);
        bytes
    }

    #[test]
    fn semantic_refusals_behind_a_valid_checksum() {
        let good = sample().encode();
        let mut bad = good.clone();
        bad[12..16].copy_from_slice(&65537u32.to_le_bytes());
        assert_eq!(
            BackupIndex::decode(&resign(bad)),
            Err(IndexError::BadChunkSize(65537))
        );
        let mut bad = good.clone();
        bad[16..24].copy_from_slice(&(10 * 65536u64).to_le_bytes());
        assert!(matches!(
            BackupIndex::decode(&resign(bad)),
            Err(IndexError::EntryCountMismatch { .. })
        ));
        let mut bad = good;
        bad[66] = b'/';
        assert!(matches!(
            BackupIndex::decode(&resign(bad)),
            Err(IndexError::BadName(_))
        ));
    }

    fn any_index() -> impl Strategy<Value = BackupIndex> {
        (
            any::<[u8; 16]>(),
            "[a-z0-9][a-z0-9._-]{0,20}",
            0u64..(40 * 4096),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(uuid, name, size, lsn, created_ms, seed)| {
                let count = chunk_count(size, 4096) as usize;
                let chunks = (0..count)
                    .map(|i| {
                        (seed >> (i % 64) & 1 == 1)
                            .then(|| Digest::of(&(seed ^ i as u64).to_le_bytes()))
                    })
                    .collect();
                BackupIndex {
                    volume_uuid: uuid,
                    volume_name: name,
                    size,
                    chunk_size: 4096,
                    lsn,
                    created_ms,
                    chunks,
                }
            })
    }

    proptest! {
        #[test]
        fn proptest_round_trip(index in any_index()) {
            let bytes = index.encode();
            prop_assert_eq!(BackupIndex::decode(&bytes).unwrap(), index);
        }

        #[test]
        fn proptest_truncation_and_flips_are_refused(index in any_index(), cut in any::<prop::sample::Index>(), bit in 0u8..8) {
            let bytes = index.encode();
            let at = cut.index(bytes.len());
            prop_assert!(BackupIndex::decode(&bytes[..at]).is_err());
            let mut flipped = bytes;
            flipped[at] ^= 1 << bit;
            prop_assert!(BackupIndex::decode(&flipped).is_err());
        }
    }
}
