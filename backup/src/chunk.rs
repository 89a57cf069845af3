//! One stored chunk: its name (the SHA-256 of the plain data) and the blob
//! format it is stored in.
//!
//! A blob is a 20-byte header then the payload:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `MBKC` |
//! | 4 | 1 | version, 1 |
//! | 5 | 1 | flags: bit 0 = payload is zstd-compressed; other bits must be 0 |
//! | 6 | 2 | reserved, 0 |
//! | 8 | 4 | plain length, little-endian, at most [`MAX_CHUNK_SIZE`] |
//! | 12 | 8 | XXH3-64 of the payload, little-endian |
//!
//! The payload checksum is checked before decompression, so a flipped bit is
//! reported as corruption and never fed to zstd; the SHA-256 of the plain data
//! is then checked against the chunk's name, so nothing but the exact data
//! that was backed up is ever returned.

use std::cell::RefCell;
use std::fmt;

use sha2::{Digest as _, Sha256};
use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

use crate::MAX_CHUNK_SIZE;

/// The magic that starts every blob.
pub const BLOB_MAGIC: [u8; 4] = *b"MBKC";
/// The blob format version this code writes and reads.
pub const BLOB_VERSION: u8 = 1;
/// The length of a blob header.
pub const BLOB_HEADER_LEN: usize = 20;
/// Blob flag: the payload is zstd-compressed.
pub const FLAG_ZSTD: u8 = 1;
/// The zstd level: fast, since backups are throughput-bound.
const ZSTD_LEVEL: i32 = 1;

/// The SHA-256 of a chunk's plain data: its name in the repository.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    /// Parses 64 lowercase hex digits, the form chunk names take.
    pub fn from_hex(text: &str) -> Option<Digest> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
        }
        Some(Digest(out))
    }

    /// The key of this chunk in a repository: `.chunks/PPPP/DIGEST`, with
    /// the first four hex digits as a prefix directory (65536 of them at
    /// most), so no directory grows past a few thousand entries per TiB.
    pub fn key(&self) -> String {
        let hex = self.to_string();
        format!("{}/{}/{}", crate::repo::CHUNK_DIR, &hex[..4], hex)
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// Why a stored blob was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BlobError {
    /// Shorter than a header.
    #[error("blob of {len} bytes is shorter than its {BLOB_HEADER_LEN}-byte header")]
    TooShort {
        /// The blob's length.
        len: usize,
    },
    /// The magic is wrong: not a chunk blob.
    #[error("blob magic {found:02x?} is not MBKC")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A version this code does not read.
    #[error("blob version {0} is not supported (only {BLOB_VERSION})")]
    UnsupportedVersion(u8),
    /// Unknown flag bits or a non-zero reserved field.
    #[error("blob flags {flags:#04x} / reserved {reserved:#06x} are not understood")]
    BadFlags {
        /// The flags byte.
        flags: u8,
        /// The reserved field.
        reserved: u16,
    },
    /// The plain length is larger than any chunk may be.
    #[error("blob claims {len} plain bytes, more than the {MAX_CHUNK_SIZE}-byte bound")]
    TooLarge {
        /// The claimed length.
        len: u32,
    },
    /// The payload does not match the header's checksum: the stored bytes
    /// changed after they were written.
    #[error("payload checksum {computed:#018x} does not match the stored {stored:#018x}")]
    ChecksumMismatch {
        /// The checksum in the header.
        stored: u64,
        /// The checksum of the payload as read.
        computed: u64,
    },
    /// zstd refused the payload.
    #[error("zstd decompression failed: {0}")]
    Decompress(String),
    /// The payload's plain data has another length than the header says.
    #[error("plain data is {got} bytes, the header says {expected}")]
    LengthMismatch {
        /// The header's plain length.
        expected: u32,
        /// The length found.
        got: usize,
    },
    /// The plain data does not hash to the chunk's name.
    #[error("plain data hashes to {actual}, not to the chunk's name")]
    DigestMismatch {
        /// The digest of the data as read.
        actual: Digest,
    },
}

/// A compressed payload is kept only when it saves at least this share of
/// the plain length (1/32, about 3 %): less is not worth zstd's time at
/// every restore.
const MIN_SAVING_DIVISOR: usize = 32;
/// Most bytes of each probe a chunk is sampled at before compressing it
/// whole.
const PROBE_LEN: usize = 16 << 10;
/// Fewest bytes of each probe: zstd still tells incompressible data apart.
const MIN_PROBE_LEN: usize = 1 << 10;
/// A probe is at most this share of the chunk, so the sample costs the same
/// share of zstd time at every chunk size (1/64: 64 KiB chunks are judged
/// on 4 probes of 1 KiB, not compressed whole to find out).
const PROBE_DIVISOR: usize = 64;
/// How many probes, spread evenly over the chunk.
const PROBES: usize = 4;

/// Whether a payload compressed from `plain` to `packed` bytes is worth
/// storing compressed (pure).
pub fn worth_compressing(plain: usize, packed: usize) -> bool {
    packed + plain / MIN_SAVING_DIVISOR <= plain && packed < plain
}

