#!/bin/bash
# Group commits, device flushes and IOPS per binary (flush mode), bounded: 3 binaries x 3 jobs x 2 rounds.
set -u
dir=/var/tmp/ab3; rm -rf $dir; mkdir -p $dir
flushes() { awk '{print $16}' /sys/block/vda/stat; }
for rep in 1 2; do
for bin in 98e0850 0839aec inflight1; do
for job in nofsync fsync32 1m; do
  rm -f $dir/v.img $dir/v.journal
  /work/rel-target/mirrorblkd-$bin --export vol0 --data $dir/v.img --journal $dir/v.journal --size 1073741824 --preallocate full --listen 127.0.0.1:29997 --metrics-listen 127.0.0.1:29996 --durability flush > $dir/d.log 2>&1 &
  pid=$!
  for i in $(seq 1 100); do nbdinfo --size nbd://127.0.0.1:29997/vol0 >/dev/null 2>&1 && break; sleep 0.1; done
  case $job in
    nofsync) extra="--bs=4k --rw=randwrite --iodepth=32 --size=256M";;
    fsync32) extra="--bs=4k --rw=randwrite --iodepth=32 --size=256M --fsync=32";;
    1m) extra="--bs=1M --rw=write --iodepth=8 --size=1G";;
  esac
  f0=$(flushes)
  out=$(timeout 120 fio --name=j --ioengine=nbd --uri=nbd://127.0.0.1:29997/vol0 $extra --output-format=json 2>/dev/null | sed -n "/^{/,\$p")
  f1=$(flushes)
  commits=$(curl -s 127.0.0.1:29996/metrics | awk '/^mirrorblk_journal_batch_records_count/{print $2}')
  kill $pid; wait $pid 2>/dev/null
  echo "$out" | python3 -c "
import json,sys; j=json.load(sys.stdin)['jobs'][0]['write']
n=j['total_ios']; print('$rep %-9s %-7s ios=%d iops=%.0f MiBps=%.0f flushes_per_1k=%.1f records_per_commit=%.2f' % ('$bin','$job', n, j['iops'], j['bw']/1024, ($f1-$f0)*1000.0/max(n,1), n/max(float('${commits:-0}'),1)))"
done; done; done
rm -rf $dir
