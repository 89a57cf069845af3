#!/bin/bash
# A/B/C: main's binaries (old), packs stored in place (new, the packs branch without the store thread),
# packs stored on a thread while the next fills (new2), rotating order, 3 rounds.
set -u
cd /work/wt-packs
for i in 1 2 3; do
  case $i in 1) order="old new new2";; 2) order="new2 old new";; 3) order="new new2 old";; esac
  for side in $order; do
    echo "== run $i $side waiting from $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >> benches/results/20261207T1129Z-packs-thread-ab/runs.log
    timeout 900 flock /work/notes/bench.lock env MIRRORBLKD=/work/rel-target-packs/ab/$side/mirrorblkd MIRRORBLK=/work/rel-target-packs/ab/$side/mirrorblk DIR=/var/tmp/packs-bench benches/backup-bench.sh > benches/results/20261207T1129Z-packs-thread-ab/$i-$side.txt 2>&1
    echo "rc=$?" >> benches/results/20261207T1129Z-packs-thread-ab/$i-$side.txt
  done
done
rm -rf /var/tmp/packs-bench
echo done >> benches/results/20261207T1129Z-packs-thread-ab/runs.log
