#!/bin/bash
# usage: prof.sh BINDIR OUT  — perf of one full backup
set -eu
B=$1; OUT=$2; DIR=/var/tmp/bkprof/run; PORT=22813
rm -rf $DIR; mkdir -p $DIR
$B/mirrorblkd --export vol0 --data $DIR/d.img --journal $DIR/j.img --size 1G --journal-size 256M --listen 127.0.0.1:$PORT --admin-socket $DIR/admin.sock --log-level warn 2>$DIR/d.log &
PID=$!
trap 'kill $PID; wait $PID 2>/dev/null' EXIT
for _ in $(seq 100); do [ -S $DIR/admin.sock ] && break; sleep 0.1; done
timeout 300 fio --name=fill --ioengine=nbd --uri=nbd://127.0.0.1:$PORT/vol0 --rw=write --bs=1m --iodepth=8 --size=1g --refill_buffers --output=/dev/null
sync; echo 3 >/proc/sys/vm/drop_caches
timeout 300 perf record -o $OUT -g -a -- $B/mirrorblk backup create --admin-socket $DIR/admin.sock --repo $DIR/repo vol0 --json 2>&1 | grep seconds
