//! How a replica that just answered HELLO is brought up to date: a pure
//! decision over plain values, with the rule that decided it (the link
//! applies it: bitmap marks, persistence, the job).

use std::fmt;

use crate::units::{ByteSize, Epoch, Lsn};

/// How a replica that just answered HELLO is brought up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Stream from its LSN: it has everything before.
    Stream,
    /// Its resync was interrupted: stream from its LSN and go on with the
    /// regions still marked.
    Resume,
    /// Its LSN left the journal: send the marked regions (and those of the
    /// records still in the journal), then stream live.
    Bitmap,
    /// Its data is unknown: compare every region by checksum, send those
    /// that differ, then stream live.
    Full,
}

/// What the plan is decided from: the replica's answer and this primary's
/// journal, bitmap and link state, as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanInputs {
    /// The highest LSN the replica holds durably.
    pub replica_durable: Lsn,
    /// The replica says its data is Inconsistent (a resync did not finish).
    pub inconsistent: bool,
    /// The replica's volume UUID is this volume's.
    pub uuid_equal: bool,
    /// The next LSN this primary will assign.
    pub next: Lsn,
    /// The first LSN this primary's journal still holds.
    pub checkpoint: Lsn,
    /// The journal still retains the record at the replica's next LSN.
    pub retained: bool,
    /// The record at the replica's next LSN is still in memory.
    pub in_memory: bool,
    /// Some retained record from the replica's next LSN on was written in
    /// place (its data is in the journal as metadata only).
    pub in_place_since: bool,
    /// This primary's out-of-sync bitmap for the replica is valid.
    pub bitmap_valid: bool,
    /// Bytes the bitmap marks (for the log text).
    pub bitmap_bytes: u64,
    /// The replica connected before, since this primary started.
    pub connected_since_start: bool,
    /// The next LSN when this primary's recovery ended at its start.
    pub startup_next: Lsn,
    /// This primary's epoch (for the log text).
    pub epoch: Epoch,
}

/// Why [`plan`] decided what it did; `Display` gives the log text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanRule {
    /// The replica's volume UUID differs: it was never a copy of this volume.
    UnknownVolume,
    /// The replica holds LSNs this primary never assigned.
    AheadOfPrimary {
        /// The replica's durable LSN.
        durable: Lsn,
        /// This primary's last assigned LSN.
        last: u64,
    },
    /// Not catchable from the journal (or Inconsistent) and no valid bitmap.
    NoBitmap {
        /// This primary's epoch.
        epoch: Epoch,
        /// The replica is Inconsistent (else its LSN left the journal).
        inconsistent: bool,
    },
    /// On its first connection since this primary started, the replica holds
    /// records this primary lost in its crash: same LSNs, other writes.
    Diverged {
        /// The replica's durable LSN.
        durable: Lsn,
        /// The last LSN this primary recovered at its start.
        recovered: u64,
    },
    /// The replica's resync was interrupted; its LSN is still catchable.
    Unfinished {
        /// Bytes still marked.
        remaining: ByteSize,
    },
    /// Every later record is at hand.
    CaughtUp,
    /// The replica's LSN left the journal, the bitmap is valid.
    LeftJournal {
        /// The replica's durable LSN.
        durable: Lsn,
        /// The first LSN this primary's journal now holds.
        checkpoint: Lsn,
    },
}

impl fmt::Display for PlanRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownVolume => {
                f.write_str("it is new (or its volume was re-created): its data is unknown")
            }
            Self::AheadOfPrimary { durable, last } => write!(
                f,
                "it has records up to LSN {durable}, beyond this primary's {last} (it followed another primary)"
            ),
            Self::NoBitmap { epoch, inconsistent } => write!(
                f,
                "this primary has no record of its out-of-sync regions in epoch {epoch} ({})",
                if *inconsistent {
                    "it is Inconsistent"
                } else {
                    "its LSN left the journal"
                }
            ),
            Self::Diverged { durable, recovered } => write!(
                f,
                "it has records up to LSN {durable}, but this primary recovered only up to LSN {recovered} at its start: the rest never became durable here"
            ),
            Self::Unfinished { remaining } => {
                write!(f, "its resync did not finish: {remaining} still to do")
            }
            Self::CaughtUp => Ok(()),
            Self::LeftJournal {
                durable,
                checkpoint,
            } => write!(
                f,
                "it is at LSN {durable}, but this primary's journal now starts at LSN {checkpoint}"
            ),
        }
    }
}

/// Whether every record from `from` on can be sent from the journal: at or
/// past its checkpoint (which moves before a checkpoint's release completes)
/// and still retained. A record only in memory may be trimmed any moment;
/// writes made in place are in the journal as metadata only, so catch-up
/// can send them only while they are still in memory.
fn catchable(i: &PlanInputs, from: Lsn) -> bool {
    from <= i.next
        && (from == i.next
            || (from >= i.checkpoint && i.retained && (i.in_memory || !i.in_place_since)))
}

