set -e
DIR=/var/tmp/bkst; rm -rf $DIR; mkdir -p $DIR; rm -rf $DIR/repo
B=/work/rel-target/release
$B/mirrorblkd --export vol0 --data $DIR/d.img --journal $DIR/j.img --size 1G --journal-size 256M --listen 127.0.0.1:22813 --admin-socket $DIR/admin.sock --log-level warn 2>$DIR/d.log &
PID=$!
trap 'kill $PID; wait $PID' EXIT
for _ in $(seq 100); do [ -S $DIR/admin.sock ] && break; sleep 0.1; done
timeout 300 fio --name=fill --ioengine=nbd --uri=nbd://127.0.0.1:22813/vol0 --rw=write --bs=1m --iodepth=8 --size=1g --refill_buffers --output=/dev/null
for i in 1 2 3 4; do for v in new old; do
[ $v = new ] && CLI=/work/rel-target-bkpipe/release/mirrorblk || CLI=$B/mirrorblk
rm -rf $DIR/repo; sync; echo 3 >/proc/sys/vm/drop_caches
echo "$v $i load $(cut -d' ' -f1 /proc/loadavg) $(/usr/bin/time -f '%e wall %U user %S sys' $CLI backup create --admin-socket $DIR/admin.sock --repo $DIR/repo vol0 --json 2>&1 | grep wall)"
done; done
