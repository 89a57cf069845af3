#!/bin/bash
# A/B: in-place intents on a single node (mbd-old: intents only with replicas; mbd-new: always).
set -u
D=/var/tmp/intent-ab
for round in 1 2 3; do
  for v in old new; do
    rm -f $D/d.img $D/j.img $D/j.img.*
    /tmp/mbd-$v --export vol0 --data $D/d.img --journal $D/j.img --size 1G --journal-size 256M \
      --listen 127.0.0.1:22990 --log-level warn 2>$D/$v.log &
    pid=$!
    for _ in $(seq 600); do (echo > /dev/tcp/127.0.0.1/22990) 2>/dev/null && break; sleep 0.1; done
    for job in "write 1m 8" "randwrite 4k 32"; do
      set -- $job
      bw=$(timeout 60 fio --name=ab --ioengine=nbd --uri=nbd://127.0.0.1:22990/vol0 --rw=$1 --bs=$2 --iodepth=$3 \
        --size=1g --runtime=6 --time_based --output-format=json 2>&1 | python3 /var/tmp/intent-ab/parse.py)
      echo "round $round $v $1 $2 qd$3: $bw load $(cut -d' ' -f1 /proc/loadavg)"
    done
    kill $pid; wait $pid 2>/dev/null
  done
done
