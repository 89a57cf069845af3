#!/bin/bash
# A/B of mirrorblkd binaries on one volume served by several cores: one node, no replica,
# a 1 GiB volume (--durability per-write, page-cache reads as by default), fio's nbd engine.
# Runs, each fio run RUNTIME s after RAMP s:
#   rr-j1   4k randread QD32, one job (one connection)
#   rr-j2   4k randread QD32, two jobs (numjobs=2: a connection each), IOPS summed
#   copy    nbdcopy -C 4 of the whole volume to null: (wall seconds, MiB/s)
#   rw-j2   4k randwrite QD32, two jobs (the cost of forwarding writes to the home core)
# Each binary gets a fresh volume per round (written once with nbdcopy so reads hit data),
# and its runs go back to back; binaries alternate within a round, each round starting one
# further along the list. The daemon's CPU seconds over each run come from /proc/PID/stat.
# Usage: DIR=/tmp/mcab BINS="old=path/to/mirrorblkd new=path/to/mirrorblkd new1=path:--cores=1 ..." \
#        [RUNTIME=10] [ROUNDS=3] [LOCK=/work/notes/bench.lock] benches/multicore-ab.sh
# A binary's path may carry extra daemon flags after ':' (commas for spaces). Each run holds
# flock $LOCK (if set). One line per run on stdout (with the load average); fio's JSON and
# the daemon's log under $DIR/<run>/.
DIR=${DIR:?set DIR}
BINS=${BINS:?set BINS to "name=path[:flags] ..."}
set -u
read -r -a VARIANTS <<< "$BINS"
RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-3}
LOCK=${LOCK:-}
RAMP=2
mkdir -p "$DIR" || exit 1
. "$(dirname "$0")/lib.sh"
load() { cut -d' ' -f1-3 /proc/loadavg; }

# fio's IOPS summed over its jobs (group reporting off): $1 json, $2 read|write.
iops() {
  python3 -c 'import json,sys
j=json.load(open(sys.argv[1])); print("%.0f" % sum(x[sys.argv[2]]["iops"] for x in j["jobs"]))' "$1" "$2"
}

# One measured step of a running daemon: $1 run dir, $2 step, $3 pid, $4 port, then what.
step() {
  local d=$1 s=$2 pid=$3 port=$4; shift 4
  local t0 t1 w0 w1 out
  t0=$(ticks "$pid"); w0=$(date +%s.%N)
  case $s in
    copy)
      nbdcopy -C 4 "nbd://127.0.0.1:$port/vol0" null: 2>"$d/$s.err"
      w1=$(date +%s.%N)
      out=$(python3 -c "import sys; w=float(sys.argv[2])-float(sys.argv[1]); print('%.2fs %.0fMiB/s' % (w, 1024/w))" "$w0" "$w1");;
    *)
      local rw=randread kind=read jobs=1
      case $s in rr-j2) jobs=2;; rw-j2) rw=randwrite kind=write jobs=2;; esac
      fio --name=b --ioengine=nbd --uri="nbd://127.0.0.1:$port/vol0" --size=1g --rw=$rw --bs=4k \
        --iodepth=32 --numjobs=$jobs --time_based --ramp_time=$RAMP --runtime="$RUNTIME" \
        --output-format=json --output="$d/$s.json" >/dev/null 2>"$d/$s.err"
      out="IOPS $(iops "$d/$s.json" $kind)";;
  esac
  t1=$(ticks "$pid")
  echo "$out cpu $(python3 -c "print('%.2fs' % ((int('$t1')-int('$t0'))/100))")"
}

run() { # name binary[:flags]
  local name=$1 spec=$2
  local bin=${spec%%:*} flags=""
  [ "$bin" != "$spec" ] && flags=${spec#*:}
  local d="$DIR/$name" port mport pid s
  rm -rf "$d"; mkdir -p "$d"
  port=$(free_port); mport=$(free_port)
  # shellcheck disable=SC2086
  "$bin" --node n1 --export vol0 --data "$d/v.data" --journal "$d/v.journal" --size 1G \
    --journal-size 256M --listen "127.0.0.1:$port" --admin-socket "$d/admin" \
    --metrics-listen "127.0.0.1:$mport" --log-level warn ${flags//,/ } 2> "$d/log" &
  pid=$!
  wait_metrics "$mport" || echo "# $name: not up" >&2
  # Data everywhere (not zeroes a page-cache read would find the same way either way).
  head -c 1G /dev/urandom > "$d/img" && nbdcopy -C 4 "$d/img" "nbd://127.0.0.1:$port/vol0"
  rm -f "$d/img"
  for s in rr-j1 rr-j2 copy rw-j2; do
    echo -e "$name\t$s\t$(step "$d" "$s" "$pid" "$port")\tload $(load)"
  done
  curl -s "http://127.0.0.1:$mport/metrics" | grep -E '^mirrorblk_(satellite_local_reads|forwarded_requests|payload_copies)_total' > "$d/metrics"
  kill "$pid"; wait "$pid" 2>/dev/null
  rm -f "$d/v.data" "$d/v.journal" "$d"/*.data.* "$d"/*.journal.*
}

one_run_dispatch "$@"

echo "# load before: $(load)"
for r in $(seq 1 "$ROUNDS"); do
  n=${#VARIANTS[@]}
  for k in $(seq 0 $((n - 1))); do
    v=${VARIANTS[$(( (k + r - 1) % n ))]}
    locked_run "${v%%=*}-r$r" "${v#*=}"
  done
  echo "# load after round $r: $(load)"
done
