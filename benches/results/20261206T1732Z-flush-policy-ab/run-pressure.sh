#!/bin/bash
# Device cache flushes per 4k write, old vs new flush-mode policy (bounded: 2 binaries x 3 jobs x 2 reps, 64Ki writes each).
set -u
dir=/var/tmp/ab2; rm -rf $dir; mkdir -p $dir
flushes() { awk '{print $16}' /sys/block/vda/stat; }
for rep in 1 2; do
for v in 98e0850:2 exp:2 exp:4 exp:8 exp:16; do bin=${v%%:*}; div=${v##*:}
for job in nofsync fsync32; do
  rm -f $dir/v.img $dir/v.journal
  port=$((20000 + RANDOM % 20000))
  MB_PRESSURE_DIV=$div /work/rel-target/mirrorblkd-$bin --export vol0 --data $dir/v.img --journal $dir/v.journal --size 1073741824 --preallocate full --listen 127.0.0.1:$port --durability flush > $dir/d.log 2>&1 &
  pid=$!
  for i in $(seq 1 100); do nbdinfo --size nbd://127.0.0.1:$port/vol0 >/dev/null 2>&1 && break; sleep 0.1; done
  case $job in
    nofsync) extra="--bs=4k --rw=randwrite --iodepth=32 --size=256M";;
    fsync32) extra="--bs=4k --rw=randwrite --iodepth=32 --size=256M --fsync=32";;
    1m) extra="--bs=1M --rw=write --iodepth=8 --size=1G";;
  esac
  f0=$(flushes)
  out=$(timeout 120 fio --name=j --ioengine=nbd --uri=nbd://127.0.0.1:$port/vol0 $extra --output-format=json 2>/dev/null | sed -n "/^{/,\$p")
  f1=$(flushes)
  kill $pid; wait $pid 2>/dev/null
  echo "$out" | python3 -c "
import json,sys; j=json.load(sys.stdin)['jobs'][0]['write']
n=j['total_ios']; print('$rep $bin div=$div $job ios=%d iops=%.0f MiBps=%.0f flushes=%d flushes_per_1k_writes=%.1f' % (n, j['iops'], j['bw']/1024, $f1-$f0, ($f1-$f0)*1000.0/max(n,1)))"
done; done; done
rm -rf $dir
