//! Arbitrary bytes as the start of a snapshot side file, which start-up
//! reads back after a crash: two header copies, then map entries. Besides
//! "no panic", a header that decodes encodes back to bytes that decode to
//! the same header, and judging the decoded map never panics (whatever
//! `sealed`, size or data check say).

#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrorblk_server::engine::snapshot_file::{
    judge_map, pick_header, Entry, Header, ENTRY_LEN, HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER_LEN {
        if let Ok(h) = Header::decode(data) {
            panic!("a buffer shorter than a header decoded: {h:?}");
        }
        return;
    }
    if data.len() < 2 * HEADER_LEN {
        return;
    }
    let (a, rest) = data.split_at(HEADER_LEN);
    let (b, map) = rest.split_at(HEADER_LEN);
    let Ok(h) = pick_header(a, b) else {
        return;
    };
    let mut again = vec![0u8; HEADER_LEN];
    h.encode(&mut again);
    assert_eq!(Header::decode(&again).as_ref(), Ok(&h), "a decoded header re-encodes to itself");
    let slots: Vec<_> = map
        .chunks_exact(ENTRY_LEN)
        .enumerate()
        .map(|(i, e)| Entry::decode(e, i as u64, h.nonce))
        .collect();
    let _ = judge_map(&slots, h.sealed, (h.from, h.size), |i, _| i % 2 == 0);
});
