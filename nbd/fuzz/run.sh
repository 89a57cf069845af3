#!/usr/bin/env bash
# Fuzz every target of this harness (the NBD handshake and the compact and
# extended request parsers)
# for SECONDS seconds each (default 60), after seeding empty corpora:
#
#   nbd/fuzz/run.sh 30
#
# The build and the fuzzing loop are scripts/cargo-fuzz-crate (see there
# for the toolchain and the environment variables).
set -euo pipefail

secs="${1:-60}"
case "$secs" in
    '' | *[!0-9]*) echo "usage: $0 SECONDS" >&2; exit 2 ;;
esac

fuzz_dir="$(cd "$(dirname "$0")" && pwd)"

# Seed empty corpora with a few valid conversations so the fuzzer starts
# deep inside option haggling instead of rediscovering the framing. Format
# strings only: printf expands the \x escapes.
seed() { # target name printf-format
    local dir="$fuzz_dir/corpus/$1"
    mkdir -p "$dir"
    # shellcheck disable=SC2059 # the seed is the format string on purpose.
    [ -e "$dir/seed-$2" ] || printf "$3" >"$dir/seed-$2"
}
flags='\x05\x00\x00\x00\x03' # chunking seed byte, then client flags
list='IHAVEOPT\x00\x00\x00\x03\x00\x00\x00\x00'
structured='IHAVEOPT\x00\x00\x00\x08\x00\x00\x00\x00'
set_meta='IHAVEOPT\x00\x00\x00\x0a\x00\x00\x00\x1f\x00\x00\x00\x04disk\x00\x00\x00\x01\x00\x00\x00\x0fbase:allocation'
list_meta='IHAVEOPT\x00\x00\x00\x09\x00\x00\x00\x0c\x00\x00\x00\x04disk\x00\x00\x00\x00'
info='IHAVEOPT\x00\x00\x00\x06\x00\x00\x00\x08\x00\x00\x00\x00\x00\x01\x00\x03'
go='IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x0a\x00\x00\x00\x04disk\x00\x00'
export_name='IHAVEOPT\x00\x00\x00\x01\x00\x00\x00\x02ro'
abort='IHAVEOPT\x00\x00\x00\x02\x00\x00\x00\x00'
extended='IHAVEOPT\x00\x00\x00\x0b\x00\x00\x00\x00'
seed handshake go "$flags$list$structured$set_meta$list_meta$go"
seed handshake info "$flags$info$export_name"
seed handshake abort "$flags$list$abort"
seed handshake extended "$flags$extended$set_meta$go"
seed request read '\x25\x60\x95\x13\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x02\x00'
# A 6 GiB WRITE_ZEROES and a 4 KiB WRITE with PAYLOAD_LEN, extended headers.
seed request_extended zeroes '\x21\xe4\x1c\x71\x00\x00\x00\x06\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x01\x80\x00\x00\x00'
seed request_extended write '\x21\xe4\x1c\x71\x00\x20\x00\x01\x00\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x20\x00\x00\x00\x00\x00\x00\x00\x10\x00'

exec "$fuzz_dir/../../scripts/cargo-fuzz-crate" "$fuzz_dir" "$secs" -dict="$fuzz_dir/nbd.dict"
