#!/usr/bin/env bash
# Fuzz every target of this harness (the replication wire codec, the
# live-restart hand-over state, the snapshot side file, the journal's batch
# and record headers) for SECONDS seconds each (default 60):
#
#   server/fuzz/run.sh 30
#
# The build and the fuzzing loop are scripts/cargo-fuzz-crate (see there
# for the toolchain and the environment variables).
set -euo pipefail

secs="${1:-60}"
fuzz_dir="$(cd "$(dirname "$0")" && pwd)"
exec "$fuzz_dir/../../scripts/cargo-fuzz-crate" "$fuzz_dir" "$secs"
