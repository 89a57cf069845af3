#!/bin/bash
# A/B: --durability per-write vs flush with 1 replica, replication mode sync, both nodes
# on loopback and in the same durability; fio's nbd engine, 4k randwrite QD32 without and
# with a FLUSH every 32 writes (--fsync=32). Interleaved rounds, fresh volumes per run.
# Usage: DIR=/tmp/frbench [MIRRORBLKD=...] [MIRRORBLK=...] [RUNTIME=20] [ROUNDS=2] \
#        benches/flush-replication-ab.sh
# Prints one line per run: IOPS, p99, CPU seconds of primary + replica and per GiB.
DIR=${DIR:?set DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
set -u
BIN=${MIRRORBLKD:-$ROOT/target/release/mirrorblkd}
CLI=${MIRRORBLK:-$(dirname "$BIN")/mirrorblk}
RUNTIME=${RUNTIME:-20}
ROUNDS=${ROUNDS:-2}
mkdir -p "$DIR" || exit 1
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DIR/secret"
chmod 600 "$DIR/secret"
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

run() { # name durability fio-extra...
  local name=$1 dur=$2; shift 2
  local d="$DIR/$name" rport pport
  rm -rf "$d"; mkdir -p "$d"
  rport=$(free_port); pport=$(free_port)
  "$BIN" --node n2 --export vol0 --data "$d/r.data" --journal "$d/r.journal" --size 1G \
    --journal-size 256M --listen 127.0.0.1:0 --admin-socket "$d/r.admin" --role replica \
    --replication-listen "127.0.0.1:$rport" --secret-file "$DIR/secret" --durability "$dur" \
    --log-level warn 2> "$d/r.log" &
  local rpid=$!
  sleep 1
  "$BIN" --node n1 --export vol0 --data "$d/p.data" --journal "$d/p.journal" --size 1G \
    --journal-size 256M --listen "127.0.0.1:$pport" --admin-socket "$d/p.admin" --role primary \
    --peer "n2=127.0.0.1:$rport" --secret-file "$DIR/secret" --mode sync --durability "$dur" \
    --log-level warn 2> "$d/p.log" &
  local ppid=$!
  local i
  for i in $(seq 1 120); do
    "$CLI" --admin-socket "$d/p.admin" status --json 2>/dev/null \
      | python3 -c 'import json,sys
v=json.load(sys.stdin); v=v["volumes"][0] if "volumes" in v else v
r=v.get("replicas",[])
sys.exit(0 if r and all(x.get("state")=="in-sync" and not x.get("resync") for x in r) else 1)' 2>/dev/null && break
    sleep 0.5
  done
  local t0p t0r t1p t1r
  t0p=$(ticks $ppid); t0r=$(ticks $rpid)
  fio --name=b --ioengine=nbd --uri="nbd://127.0.0.1:$pport/vol0" --rw=randwrite --bs=4k \
    --iodepth=32 --size=1g --time_based --ramp_time=2 --runtime="$RUNTIME" "$@" \
    --output-format=json --output="$d/fio.json" >/dev/null 2>&1
  t1p=$(ticks $ppid); t1r=$(ticks $rpid)
  kill $ppid $rpid; wait $ppid $rpid 2>/dev/null
  python3 - "$name" "$d" $((t1p - t0p)) $((t1r - t0r)) "$RUNTIME" <<'PY'
import json, sys
n, d, tp, tr, rt = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
w = json.load(open(f"{d}/fio.json"))["jobs"][0]["write"]
gib = w["io_bytes"] / 2**30
cpu = (tp + tr) / 100.0
# CPU covers the ramp too: scale to the measured window.
cpu_win = cpu * rt / (rt + 2)
print(f"{n}\tIOPS {w['iops']:.0f}\tp99 {w['clat_ns']['percentile']['99.000000']/1000:.0f}us"
      f"\tcpu p+r {cpu_win:.1f}s (replica {tr/100*rt/(rt+2):.1f}s)\tcpu/GiB {cpu_win/max(gib,1e-9):.1f}")
PY
}

for r in $(seq 1 "$ROUNDS"); do
  for dur in per-write flush; do
    run "r1-sync-$dur-qd32-r$r" "$dur"
    run "r1-sync-$dur-qd32-fsync32-r$r" "$dur" --fsync=32
  done
done
