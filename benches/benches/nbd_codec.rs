//! Per-request CPU cost of the NBD codec on the data path: decoding and
//! validating a request header, and encoding the reply header.
//!
//! These bound how many requests one core can turn around before any I/O:
//! compare their per-op time with the per-request budget at the IOPS the
//! fio comparison reaches (e.g. 100k IOPS on one core = 10 µs per request).
//!
//! Run with `cargo bench -p mirrorblk-benches --bench nbd_codec`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nbd::client::encode_request;
use nbd::request::{check_request, decode_request, REQUEST_HEADER_LEN};
use nbd::{reply, Command, CommandFlags, ExportInfo, Negotiated, Request, Verdict};

/// What mirrorblkd negotiates with fio: a 1 GiB writable export with
/// flush/FUA/trim/zeroes, structured replies and 4 KiB blocks.
fn negotiated() -> Negotiated {
    let export = ExportInfo {
        name: "vol0".into(),
        description: String::new(),
        size: 1 << 30,
        read_only: false,
        can_flush: true,
        can_fua: true,
        can_trim: true,
        can_write_zeroes: true,
        can_fast_zero: true,
        can_cache: false,
        can_df: true,
        can_multi_conn: true,
        can_block_status: true,
        can_dirty_bitmap: true,
        min_block: 4096,
        preferred_block: 4096,
        max_payload: 32 << 20,
    };
    Negotiated {
        transmission_flags: export.transmission_flags(),
        export,
        structured_replies: true,
        extended_headers: false,
        base_allocation: Some(1),
        dirty_bitmap: None,
        no_zeroes: true,
    }
}

fn header(command: Command, flags: CommandFlags, len: u32) -> [u8; REQUEST_HEADER_LEN] {
    encode_request(&Request {
        flags,
        command,
        cookie: 0x1234_5678_9abc_def0,
        offset: 123 * 4096,
        length: u64::from(len),
    })
}

fn request_decode(c: &mut Criterion) {
    let neg = negotiated();
    let mut g = c.benchmark_group("nbd_request_decode_check");
    g.throughput(Throughput::Elements(1));
    for (name, h) in [
        (
            "write_4k",
            header(Command::Write, CommandFlags::default(), 4096),
        ),
        (
            "write_4k_fua",
            header(Command::Write, CommandFlags::FUA, 4096),
        ),
        (
            "read_1m",
            header(Command::Read, CommandFlags::default(), 1 << 20),
        ),
    ] {
        // Sanity: a benchmark of the reject path would measure the wrong thing.
        let req = decode_request(&h).expect("benchmark header decodes");
        assert_eq!(
            check_request(&req, &neg),
            Verdict::Serve,
            "{name} must be served"
        );
        g.bench_function(name, |b| {
            b.iter(|| {
                let r = decode_request(black_box(&h)).expect("decodes");
                black_box(check_request(&r, &neg))
            })
        });
    }
    g.finish();
}

fn reply_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd_reply_encode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("simple_ok", |b| {
        b.iter(|| black_box(reply::simple_reply(black_box(42), None)))
    });
    g.bench_function("structured_read_data_header", |b| {
        b.iter(|| {
            black_box(reply::offset_data_header(
                black_box(42),
                black_box(4096),
                4096,
                true,
            ))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // Short, so the whole `cargo bench -p mirrorblk-benches` stays near a minute.
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = request_decode, reply_encode
}
criterion_main!(benches);
