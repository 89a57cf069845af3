//! Arbitrary bytes as the start of a snapshot side file, which start-up
//! reads back after a crash: a header copy (its checksum made valid when
//! the first byte is odd, so the fields behind it are fuzzed too), then map
//! entries. Besides "no panic", a header that decodes encodes back to bytes
//! that decode to the same header, and judging the decoded map never
//! panics (whatever `sealed`, size or data check say).

#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrorblk_server::engine::snapshot_file::{
    judge_map, pick_header, Entry, Header, ENTRY_LEN, HEADER_LEN, MAGIC,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let (head, map) = data.split_at(data.len().min(HEADER_LEN - 16));
    let mut block = vec![0u8; HEADER_LEN];
    block[..8].copy_from_slice(&MAGIC);
    block[8..12].copy_from_slice(&1u32.to_le_bytes());
    block[16..16 + head.len()].copy_from_slice(head);
    if mode & 1 == 1 {
        let check = xxhash_rust::xxh3::xxh3_64(&block[..HEADER_LEN - 8]);
        block[HEADER_LEN - 8..].copy_from_slice(&check.to_le_bytes());
    }
    let Ok(h) = pick_header(&block, &[0u8; HEADER_LEN]) else {
        return;
    };
    let mut again = vec![0u8; HEADER_LEN];
    h.encode(&mut again);
    assert_eq!(
        Header::decode(&again).as_ref(),
        Ok(&h),
        "a decoded header re-encodes to itself"
    );
    let slots: Vec<_> = map
        .chunks_exact(ENTRY_LEN)
        .enumerate()
        .map(|(i, e)| Entry::decode(e, i as u64, h.nonce))
        .collect();
    let _ = judge_map(&slots, h.sealed, (h.from, h.size), |i, _| i % 2 == 0);
});
