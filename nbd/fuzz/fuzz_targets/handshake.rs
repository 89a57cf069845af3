//! Arbitrary bytes, fed to the server handshake in arbitrary chunks.
//!
//! The first input byte seeds the chunk sizes and picks the TLS policy; the
//! rest is the client's byte stream (after `STARTTLS` the same stream goes
//! on as if decrypted). Besides "no panic", it checks the crate's promises: `receive`
//! never claims more than it was given, input buffering stays within
//! `MAX_BUFFERED_INPUT`, queued output stays near `OUTPUT_HIGH_WATER`, and a
//! protocol error always leaves the handshake `Closed`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::handshake::{MAX_BUFFERED_INPUT, OUTPUT_HIGH_WATER};
use nbd::{ExportInfo, Handshake, Status, TlsPolicy};

fn catalog() -> Vec<ExportInfo> {
    let mut disk = ExportInfo::new("disk", 1 << 30);
    disk.description = "fuzz disk".into();
    disk.can_flush = true;
    disk.can_fua = true;
    disk.can_df = true;
    disk.can_block_status = true;
    // Dirty-bitmap context names go through the handshake's parser too.
    disk.can_dirty_bitmap = true;
    disk.min_block = 512;
    let mut ro = ExportInfo::new("ro", 4096);
    ro.read_only = true;
    vec![disk, ro]
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, mut stream)) = data.split_first() else {
        return;
    };
    let catalog = catalog();
    let policy = [TlsPolicy::Off, TlsPolicy::Optional, TlsPolicy::Required][usize::from(seed % 3)];
    let mut hs = Handshake::with_tls(policy);
    let mut rng = u32::from(seed) | 1;
    loop {
        if hs.status() == Status::StartTls {
            assert_ne!(policy, TlsPolicy::Off);
            hs.tls_established();
        }
        if stream.is_empty() || hs.status() != Status::InProgress {
            break;
        }
        // xorshift: cheap, deterministic chunk sizes from the seed.
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        let chunk = (rng % 97) as usize + 1;
        let offered = chunk.min(stream.len());
        match hs.receive(&stream[..offered], &catalog) {
            Ok(n) => {
                assert!(n <= offered, "consumed more than offered");
                stream = &stream[n..];
                if n == 0 && hs.output().is_empty() && hs.status() == Status::InProgress {
                    panic!("no progress with input available and no output pending");
                }
            }
            Err(_) => {
                assert_eq!(hs.status(), Status::Closed);
                assert!(hs.close_reason().is_some());
                break;
            }
        }
        assert!(hs.buffered_input() <= MAX_BUFFERED_INPUT);
        assert!(hs.output().len() <= OUTPUT_HIGH_WATER + 64 * 1024);
        if hs.status() == Status::Ready {
            assert!(hs.negotiated().is_some());
            // Required: nothing is served before TLS.
            assert!(policy != TlsPolicy::Required || hs.tls_active());
        }
        // Write out a varying part of the output, like a slow socket.
        let written = hs.output().len() / 2 + 1;
        hs.consume_output(written);
    }
});
