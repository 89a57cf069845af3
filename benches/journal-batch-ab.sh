#!/bin/bash
# A/B of two mirrorblkd binaries (e.g. before and after batch headers in the journal):
# one node, no replica, --durability per-write (the default), fio's nbd engine on a fresh
# 1 GiB volume per run: 4k randwrite QD32, 4k randwrite QD1, 1M write QD8. The binaries
# alternate within each round. Besides IOPS, bandwidth and p99 it records the journal bytes
# written per client write (mirrorblk_journal_written_bytes_total, where the binary has it)
# and the daemon's /proc/PID/io write_bytes per client write (journal and store together;
# the store part lags behind, so it is a lower bound).
# Usage: DIR=/tmp/jbab A=path/to/old/mirrorblkd B=path/to/new/mirrorblkd \
#        [RUNTIME=15] [ROUNDS=3] [ONLY=REGEX] [LOCK=/work/notes/bench.lock] benches/journal-batch-ab.sh
# ONLY runs just the jobs whose name matches (e.g. ONLY=qd1).
# Each run holds flock $LOCK (if set) so no two benchmarks overlap. One line per run on
# stdout (tab-separated), fio's JSON and the daemon's log under $DIR/<run>/.
DIR=${DIR:?set DIR}
A=${A:?set A (the old binary)}
B=${B:?set B (the new binary)}
set -u
RUNTIME=${RUNTIME:-15}
ROUNDS=${ROUNDS:-3}
LOCK=${LOCK:-}
mkdir -p "$DIR" || exit 1
. "$(dirname "$0")/lib.sh"
io_written() { awk '/^write_bytes/ {print $2}' "/proc/$1/io"; }
journal_written() { # metrics port → the counter, or -1 without it
  curl -s "http://127.0.0.1:$1/metrics" | awk '/^mirrorblk_journal_written_bytes_total/ {v=$2} END {print (v=="" ? -1 : v)}'
}

run() { # name binary fio-args...
  local name=$1 bin=$2; shift 2
  local d="$DIR/$name" port mport pid
  rm -rf "$d"; mkdir -p "$d"
  port=$(free_port); mport=$(free_port)
  "$bin" --node n1 --export vol0 --data "$d/data" --journal "$d/journal" --size 1G \
    --journal-size 256M --listen "127.0.0.1:$port" --admin-socket "$d/admin" \
    --metrics-listen "127.0.0.1:$mport" --log-level warn 2> "$d/log" &
  pid=$!
  wait_metrics "$mport"
  local io0 j0 io1 j1
  io0=$(io_written $pid); j0=$(journal_written $mport)
  fio --name=b --ioengine=nbd --uri="nbd://127.0.0.1:$port/vol0" --size=1g \
    --time_based --runtime="$RUNTIME" "$@" --output-format=json --output="$d/fio.json" \
    >/dev/null 2>"$d/fio.err"
  # Let the applier catch up, so the metric scrape sees every group commit.
  sleep 1
  io1=$(io_written $pid); j1=$(journal_written $mport)
  kill $pid; wait $pid 2>/dev/null
  python3 - "$name" "$d" "$io0" "$io1" "$j0" "$j1" <<'PY'
import json, sys
n, d = sys.argv[1], sys.argv[2]
io0, io1, j0, j1 = (float(x) for x in sys.argv[3:7])
w = json.load(open(f"{d}/fio.json"))["jobs"][0]["write"]
ios = max(w["total_ios"], 1)
# The counter appears with the first group commit: absent before the run is 0.
journal = f"{(j1 - max(j0, 0)) / ios:.0f}" if j1 >= 0 else "n/a"
print(f"{n}\tIOPS {w['iops']:.0f}\tMiB/s {w['bw_bytes']/2**20:.1f}"
      f"\tp99 {w['clat_ns']['percentile']['99.000000']/1000:.0f}us\twrites {w['total_ios']}"
      f"\tjournal B/write {journal}\tprocess write_bytes/write {(io1 - io0) / ios:.0f}", flush=True)
PY
}

one_run_dispatch "$@"

echo "# load before: $(cat /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
  for job in "4k-randwrite-qd32 --rw=randwrite --bs=4k --iodepth=32" \
             "4k-randwrite-qd1 --rw=randwrite --bs=4k --iodepth=1" \
             "1m-write-qd8 --rw=write --bs=1m --iodepth=8"; do
    set -- $job
    jobname=$1; shift
    [[ "$jobname" =~ ${ONLY:-.} ]] || continue
    for side in A B; do
      bin=$A; [ "$side" = B ] && bin=$B
      locked_run "$jobname-$side-r$r" "$bin" "$@"
    done
  done
  echo "# load after round $r: $(cat /proc/loadavg)"
done
