#!/bin/bash
# One round: each spec (chunk:level, level "base" = main's CLI) once, the same daemon.
RES=$1; ROUND=$2; shift 2
for spec in "$@"; do
  cs=${spec%%:*}; lvl=${spec#*:}
  out=$RES/run-r$ROUND-$cs-$lvl.txt
  echo "== round $ROUND chunk $cs sync $lvl $(date -u +%T)" | tee $out
  if [ "$lvl" = base ]; then
    case $cs in 4M) bytes=;; 64K) bytes=65536;; 256K) bytes=262144;; 1M) bytes=1048576;; esac
    DIR=/var/tmp/bkbench-cs REPO_CHUNK_BYTES=$bytes \
      MIRRORBLKD=/work/chunksize-bin/mirrorblkd MIRRORBLK=/work/chunksize-bin/mirrorblk-base \
      PORT=22841 timeout 900 /work/wt-chunksize/benches/backup-bench.sh >>$out 2>&1
  else
    DIR=/var/tmp/bkbench-cs CHUNK_SIZE=$cs MIRRORBLK_BACKUP_SYNC_LEVEL=$lvl \
      MIRRORBLKD=/work/chunksize-bin/mirrorblkd MIRRORBLK=${NEWCLI:-/work/chunksize-bin/mirrorblk} \
      PORT=22841 timeout 900 /work/wt-chunksize/benches/backup-bench.sh >>$out 2>&1
  fi
  echo "exit $?" >> $out
done
rm -rf /var/tmp/bkbench-cs
