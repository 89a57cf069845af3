//! `decode_request` + `check_request` on arbitrary headers against a few
//! negotiated sessions (structured or not, read-only, large minimum block,
//! tiny export, zero block-size fields).
//!
//! Beyond "no panic", a `Serve` verdict must only ever be given to a request
//! that is in bounds, aligned and within the payload limit.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::consts;
use nbd::request::{check_request, decode_request, Command, CommandFlags, Verdict};
use nbd::{ExportInfo, Negotiated};

fn negotiated(export: ExportInfo, structured: bool, meta: bool) -> Negotiated {
    let mut flags = export.transmission_flags();
    if !structured {
        flags &= !consts::FLAG_SEND_DF;
    }
    Negotiated {
        base_allocation: (structured && meta && export.can_block_status).then_some(1),
        dirty_bitmap: None,
        transmission_flags: flags,
        structured_replies: structured,
        extended_headers: false,
        no_zeroes: true,
        export,
    }
}

fn variants() -> Vec<Negotiated> {
    let mut full = ExportInfo::new("full", 1 << 30);
    full.can_flush = true;
    full.can_fua = true;
    full.can_trim = true;
    full.can_write_zeroes = true;
    full.can_fast_zero = true;
    full.can_cache = true;
    full.can_df = true;
    full.can_multi_conn = true;
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
        negotiated(full.clone(), true, true),
        negotiated(full, false, false),
        negotiated(ro, true, false),
        negotiated(tiny, false, false),
        negotiated(zeroed, true, true),
    ]
}

fuzz_target!(|data: &[u8]| {
    let Some(header) = data.get(..28) else {
        return;
    };
    let mut header: [u8; 28] = header.try_into().unwrap();
    let first = decode_request(&header);
    assert_eq!(
        first.is_ok(),
        header[..4] == consts::REQUEST_MAGIC.to_be_bytes()
    );
    // With the magic forced right, decoding must succeed so the checks run.
    header[..4].copy_from_slice(&consts::REQUEST_MAGIC.to_be_bytes());
    let req = decode_request(&header).expect("valid magic decodes");
    for neg in variants() {
        let verdict = check_request(&req, &neg);
        let (min, _, max) = neg.export.block_sizes();
        match verdict {
            Verdict::Close(_) => {
                assert!(matches!(req.command, Command::Read | Command::Write));
                assert!(req.length > u64::from(max));
            }
            Verdict::Reject(_) => {}
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
                    assert_eq!(req.flags.unknown_bits(), 0);
                    assert!(!req.flags.contains(CommandFlags::PAYLOAD_LEN));
                    if matches!(cmd, Command::Read | Command::Write) {
                        assert!(req.length <= u64::from(max));
                    }
                    if matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes) {
                        assert!(!neg.export.read_only);
                    }
                    if req.flags.contains(CommandFlags::DF) {
                        assert!(neg.structured_replies);
                    }
                }
            },
        }
    }
});
