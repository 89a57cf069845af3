//! Arbitrary bytes as a stored chunk: the first 32 bytes are the name the
//! chunk is looked up by, the rest the blob. Besides "no panic and no
//! allocation past the chunk bound", a blob that decodes must hash to its
//! name: nothing else is ever handed out.

#![no_main]

use backup::chunk::{decode_blob, Digest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((name, blob)) = data.split_first_chunk::<32>() else { return };
    let name = Digest(*name);
    if let Ok(plain) = decode_blob(&name, blob) {
        assert_eq!(Digest::of(&plain), name);
    }
});
