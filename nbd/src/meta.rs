//! Names of the metadata contexts beyond `base:allocation`.
//!
//! This server offers qemu's dirty-bitmap format for changed-block
//! tracking: `qemu:dirty-bitmap:since-LSN` marks dirty (bit 0) every region
//! changed by a record after `LSN`. The bitmap is named by the LSN because
//! the server keeps the last LSN of every region, so one table answers any
//! base at once; there is nothing to create or clear per bitmap.

use crate::consts;

/// Leaf prefix of the one bitmap family: `since-` then a decimal LSN.
const SINCE: &str = "since-";

/// Longest decimal LSN accepted (u64::MAX has 20 digits).
const MAX_LSN_DIGITS: usize = 20;

/// The context name of the dirty bitmap of changes after `lsn`
/// (`qemu:dirty-bitmap:since-LSN`).
pub fn dirty_bitmap_name(lsn: u64) -> String {
    format!("{}{SINCE}{lsn}", consts::META_DIRTY_BITMAP_PREFIX)
}

/// The LSN a context name `qemu:dirty-bitmap:since-LSN` asks about, if the
/// name is exactly that, in canonical form: decimal digits without a sign
/// or leading zero (so a name and its LSN map one to one, and the name the
/// server echoes is the one the client asked for). Never panics.
pub fn parse_dirty_bitmap(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(consts::META_DIRTY_BITMAP_PREFIX)?
        .strip_prefix(SINCE)?;
    let canonical = !digits.is_empty()
        && digits.len() <= MAX_LSN_DIGITS
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if !canonical {
        return None;
    }
    digits.parse().ok()
}

/// Whether a `LIST_META_CONTEXT` query selects the dirty-bitmap family:
/// the namespace (`qemu:`), the family (`qemu:dirty-bitmap:`) or a name.
pub fn lists_dirty_bitmaps(query: &str) -> bool {
    query == "qemu:" || query == consts::META_DIRTY_BITMAP_PREFIX
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_parse_only_in_canonical_form() {
        let cases: &[(&str, Option<u64>)] = &[
            ("qemu:dirty-bitmap:since-0", Some(0)),
            ("qemu:dirty-bitmap:since-1234", Some(1234)),
            (
                "qemu:dirty-bitmap:since-18446744073709551615",
                Some(u64::MAX),
            ),
            ("qemu:dirty-bitmap:since-18446744073709551616", None),
            ("qemu:dirty-bitmap:since-007", None),
            ("qemu:dirty-bitmap:since-+7", None),
            ("qemu:dirty-bitmap:since--7", None),
            ("qemu:dirty-bitmap:since-", None),
            ("qemu:dirty-bitmap:since-7 ", None),
            ("qemu:dirty-bitmap:since-٣", None),
            ("qemu:dirty-bitmap:bitmap0", None),
            ("qemu:dirty-bitmap:", None),
            ("QEMU:dirty-bitmap:since-1", None),
            ("base:allocation", None),
            ("", None),
        ];
        for &(name, want) in cases {
            assert_eq!(parse_dirty_bitmap(name), want, "{name:?}");
        }
    }

    proptest! {
        #[test]
        fn every_lsn_round_trips(lsn in any::<u64>()) {
            prop_assert_eq!(parse_dirty_bitmap(&dirty_bitmap_name(lsn)), Some(lsn));
        }

        #[test]
        fn a_parsed_name_is_the_canonical_one(s in "qemu:dirty-bitmap:since-[0-9+ -]{0,24}") {
            if let Some(lsn) = parse_dirty_bitmap(&s) {
                prop_assert_eq!(dirty_bitmap_name(lsn), s);
            }
        }

        #[test]
        fn arbitrary_strings_never_panic(s in any::<String>()) {
            if let Some(lsn) = parse_dirty_bitmap(&s) {
                prop_assert_eq!(dirty_bitmap_name(lsn), s);
            }
        }
    }
}