/// The sample a chunk's compressibility is judged on: [`PROBES`] slices
/// spread evenly, each 1/64 of the chunk within [`MIN_PROBE_LEN`] and
/// [`PROBE_LEN`] bytes; the whole chunk when it is small.
fn probes(plain: &[u8]) -> Vec<&[u8]> {
    let len = (plain.len() / PROBE_DIVISOR).clamp(MIN_PROBE_LEN, PROBE_LEN);
    if plain.len() <= PROBES * len * 2 {
        return vec![plain];
    }
    let stride = plain.len() / PROBES;
    (0..PROBES)
        .map(|i| &plain[i * stride..i * stride + len])
        .collect()
}

thread_local! {
    /// This thread's zstd compression context, made on first use. A fresh
    /// context per call (what `zstd::bulk::compress` does) allocated and
    /// cleared a few hundred KiB each time: 17 % of a full backup's CPU,
    /// with four probes per 64 KiB chunk.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { RefCell::new(None) };
    /// This thread's zstd decompression context, made on first use.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// zstd of `data` at [`ZSTD_LEVEL`] through this thread's context; `None`
/// when zstd fails (the chunk is then stored raw).
fn zstd_compress(data: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        slot.as_mut()?.compress(data).ok()
    })
}

/// Decompresses `data`, at most `capacity` bytes of output, through this
/// thread's context.
fn zstd_decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(data, capacity),
            None => Err(std::io::Error::other("no zstd decompression context")),
        }
    })
}

/// zstd of `plain`, when a sample suggests and the whole confirms that it
/// is [`worth_compressing`]; `None` stores it raw. Incompressible data
/// (already compressed or encrypted) costs only the sample's compression.
fn compressed(plain: &[u8]) -> Option<Vec<u8>> {
    let sample = probes(plain);
    if sample.len() > 1 {
        let (mut raw, mut packed) = (0, 0);
        for piece in sample {
            raw += piece.len();
            packed += zstd_compress(piece)?.len();
        }
        if !worth_compressing(raw, packed) {
            return None;
        }
    }
    zstd_compress(plain).filter(|c| worth_compressing(plain.len(), c.len()))
}

/// Encodes `plain` as a blob, zstd-compressed when `compress` is set and
/// compression saves space meaningfully (see [`worth_compressing`]);
/// otherwise stored raw, which the flags say.
pub fn encode_blob(plain: &[u8], compress: bool) -> Vec<u8> {
    assert!(
        plain.len() <= MAX_CHUNK_SIZE as usize,
        "chunk over the bound"
    );
    let compressed = if compress { compressed(plain) } else { None };
    let (flags, payload) = match &compressed {
        Some(c) => (FLAG_ZSTD, c.as_slice()),
        None => (0, plain),
    };
    let mut blob = Vec::with_capacity(BLOB_HEADER_LEN + payload.len());
    blob.extend_from_slice(&BLOB_MAGIC);
    blob.push(BLOB_VERSION);
    blob.push(flags);
    blob.extend_from_slice(&0u16.to_le_bytes());
    blob.extend_from_slice(&(plain.len() as u32).to_le_bytes());
    blob.extend_from_slice(&xxh3_64(payload).to_le_bytes());
    blob.extend_from_slice(payload);
    blob
}

/// Whether a blob's payload is zstd-compressed (false for anything that is
/// not a blob).
pub fn is_compressed(blob: &[u8]) -> bool {
    blob.len() >= BLOB_HEADER_LEN && blob[5] & FLAG_ZSTD != 0
}

/// Decodes a blob and checks that its plain data is the chunk `digest`.
pub fn decode_blob(digest: &Digest, blob: &[u8]) -> Result<Vec<u8>, BlobError> {
    let (flags, plain_len, payload) = parse_header(blob)?;
    let plain = if flags & FLAG_ZSTD != 0 {
        zstd_decompress(payload, plain_len as usize)
            .map_err(|e| BlobError::Decompress(e.to_string()))?
    } else {
        payload.to_vec()
    };
    if plain.len() != plain_len as usize {
        return Err(BlobError::LengthMismatch {
            expected: plain_len,
            got: plain.len(),
        });
    }
    let actual = Digest::of(&plain);
    if actual != *digest {
        return Err(BlobError::DigestMismatch { actual });
    }
    Ok(plain)
}

