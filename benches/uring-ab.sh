#!/bin/bash
# A/B of mirrorblkd binaries on system calls and wake-ups per write: one node alone
# (r0) and a primary with one sync replica on loopback (r1), both --durability per-write,
# fio's nbd engine, 4k randwrite at QD32 and QD1, a fresh 1 GiB volume per run. The
# binaries alternate within each round, each round starting one further along the list. Over a window inside fio's measured period it
# counts, per process (all threads), with `perf stat -p`: io_uring_enter calls, SQEs
# (io_uring_submit_req), epoll waits, recvmsg calls, all system calls, context switches,
# and the CPU time from /proc/PID/stat; each divided by the writes fio completed in the
# window (its IOPS times the window).
# Usage: DIR=/tmp/uab BINS="old=path/to/mirrorblkd new=path/to/other/mirrorblkd ..." \
#        [CLI=path/to/mirrorblk] [RUNTIME=12] [ROUNDS=3] [ONLY=REGEX] \
#        [LOCK=/work/notes/bench.lock] benches/uring-ab.sh
# ONLY runs just the runs whose name (job-variant) matches (e.g. ONLY=r1-qd32). Each run holds flock $LOCK
# (if set). One line per run and process on stdout; fio's JSON, perf's counts and the logs
# under $DIR/<run>/.
DIR=${DIR:?set DIR}
BINS=${BINS:?set BINS to "name=path name=path ..."}
set -u
read -r -a VARIANTS <<< "$BINS"
first=${VARIANTS[0]}
CLI=${CLI:-$(dirname "${first#*=}")/mirrorblk}
RUNTIME=${RUNTIME:-12}
ROUNDS=${ROUNDS:-3}
LOCK=${LOCK:-}
RAMP=2
# The counting window: from RAMP+1 s after fio starts, WINDOW seconds (inside its runtime).
WINDOW=$((RUNTIME - 2))
EVENTS=syscalls:sys_enter_io_uring_enter,io_uring:io_uring_submit_req,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_recvmsg,syscalls:sys_enter_sendmsg,syscalls:sys_enter_recvfrom,raw_syscalls:sys_enter,context-switches
mkdir -p "$DIR" || exit 1
[ -f "$DIR/secret" ] || { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DIR/secret"; chmod 600 "$DIR/secret"; }
. "$(dirname "$0")/lib.sh"

run() { # name binary replicas fio-args...
  local name=$1 bin=$2 reps=$3; shift 3
  local d="$DIR/$name" pport mport rport rpid="" ppid
  rm -rf "$d"; mkdir -p "$d"
  pport=$(free_port); mport=$(free_port)
  local peer=()
  if [ "$reps" = 1 ]; then
    rport=$(free_port)
    "$bin" --node n2 --export vol0 --data "$d/r.data" --journal "$d/r.journal" --size 1G \
      --journal-size 256M --listen 127.0.0.1:0 --admin-socket "$d/r.admin" --role replica \
      --replication-listen "127.0.0.1:$rport" --secret-file "$DIR/secret" \
      --log-level warn 2> "$d/r.log" &
    rpid=$!
    sleep 1
    peer=(--role primary --peer "n2=127.0.0.1:$rport" --secret-file "$DIR/secret" --mode sync)
  fi
  "$bin" --node n1 --export vol0 --data "$d/p.data" --journal "$d/p.journal" --size 1G \
    --journal-size 256M --listen "127.0.0.1:$pport" --admin-socket "$d/p.admin" \
    --metrics-listen "127.0.0.1:$mport" "${peer[@]}" --log-level warn 2> "$d/p.log" &
  ppid=$!
  wait_metrics "$mport" || echo "# $name: primary not up" >&2
  if [ "$reps" = 1 ]; then wait_in_sync "$CLI" "$d/p.admin" || echo "# $name: replica not in sync" >&2; fi
  fio --name=b --ioengine=nbd --uri="nbd://127.0.0.1:$pport/vol0" --size=1g \
    --time_based --ramp_time=$RAMP --runtime="$RUNTIME" "$@" --output-format=json \
    --output="$d/fio.json" >/dev/null 2>"$d/fio.err" &
  local fpid=$!
  sleep $((RAMP + 1))
  local pids=("p:$ppid") t0=() t1=() perfs=() p
  [ -n "$rpid" ] && pids+=("r:$rpid")
  for p in "${pids[@]}"; do
    t0+=("$(ticks "${p#*:}")")
    perf stat -x, -e "$EVENTS" -p "${p#*:}" -o "$d/perf-${p%%:*}.csv" -- sleep "$WINDOW" 2>/dev/null &
    perfs+=($!)
  done
  wait "${perfs[@]}"
  for p in "${pids[@]}"; do t1+=("$(ticks "${p#*:}")"); done
  wait $fpid
  kill $ppid $rpid 2>/dev/null; wait $ppid $rpid 2>/dev/null
  # Keep the logs and counts, not the 1 GiB volumes.
  rm -f "$d"/*.data "$d"/*.journal "$d"/*.data.* "$d"/*.journal.*
  local i=0
  for p in "${pids[@]}"; do
    python3 - "$name" "${p%%:*}" "$d" "$((t1[i] - t0[i]))" "$WINDOW" <<'PY'
import json, sys
name, who, d, ticks, win = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
w = json.load(open(f"{d}/fio.json"))["jobs"][0]["write"]
writes = w["iops"] * win
counts = {}
for line in open(f"{d}/perf-{who}.csv"):
    f = line.strip().split(",")
    if len(f) > 2 and f[0].replace(".", "").isdigit():
        counts[f[2]] = float(f[0])
def per(ev):
    return counts.get(ev, 0) / max(writes, 1)
cpu = ticks / 100.0
bytes_ = w["bw_bytes"] * win
print(f"{name}\t{who}\tIOPS {w['iops']:.0f}\tp99 {w['clat_ns']['percentile']['99.000000']/1000:.0f}us"
      f"\tcpu {cpu:.2f}s\tcpu/GiB {cpu / max(bytes_ / 2**30, 1e-9):.1f}"
      f"\tenter/w {per('syscalls:sys_enter_io_uring_enter'):.2f}"
      f"\tsqe/w {per('io_uring:io_uring_submit_req'):.2f}"
      f"\tepoll/w {per('syscalls:sys_enter_epoll_wait') + per('syscalls:sys_enter_epoll_pwait'):.2f}"
      f"\trecv/w {per('syscalls:sys_enter_recvmsg') + per('syscalls:sys_enter_recvfrom'):.2f}"
      f"\tsendmsg/w {per('syscalls:sys_enter_sendmsg'):.2f}"
      f"\tsyscalls/w {per('raw_syscalls:sys_enter'):.2f}"
      f"\tcs/w {per('context-switches'):.2f}", flush=True)
PY
    i=$((i + 1))
  done
}

one_run_dispatch "$@"

echo "# load before: $(cat /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
  for job in "r1-qd32 1 --rw=randwrite --bs=4k --iodepth=32" \
             "r0-qd32 0 --rw=randwrite --bs=4k --iodepth=32" \
             "r1-qd1 1 --rw=randwrite --bs=4k --iodepth=1" \
             "r0-qd1 0 --rw=randwrite --bs=4k --iodepth=1"; do
    set -- $job
    jobname=$1 reps=$2; shift 2
    n=${#VARIANTS[@]}
    for k in $(seq 0 $((n - 1))); do
      v=${VARIANTS[$(( (k + r - 1) % n ))]}
      [[ "$jobname-${v%%=*}" =~ ${ONLY:-.} ]] || continue
      locked_run "$jobname-${v%%=*}-r$r" "${v#*=}" "$reps" "$@"
    done
  done
  echo "# load after round $r: $(cat /proc/loadavg)"
done
