//! `decode_extended_request` + `check_request` on arbitrary 32-byte headers
//! against sessions that negotiated extended headers (a full export, a
//! read-only one, a tiny one, one with zeroed block-size fields).
//!
//! Beyond "no panic": a `Serve` verdict only for a request that is in
//! bounds (64-bit lengths, overflow-safe), aligned, and whose payload (if
//! any) is a WRITE's within the payload limit; a `Close` only for a payload
//! or READ/WRITE past the limit; and what
//! a `Reject` leaves to drain never exceeds the limit.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::consts;
use nbd::request::{check_request, decode_extended_request, Command, Verdict};
use nbd::{ExportInfo, Negotiated};

fn negotiated(export: ExportInfo, meta: bool) -> Negotiated {
    Negotiated {
        base_allocation: (meta && export.can_block_status).then_some(1),
        dirty_bitmap: None,
        transmission_flags: export.transmission_flags(),
        structured_replies: true,
        extended_headers: true,
        no_zeroes: true,
        export,
    }
}

fn variants() -> Vec<Negotiated> {
    let mut full = ExportInfo::new("full", 1 << 40);
    full.can_flush = true;
    full.can_fua = true;
    full.can_trim = true;
    full.can_write_zeroes = true;
    full.can_fast_zero = true;
    full.can_cache = true;
    full.can_df = true;
    full.can_block_status = true;
    full.min_block = 512;
    full.max_payload = 1 << 20;

    let mut ro = full.clone();
    ro.read_only = true;
    ro.min_block = 4096;

    let mut tiny = ExportInfo::new("tiny", 1000);
    tiny.can_trim = true;

    let mut zeroed = ExportInfo::new("zeroed", u64::MAX);
    zeroed.min_block = 0;
    zeroed.preferred_block = 0;
    zeroed.max_payload = 0;
    zeroed.can_write_zeroes = true;

    vec![
        negotiated(full, true),
        negotiated(ro, false),
        negotiated(tiny, false),
        negotiated(zeroed, true),
    ]
}

fuzz_target!(|data: &[u8]| {
    let Some(header) = data.get(..32) else {
        return;
    };
    let mut header: [u8; 32] = header.try_into().unwrap();
    let first = decode_extended_request(&header);
    assert_eq!(
        first.is_ok(),
        header[..4] == consts::EXTENDED_REQUEST_MAGIC.to_be_bytes()
    );
    header[..4].copy_from_slice(&consts::EXTENDED_REQUEST_MAGIC.to_be_bytes());
    let req = decode_extended_request(&header).expect("valid magic decodes");
    assert_eq!(req.encode_extended(), header, "decode then encode is the identity");
    for neg in variants() {
        let (min, _, max) = neg.export.block_sizes();
        let max = u64::from(max);
        let payload = req.payload_len(true);
        match check_request(&req, &neg) {
            Verdict::Close(_) => assert!(
                payload > max
                    || (matches!(req.command, Command::Read | Command::Write) && req.length > max)
            ),
            Verdict::Reject(_) => assert!(payload <= max),
            Verdict::Serve => match req.command {
                Command::Disc => {}
                Command::Unknown(_) => panic!("unknown command served"),
                Command::Flush => {
                    assert!(neg.transmission_flags & consts::FLAG_SEND_FLUSH != 0)
                }
                cmd => {
                    let end = req.offset.checked_add(req.length);
                    assert!(end.is_some_and(|e| e <= neg.export.size));
                    assert_eq!(req.offset % u64::from(min), 0);
                    assert_eq!(req.length % u64::from(min), 0);
                    if matches!(cmd, Command::Read | Command::Write) {
                        assert!(req.length <= max);
                    }
                    if payload > 0 {
                        assert_eq!(cmd, Command::Write);
                        assert_eq!(payload, req.length);
                    }
                    if matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes) {
                        assert!(!neg.export.read_only);
                    }
                }
            },
        }
    }
});
