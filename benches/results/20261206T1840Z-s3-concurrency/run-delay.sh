#!/bin/bash
# S3 put_batch A/B: old (one PUT after another) vs new (16 in flight); moto on loopback, 256 MiB volume, 64 KiB chunks. Bounded: 2 rounds x 2 CLIs.
set -u
cd /var/tmp/s3ab
/work/main/target/tmp/moto-venv/bin/moto_server -p 29990 > moto.log 2>&1 & moto=$!
/work/main/target/debug/mirrorblkd --export vol0 --data v.img --journal v.journal --size 64M --listen 127.0.0.1:29991 --admin-socket a.sock > d.log 2>&1 & d=$!
for i in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:29990/ && nbdinfo --size nbd://127.0.0.1:29991/vol0 >/dev/null 2>&1 && break; sleep 0.2; done
/work/main/target/debug/delay-proxy 127.0.0.1:29992 127.0.0.1:29990 5 > proxy.log 2>&1 & px=$!
sleep 0.5
curl -s -X PUT http://127.0.0.1:29990/bkt >/dev/null
head -c 67108864 /dev/urandom > fill.bin && nbdcopy fill.bin nbd://127.0.0.1:29991/vol0 && rm fill.bin
export AWS_ENDPOINT=http://127.0.0.1:29992 AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
for r in 1 2; do for b in old new; do
  s=$(date +%s.%N); out=$(timeout 600 /tmp/mb-$b backup create --repo s3://bkt/d$b$r --admin-socket a.sock vol0 --json 2>&1 | tail -1); e=$(date +%s.%N)
  echo "round $r $b: $(echo "$e - $s" | bc) s wall; $out"
done; done
kill $d $moto $px; wait
