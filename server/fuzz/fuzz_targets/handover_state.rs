//! Arbitrary bytes (and a descriptor count from the first byte) as the
//! live-restart hand-over state a new daemon process decodes. Besides "no
//! panic", a state that decodes must encode back to the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrorblk_server::handover::wire::State;

fuzz_target!(|data: &[u8]| {
    let Some((&fds, body)) = data.split_first() else {
        return;
    };
    if let Ok(s) = State::decode(body, fds as usize) {
        assert_eq!(s.encode(), body, "a decoded state re-encodes to its bytes");
    }
});
