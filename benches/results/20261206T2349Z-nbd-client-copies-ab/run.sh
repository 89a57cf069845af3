#!/bin/bash
# A/B of the backup CLI: old (eeebf32) vs new (NBD client without copies), same daemon.
set -u
OUT=/work/ab/out; mkdir -p $OUT
for round in 1 2; do
  for v in new old; do
    export REAL_CLI=/work/ab/mirrorblk.$v CPU_LOG=$OUT/cpu-$v-$round.txt
    rm -f $CPU_LOG
    flock /work/notes/bench.lock env DIR=/var/tmp/bkab MIRRORBLKD=/work/ab/mirrorblkd MIRRORBLK=/work/ab/timed.sh \
      timeout 900 bash /work/wt-lead/benches/backup-bench.sh > $OUT/bench-$v-$round.txt 2>&1
    echo "$v $round rc=$?" >> $OUT/status
  done
done
rm -rf /var/tmp/bkab
echo done >> $OUT/status
