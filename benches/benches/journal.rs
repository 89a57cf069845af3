//! CPU cost of the journal: batch header encoding, payload checksums,
//! region checksums, and the recovery scan rate.
//!
//! Every journaled write pays one xxh3 of its payload and a share of one
//! batch header encode (which checksums the 4 KiB header block; a group
//! commit shares it, journal format 3); recovery pays a header decode, a
//! read and an xxh3 per record. These figures say how far those costs are
//! from the disk's bandwidth.
//!
//! Run with `cargo bench -p mirrorblk-benches --bench journal`.

use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mirrorblk_server::journal::format::{
    BatchEntry, BatchHeader, Superblock, AREA_START, HEADER_BLOCK, MAX_BATCH_ENTRIES,
};
use mirrorblk_server::journal::recovery::{open_and_recover, scan, JournalSpec, ReplayTarget};
use mirrorblk_server::journal::MutationOp;
use mirrorblk_server::units::{Epoch, Lsn};
use xxhash_rust::xxh3::xxh3_64;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// Non-constant payload bytes (a constant buffer could flatter nothing in
/// xxh3, but the data looks more like real writes this way).
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            // xorshift64: cheap, deterministic filler.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Records per batch in the 4 KiB benches: what a group commit at 4k QD32
/// averaged in docs/PERFORMANCE.md (journal format 3's A/B).
const RECORDS_PER_BATCH_4K: usize = 8;

/// A batch of `n` write records of `len` bytes each from `first_lsn`, laid
/// out as `server/src/journal/format.rs` documents.
fn batch(first_lsn: u64, n: usize, offset: u64, len: usize, hash: u64) -> BatchHeader {
    assert!((1..=MAX_BATCH_ENTRIES).contains(&n));
    let mut entries: Vec<BatchEntry> = Vec::with_capacity(n);
    for i in 0..n {
        let e = BatchEntry {
            lsn: Lsn(first_lsn + i as u64),
            op: MutationOp::Write,
            flags: 0,
            offset: offset + (i * len) as u64,
            length: len as u64,
            payload_at: BatchHeader::next_payload_at(entries.last()),
            payload_hash: hash,
        };
        entries.push(e);
    }
    BatchHeader {
        epoch: Epoch(1),
        session: 1,
        entries,
    }
}

/// Header encode alone (zero-fill of the 4 KiB block, the entries, xxh3
/// over the block), for a batch of one and for a group commit's batch.
fn header_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("journal_batch_header_encode");
    let mut block = vec![0u8; HEADER_BLOCK];
    for n in [1, RECORDS_PER_BATCH_4K] {
        let h = batch(7, n, 4096, 4096, 0xdead_beef);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("records", n), |b| {
            b.iter(|| black_box(&h).encode(black_box(&mut block)))
        });
    }
    g.finish();
}

/// What the write path does per group commit: checksum every payload,
/// encode the batch header (one record of 1 MiB; eight of 4 KiB).
fn record_prepare(c: &mut Criterion) {
    let mut g = c.benchmark_group("journal_batch_hash_and_encode");
    let mut block = vec![0u8; HEADER_BLOCK];
    for (len, n) in [(4 * KIB, RECORDS_PER_BATCH_4K), (MIB, 1)] {
        let data: Vec<Vec<u8>> = (0..n).map(|i| payload(len, (len + i) as u64)).collect();
        g.throughput(Throughput::Bytes((len * n) as u64));
        g.bench_with_input(BenchmarkId::from_parameter(label(len)), &data, |b, d| {
            b.iter(|| {
                let mut h = batch(9, d.len(), 0, len, 0);
                for (e, p) in h.entries.iter_mut().zip(d) {
                    e.payload_hash = xxh3_64(black_box(p));
                }
                h.encode(&mut block);
                black_box(&block);
            })
        });
    }
    g.finish();
}

/// xxh3 over a 64 MiB region in 1 MiB pieces: larger than the CPU caches,
/// so this is the rate for data that comes from memory, not cache.
fn region_checksum(c: &mut Criterion) {
    let mut g = c.benchmark_group("region_checksum_xxh3");
    let region = payload(64 * MIB, 3);
    g.throughput(Throughput::Bytes(region.len() as u64));
    g.sample_size(10);
    g.bench_function("64MiB_in_1MiB_chunks", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for chunk in region.chunks(MIB) {
                acc ^= xxh3_64(chunk);
            }
            black_box(acc)
        })
    });
    g.finish();
}

