//! Property tests: codec round trips, split-independence of the handshake,
//! and robustness against arbitrary input.

use nbd::client;
use nbd::consts;
use nbd::handshake::{MAX_BUFFERED_INPUT, OUTPUT_HIGH_WATER};
use nbd::reply::{self, Extent};
use nbd::request::{self, Command, CommandFlags, Request, Verdict};
use nbd::{ErrorCode, ExportInfo, Handshake, Negotiated, Status};
use proptest::prelude::*;

const ALL_ERRORS: [ErrorCode; 8] = [
    ErrorCode::Perm,
    ErrorCode::Io,
    ErrorCode::NoMem,
    ErrorCode::Inval,
    ErrorCode::NoSpc,
    ErrorCode::Overflow,
    ErrorCode::NotSup,
    ErrorCode::Shutdown,
];

fn catalog() -> Vec<ExportInfo> {
    let mut disk = ExportInfo::new("disk", 1 << 30);
    disk.description = "desc".into();
    disk.can_flush = true;
    disk.can_fua = true;
    disk.can_df = true;
    disk.can_block_status = true;
    disk.min_block = 512;
    let other = ExportInfo::new("other", 4096);
    vec![disk, other]
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// Every known command with every combination of the defined flag bits, plus
/// a few undefined ones, survives encode → decode.
#[test]
fn every_command_and_flag_combination_round_trips() {
    let commands = [
        Command::Read,
        Command::Write,
        Command::Disc,
        Command::Flush,
        Command::Trim,
        Command::Cache,
        Command::WriteZeroes,
        Command::BlockStatus,
        Command::Unknown(8),
        Command::Unknown(0xffff),
    ];
    for command in commands {
        for flags in (0..=consts::KNOWN_CMD_FLAGS).chain([0x20, 0x8000, 0xffff]) {
            let req = Request {
                flags: CommandFlags(flags),
                command,
                cookie: 0x0123_4567_89ab_cdef,
                offset: 0xfedc_ba98_7654_3210,
                length: 0xdead_beef,
            };
            let decoded = request::decode_request(&client::encode_request(&req)).unwrap();
            assert_eq!(decoded, req);
            let long = Request {
                length: 0x1_dead_beef,
                ..req
            };
            let decoded = request::decode_extended_request(&long.encode_extended()).unwrap();
            assert_eq!(decoded, long);
        }
    }
}

fn arb_command() -> impl Strategy<Value = Command> {
    any::<u16>().prop_map(Command::from_code)
}

fn arb_export() -> impl Strategy<Value = ExportInfo> {
    (
        any::<u64>(),
        any::<[bool; 11]>(),
        0u32..18,
        prop_oneof![Just(0u32), 1u32..(1 << 20), Just(u32::MAX)],
    )
        .prop_map(|(size, b, min_shift, max_payload)| ExportInfo {
            name: "e".into(),
            description: String::new(),
            size: size >> (size % 64),
            read_only: b[0],
            can_flush: b[1],
            can_fua: b[2],
            can_trim: b[3],
            can_write_zeroes: b[4],
            can_fast_zero: b[5],
            can_cache: b[6],
            can_df: b[7],
            can_multi_conn: b[8],
            can_block_status: b[9],
            can_dirty_bitmap: b[9],
            // Include the invalid zero to prove it cannot divide by zero.
            min_block: if b[10] { 0 } else { 1 << min_shift.min(16) },
            preferred_block: 4096,
            max_payload,
        })
}

fn arb_negotiated() -> impl Strategy<Value = Negotiated> {
    (
        arb_export(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(export, structured, meta, no_zeroes, extended)| {
            let structured = structured || extended;
            let mut flags = export.transmission_flags();
            if !structured {
                flags &= !consts::FLAG_SEND_DF;
            }
            Negotiated {
                base_allocation: (structured && meta && export.can_block_status).then_some(1),
                dirty_bitmap: None,
                transmission_flags: flags,
                structured_replies: structured,
                extended_headers: extended,
                no_zeroes,
                export,
            }
        })
}

fn arb_request() -> impl Strategy<Value = Request> {
    (
        any::<u16>(),
        arb_command(),
        any::<u64>(),
        prop_oneof![any::<u64>(), (0u64..(1 << 31)).prop_map(|o| o & !511)],
        prop_oneof![
            any::<u32>().prop_map(u64::from),
            (0u64..(1 << 21)).prop_map(|l| l & !511),
            any::<u64>(),
            (0u64..(1 << 34)).prop_map(|l| l & !511),
        ],
    )
        .prop_map(|(flags, command, cookie, offset, length)| Request {
            flags: CommandFlags(flags),
            command,
            cookie,
            offset,
            length,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn request_round_trip(req in arb_request()) {
        let compact = Request { length: req.length & u64::from(u32::MAX), ..req };
        let bytes = client::encode_request(&compact);
        prop_assert_eq!(request::decode_request(&bytes), Ok(compact));
        prop_assert_eq!(request::decode_header(&bytes, false), Ok(compact));
        let bytes = req.encode_extended();
        prop_assert_eq!(request::decode_extended_request(&bytes), Ok(req));
        prop_assert_eq!(request::decode_header(&bytes, true), Ok(req));
        // A header of the other style's size is refused, not misread.
        prop_assert!(request::decode_header(&bytes, false).is_err());
    }

    #[test]
    fn decode_extended_request_never_panics(bytes in any::<[u8; 32]>()) {
        let r = request::decode_extended_request(&bytes);
        let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        prop_assert_eq!(r.is_ok(), magic == consts::EXTENDED_REQUEST_MAGIC);
    }

    #[test]
    fn decode_request_never_panics(bytes in any::<[u8; 28]>()) {
        let r = request::decode_request(&bytes);
        let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        prop_assert_eq!(r.is_ok(), magic == consts::REQUEST_MAGIC);
    }

    /// Whatever the request, `check_request` does not panic, and `Serve`
    /// only ever comes with a request the spec says is valid.
    #[test]
    fn check_request_serves_only_valid_requests(req in arb_request(), neg in arb_negotiated()) {
        let verdict = request::check_request(&req, &neg);
        let (min, _, max) = neg.export.block_sizes();
        let end = req.offset.checked_add(req.length);
        let ext = neg.extended_headers;
        let max = u64::from(max);
        if let Verdict::Close(_) = verdict {
            let oversized = matches!(req.command, Command::Read | Command::Write) && req.length > max;
            let payload_too_long = req.payload_len(ext) > max;
            prop_assert!(oversized || payload_too_long);
        }
        if verdict == Verdict::Serve {
            match req.command {
                Command::Disc => {}
                Command::Unknown(_) => prop_assert!(false, "unknown command served"),
                Command::Flush => prop_assert!(neg.transmission_flags & consts::FLAG_SEND_FLUSH != 0),
                cmd => {
                    prop_assert!(end.is_some_and(|e| e <= neg.export.size));
                    prop_assert_eq!(req.offset % u64::from(min), 0);
                    prop_assert_eq!(req.length % u64::from(min), 0);
                    prop_assert_eq!(req.flags.unknown_bits(), 0);
                    if matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes) {
                        prop_assert!(!neg.export.read_only);
                    }
                    if matches!(cmd, Command::Read | Command::Write) {
                        prop_assert!(req.length <= max);
                    }
                    if cmd == Command::BlockStatus {
                        prop_assert!(neg.base_allocation.is_some());
                    }
                    if req.flags.contains(CommandFlags::PAYLOAD_LEN) {
                        prop_assert_eq!(cmd, Command::Write);
                        prop_assert!(ext);
                    }
                    if req.flags.contains(CommandFlags::DF) {
                        prop_assert_eq!(cmd, Command::Read);
                        prop_assert!(neg.structured_replies);
                    }
                }
            }
            if req.flags.contains(CommandFlags::FUA) && req.command != Command::Disc {
                prop_assert!(neg.transmission_flags & consts::FLAG_SEND_FUA != 0);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Replies: server encode → client decode
// ---------------------------------------------------------------------------

fn arb_error() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ALL_ERRORS.to_vec())
}

fn header<const N: usize>(b: &[u8]) -> [u8; N] {
    b[..N].try_into().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn simple_reply_round_trip(cookie in any::<u64>(), error in proptest::option::of(arb_error())) {
        let b = reply::simple_reply(cookie, error);
        prop_assert_eq!(client::reply_kind(header(&b)), Ok(client::ReplyKind::Simple));
        let h = client::decode_simple_reply(&b).unwrap();
        prop_assert_eq!(h.cookie, cookie);
        prop_assert_eq!(ErrorCode::from_code(h.error), error);
        prop_assert_eq!(h.error == 0, error.is_none());
    }

    #[test]
    fn offset_data_round_trip(
        cookie in any::<u64>(),
        offset in any::<u64>(),
        data in proptest::collection::vec(any::<u8>(), 1..2048),
        done in any::<bool>(),
    ) {
        let mut b = reply::offset_data_header(cookie, offset, data.len() as u32, done).to_vec();
        b.extend_from_slice(&data);
        prop_assert_eq!(client::reply_kind(header(&b)), Ok(client::ReplyKind::Structured));
        let h = client::decode_chunk_header(&header(&b)).unwrap();
        prop_assert_eq!(h.cookie, cookie);
        prop_assert_eq!(h.is_done(), done);
        prop_assert_eq!(h.chunk_type, consts::REPLY_TYPE_OFFSET_DATA);
        prop_assert_eq!(h.length as usize, b.len() - reply::CHUNK_HEADER_LEN);
        let (o, d) = client::decode_offset_data(&b[reply::CHUNK_HEADER_LEN..]).unwrap();
        prop_assert_eq!(o, offset);
        prop_assert_eq!(d, &data[..]);
    }

    #[test]
    fn offset_hole_round_trip(cookie in any::<u64>(), offset in any::<u64>(), len in 1u32.., done in any::<bool>()) {
        let b = reply::offset_hole_chunk(cookie, offset, len, done);
        let h = client::decode_chunk_header(&header(&b)).unwrap();
        prop_assert_eq!((h.cookie, h.is_done(), h.chunk_type, h.length), (cookie, done, consts::REPLY_TYPE_OFFSET_HOLE, 12));
        prop_assert_eq!(client::decode_offset_hole(&b[20..]), Ok((offset, len)));
    }

    #[test]
    fn none_chunk_round_trip(cookie in any::<u64>()) {
        let b = reply::none_chunk(cookie);
        let h = client::decode_chunk_header(&b).unwrap();
        prop_assert_eq!((h.cookie, h.is_done(), h.chunk_type, h.length), (cookie, true, consts::REPLY_TYPE_NONE, 0));
    }

    #[test]
    fn error_chunks_round_trip(
        cookie in any::<u64>(),
        error in arb_error(),
        message in ".{0,5000}",
        offset in proptest::option::of(any::<u64>()),
        done in any::<bool>(),
    ) {
        let b = match offset {
            Some(o) => reply::error_offset_chunk(cookie, error, &message, o, done),
            None => reply::error_chunk(cookie, error, &message, done),
        };
        let h = client::decode_chunk_header(&header(&b)).unwrap();
        prop_assert!(h.is_error());
        prop_assert_eq!((h.cookie, h.is_done()), (cookie, done));
        prop_assert_eq!(h.length as usize, b.len() - 20);
        let e = client::decode_error_chunk(h.chunk_type, &b[20..]).unwrap();
        prop_assert_eq!(e.code, error.code());
        prop_assert_eq!(e.offset, offset);
        prop_assert!(e.message.len() <= reply::MAX_ERROR_MESSAGE_LEN);
        prop_assert!(message.starts_with(&e.message));
        if message.len() <= reply::MAX_ERROR_MESSAGE_LEN {
            prop_assert_eq!(e.message, message);
        }
    }

    #[test]
    fn block_status_round_trip(
        cookie in any::<u64>(),
        id in any::<u32>(),
        extents in proptest::collection::vec((1u32.., any::<u32>()), 1..64),
        done in any::<bool>(),
    ) {
        let extents: Vec<Extent> = extents.into_iter().map(|(length, flags)| Extent { length, flags }).collect();
        let b = reply::block_status_chunk(cookie, id, &extents, done);
        let h = client::decode_chunk_header(&header(&b)).unwrap();
        prop_assert_eq!((h.cookie, h.is_done(), h.chunk_type), (cookie, done, consts::REPLY_TYPE_BLOCK_STATUS));
        prop_assert_eq!(h.length as usize, b.len() - 20);
        prop_assert_eq!(client::decode_block_status(&b[20..]), Ok((id, extents)));
    }

    /// Client-side payload decoders never panic on garbage.
    #[test]
    fn client_decoders_never_panic(ty in any::<u16>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = client::decode_error_chunk(ty, &payload);
        let _ = client::decode_block_status(&payload);
        let _ = client::decode_offset_data(&payload);
        let _ = client::decode_offset_hole(&payload);
        let _ = client::decode_info_reply(&payload);
    }
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    client::encode_info_request(name, infos)
}

/// One option a well-behaved client might send mid-negotiation.
fn arb_middle_option() -> impl Strategy<Value = Vec<u8>> {
    let names = prop_oneof![Just(""), Just("disk"), Just("other"), Just("missing")];
    prop_oneof![
        Just(client::encode_option(consts::OPT_LIST, &[])),
        Just(client::encode_option(consts::OPT_STRUCTURED_REPLY, &[])),
        names
            .clone()
            .prop_map(|n| client::encode_option(consts::OPT_INFO, &info_data(n, &[3, 1]))),
        (
            names.clone(),
            prop_oneof![
                Just(vec![]),
                Just(vec!["base:allocation"]),
                Just(vec!["base:", "x-a:b"])
            ]
        )
            .prop_map(|(n, q)| client::encode_option(
                consts::OPT_SET_META_CONTEXT,
                &client::encode_meta_context_request(n, &q)
            )),
        names.clone().prop_map(|n| client::encode_option(
            consts::OPT_LIST_META_CONTEXT,
            &client::encode_meta_context_request(n, &[])
        )),
        (100u32..200, proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(o, d)| client::encode_option(o, &d)),
        // Failing GO: the session goes on.
        Just(client::encode_option(
            consts::OPT_GO,
            &info_data("missing", &[])
        )),
    ]
}

/// How a conversation ends.
fn arb_final_option() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(client::encode_option(
            consts::OPT_GO,
            &info_data("disk", &[3])
        )),
        Just(client::encode_option(consts::OPT_GO, &info_data("", &[]))),
        Just(client::encode_option(consts::OPT_EXPORT_NAME, b"other")),
        Just(client::encode_option(consts::OPT_EXPORT_NAME, b"missing")),
        Just(client::encode_option(consts::OPT_ABORT, &[])),
    ]
}

fn arb_conversation() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(1u32), Just(3u32), Just(0u32)],
        proptest::collection::vec(arb_middle_option(), 0..8),
        arb_final_option(),
    )
        .prop_map(|(flags, middle, last)| {
            let mut v = flags.to_be_bytes().to_vec();
            for m in middle {
                v.extend(m);
            }
            v.extend(last);
            v
        })
}

