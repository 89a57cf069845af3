//! The named states the admin protocol reports and the daemon is configured
//! with. Each serializes to the same kebab-case word the daemon has always
//! written, prints as that word (padded like a `str`, so tables align), and
//! parses back from it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A word that names none of a state's variants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{got}' is not a {what}; expected one of: {expected}")]
pub struct UnknownName {
    /// Which kind of state was being parsed ("role", "replica state", ...).
    pub what: &'static str,
    /// The word given.
    pub got: String,
    /// The words accepted, comma-separated.
    pub expected: &'static str,
}

/// Implements `as_str`, `Display` (padding like a `str`) and `FromStr` from
/// one table, so the word of a variant is written down once.
macro_rules! named_states {
    ($ty:ident, $what:literal, { $($variant:ident => $word:literal),+ $(,)? }) => {
        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The word on the wire, in logs and on the command line.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $word),+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<$ty, UnknownName> {
                match s {
                    $($word => Ok($ty::$variant),)+
                    _ => Err(UnknownName {
                        what: $what,
                        got: s.to_string(),
                        expected: concat!($($word, " "),+),
                    }),
                }
            }
        }
    };
}

/// The role of a node for its volumes (also stored in the journal's
/// superblock, which keeps its own byte code for it).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Never set (journals written before roles existed, or fresh ones).
    #[default]
    #[value(skip)]
    Unset,
    /// Serves NBD clients and orders writes.
    Primary,
    /// Mirrors a primary; serves no NBD client.
    Replica,
}

named_states!(Role, "role", {
    Unset => "unset",
    Primary => "primary",
    Replica => "replica",
});

/// Where a primary's link to one replica stands, as `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// Not connected yet (or reconnecting).
    Connecting,
    /// Connected, sending records the replica missed from the journal.
    CatchingUp,
    /// Connected and streaming live records; counts for acknowledgements.
    InSync,
    /// Lost or unable to catch up (the status says why).
    OutOfSync,
    /// Streaming live records while a resync of older regions runs; the
    /// replica is Inconsistent and does not count for acknowledgements.
    Resyncing,
}

named_states!(ReplicaState, "replica state", {
    Connecting => "connecting",
    CatchingUp => "catching-up",
    InSync => "in-sync",
    OutOfSync => "out-of-sync",
    Resyncing => "resyncing",
});

/// When the primary acknowledges a write (see DESIGN.md, "Write path").
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Durable locally and in the journal of every in-sync replica (or of
    /// `min_sync_replicas`): DRBD protocol C.
    #[default]
    Sync,
    /// Durable locally and received by every in-sync replica; FLUSH and FUA
    /// wait until everything before them is durable on the replicas too.
    Flush,
    /// Durable locally; replicas trail by at most `max_lag` bytes.
    Async,
}

named_states!(Mode, "replication mode", {
    Sync => "sync",
    Flush => "flush",
    Async => "async",
});

/// When a write's reply promises that the write survives a power cut
/// (docs/ARCHITECTURE.md, "Durability modes").
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Every reply: a write is durable in the journal before it is
    /// acknowledged, so FLUSH and FUA cost nothing more.
    #[default]
    PerWrite,
    /// NBD's own contract: a write is acknowledged once the disk has it
    /// (it survives the daemon's death, not a power cut); FLUSH, and a
    /// FUA write, complete once everything acknowledged before them is
    /// durable.
    Flush,
}

named_states!(Durability, "durability mode", {
    PerWrite => "per-write",
    Flush => "flush",
});

/// What the primary does when a replica stops answering.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum OnReplicaLoss {
    /// Go on without it (it is marked out of sync and resynced later).
    #[default]
    Degrade,
    /// Hold writes until enough replicas are back in sync.
    Block,
}

named_states!(OnReplicaLoss, "replica-loss policy", {
    Degrade => "degrade",
    Block => "block",
});

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON string of `v`, without its quotes.
    fn wire<T: Serialize>(v: T) -> String {
        let json = serde_json::to_string(&v).expect("serializes");
        json.trim_matches('"').to_string()
    }

    /// Serde, `Display` and `FromStr` agree on every variant's word, and
    /// serde gives the word back as the variant.
    fn round_trips<T>(all: &[T])
    where
        T: Copy + PartialEq + fmt::Debug + fmt::Display + FromStr + Serialize,
        T: for<'de> Deserialize<'de>,
        <T as FromStr>::Err: fmt::Debug,
    {
        for &v in all {
            let word = v.to_string();
            assert_eq!(wire(v), word, "serde and Display disagree on {v:?}");
            assert_eq!(word.parse::<T>().expect("parses"), v);
            let back: T = serde_json::from_str(&format!("\"{word}\"")).expect("deserializes");
            assert_eq!(back, v);
        }
    }

    #[test]
    fn replica_states_keep_the_words_the_daemon_always_wrote() {
        let words: Vec<String> = ReplicaState::ALL.iter().map(|&s| wire(s)).collect();
        assert_eq!(
            words,
            [
                "connecting",
                "catching-up",
                "in-sync",
                "out-of-sync",
                "resyncing"
            ]
        );
        round_trips(ReplicaState::ALL);
    }

    #[test]
    fn roles_modes_and_policies_keep_their_words() {
        let roles: Vec<String> = Role::ALL.iter().map(|&r| wire(r)).collect();
        assert_eq!(roles, ["unset", "primary", "replica"]);
        let modes: Vec<String> = Mode::ALL.iter().map(|&m| wire(m)).collect();
        assert_eq!(modes, ["sync", "flush", "async"]);
        let loss: Vec<String> = OnReplicaLoss::ALL.iter().map(|&p| wire(p)).collect();
        assert_eq!(loss, ["degrade", "block"]);
        round_trips(Role::ALL);
        round_trips(Mode::ALL);
        round_trips(OnReplicaLoss::ALL);
    }

    #[test]
    fn command_line_words_match_the_wire() {
        use clap::ValueEnum;
        for m in Mode::value_variants() {
            let pv = m.to_possible_value().expect("not skipped");
            assert_eq!(pv.get_name(), m.as_str());
        }
        for p in OnReplicaLoss::value_variants() {
            let pv = p.to_possible_value().expect("not skipped");
            assert_eq!(pv.get_name(), p.as_str());
        }
        let roles: Vec<&str> = Role::value_variants()
            .iter()
            .filter_map(|r| r.to_possible_value())
            .map(|pv| pv.get_name().to_string())
            .map(|n| n.parse::<Role>().expect("parses").as_str())
            .collect();
        assert_eq!(
            roles,
            ["primary", "replica"],
            "unset is never given by hand"
        );
    }

    #[test]
    fn display_pads_like_a_str() {
        assert_eq!(format!("[{:<9}]", ReplicaState::InSync), "[in-sync  ]");
        assert_eq!(format!("[{:>8}]", Role::Primary), "[ primary]");
    }

    #[test]
    fn unknown_words_are_refused_with_the_choices() {
        let e = "insync".parse::<ReplicaState>().unwrap_err();
        assert!(e.to_string().contains("in-sync"), "{e}");
        assert!("Primary".parse::<Role>().is_err());
    }
}
