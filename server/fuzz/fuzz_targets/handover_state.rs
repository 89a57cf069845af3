//! Arbitrary bytes (and a descriptor count from the first byte) as the
//! live-restart hand-over state a new daemon process decodes. Besides "no
//! panic", a state that decodes must encode back to the same bytes when it
//! came in the current version (an older version's message re-encodes in
//! the current one), and always to bytes that decode to the same state.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrorblk_server::handover::wire::{State, VERSION};

fuzz_target!(|data: &[u8]| {
    let Some((&fds, body)) = data.split_first() else {
        return;
    };
    if let Ok(s) = State::decode(body, fds as usize) {
        let again = s.encode();
        if u16::from_le_bytes([body[4], body[5]]) == VERSION {
            assert_eq!(again, body, "a decoded state re-encodes to its bytes");
        }
        assert_eq!(
            State::decode(&again, fds as usize).as_ref(),
            Ok(&s),
            "a re-encoded state decodes to itself"
        );
    }
});
