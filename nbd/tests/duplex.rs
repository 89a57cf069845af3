//! Drives the server-side `Handshake` (plus a toy transmission loop built from
//! `decode_request`, `check_request` and the `reply` encoders) against the
//! blocking `client` over a real socket pair, one side per thread.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;

use nbd::client::{ClientHandshake, Response};
use nbd::consts;
use nbd::reply::{self, Extent, ExtentExt};
use nbd::request::{self, Command, CommandFlags, Request, Verdict, REQUEST_HEADER_LEN};
use nbd::{ClientError, ErrorCode, ExportInfo, Handshake, Negotiated, ProtocolError, Status};

const DISK_SIZE: u64 = 1 << 20;

fn catalog() -> Vec<ExportInfo> {
    let mut disk = ExportInfo::new("disk", DISK_SIZE);
    disk.description = "a test disk".into();
    disk.can_flush = true;
    disk.can_fua = true;
    disk.can_trim = true;
    disk.can_write_zeroes = true;
    disk.can_fast_zero = true;
    disk.can_df = true;
    disk.can_block_status = true;
    disk.min_block = 512;
    disk.preferred_block = 4096;
    disk.max_payload = 256 * 1024;
    let mut ro = ExportInfo::new("ro", 64 * 1024);
    ro.read_only = true;
    ro.description = "read-only".into();
    vec![disk, ro]
}

/// What the server side saw.
#[derive(Debug)]
struct ServerEnd {
    status: Status,
    error: Option<ProtocolError>,
    close_reason: Option<String>,
    negotiated: Option<Negotiated>,
    /// Contents of the export after the transmission phase.
    disk: Vec<u8>,
}

