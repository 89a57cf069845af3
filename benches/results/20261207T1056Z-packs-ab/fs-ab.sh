#!/bin/bash
# The new binary with the repository on ext4 (/var/tmp) and on tmpfs (/dev/shm), alternating,
# 3 pairs: how much of the full backup's time is still the repository's filesystem.
set -u
cd /work/wt-packs
for i in 1 2 3; do
  if [ $((i % 2)) = 1 ]; then order="ext4 tmpfs"; else order="tmpfs ext4"; fi
  for fs in $order; do
    if [ $fs = tmpfs ]; then repo=/dev/shm/packs-repo; else repo=/var/tmp/packs-bench/repo; fi
    echo "== fs $i $fs waiting from $(date -u +%T)" >> benches/results/20261207T1056Z-packs-ab/runs.log
    timeout 900 flock /work/notes/bench.lock env MIRRORBLKD=/work/rel-target-packs/ab/new/mirrorblkd MIRRORBLK=/work/rel-target-packs/ab/new/mirrorblk DIR=/var/tmp/packs-bench REPO=$repo benches/backup-bench.sh > benches/results/20261207T1056Z-packs-ab/fs$i-$fs.txt 2>&1
    echo "rc=$?" >> benches/results/20261207T1056Z-packs-ab/fs$i-$fs.txt
    rm -rf /dev/shm/packs-repo
  done
done
rm -rf /var/tmp/packs-bench /dev/shm/packs-repo
echo "fs done" >> benches/results/20261207T1056Z-packs-ab/runs.log