/// Replay target that drops everything: creating the journal through
/// `open_and_recover` needs one, and there is nothing to replay yet.
struct Discard;

impl ReplayTarget for Discard {
    fn write(&mut self, _: u64, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn zero(&mut self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Creates a journal with the daemon's own code (`open_and_recover` on a
/// missing file: zero-filled, valid superblock, fresh session), then appends
/// `records` write records of `len` bytes each after its checkpoint in
/// batches of `per_batch`, laid out as `server/src/journal/format.rs`
/// documents. The zero block after the last batch ends the scan ("no more
/// records"). Going through the daemon for the superblock keeps this bench
/// valid when superblock fields change. Returns the superblock to scan from
/// and the payload bytes.
fn build_journal(path: &Path, records: usize, len: usize, per_batch: usize) -> (Superblock, u64) {
    assert!(records % per_batch == 0, "whole batches only");
    let batch_len = batch(1, per_batch, 0, len, 0).batch_len() as usize;
    let spec = JournalSpec {
        path,
        // Room for the batches, the spare block and the superblocks.
        size: ((records / per_batch) * batch_len + 2 * MIB).max(8 * MIB) as u64 + AREA_START,
        volume_name: "bench",
        volume_size: 1 << 30,
        durability: mirrorblk_server::journal::Durability::PerWrite,
    };
    let opened = open_and_recover(&spec, &mut Discard).expect("create the bench journal");
    let sb = opened.superblock.clone();
    drop(opened);
    // Buffered handle: the batches go through the page cache, where the scan
    // then reads them (the CPU side of recovery, not the disk).
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the bench journal for writing");
    let data = payload(len, 11);
    let hash = xxh3_64(&data);
    let mut out = vec![0u8; batch_len];
    for i in 0..records / per_batch {
        let first = sb.checkpoint_lsn.0 + (i * per_batch) as u64;
        let offset = (i * per_batch * len) as u64 % (1 << 30);
        let mut h = batch(first, per_batch, offset, len, hash);
        h.epoch = sb.epoch;
        h.session = sb.session;
        h.encode(&mut out[..HEADER_BLOCK]);
        for e in &h.entries {
            let at = e.payload_at as usize;
            out[at..at + len].copy_from_slice(&data);
        }
        let at = AREA_START + sb.checkpoint_pos + (i * batch_len) as u64;
        f.write_all_at(&out, at).expect("write a batch");
    }
    (sb, (records * len) as u64)
}

/// The recovery scan over a journal in the page cache: the CPU side of
/// recovery (pread copies, header decode, payload xxh3), not the disk.
fn recovery_scan(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("create a temp dir for the bench journal");
    let mut g = c.benchmark_group("recovery_scan");
    g.sample_size(10);
    for (records, len, per_batch) in [(8192, 4 * KIB, RECORDS_PER_BATCH_4K), (64, MIB, 1)] {
        let path = dir.path().join(format!("j-{len}"));
        let (sb, bytes) = build_journal(&path, records, len, per_batch);
        let f = File::open(&path).expect("open the bench journal");
        // Check once that every record is found, so the timing is of a full scan.
        let mut n = 0;
        let (next, _, stop) = scan(&f, &sb, |_, _| {
            n += 1;
            Ok(())
        })
        .expect("scan the bench journal");
        assert_eq!(
            (n, next),
            (records, Lsn(sb.checkpoint_lsn.0 + records as u64)),
            "stop: {stop:?}"
        );
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(BenchmarkId::new("payload", label(len)), |b| {
            b.iter(|| {
                let mut seen = 0u64;
                scan(&f, &sb, |_, data| {
                    seen += data.len() as u64;
                    Ok(())
                })
                .expect("scan");
                black_box(seen)
            })
        });
    }
    g.finish();
}

fn label(len: usize) -> String {
    if len >= MIB {
        format!("{}MiB", len / MIB)
    } else {
        format!("{}KiB", len / KIB)
    }
}

criterion_group! {
    name = benches;
    // Short, so the whole `cargo bench -p mirrorblk-benches` stays near a minute.
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = header_encode, record_prepare, region_checksum, recovery_scan
}
criterion_main!(benches);