/// Checks a blob's header and payload checksum; returns the flags, the plain
/// length and the payload.
fn parse_header(blob: &[u8]) -> Result<(u8, u32, &[u8]), BlobError> {
    let Some((header, payload)) = blob.split_first_chunk::<BLOB_HEADER_LEN>() else {
        return Err(BlobError::TooShort { len: blob.len() });
    };
    let field = |at: usize, n: usize| &header[at..at + n];
    let magic: [u8; 4] = field(0, 4).try_into().expect("4 bytes");
    if magic != BLOB_MAGIC {
        return Err(BlobError::BadMagic { found: magic });
    }
    if header[4] != BLOB_VERSION {
        return Err(BlobError::UnsupportedVersion(header[4]));
    }
    let flags = header[5];
    let reserved = u16::from_le_bytes(field(6, 2).try_into().expect("2 bytes"));
    if flags & !FLAG_ZSTD != 0 || reserved != 0 {
        return Err(BlobError::BadFlags { flags, reserved });
    }
    let plain_len = u32::from_le_bytes(field(8, 4).try_into().expect("4 bytes"));
    if plain_len > MAX_CHUNK_SIZE {
        return Err(BlobError::TooLarge { len: plain_len });
    }
    let stored = u64::from_le_bytes(field(12, 8).try_into().expect("8 bytes"));
    let computed = xxh3_64(payload);
    if stored != computed {
        return Err(BlobError::ChecksumMismatch { stored, computed });
    }
    Ok((flags, plain_len, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_compressed_and_plain() {
        let data = vec![7u8; 100_000];
        let digest = Digest::of(&data);
        let packed = encode_blob(&data, true);
        assert!(packed.len() < 1000, "compressible data is compressed");
        assert_eq!(decode_blob(&digest, &packed).unwrap(), data);
        let plain = encode_blob(&data, false);
        assert_eq!(plain.len(), BLOB_HEADER_LEN + data.len());
        assert_eq!(decode_blob(&digest, &plain).unwrap(), data);
    }

    #[test]
    fn a_flipped_payload_bit_is_caught_before_decompression() {
        let data = vec![3u8; 10_000];
        let mut blob = encode_blob(&data, true);
        let last = blob.len() - 1;
        blob[last] ^= 1;
        assert!(matches!(
            decode_blob(&Digest::of(&data), &blob),
            Err(BlobError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn data_under_the_wrong_name_is_refused() {
        let blob = encode_blob(b"hello", false);
        let wrong = Digest::of(b"other");
        assert!(matches!(
            decode_blob(&wrong, &blob),
            Err(BlobError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn header_errors_are_precise() {
        let blob = encode_blob(b"x", false);
        let d = Digest::of(b"x");
        assert_eq!(
            decode_blob(&d, &blob[..5]),
            Err(BlobError::TooShort { len: 5 })
        );
        let mut bad = blob.clone();
        bad[4] = 9;
        assert_eq!(decode_blob(&d, &bad), Err(BlobError::UnsupportedVersion(9)));
        let mut bad = blob.clone();
        bad[5] = 0x80;
        assert!(matches!(
            decode_blob(&d, &bad),
            Err(BlobError::BadFlags { .. })
        ));
        let mut bad = blob;
        bad[8..12].copy_from_slice(&(MAX_CHUNK_SIZE + 1).to_le_bytes());
        assert!(matches!(
            decode_blob(&d, &bad),
            Err(BlobError::TooLarge { .. })
        ));
    }

    #[test]
    fn compression_is_kept_only_when_it_saves_a_thirty_second() {
        // (plain, packed, kept)
        let table = [
            (1024, 1024, false),
            (1024, 1025, false),
            (1024, 993, false),
            (1024, 992, true),
            (1024, 10, true),
            (0, 0, false),
            (31, 30, true),
        ];
        for (plain, packed, kept) in table {
            assert_eq!(
                worth_compressing(plain, packed),
                kept,
                "{plain} -> {packed}"
            );
        }
    }

    #[test]
    fn incompressible_chunks_are_stored_raw_and_mixed_ones_compressed() {
        let mut random = vec![0u8; 4 << 20];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for b in random.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let blob = encode_blob(&random, true);
        assert!(!is_compressed(&blob), "random data stored raw");
        assert_eq!(decode_blob(&Digest::of(&random), &blob).unwrap(), random);
        // Half random, half zero: every probe that lands in the zeros
        // compresses, so the whole is compressed.
        let mut mixed = random.clone();
        mixed[2 << 20..].fill(0);
        let blob = encode_blob(&mixed, true);
        assert!(is_compressed(&blob), "half-zero chunk compressed");
        assert_eq!(decode_blob(&Digest::of(&mixed), &blob).unwrap(), mixed);
        // The same at 64 KiB, judged on a 4 KiB sample, not the whole.
        let small = &random[..64 << 10];
        assert!(!is_compressed(&encode_blob(small, true)));
        let mut half = small.to_vec();
        half[32 << 10..].fill(0);
        assert!(is_compressed(&encode_blob(&half, true)));
    }

    #[test]
    fn the_sample_is_a_sixteenth_of_the_chunk_within_bounds() {
        let sampled = |len: usize| -> usize {
            let plain = vec![1u8; len];
            probes(&plain).iter().map(|p| p.len()).sum()
        };
        assert_eq!(sampled(64 << 10), 4 << 10);
        assert_eq!(sampled(256 << 10), 16 << 10);
        assert_eq!(sampled(4 << 20), 64 << 10);
        assert_eq!(sampled(16 << 20), 64 << 10);
        // Too small to sample: the whole chunk.
        assert_eq!(sampled(4 << 10), 4 << 10);
    }

    #[test]
    fn hex_names_round_trip() {
        let d = Digest::of(b"abc");
        assert_eq!(Digest::from_hex(&d.to_string()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
        assert!(d.key().starts_with(".chunks/ba78/ba78"));
    }
}
