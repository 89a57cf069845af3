//! Arbitrary bytes as every message a replication peer can send: the frame
//! header and each body decoder (HELLO and HELLO_REPLY are parsed before
//! the peer has proven the shared secret, so they face anyone). Besides
//! "no panic", a body that decodes must encode back to something that
//! decodes to the same message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrorblk_server::replication::wire::{
    decode_frame_header, decode_stamp, Ack, Auth, Barrier, ErrorMsg, Hello, HelloReply, RecordHeader,
    RegionCheck, ResyncHeader, FRAME_HEADER_LEN, RECORD_HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    if data.len() >= FRAME_HEADER_LEN {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h.copy_from_slice(&data[..FRAME_HEADER_LEN]);
        if let Ok(f) = decode_frame_header(&h) {
            assert!(f.len <= f.kind.max_body(), "frame length bound not enforced");
        }
    }
    if data.len() >= RECORD_HEADER_LEN {
        let mut r = [0u8; RECORD_HEADER_LEN];
        r.copy_from_slice(&data[..RECORD_HEADER_LEN]);
        if let Ok(h) = RecordHeader::decode(&r) {
            assert_eq!(RecordHeader::decode(&h.encode()), Ok(h));
        }
    }
    if let Ok(m) = Hello::decode(data) {
        assert_eq!(Hello::decode(&m.encode()), Ok(m));
    }
    if let Ok(m) = HelloReply::decode(data) {
        assert_eq!(HelloReply::decode(&m.encode()), Ok(m));
    }
    if let Ok(m) = Auth::decode(data) {
        assert_eq!(Auth::decode(&m.encode()), Ok(m));
    }
    if let Ok(m) = Ack::decode(data) {
        assert_eq!(Ack::decode(&m.encode()), Ok(m));
    }
    if let Ok(m) = Barrier::decode(data) {
        assert_eq!(Barrier::decode(&m.encode()), Ok(m));
    }
    if let Ok(m) = RegionCheck::decode(data) {
        assert_eq!(RegionCheck::decode(&m.encode()), Ok(m));
    }
    if let Ok(m) = ResyncHeader::decode(data) {
        assert_eq!(ResyncHeader::decode(&m.encode()), Ok(m));
    }
    if let Ok(m) = ErrorMsg::decode(data) {
        assert_eq!(ErrorMsg::decode(&m.encode()), Ok(m));
    }
    let _ = decode_stamp(data);
});