/// Decides how the replica is brought up to date, and why. The order of the
/// rules matters: data-loss cases (unknown, ahead, diverged) come before
/// anything that would trust the replica's LSN.
pub fn plan(i: &PlanInputs) -> (Plan, PlanRule) {
    let from = Lsn(i.replica_durable.0 + 1);
    let catchable = catchable(i, from);
    // On its first connection since this primary started, a replica durable
    // at or past the LSN this primary's recovery ended at holds records this
    // primary lost (sent to it before they were durable here).
    let diverged = !i.connected_since_start && from > i.startup_next;
    if !i.uuid_equal {
        (Plan::Full, PlanRule::UnknownVolume)
    } else if from > i.next {
        let last = i.next.0.saturating_sub(1);
        let durable = i.replica_durable;
        (Plan::Full, PlanRule::AheadOfPrimary { durable, last })
    } else if !i.bitmap_valid && (i.inconsistent || !catchable) {
        let (epoch, inconsistent) = (i.epoch, i.inconsistent);
        (
            Plan::Full,
            PlanRule::NoBitmap {
                epoch,
                inconsistent,
            },
        )
    } else if diverged {
        let recovered = i.startup_next.0.saturating_sub(1);
        let durable = i.replica_durable;
        (Plan::Full, PlanRule::Diverged { durable, recovered })
    } else if catchable && i.inconsistent {
        let remaining = ByteSize(i.bitmap_bytes);
        (Plan::Resume, PlanRule::Unfinished { remaining })
    } else if catchable {
        (Plan::Stream, PlanRule::CaughtUp)
    } else {
        let (durable, checkpoint) = (i.replica_durable, i.checkpoint);
        (
            Plan::Bitmap,
            PlanRule::LeftJournal {
                durable,
                checkpoint,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A consistent replica one record behind, everything at hand.
    fn base() -> PlanInputs {
        PlanInputs {
            replica_durable: Lsn(9),
            inconsistent: false,
            uuid_equal: true,
            next: Lsn(11),
            checkpoint: Lsn(5),
            retained: true,
            in_memory: true,
            in_place_since: false,
            bitmap_valid: true,
            bitmap_bytes: 0,
            connected_since_start: true,
            startup_next: Lsn(1),
            epoch: Epoch(3),
        }
    }

    #[test]
    fn every_rule() {
        let b = base();
        let cases: Vec<(&str, PlanInputs, Plan, &str)> = vec![
            ("caught up", b, Plan::Stream, ""),
            (
                "at the head, journal empty",
                PlanInputs { replica_durable: Lsn(10), retained: false, in_memory: false, checkpoint: Lsn(11), bitmap_valid: false, ..b },
                Plan::Stream,
                "",
            ),
            (
                "unknown UUID, even when caught up",
                PlanInputs { uuid_equal: false, ..b },
                Plan::Full,
                "it is new (or its volume was re-created): its data is unknown",
            ),
            (
                "replica ahead of this primary",
                PlanInputs { replica_durable: Lsn(11), ..b },
                Plan::Full,
                "it has records up to LSN 11, beyond this primary's 10 (it followed another primary)",
            ),
            (
                "inconsistent, no bitmap",
                PlanInputs { inconsistent: true, bitmap_valid: false, ..b },
                Plan::Full,
                "this primary has no record of its out-of-sync regions in epoch 3 (it is Inconsistent)",
            ),
            (
                "left the journal, no bitmap",
                PlanInputs { checkpoint: Lsn(11), retained: false, bitmap_valid: false, ..b },
                Plan::Full,
                "this primary has no record of its out-of-sync regions in epoch 3 (its LSN left the journal)",
            ),
            (
                "diverged after restart",
                PlanInputs { connected_since_start: false, startup_next: Lsn(8), ..b },
                Plan::Full,
                "it has records up to LSN 9, but this primary recovered only up to LSN 7 at its start: the rest never became durable here",
            ),
            (
                "first connection, not diverged",
                PlanInputs { connected_since_start: false, startup_next: Lsn(10), ..b },
                Plan::Stream,
                "",
            ),
            (
                "inconsistent and catchable",
                PlanInputs { inconsistent: true, bitmap_bytes: 4096, ..b },
                Plan::Resume,
                "its resync did not finish: 4K still to do",
            ),
            (
                "LSN before the checkpoint, valid bitmap",
                PlanInputs { checkpoint: Lsn(11), ..b },
                Plan::Bitmap,
                "it is at LSN 9, but this primary's journal now starts at LSN 11",
            ),
            (
                "record no longer retained",
                PlanInputs { retained: false, ..b },
                Plan::Bitmap,
                "it is at LSN 9, but this primary's journal now starts at LSN 5",
            ),
            (
                "written in place and gone from memory",
                PlanInputs { in_memory: false, in_place_since: true, ..b },
                Plan::Bitmap,
                "it is at LSN 9, but this primary's journal now starts at LSN 5",
            ),
            (
                "written in place, still in memory",
                PlanInputs { in_memory: true, in_place_since: true, ..b },
                Plan::Stream,
                "",
            ),
        ];
        for (name, inputs, want, text) in cases {
            let (got, rule) = plan(&inputs);
            assert_eq!(got, want, "{name}: {rule:?}");
            assert_eq!(rule.to_string(), text, "{name}");
        }
    }
}
