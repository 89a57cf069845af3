#!/bin/bash
# 4k randwrite QD32 with every file on tmpfs: mirrorblk (both modes) vs nbdkit-file, 3 rounds.
D=/mnt/tmpab; B=/work/rel-target/release/mirrorblkd
fiorun() { timeout 60 fio --name=w --ioengine=nbd --uri=$1 --rw=randwrite --bs=4k --iodepth=32 --size=1g --time_based --runtime=8 --ramp_time=2 --output-format=json 2>/dev/null | python3 -c 'import json,sys; d=(lambda t: json.loads(t[t.index("{"):]))(sys.stdin.read()); print(round(d["jobs"][0]["write"]["iops"]))'; }
for r in 1 2 3; do
 for t in nbdkit mb mbflush; do
  rm -f $D/*; port=$((24000+RANDOM%1000))
  case $t in
   nbdkit) truncate -s 1G $D/img; nbdkit -f -p $port -i 127.0.0.1 file $D/img & pid=$!; uri=nbd://127.0.0.1:$port ;;
   mb|mbflush) dur=per-write; [ $t = mbflush ] && dur=flush
     $B --export vol0 --data $D/img --journal $D/j --size 1G --journal-size 256M --listen 127.0.0.1:$port --admin-socket $D/adm --event-log $D/ev --durability $dur --log-level warn 2>$D/log & pid=$!; uri=nbd://127.0.0.1:$port/vol0 ;;
  esac
  for i in $(seq 50); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  timeout 60 fio --name=f --ioengine=nbd --uri=$uri --rw=write --bs=1m --iodepth=8 --size=1g --output=/dev/null 2>/dev/null
  t0=$(awk '{print $14+$15}' /proc/$pid/stat)
  iops=$(fiorun $uri)
  t1=$(awk '{print $14+$15}' /proc/$pid/stat)
  echo "r$r $t iops $iops cpu_s $(( (t1-t0) ))cs load $(cut -d' ' -f1 /proc/loadavg)"
  kill $pid; wait $pid 2>/dev/null
 done
done
rm -f $D/*
