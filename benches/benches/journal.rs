//! CPU cost of the journal: record header encoding, payload checksums,
//! region checksums, and the recovery scan rate.
//!
//! Every journaled write pays one xxh3 of its payload and one header encode
//! (which checksums the 4 KiB header block); recovery pays a header decode,
//! a read and an xxh3 per record. These figures say how far those costs are
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
    EntryKind, RecordHeader, Superblock, AREA_START, HEADER_BLOCK,
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

fn write_header(lsn: u64, offset: u64, len: usize, hash: u64) -> RecordHeader {
    RecordHeader {
        lsn: Lsn(lsn),
        epoch: Epoch(1),
        session: 1,
        kind: EntryKind::Mutation(MutationOp::Write),
        flags: 0,
        offset,
        length: len as u64,
        payload_len: len as u64,
        record_len: RecordHeader::record_len_for(len as u64),
        payload_hash: hash,
    }
}

/// Header encode alone (zero-fill of the 4 KiB block + xxh3 over it).
fn header_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("journal_header_encode");
    g.throughput(Throughput::Elements(1));
    let h = write_header(7, 4096, 4096, 0xdead_beef);
    let mut block = vec![0u8; HEADER_BLOCK];
    g.bench_function("encode_4k_header_block", |b| {
        b.iter(|| black_box(&h).encode(black_box(&mut block)))
    });
    g.finish();
}

/// What the write path does per record: checksum the payload, encode the header.
fn record_prepare(c: &mut Criterion) {
    let mut g = c.benchmark_group("journal_record_hash_and_encode");
    let mut block = vec![0u8; HEADER_BLOCK];
    for len in [4 * KIB, MIB] {
        let data = payload(len, len as u64);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::from_parameter(label(len)), &data, |b, d| {
            b.iter(|| {
                let hash = xxh3_64(black_box(d));
                write_header(9, 0, d.len(), hash).encode(&mut block);
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
/// `records` write records of `len` bytes each after its checkpoint, laid
/// out as `server/src/journal/format.rs` documents. The zero block after the
/// last record ends the scan ("no more records"). Going through the daemon
/// for the superblock keeps this bench valid when superblock fields change.
/// Returns the superblock to scan from and the payload bytes.
fn build_journal(path: &Path, records: usize, len: usize) -> (Superblock, u64) {
    let record_len = RecordHeader::record_len_for(len as u64) as usize;
    let spec = JournalSpec {
        path,
        // Room for the records, the spare block and the superblocks.
        size: (records * record_len + 2 * MIB).max(8 * MIB) as u64 + AREA_START,
        volume_name: "bench",
        volume_size: 1 << 30,
        durability: mirrorblk_server::journal::Durability::PerWrite,
    };
    let opened = open_and_recover(&spec, &mut Discard).expect("create the bench journal");
    let sb = opened.superblock.clone();
    drop(opened);
    // Buffered handle: the records go through the page cache, where the scan
    // then reads them (the CPU side of recovery, not the disk).
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the bench journal for writing");
    let data = payload(len, 11);
    let hash = xxh3_64(&data);
    let mut rec = vec![0u8; record_len];
    for i in 0..records {
        let offset = (i * len) as u64 % (1 << 30);
        let mut h = write_header(sb.checkpoint_lsn.0 + i as u64, offset, len, hash);
        h.epoch = sb.epoch;
        h.session = sb.session;
        h.encode(&mut rec[..HEADER_BLOCK]);
        rec[HEADER_BLOCK..HEADER_BLOCK + len].copy_from_slice(&data);
        let at = AREA_START + sb.checkpoint_pos + (i * record_len) as u64;
        f.write_all_at(&rec, at).expect("write a record");
    }
    (sb, (records * len) as u64)
}

/// The recovery scan over a journal in the page cache: the CPU side of
/// recovery (pread copies, header decode, payload xxh3), not the disk.
fn recovery_scan(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("create a temp dir for the bench journal");
    let mut g = c.benchmark_group("recovery_scan");
    g.sample_size(10);
    for (records, len) in [(8192, 4 * KIB), (64, MIB)] {
        let path = dir.path().join(format!("j-{len}"));
        let (sb, bytes) = build_journal(&path, records, len);
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
