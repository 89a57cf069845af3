//! The logical mutation: what a write, trim or write-zeroes does to the
//! volume, apart from where the journal keeps it. The overlay, the applier,
//! catch-up and the replication wire speak only this.

use std::rc::Rc;

use crate::buffer::Payload;
use crate::units::Lsn;

/// What a mutation does. Its [`code`](MutationOp::code) is the same byte in
/// a journal record header and in a replication RECORD header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MutationOp {
    /// Write the payload at `offset`.
    Write,
    /// Discard `[offset, offset+length)` (advisory; whole blocks inside it read as zero after).
    Trim,
    /// Make `[offset, offset+length)` read as zeroes.
    WriteZeroes,
    /// Change the volume's size to `offset` bytes (`length` is 0, so the
    /// record touches no range): ordered among the writes like any other
    /// record. A shrink discards the data past the new end.
    Resize,
}

impl MutationOp {
    /// Every op, in code order.
    pub const ALL: [MutationOp; 4] = [
        MutationOp::Write,
        MutationOp::Trim,
        MutationOp::WriteZeroes,
        MutationOp::Resize,
    ];

    /// The op's code on disk and on the wire.
    pub const fn code(self) -> u8 {
        match self {
            MutationOp::Write => 1,
            MutationOp::Trim => 2,
            MutationOp::WriteZeroes => 3,
            // 4, 5 and 6 are the journal's own entry kinds.
            MutationOp::Resize => 7,
        }
    }

    /// The op with code `c`, if any.
    pub const fn from_code(c: u8) -> Option<MutationOp> {
        Some(match c {
            1 => MutationOp::Write,
            2 => MutationOp::Trim,
            3 => MutationOp::WriteZeroes,
            7 => MutationOp::Resize,
            _ => return None,
        })
    }

    /// Payload bytes a mutation of `length` volume bytes carries (only a
    /// write has a payload).
    pub const fn payload_len(self, length: u64) -> u64 {
        match self {
            MutationOp::Write => length,
            MutationOp::Trim | MutationOp::WriteZeroes | MutationOp::Resize => 0,
        }
    }
}

/// A mutation with its LSN: the unit the journal orders and replication
/// ships. Where it sits in the journal is the journal's business
/// ([`Record`](super::Record)).
#[derive(Clone)]
pub struct Mutation {
    /// Its LSN.
    pub lsn: Lsn,
    /// What it does.
    pub op: MutationOp,
    /// Op flags (see [`FLAG_NO_HOLE`](super::format::FLAG_NO_HOLE)).
    pub flags: u8,
    /// Volume byte offset.
    pub offset: u64,
    /// Volume bytes affected.
    pub length: u64,
    /// The data of a write.
    pub payload: Option<Rc<Payload>>,
    /// xxh3 of the payload (0 without one).
    pub payload_hash: u64,
}

impl Mutation {
    /// Payload bytes it carries.
    pub fn payload_len(&self) -> u64 {
        self.op.payload_len(self.length)
    }

    /// The new volume size, if it is a resize.
    pub fn new_size(&self) -> Option<u64> {
        (self.op == MutationOp::Resize).then_some(self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_nothing_else_decodes() {
        for op in MutationOp::ALL {
            assert_eq!(MutationOp::from_code(op.code()), Some(op));
        }
        let known = (0..=u8::MAX)
            .filter(|&c| MutationOp::from_code(c).is_some())
            .count();
        assert_eq!(known, MutationOp::ALL.len());
    }

    #[test]
    fn codes_are_the_published_ones() {
        // Journals on disk and peers on the wire depend on these bytes.
        assert_eq!(MutationOp::Write.code(), 1);
        assert_eq!(MutationOp::Trim.code(), 2);
        assert_eq!(MutationOp::WriteZeroes.code(), 3);
        assert_eq!(MutationOp::Resize.code(), 7);
    }
}
