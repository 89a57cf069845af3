#!/bin/bash
# A/B: main's binaries (old) vs the packs branch (new), alternating, 3 pairs.
set -u
cd /work/wt-packs
for i in 1 2 3; do
  if [ $((i % 2)) = 1 ]; then order="old new"; else order="new old"; fi
  for side in $order; do
    echo "== run $i $side $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >> benches/results/20261207T1056Z-packs-ab/runs.log
    timeout 900 flock /work/notes/bench.lock env MIRRORBLKD=/work/rel-target-packs/ab/$side/mirrorblkd MIRRORBLK=/work/rel-target-packs/ab/$side/mirrorblk DIR=/var/tmp/packs-bench benches/backup-bench.sh > benches/results/20261207T1056Z-packs-ab/$i-$side.txt 2>&1
    echo "rc=$?" >> benches/results/20261207T1056Z-packs-ab/$i-$side.txt
  done
done
rm -rf /var/tmp/packs-bench
echo done >> benches/results/20261207T1056Z-packs-ab/runs.log
