#!/bin/bash
set -eu
D=/var/tmp/cs-strace; rm -rf $D; mkdir -p $D
/work/chunksize-bin/mirrorblkd --export vol0 --data $D/d.img --journal $D/j.img --size 256M --journal-size 64M \
  --listen 127.0.0.1:22843 --admin-socket $D/admin.sock --log-level warn 2>$D/d.log &
PID=$!
trap 'kill $PID; wait $PID 2>/dev/null' EXIT
for _ in $(seq 100); do [ -S $D/admin.sock ] && break; sleep 0.1; done
timeout 120 fio --name=fill --ioengine=nbd --uri=nbd://127.0.0.1:22843/vol0 --rw=write --bs=1m --iodepth=8 --size=256m --refill_buffers --output=/dev/null
for v in file base filesystem; do
  rm -rf $D/repo; mkdir -p $D/repo; echo '{"version":1,"chunk_size":65536,"compress":true}' > $D/repo/mirrorblk-backup.json
  CLI=/work/chunksize-bin/mirrorblk-next; [ $v = base ] && CLI=/work/chunksize-bin/mirrorblk-base
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(date +%s.%N)
  MIRRORBLK_BACKUP_SYNC_LEVEL=$([ $v = base ] && echo filesystem || echo $v) timeout 300 strace -f -c -o $D/strace-$v.txt -e trace=fsync,fdatasync,syncfs,mkdir,rename,openat,utimensat,write \
    $CLI backup create --admin-socket $D/admin.sock --repo $D/repo vol0 --json
  echo "$v wall $(echo "$(date +%s.%N) - $t0" | bc)"
  head -20 $D/strace-$v.txt
done