/// Runs the handshake to completion, then (if Ready) serves requests from an
/// in-memory disk until DISC or EOF.
fn server(mut sock: UnixStream) -> ServerEnd {
    let catalog = catalog();
    let mut hs = Handshake::new();
    let mut inbuf: Vec<u8> = Vec::new();
    let mut error = None;
    loop {
        let out = hs.output().to_vec();
        if sock.write_all(&out).is_err() {
            break;
        }
        hs.consume_output(out.len());
        if hs.status() != Status::InProgress {
            break;
        }
        if !inbuf.is_empty() {
            match hs.receive(&inbuf, &catalog) {
                Ok(n) => {
                    inbuf.drain(..n);
                    if n > 0 {
                        continue;
                    }
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let mut buf = [0u8; 7]; // small reads: exercise partial messages
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => inbuf.extend_from_slice(&buf[..n]),
        }
    }
    let status = hs.status();
    let close_reason = hs.close_reason().map(str::to_string);
    let negotiated = hs.into_negotiated();
    let mut disk = vec![0u8; DISK_SIZE as usize];
    if let (Status::Ready, Some(neg)) = (status, &negotiated) {
        // Bytes the handshake did not consume start the transmission phase.
        let mut stream = io::Cursor::new(inbuf).chain(sock.try_clone().unwrap());
        let _ = transmission(&mut stream, &mut sock, neg, &mut disk);
    }
    ServerEnd {
        status,
        error,
        close_reason,
        negotiated,
        disk,
    }
}

fn transmission(
    input: &mut impl Read,
    out: &mut impl Write,
    neg: &Negotiated,
    disk: &mut [u8],
) -> io::Result<()> {
    let disk = &mut disk[..neg.export.size as usize];
    loop {
        let mut header = [0u8; REQUEST_HEADER_LEN];
        input.read_exact(&mut header)?;
        let req = match request::decode_request(&header) {
            Ok(r) => r,
            Err(_) => return Ok(()),
        };
        match request::check_request(&req, neg) {
            Verdict::Close(_) => return Ok(()),
            Verdict::Reject(e) => {
                // A rejected write still has its payload on the wire.
                io::copy(
                    &mut input.by_ref().take(req.payload_len(false)),
                    &mut io::sink(),
                )?;
                send_error(out, neg, &req, e)?;
            }
            Verdict::Serve => {
                let start = req.offset as usize;
                let end = start + req.length as usize;
                match req.command {
                    Command::Disc => return Ok(()),
                    Command::Read => send_read(out, neg, &req, &disk[start..end])?,
                    Command::Write => {
                        input.read_exact(&mut disk[start..end])?;
                        // Simple replies are allowed for data-less answers
                        // even with structured replies on; mix them in.
                        out.write_all(&reply::simple_reply(req.cookie, None))?;
                    }
                    Command::Trim | Command::WriteZeroes => {
                        disk[start..end].fill(0);
                        send_ok(out, neg, &req)?;
                    }
                    Command::BlockStatus => {
                        let extents = extents(&disk[start..end], &req);
                        let id = neg.base_allocation.unwrap();
                        out.write_all(&reply::block_status_chunk(req.cookie, id, &extents, true))?;
                    }
                    _ => send_ok(out, neg, &req)?,
                }
            }
        }
    }
}

fn send_ok(out: &mut impl Write, neg: &Negotiated, req: &Request) -> io::Result<()> {
    if neg.structured_replies {
        out.write_all(&reply::none_chunk(req.cookie))
    } else {
        out.write_all(&reply::simple_reply(req.cookie, None))
    }
}

fn send_error(
    out: &mut impl Write,
    neg: &Negotiated,
    req: &Request,
    e: ErrorCode,
) -> io::Result<()> {
    if neg.structured_replies {
        out.write_all(&reply::error_chunk(req.cookie, e, "rejected", true))
    } else {
        out.write_all(&reply::simple_reply(req.cookie, Some(e)))
    }
}

/// Structured reads describe 4 KiB zero blocks as holes, everything else as
/// data, then end with NONE; simple reads send the data after the header.
fn send_read(out: &mut impl Write, neg: &Negotiated, req: &Request, data: &[u8]) -> io::Result<()> {
    if !neg.structured_replies {
        out.write_all(&reply::simple_reply(req.cookie, None))?;
        return out.write_all(data);
    }
    let mut pos = 0usize;
    for piece in data.chunks(4096) {
        let offset = req.offset + pos as u64;
        if piece.iter().all(|b| *b == 0) {
            out.write_all(&reply::offset_hole_chunk(
                req.cookie,
                offset,
                piece.len() as u32,
                false,
            ))?;
        } else {
            out.write_all(&reply::offset_data_header(
                req.cookie,
                offset,
                piece.len() as u32,
                false,
            ))?;
            out.write_all(piece)?;
        }
        pos += piece.len();
    }
    out.write_all(&reply::none_chunk(req.cookie))
}

fn extents(data: &[u8], req: &Request) -> Vec<Extent> {
    let mut v: Vec<Extent> = Vec::new();
    for piece in data.chunks(4096) {
        let flags = if piece.iter().all(|b| *b == 0) {
            consts::STATE_HOLE | consts::STATE_ZERO
        } else {
            0
        };
        match v.last_mut() {
            Some(last) if last.flags == flags => last.length += piece.len() as u32,
            _ => v.push(Extent {
                length: piece.len() as u32,
                flags,
            }),
        }
        if req.flags.contains(CommandFlags::REQ_ONE) {
            v.truncate(1);
            break;
        }
    }
    v
}

/// Runs `client` against a fresh server thread and returns both results.
fn run<T>(client: impl FnOnce(UnixStream) -> T) -> (T, ServerEnd) {
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || server(b));
    let result = client(a);
    (result, server.join().unwrap())
}

#[test]
fn go_simple_replies() {
    let (res, end) = run(|s| -> Result<(), ClientError> {
        let mut c = nbd::Client::connect(s, "disk", false)?;
        assert_eq!(c.size(), DISK_SIZE);
        assert!(!c.structured_replies());
        assert_eq!(c.transmission_flags() & consts::FLAG_SEND_DF, 0);
        assert_eq!(c.info().min_block, 512);
        assert_eq!(c.info().max_payload, 256 * 1024);
        assert_eq!(c.info().description, "a test disk");

        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        c.write(4096, &data, true)?;
        assert_eq!(c.read(4096, 8192)?, data);
        c.flush()?;
        c.trim(4096, 4096)?;
        assert_eq!(c.read(4096, 4096)?, vec![0; 4096]);
        c.write_zeroes(8192, 512, CommandFlags::NO_HOLE)?;
        // Errors come back as server error values.
        assert_eq!(c.read(DISK_SIZE, 512).unwrap_err().server_code(), Some(22));
        assert_eq!(
            c.write(DISK_SIZE, &[1; 512], false)
                .unwrap_err()
                .server_code(),
            Some(28)
        );
        assert_eq!(c.read(100, 512).unwrap_err().server_code(), Some(22));
        assert_eq!(c.block_status(0, 4096).unwrap_err().server_code(), Some(22));
        // A rejected write's payload is drained, so the stream stays in sync.
        assert_eq!(
            c.write(3, &[7; 512], false).unwrap_err().server_code(),
            Some(22)
        );
        assert_eq!(c.read(8192 + 512, 512)?, data[4608..5120].to_vec());
        c.disconnect()?;
        Ok(())
    });
    res.unwrap();
    assert_eq!(end.status, Status::Ready);
    let neg = end.negotiated.unwrap();
    assert!(!neg.structured_replies);
    assert!(neg.no_zeroes);
    assert_eq!(neg.base_allocation, None);
    assert_eq!(end.disk[8192 + 512], (4608 % 251) as u8);
}

#[test]
fn go_structured_replies_and_pipelining() {
    let (res, end) = run(|s| -> Result<(), ClientError> {
        let mut c = nbd::Client::connect(s, "disk", true)?;
        assert!(c.structured_replies());
        assert_eq!(
            c.base_allocation(),
            Some(nbd::handshake::BASE_ALLOCATION_ID)
        );
        assert!(c.info().can_block_status);
        assert_ne!(c.transmission_flags() & consts::FLAG_SEND_DF, 0);

        // Pipeline: write, read back (mixed hole/data), block status, bad read.
        let data = vec![0xABu8; 4096];
        let cookies: Vec<u64> = (0..4).map(|_| c.next_cookie()).collect();
        let reqs = [
            (Command::Write, CommandFlags::FUA, 8192u64, 4096u64),
            (Command::Read, CommandFlags::DF, 4096, 12288),
            (Command::BlockStatus, CommandFlags::empty(), 0, 65536),
            (Command::Read, CommandFlags(0x40), 0, 512),
        ];
        for (cookie, (command, flags, offset, length)) in cookies.iter().zip(reqs) {
            let req = Request {
                flags,
                command,
                cookie: *cookie,
                offset,
                length,
            };
            let payload = (command == Command::Write).then_some(&data[..]);
            c.submit(&req, payload)?;
        }
        assert_eq!(c.in_flight(), 4);
        let mut responses: Vec<Response> = (0..4).map(|_| c.receive()).collect::<Result<_, _>>()?;
        responses.sort_by_key(|r| r.cookie);
        assert_eq!(responses[0].error, None);
        let mut expect = vec![0u8; 12288];
        expect[4096..8192].fill(0xAB);
        assert_eq!(responses[1].data, expect);
        assert_eq!(
            responses[2].extents,
            vec![
                ExtentExt {
                    length: 8192,
                    flags: u64::from(consts::STATE_HOLE | consts::STATE_ZERO)
                },
                ExtentExt {
                    length: 4096,
                    flags: 0
                },
                ExtentExt {
                    length: 65536 - 12288,
                    flags: u64::from(consts::STATE_HOLE | consts::STATE_ZERO)
                },
            ]
        );
        assert_eq!(responses[3].error, Some(22));
        assert!(responses[3].data.is_empty());
        assert_eq!(c.in_flight(), 0);

        // REQ_ONE gives one extent.
        let r = c.execute(Command::BlockStatus, CommandFlags::REQ_ONE, 0, 65536, None)?;
        assert_eq!(r.extents.len(), 1);
        // FAST_ZERO is advertised here, so it is served.
        c.write_zeroes(8192, 4096, CommandFlags::FAST_ZERO)?;
        assert_eq!(c.block_status(0, 16384)?.len(), 1);
        // Oversized read: the server drops the connection.
        let err = c.read(0, 512 * 1024).unwrap_err();
        assert!(matches!(err, ClientError::Io(_)), "{err:?}");
        Ok(())
    });
    res.unwrap();
    let neg = end.negotiated.unwrap();
    assert!(neg.structured_replies);
    assert_eq!(
        neg.base_allocation,
        Some(nbd::handshake::BASE_ALLOCATION_ID)
    );
}

#[test]
fn read_only_export() {
    let (res, _end) = run(|s| -> Result<(), ClientError> {
        let mut c = nbd::Client::connect(s, "ro", true)?;
        assert!(c.info().read_only);
        assert!(!c.info().can_block_status);
        assert_eq!(
            c.write(0, &[1; 512], false).unwrap_err().server_code(),
            Some(1)
        );
        assert_eq!(c.read(0, 512)?, vec![0; 512]);
        // Not advertised for this export.
        assert_eq!(c.flush().unwrap_err().server_code(), Some(22));
        c.disconnect()?;
        Ok(())
    });
    res.unwrap();
}

#[test]
fn info_then_go_gives_same_data() {
    let (res, end) = run(|s| -> Result<_, ClientError> {
        let mut hs = ClientHandshake::start(s, true)?;
        assert!(hs.structured_reply()?);
        let info = hs.info("disk")?;
        let c = hs.go("disk")?;
        Ok((info, c.info().clone(), c.transmission_flags()))
    });
    let (info, go_info, flags) = res.unwrap();
    assert_eq!(info, go_info);
    assert_eq!(info.name, "disk");
    assert_eq!(info.description, "a test disk");
    assert_eq!(info.size, DISK_SIZE);
    assert_eq!(
        (info.min_block, info.preferred_block, info.max_payload),
        (512, 4096, 256 * 1024)
    );
    assert!(info.can_df && info.can_fua && info.can_fast_zero);
    let neg = end.negotiated.unwrap();
    assert_eq!(neg.transmission_flags, flags);
    assert_eq!(neg.export, catalog()[0]);
}

#[test]
fn info_of_default_and_unknown_export() {
    let (res, end) = run(|s| -> Result<(), ClientError> {
        let mut hs = ClientHandshake::start(s, true)?;
        // "" is the default export; its canonical name comes back.
        assert_eq!(hs.info("")?.name, "disk");
        match hs.info("missing") {
            Err(ClientError::OptionRejected { reply_type, .. }) => {
                assert_eq!(reply_type, consts::REP_ERR_UNKNOWN)
            }
            other => panic!("{other:?}"),
        }
        // GO of an unknown export is an error too, and the session goes on.
        let r = hs.option(
            consts::OPT_GO,
            &nbd::client::encode_info_request("nope", &[]),
        )?;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].reply_type, consts::REP_ERR_UNKNOWN);
        assert_eq!(hs.list()?.len(), 2);
        hs.abort()
    });
    res.unwrap();
    assert_eq!(end.status, Status::Closed);
}

