#!/usr/bin/env bash
# Fuzz every target of this harness for SECONDS seconds each (default 60).
#
#   nbd/fuzz/run.sh 30
#
# Only a stable toolchain is needed: cargo-fuzz passes nightly-only flags
# (-Z...) to rustc, and RUSTC_BOOTSTRAP=1 lets stable accept them. The crate
# under test forbids unsafe code, so the harness runs without a sanitizer
# (faster, and no sanitizer runtime needed) but with debug assertions and
# overflow checks on, which is what catches arithmetic bugs in parsers.
#
# Environment:
#   CARGO_TARGET_DIR   build directory (default: nbd/fuzz/target, gitignored)
#   CARGO_BUILD_JOBS   parallel rustc jobs (default: 1; small build machines)
#   FUZZ_ARGS          extra libFuzzer arguments, e.g. "-max_len=65536"
set -euo pipefail

secs="${1:-60}"
case "$secs" in
    '' | *[!0-9]*) echo "usage: $0 SECONDS" >&2; exit 2 ;;
esac

fuzz_dir="$(cd "$(dirname "$0")" && pwd)"
# cargo-fuzz expects to be run from the crate root, the parent of fuzz/.
cd "$fuzz_dir/.."

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$fuzz_dir/target}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"

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
seed handshake go "$flags$list$structured$set_meta$list_meta$go"
seed handshake info "$flags$info$export_name"
seed handshake abort "$flags$list$abort"
seed request read '\x25\x60\x95\x13\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x02\x00'

status=0
for target in $(cargo fuzz list); do
    echo "== fuzzing $target for ${secs}s"
    mkdir -p "$fuzz_dir/corpus/$target"
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of arguments.
    if ! cargo fuzz run --sanitizer none --debug-assertions "$target" \
        "$fuzz_dir/corpus/$target" -- \
        -max_total_time="$secs" \
        -timeout=10 \
        -rss_limit_mb=2048 \
        -dict="$fuzz_dir/nbd.dict" \
        -print_final_stats=1 \
        ${FUZZ_ARGS:-}; then
        echo "== $target FAILED (crash input under $fuzz_dir/artifacts/$target)" >&2
        status=1
    fi
done
exit "$status"
