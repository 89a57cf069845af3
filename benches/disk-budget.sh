#!/bin/bash
# What the disk allows a durable-per-write server, measured with fio alone (no server):
#   1. one O_DSYNC write at QD1 of 4 KiB (a raw write) against 8 KiB (a journal batch of one:
#      header block + payload) and 4.5 KiB (what a 512-byte header would cost), with the device's
#      FUA support (without FUA every O_DSYNC write is a write and a cache flush);
#   2. the device's write-op budget at depth: group commits as mirrorblk writes them at 4k QD32
#      (36 KiB O_DSYNC sequential writes: 8 records and their header, 2 in flight) alone, then
#      beside plain O_DIRECT 4 KiB random writes at a fixed rate (the applier's in-place writes,
#      one per record), against raw-dsync's 4 KiB QD32.
# Usage: DIR=/var/tmp/disk-budget [RUNTIME=6] [ROUNDS=2] benches/disk-budget.sh
# Bounded: every fio run has a runtime and a timeout; the files are removed at the end.
set -eu
DIR=${DIR:?set DIR}
RUNTIME=${RUNTIME:-6}
ROUNDS=${ROUNDS:-2}
mkdir -p "$DIR"
trap 'rm -f "$DIR/journal.img" "$DIR/store.img" "$DIR/out.json"' EXIT
dev=$(findmnt -n -o SOURCE --target "$DIR" | sed 's#/dev/##; s#[0-9]*$##')
echo "device $dev fua $(cat /sys/block/$dev/queue/fua 2>/dev/null || echo ?) write_cache $(cat /sys/block/$dev/queue/write_cache 2>/dev/null || echo ?)"
# Written through once, so no run pays for unwritten extents.
for f in journal store; do
    dd if=/dev/zero of="$DIR/$f.img" bs=1M count=1024 oflag=direct status=none
done
# The host writes those 2 GiB back too: the first runs would measure that.
sync
sleep 10
# job NAME FILE RW BS DEPTH [EXTRA...]: fio job arguments, O_DIRECT on io_uring.
job() {
    local name=$1 file=$2 rw=$3 bs=$4 depth=$5; shift 5
    echo --name="$name" --ioengine=io_uring --direct=1 --filename="$DIR/$file" --rw="$rw" \
        --bs="$bs" --iodepth="$depth" --size=1g --time_based --runtime="$RUNTIME" "$@"
}
# report LABEL: one line per fio job of the last run: IOPS, mean and p50 latency (µs).
report() {
    python3 - "$1" "$DIR/out.json" <<'EOF'
import json, sys
label, path = sys.argv[1], sys.argv[2]
for j in json.load(open(path))["jobs"]:
    w = j["write"]
    print(f"{label:32} {j['jobname']:8} iops {w['iops']:8.0f}  mean {w['clat_ns']['mean']/1000:6.0f} us"
          f"  p50 {w['clat_ns']['percentile']['50.000000']/1000:6.0f} us")
EOF
}
run() {
    local label=$1; shift
    # shellcheck disable=SC2046
    timeout $((RUNTIME * 3 + 30)) fio --output-format=json --output="$DIR/out.json" "$@" >/dev/null
    report "$label"
}
for round in $(seq "$ROUNDS"); do
    echo "round $round, load $(cut -d' ' -f1-3 /proc/loadavg)"
    for bs in 4k 4608 8k; do
        run "qd1 dsync $bs" $(job dsync journal randwrite "$bs" 1 --sync=dsync)
    done
    run "raw-dsync 4k qd32" $(job dsync journal randwrite 4k 32 --sync=dsync)
    run "commits alone" $(job commit journal write 36k 2 --sync=dsync)
    for rate in 20000 30000; do
        run "commits + in-place at $rate/s" $(job commit journal write 36k 2 --sync=dsync) \
            $(job apply store randwrite 4k 8 --rate_iops="$rate")
    done
done