#[test]
fn list_exports() {
    let (res, end) = run(|s| -> Result<_, ClientError> {
        let mut hs = ClientHandshake::start(s, true)?;
        let list = hs.list()?;
        hs.abort()?;
        Ok(list)
    });
    assert_eq!(
        res.unwrap(),
        vec![
            ("disk".to_string(), "a test disk".to_string()),
            ("ro".to_string(), "read-only".to_string())
        ]
    );
    assert_eq!(end.status, Status::Closed);
}

#[test]
fn abort() {
    let (res, end) = run(|s| ClientHandshake::start(s, false)?.abort());
    res.unwrap();
    assert_eq!(end.status, Status::Closed);
    assert_eq!(
        end.close_reason.as_deref(),
        Some("client sent NBD_OPT_ABORT")
    );
    assert!(end.negotiated.is_none());
}

#[test]
fn unknown_option_then_go() {
    let (res, end) = run(|s| -> Result<(), ClientError> {
        let mut hs = ClientHandshake::start(s, true)?;
        for option in [0, 4, 5, 12345, u32::MAX] {
            let r = hs.option(option, b"some data")?;
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].reply_type, consts::REP_ERR_UNSUP, "option {option}");
        }
        // EXTENDED_HEADERS is known but takes no data.
        let r = hs.option(consts::OPT_EXTENDED_HEADERS, b"some data")?;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].reply_type, consts::REP_ERR_INVALID);
        let mut c = hs.go("disk")?;
        c.write(0, &[5; 512], false)?;
        assert_eq!(c.read(0, 512)?, vec![5; 512]);
        c.disconnect()?;
        Ok(())
    });
    res.unwrap();
    assert_eq!(end.status, Status::Ready);
    assert_eq!(end.disk[..512], [5; 512]);
}

