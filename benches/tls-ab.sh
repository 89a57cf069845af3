#!/bin/bash
# A/B: clear-text vs TLS NBD on one release mirrorblkd (--tls on), interleaved rounds.
# Usage: DIR=/tmp/tlsbench benches/tls-ab.sh  (DIR holds pki/ from `mirrorblk certs init DIR/pki`;
# fio with its nbd engine and libnbd built with GnuTLS). Prints one line per run.
DIR=${DIR:?set DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$DIR" || exit 1
set -u
BIN=${MIRRORBLKD:-$ROOT/target/release/mirrorblkd}
PORT=22809
$BIN --export vol0 --data $DIR/d.img --journal $DIR/j.img --size 1G --journal-size 256M \
  --listen 127.0.0.1:$PORT --tls on --tls-certificates $DIR/pki --log-level warn 2> d.log &
PID=$!
sleep 4
ticks() { awk '{print $14+$15}' /proc/$PID/stat; }
job() { # name uri rw bs qd
  local t0=$(ticks)
  fio --name=b --ioengine=nbd --uri="$2" --rw=$3 --bs=$4 --iodepth=$5 --size=1g --time_based --ramp_time=1 --runtime=5 \
      --output-format=json --output=$DIR/$1.json >/dev/null 2>&1
  local t1=$(ticks)
  python3 - "$1" "$t0" "$t1" "$DIR" <<'PY'
import json,sys
n,t0,t1,d=sys.argv[1],int(sys.argv[2]),int(sys.argv[3]),sys.argv[4]
j=json.load(open(f"{d}/{n}.json"))["jobs"][0]
w=j["write"]; gib=w["io_bytes"]/2**30
# io_bytes excludes the ramp; CPU includes it: per GiB of everything written is approximated by runtime share
cpu=(t1-t0)/100.0
print(f"{n}\tIOPS {w['iops']:.0f}\tMiB/s {w['bw']/1024:.0f}\tp99 {w['clat_ns']['percentile']['99.000000']/1000:.0f}us\tcpu {cpu:.2f}s\tGiB {gib:.2f}\tcpu/GiB {cpu/max(gib,1e-9)*5/6:.2f}")
PY
}
for r in 1 2 3; do
  job clear-4k-r$r "nbd://127.0.0.1:$PORT/vol0" randwrite 4k 32
  job tls-4k-r$r "nbds://127.0.0.1:$PORT/vol0?tls-verify-peer=false" randwrite 4k 32
  job clear-1m-r$r "nbd://127.0.0.1:$PORT/vol0" write 1m 8
  job tls-1m-r$r "nbds://127.0.0.1:$PORT/vol0?tls-verify-peer=false" write 1m 8
done
kill $PID; wait $PID