#[derive(Debug, PartialEq)]
struct Outcome {
    consumed: usize,
    output: Vec<u8>,
    status: Status,
    negotiated: Option<Negotiated>,
    close_reason: Option<String>,
}

/// Feeds `input` in the given chunk sizes (cycled), collecting all output.
/// Unconsumed bytes are offered again with the next chunk, like a real
/// server's input buffer.
fn drive(input: &[u8], chunks: &[usize]) -> Outcome {
    let catalog = catalog();
    let mut hs = Handshake::new();
    let mut output = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut fed = 0usize;
    let mut consumed = 0usize;
    let mut i = 0usize;
    loop {
        output.extend_from_slice(hs.output());
        hs.consume_output(usize::MAX);
        assert!(hs.buffered_input() <= MAX_BUFFERED_INPUT);
        if hs.status() != Status::InProgress {
            break;
        }
        if fed < input.len() {
            let step = chunks
                .get(i % chunks.len().max(1))
                .copied()
                .unwrap_or(1)
                .max(1);
            i += 1;
            let end = (fed + step).min(input.len());
            pending.extend_from_slice(&input[fed..end]);
            fed = end;
        } else if pending.is_empty() {
            break;
        }
        match hs.receive(&pending, &catalog) {
            Ok(n) => {
                pending.drain(..n);
                consumed += n;
                // Everything offered, nothing taken, nothing to flush: the
                // input ends mid-message.
                if n == 0 && fed >= input.len() && hs.output().is_empty() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    output.extend_from_slice(hs.output());
    Outcome {
        consumed,
        output,
        status: hs.status(),
        close_reason: hs.close_reason().map(str::to_string),
        negotiated: hs.into_negotiated(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// However a valid conversation is split into reads, the handshake answers
    /// the same bytes, reaches the same state, and consumes exactly the
    /// conversation (not the transmission bytes after it).
    #[test]
    fn handshake_is_split_independent(
        conversation in arb_conversation(),
        trailer in proptest::collection::vec(any::<u8>(), 0..64),
        chunks in proptest::collection::vec(1usize..64, 1..16),
    ) {
        let mut input = conversation.clone();
        input.extend_from_slice(&trailer);
        let whole = drive(&input, &[input.len().max(1)]);
        let split = drive(&input, &chunks);
        prop_assert_eq!(&whole, &split);
        prop_assert_ne!(whole.status, Status::InProgress);
        if whole.status == Status::Ready {
            prop_assert_eq!(whole.consumed, conversation.len());
            prop_assert!(whole.negotiated.is_some());
        } else {
            prop_assert!(whole.close_reason.is_some());
        }
    }
}

/// Garbage that gets past the greeting: valid client flags and option magic
/// with random option codes, random lengths (sometimes huge), random data.
fn arb_framed_garbage() -> impl Strategy<Value = Vec<u8>> {
    let frame = (
        prop_oneof![0u32..16, any::<u32>()],
        prop_oneof![
            0u32..64,
            Just(nbd::handshake::MAX_OPTION_DATA + 1),
            any::<u32>()
        ],
        proptest::collection::vec(any::<u8>(), 0..128),
        any::<bool>(),
    )
        .prop_map(|(option, len, data, honest)| {
            let mut v = consts::IHAVEOPT.to_be_bytes().to_vec();
            v.extend_from_slice(&option.to_be_bytes());
            let len = if honest { data.len() as u32 } else { len };
            v.extend_from_slice(&len.to_be_bytes());
            v.extend(data);
            v
        });
    (any::<u32>(), proptest::collection::vec(frame, 0..12)).prop_map(|(flags, frames)| {
        let mut v = (flags & 3).to_be_bytes().to_vec();
        for f in frames {
            v.extend(f);
        }
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Random bytes in random chunks: no panic, input buffer within bound,
    /// output bounded by the high-water mark plus one option's replies.
    #[test]
    fn handshake_survives_garbage(
        input in prop_oneof![proptest::collection::vec(any::<u8>(), 0..512), arb_framed_garbage()],
        chunks in proptest::collection::vec(1usize..300, 1..8),
    ) {
        let catalog = catalog();
        let mut hs = Handshake::new();
        let mut pos = 0usize;
        let mut i = 0usize;
        while pos < input.len() && hs.status() == Status::InProgress {
            let step = chunks[i % chunks.len()];
            i += 1;
            let end = (pos + step).min(input.len());
            match hs.receive(&input[pos..end], &catalog) {
                Ok(n) => {
                    prop_assert!(n <= end - pos);
                    pos += n;
                }
                Err(_) => {
                    prop_assert_eq!(hs.status(), Status::Closed);
                    break;
                }
            }
            prop_assert!(hs.buffered_input() <= MAX_BUFFERED_INPUT);
            prop_assert!(hs.output().len() <= OUTPUT_HIGH_WATER + 64 * 1024);
            hs.consume_output(hs.output().len() / 2);
        }
    }
}

/// Huge option lengths are skipped without ever being buffered.
#[test]
fn oversized_option_is_never_buffered() {
    let catalog = catalog();
    let mut hs = Handshake::new();
    let mut input = 3u32.to_be_bytes().to_vec();
    input.extend_from_slice(&consts::IHAVEOPT.to_be_bytes());
    input.extend_from_slice(&consts::OPT_INFO.to_be_bytes());
    input.extend_from_slice(&(16u32 << 20).to_be_bytes());
    assert_eq!(hs.receive(&input, &catalog), Ok(input.len()));
    let block = vec![0u8; 1 << 16];
    for _ in 0..256 {
        assert_eq!(hs.receive(&block, &catalog), Ok(block.len()));
        assert_eq!(hs.buffered_input(), 0);
    }
    let out = hs.output();
    assert_eq!(
        out.len(),
        18 + 20 + u32::from_be_bytes(out[34..38].try_into().unwrap()) as usize
    );
    assert_eq!(&out[30..34], &consts::REP_ERR_TOO_BIG.to_be_bytes());
    assert_eq!(hs.status(), Status::InProgress);
}