#[test]
fn export_name_with_and_without_no_zeroes() {
    for no_zeroes in [false, true] {
        let (res, end) = run(move |s| -> Result<(), ClientError> {
            let hs = ClientHandshake::start(s, no_zeroes)?;
            assert_eq!(hs.no_zeroes(), no_zeroes);
            let mut c = hs.export_name("disk")?;
            assert_eq!(c.size(), DISK_SIZE);
            assert!(c.info().can_flush);
            // The stream is in sync only if exactly the right number of zero
            // bytes was sent.
            c.write(512, &[9; 512], false)?;
            assert_eq!(c.read(512, 512)?, vec![9; 512]);
            c.disconnect()?;
            Ok(())
        });
        res.unwrap();
        assert_eq!(end.status, Status::Ready);
        assert_eq!(end.negotiated.unwrap().no_zeroes, no_zeroes);
    }
}

#[test]
fn export_name_unknown_closes() {
    let (res, end) = run(|s| {
        ClientHandshake::start(s, true)?
            .export_name("nope")
            .map(drop)
    });
    assert!(matches!(res, Err(ClientError::Io(_))), "{res:?}");
    assert_eq!(end.status, Status::Closed);
    assert!(end.close_reason.unwrap().contains("nope"));
}

#[test]
fn meta_context_for_other_export_is_not_used() {
    let (res, end) = run(|s| -> Result<_, ClientError> {
        let mut hs = ClientHandshake::start(s, true)?;
        // Before structured replies: invalid.
        match hs.set_meta_context("disk", &["base:allocation"]) {
            Err(ClientError::OptionRejected { reply_type, .. }) => {
                assert_eq!(reply_type, consts::REP_ERR_INVALID)
            }
            other => panic!("{other:?}"),
        }
        assert!(hs.structured_reply()?);
        assert_eq!(
            hs.list_meta_context("disk", &[])?,
            vec![(0, "base:allocation".to_string())]
        );
        assert_eq!(
            hs.list_meta_context("disk", &["base:"])?,
            vec![(0, "base:allocation".to_string())]
        );
        let set = hs.set_meta_context("disk", &["base:allocation"])?;
        assert_eq!(set.len(), 1);
        assert_ne!(set[0].0, 0);
        let c = hs.go("")?;
        Ok(c.base_allocation())
    });
    assert_eq!(res.unwrap(), None);
    assert_eq!(end.negotiated.unwrap().base_allocation, None);
}

#[test]
fn bad_client_flags_close() {
    let (res, end) = run(|s| -> Result<(), ClientError> {
        let mut hs = ClientHandshake::start_with_flags(s, 0x8000_0001)?;
        hs.list().map(drop)
    });
    assert!(res.is_err());
    assert_eq!(end.status, Status::Closed);
    assert_eq!(end.error, Some(ProtocolError::BadClientFlags(0x8000_0001)));
}
