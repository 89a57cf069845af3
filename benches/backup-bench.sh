#!/bin/bash
# Issue 15's speed goals on one release mirrorblkd (1 GiB volume, no replica):
#   full backup into a directory repository vs nbdcopy of the volume to a file;
#   incremental after 1 % of the volume changed (a) as 3 whole 4 MiB chunks,
#   (b) as 164 scattered 64 KiB writes (1 % of the 64 KiB tracking regions);
#   restore onto the volume's NBD export vs nbdcopy from a file to it.
# Usage: DIR=/var/tmp/bkbench [CHUNK_SIZE=64K] benches/backup-bench.sh   (needs fio with its nbd engine, nbdcopy)
#   CHUNK_SIZE: the repository's chunk size (`backup create --chunk-size`; the CLI's default when unset).
#   MIRRORBLK_BACKUP_SYNC_LEVEL=file|filesystem: the directory repository's sync level (docs/BACKUP.md).
#   REPO: the repository's directory (default $DIR/repo), e.g. on a filesystem of its own.
#   REPO_CHUNK_BYTES: write the repository's config with this chunk size (bytes) before the first
#     backup, for A/Bs with a CLI older than --chunk-size.
# Prints one line per measurement (and the load average before each), then a `cpu` line with the
# CPU seconds the step cost the client (user, system) and the daemon; bounded: every step has a timeout.
set -eu
DIR=${DIR:?set DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${MIRRORBLKD:-$ROOT/target/release/mirrorblkd}
CLI=${MIRRORBLK:-$ROOT/target/release/mirrorblk}
PORT=${PORT:-22812}
REPO=${REPO:-$DIR/repo}
rm -rf "$DIR" && mkdir -p "$DIR" && rm -rf "$REPO"
ADMIN=$DIR/admin.sock
URI=nbd://127.0.0.1:$PORT/vol0
$BIN --export vol0 --data "$DIR/d.img" --journal "$DIR/j.img" --size 1G --journal-size 256M \
    --listen 127.0.0.1:$PORT --admin-socket "$ADMIN" --log-level warn 2>"$DIR/d.log" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null' EXIT
for _ in $(seq 100); do [ -S "$ADMIN" ] && break; sleep 0.1; done
secs() { local t0=$(date +%s.%N); "$@" >/dev/null; echo "$(date +%s.%N) - $t0" | bc; }
daemon_cpu() { awk '{print $14 + $15}' /proc/$PID/stat; }
# timed STEP CMD...: runs CMD (its output on stdout), then prints its and the daemon's CPU to stderr.
timed() {
    local step=$1 d0 rc=0; shift
    d0=$(daemon_cpu)
    /usr/bin/time -f "%U %S" -o "$DIR/cpu" "$@" || rc=$?
    read -r u s <"$DIR/cpu" || true
    echo "cpu $step client-user ${u:-?} client-sys ${s:-?} daemon $(echo "($(daemon_cpu) - $d0) / 100" | bc -l | cut -c1-5)" >&2
    return $rc
}
CHUNK_ARGS=()
[ -n "${CHUNK_SIZE:-}" ] && CHUNK_ARGS=(--chunk-size "$CHUNK_SIZE")
bk() { timed "$1" timeout 600 "$CLI" backup create --admin-socket "$ADMIN" --repo "$REPO" "${CHUNK_ARGS[@]}" vol0 --json; }
load() { echo "load $(cut -d' ' -f1-3 /proc/loadavg)"; }
echo "chunk-size ${CHUNK_SIZE:-${REPO_CHUNK_BYTES:-default}} sync-level ${MIRRORBLK_BACKUP_SYNC_LEVEL:-default} cli $CLI"
if [ -n "${REPO_CHUNK_BYTES:-}" ]; then
    mkdir -p "$REPO"
    echo "{\"version\":1,\"chunk_size\":$REPO_CHUNK_BYTES,\"compress\":true}" >"$REPO/mirrorblk-backup.json"
fi
# Incompressible, non-repeating data in every byte.
timeout 300 fio --name=fill --ioengine=nbd --uri=$URI --rw=write --bs=1m --iodepth=8 --size=1g \
    --refill_buffers --output=/dev/null
sync; echo 3 >/proc/sys/vm/drop_caches
load
echo "nbdcopy volume->file s $(secs timed nbdcopy-read timeout 300 nbdcopy $URI "$DIR/copy.img")"
sync; echo 3 >/proc/sys/vm/drop_caches
load
echo "full $(bk full)"
timeout 120 fio --name=chunks --ioengine=nbd --uri=$URI --rw=randwrite --bs=4m --number_ios=3 \
    --size=1g --refill_buffers --randrepeat=0 --output=/dev/null
sync; echo 3 >/proc/sys/vm/drop_caches
load
echo "incr-3-chunks $(bk incr-3-chunks)"
timeout 120 fio --name=scatter --ioengine=nbd --uri=$URI --rw=randwrite --bs=64k --number_ios=164 \
    --size=1g --refill_buffers --randrepeat=0 --output=/dev/null
sync; echo 3 >/proc/sys/vm/drop_caches
load
echo "incr-164x64k $(bk incr-164x64k)"
ID=$("$CLI" backup list --repo "$REPO" --json | tail -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
sync; echo 3 >/proc/sys/vm/drop_caches
load
echo "restore $(timed restore timeout 600 "$CLI" backup restore --repo "$REPO" --to $URI --json "$ID")"
sync; echo 3 >/proc/sys/vm/drop_caches
load
echo "nbdcopy file->volume s $(secs timed nbdcopy-write timeout 300 nbdcopy "$DIR/copy.img" $URI)"
