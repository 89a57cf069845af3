#!/bin/bash
# A/B of mirrorblkd binaries on 4k writes in both durability modes: one node, no replica,
# fio's nbd engine on a fresh 1 GiB volume per run (256M journal), 4k randwrite QD32:
#   flush          --durability flush, no client flushes
#   flush-fsync32  --durability flush, a FLUSH every 32 writes (--fsync=32)
#   perwrite       --durability per-write
# The binaries alternate within each round, each round starting one further along the list.
# Per run: IOPS, p99, the daemon's CPU (seconds and per GiB written, over fio's ramp and
# runtime), the load average before it, and from the daemon's metrics over the same span:
# journal fdatasyncs per second (mirrorblk_journal_syncs_total), the applier's own asks per
# second by reason (mirrorblk_applier_sync_asks_total; "-" for binaries without it) and the
# mean group commit (mirrorblk_journal_commit_seconds).
# Usage: DIR=/var/tmp/fpab BINS="old=path/to/mirrorblkd new=path/to/other/mirrorblkd" \
#        [RUNTIME=15] [ROUNDS=3] [ONLY=REGEX] [LOCK=/work/notes/bench.lock] benches/flushpool-ab.sh
# ONLY runs just the runs whose name (job-variant) matches. Each run holds flock $LOCK (if
# set). One line per run on stdout; fio's JSON, the metrics before and after, and the log
# under $DIR/<run>/ (the volume files are deleted after each run).
DIR=${DIR:?set DIR}
BINS=${BINS:?set BINS to "name=path name=path ..."}
set -u
read -r -a VARIANTS <<< "$BINS"
RUNTIME=${RUNTIME:-15}
ROUNDS=${ROUNDS:-3}
LOCK=${LOCK:-}
RAMP=2
mkdir -p "$DIR" || exit 1
. "$(dirname "$0")/lib.sh"

run() { # name binary durability fio-args...
  local name=$1 bin=$2 dur=$3; shift 3
  local d="$DIR/$name" port mport pid load t0 t1 c0 c1
  rm -rf "$d"; mkdir -p "$d"
  port=$(free_port); mport=$(free_port)
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  "$bin" --node n1 --export vol0 --data "$d/data" --journal "$d/journal" --size 1G \
    --journal-size 256M --listen "127.0.0.1:$port" --admin-socket "$d/admin" \
    --metrics-listen "127.0.0.1:$mport" --durability "$dur" --log-level warn 2> "$d/log" &
  pid=$!
  wait_metrics "$mport" || echo "# $name: daemon not up" >&2
  scrape_metrics "$mport" "$d/metrics.before"
  c0=$(ticks $pid); t0=$(date +%s.%N)
  fio --name=b --ioengine=nbd --uri="nbd://127.0.0.1:$port/vol0" --size=1g --rw=randwrite \
    --bs=4k --iodepth=32 --time_based --ramp_time=$RAMP --runtime="$RUNTIME" "$@" \
    --output-format=json --output="$d/fio.json" >/dev/null 2>"$d/fio.err"
  t1=$(date +%s.%N); c1=$(ticks $pid)
  scrape_metrics "$mport" "$d/metrics.after"
  kill $pid; wait $pid 2>/dev/null
  rm -f "$d/data" "$d/journal" "$d"/data.* "$d"/journal.*
  python3 - "$name" "$d" "$((c1 - c0))" "$t0" "$t1" "$load" <<'PY'
import json, re, sys
name, d, ticks, t0, t1, load = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
span = t1 - t0
def metrics(path):
    out = {}
    for line in open(path):
        m = re.match(r'^([a-z_]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$', line.strip())
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out
a, b = metrics(f"{d}/metrics.before"), metrics(f"{d}/metrics.after")
def delta(name, label=""):
    keys = [k for k in b if k[0] == name and label in k[1]]
    return sum(b[k] - a.get(k, 0.0) for k in keys) if keys else None
w = json.load(open(f"{d}/fio.json"))["jobs"][0]["write"]
gib = w["io_bytes"] / 2**30
cpu = ticks / 100.0
syncs = delta("mirrorblk_journal_syncs_total")
has_asks = any(k[0] == "mirrorblk_applier_sync_asks_total" for k in b)
asks = []
for why in ("interval", "buffers", "starved", "journal"):
    v = delta("mirrorblk_applier_sync_asks_total", f'reason="{why}"')
    asks.append(f"{why} {(v or 0.0) / span:.1f}" if has_asks else f"{why} -")
csum, ccount = delta("mirrorblk_journal_commit_seconds_sum"), delta("mirrorblk_journal_commit_seconds_count")
commit = f"{csum / ccount * 1e3:.2f}ms" if csum is not None and ccount else "-"
print(f"{name}\tIOPS {w['iops']:.0f}\tp99 {w['clat_ns']['percentile']['99.000000']/1000:.0f}us"
      f"\tcpu {cpu:.1f}s\tcpu/GiB {cpu / max(gib, 1e-9):.1f}"
      f"\tsyncs/s {syncs / span if syncs is not None else 0:.1f}\tasks/s {', '.join(asks)}"
      f"\tcommit {commit}\tload {load}", flush=True)
PY
}

one_run_dispatch "$@"

echo "# load before: $(cat /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
  for job in "flush flush" "flush-fsync32 flush --fsync=32" "perwrite per-write"; do
    set -- $job
    jobname=$1 dur=$2; shift 2
    n=${#VARIANTS[@]}
    for k in $(seq 0 $((n - 1))); do
      v=${VARIANTS[$(( (k + r - 1) % n ))]}
      [[ "$jobname-${v%%=*}" =~ ${ONLY:-.} ]] || continue
      locked_run "$jobname-${v%%=*}-r$r" "${v#*=}" "$dur" "$@"
    done
  done
  echo "# load after round $r: $(cat /proc/loadavg)"
done
