//! Arbitrary bytes as a header block of the journal's record area, which
//! recovery, catch-up reads and `mirrorblk journal inspect` decode from
//! disk: a batch header (its magic set and its checksum made valid when the
//! first byte is odd, so the fields behind them are fuzzed too; a record
//! header's magic when the second bit is set as well), else the bytes as
//! they are. Besides "no panic", a header that decodes encodes back to the
//! same bytes' meaning: decoding its encoding gives the same header.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrorblk_server::journal::format::{
    HeaderBlock, BATCH_MAGIC, HEADER_BLOCK, RECORD_MAGIC,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let mut block = vec![0u8; HEADER_BLOCK];
    let n = data.len().min(HEADER_BLOCK);
    block[..n].copy_from_slice(&data[..n]);
    if mode & 1 == 1 {
        let magic = if mode & 2 == 2 { RECORD_MAGIC } else { BATCH_MAGIC };
        block[..8].copy_from_slice(&magic.to_le_bytes());
        let check = xxhash_rust::xxh3::xxh3_64(&block[..HEADER_BLOCK - 8]);
        block[HEADER_BLOCK - 8..].copy_from_slice(&check.to_le_bytes());
    }
    let Ok(h) = HeaderBlock::decode(&block) else {
        return;
    };
    let mut again = vec![0u8; HEADER_BLOCK];
    match &h {
        HeaderBlock::Batch(b) => {
            b.encode(&mut again);
            assert!(b.batch_len() % 4096 == 0 && !b.entries.is_empty());
        }
        HeaderBlock::Record(r) => r.encode(&mut again),
    }
    assert_eq!(
        HeaderBlock::decode(&again).as_ref(),
        Ok(&h),
        "a decoded header re-encodes to itself"
    );
});
