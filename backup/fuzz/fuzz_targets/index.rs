//! Arbitrary bytes as a backup index, twice: as they are (almost always
//! refused by the trailing checksum) and re-signed, so the fuzzer reaches
//! the checks behind the checksum. Besides "no panic and no huge
//! allocation", an index that decodes must encode back to the same bytes:
//! the format has one encoding per index.

#![no_main]

use backup::BackupIndex;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = BackupIndex::decode(data) {
        assert_eq!(index.encode(), data);
    }
    if data.len() >= 32 {
        let mut signed = data.to_vec();
        let end = signed.len() - 32;
        let sum: [u8; 32] = Sha256::digest(&signed[..end]).into();
        signed[end..].copy_from_slice(&sum);
        if let Ok(index) = BackupIndex::decode(&signed) {
            assert_eq!(index.encode(), signed, "one encoding per index");
            assert_eq!(index.chunks.len() as u64, index.size.div_ceil(u64::from(index.chunk_size)));
        }
    }
});
