//! Shared helpers for the repository tests: volumes made of seeded
//! pseudo-random chunks, a repository in a temporary directory.

#![allow(dead_code)]

use std::io::Cursor;
use std::path::Path;

use backup::{BackupSpec, DirBackend, RepoConfig, Repository};

/// The chunk size the tests use: small, so volumes of a few MiB have dozens
/// of chunks.
pub const CHUNK: u32 = 64 << 10;

/// A deterministic pseudo-random fill (xorshift64*), seeded through an
/// odd multiplier so distinct seeds give distinct streams.
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x6A09_E667_F3BC_C909);
    if x == 0 {
        x = 1;
    }
    for word in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        word.copy_from_slice(&v[..word.len()]);
    }
}

/// A volume of `chunks` chunks plus `tail` bytes: every fourth chunk all
/// zero (a hole), the others random from `seed`.
pub fn volume(chunks: usize, tail: usize, seed: u64) -> Vec<u8> {
    let c = CHUNK as usize;
    let mut data = vec![0u8; chunks * c + tail];
    for (i, chunk) in data.chunks_mut(c).enumerate() {
        if i % 4 != 3 {
            fill(chunk, seed.wrapping_add(i as u64 * 7919));
        }
    }
    data
}

/// Overwrites `len` bytes at `at` with fresh random data.
pub fn scribble(data: &mut [u8], at: usize, len: usize, seed: u64) {
    fill(&mut data[at..at + len], seed);
}

/// A spec for volume `name` of `data`.
pub fn spec(name: &str, uuid: u8, data: &[u8], lsn: u64) -> BackupSpec {
    BackupSpec {
        volume_uuid: [uuid; 16],
        volume_name: name.into(),
        size: data.len() as u64,
        lsn,
    }
}

/// A fresh directory repository with the test chunk size.
pub fn dir_repo(root: &Path) -> Repository {
    let config = RepoConfig {
        chunk_size: CHUNK,
        ..RepoConfig::default()
    };
    Repository::create(Box::new(DirBackend::new(root).unwrap()), config).unwrap()
}

/// Restores `id` into a fresh buffer of `size` bytes pre-filled with 0xEE.
pub fn restore(
    repo: &Repository,
    id: &backup::BackupId,
    size: usize,
) -> (Vec<u8>, Result<backup::RestoreStats, backup::RepoError>) {
    let mut target = Cursor::new(vec![0xEEu8; size]);
    let result = repo.restore(id, &mut target);
    (target.into_inner(), result)
}

/// The stored chunks: count and bytes.
pub fn stored(repo: &Repository) -> (usize, u64) {
    let chunks = repo.backend().list(".chunks").unwrap();
    (chunks.len(), chunks.iter().map(|c| c.size).sum())
}

/// Garbage collection options with no margin: tests run on one clock.
pub fn gc_now() -> backup::GcOptions {
    backup::GcOptions {
        margin: std::time::Duration::ZERO,
        ..backup::GcOptions::default()
    }
}
