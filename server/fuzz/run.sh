#!/usr/bin/env bash
# Fuzz every target of this harness (the replication wire codec) for
# SECONDS seconds each (default 60). Same conventions as nbd/fuzz/run.sh:
# a stable toolchain with RUSTC_BOOTSTRAP=1, no sanitizer (the codec has no
# unsafe code), debug assertions and overflow checks on.
#
#   server/fuzz/run.sh 30
set -euo pipefail

secs="${1:-60}"
case "$secs" in
    '' | *[!0-9]*) echo "usage: $0 SECONDS" >&2; exit 2 ;;
esac
fuzz_dir="$(cd "$(dirname "$0")" && pwd)"
cd "$fuzz_dir/.."
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$fuzz_dir/target}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"

status=0
for target in $(cargo fuzz list); do
    echo "== fuzzing $target for ${secs}s"
    mkdir -p "$fuzz_dir/corpus/$target"
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of arguments.
    if ! cargo fuzz run --sanitizer none --debug-assertions "$target" \
        "$fuzz_dir/corpus/$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 ${FUZZ_ARGS:-}; then
        echo "== $target FAILED (crash input under $fuzz_dir/artifacts/$target)" >&2
        status=1
    fi
done
exit "$status"
