# Workloads of the kernel-test guest, sourced by /init (busybox sh).
# Each `workload_NAME` reports `PASS step` per step through pass() and ends
# the run with fail() at the first broken step. The harness
# (tests/src/kernel.rs) lists the steps each workload must pass.
#
# The NBD server is 10.0.2.100:10809, export vol0, through the host's relay.

DEV=/dev/nbd0
MNT=/mnt
SERVER=10.0.2.100
PORT=10809

# More nbd-client arguments from the host (mb.connect=, commas for spaces),
# e.g. the TLS ones: -x -cacertfile F -certfile F -keyfile F.
connect_args() {
    for arg in $(cat /proc/cmdline); do
        case "$arg" in
        mb.connect=*) echo "${arg#mb.connect=}" | tr ',' ' ' ;;
        esac
    done
}

# nbd-client ignores the block size the server advertises and would use
# 512-byte blocks: -b 4096 is what mirrorblk's README tells users to pass.
connect() {
    # shellcheck disable=SC2046 # the host's arguments are words on purpose
    nbd-client "$SERVER" "$PORT" "$DEV" -N vol0 -b 4096 $(connect_args) "$@"
}

# Size of the device in 4 KiB blocks (0 when nothing is attached).
dev_blocks() {
    echo $(($(cat /sys/block/nbd0/size) / 8))
}

# Waits (up to 5 s) until the attached device has a size: with -nonetlink,
# nbd-client returns while its forked child is still starting the device
# (NBD_DO_IT), so the size can show up a moment later. False if it never does.
wait_size() {
    n=0
    while [ "$(dev_blocks)" -eq 0 ]; do
        n=$((n + 1))
        [ $n -le 50 ] || return 1
        sleep 0.1
    done
}

# Forgets every cached page and buffer of the device, so the next read
# comes from the server, not from guest memory (a server that drops
# writes must not be hidden by the page cache).
drop_caches() {
    sync
    blockdev --flushbufs "$DEV" 2>/dev/null
    echo 3 >/proc/sys/vm/drop_caches
}

step_connect() {
    connect || fail "connect: nbd-client exited with $?"
    wait_size || fail "connect: /dev/nbd0 has size 0 5 s after nbd-client"
    [ "$(cat /sys/block/nbd0/queue/logical_block_size)" = 4096 ] ||
        fail "connect: logical block size $(cat /sys/block/nbd0/queue/logical_block_size), want 4096"
    pass connect
}

# Raw writes of random 4 KiB patterns (and one 1 MiB run) at the first,
# second, a middle and the last block, each read back with O_DIRECT after
# dropping caches and compared by sha256.
step_raw() {
    blocks=$(dev_blocks)
    mkdir -p /tmp/raw
    for at in 0 1 1000 $((blocks / 2 + 3)) $((blocks - 1)); do
        dd if=/dev/urandom of=/tmp/raw/$at bs=4096 count=1 2>/dev/null
        dd if=/tmp/raw/$at of=$DEV bs=4096 seek=$at count=1 oflag=direct conv=notrunc,fsync 2>/dev/null ||
            fail "raw: write of block $at failed"
    done
    big=$((blocks / 4))
    dd if=/dev/urandom of=/tmp/raw/big bs=4096 count=256 2>/dev/null
    dd if=/tmp/raw/big of=$DEV bs=4096 seek=$big count=256 oflag=direct conv=notrunc,fsync 2>/dev/null ||
        fail "raw: 1 MiB write at block $big failed"
    drop_caches
    for at in 0 1 1000 $((blocks / 2 + 3)) $((blocks - 1)); do
        want=$(sha256sum </tmp/raw/$at | cut -d' ' -f1)
        got=$(dd if=$DEV bs=4096 skip=$at count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
        [ "$got" = "$want" ] || fail "raw: block $at read back differs from what was written"
    done
    want=$(sha256sum </tmp/raw/big | cut -d' ' -f1)
    got=$(dd if=$DEV bs=4096 skip=$big count=256 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$got" = "$want" ] || fail "raw: 1 MiB at block $big read back differs"
    # Past the end: the kernel must refuse (the size is the server's).
    if dd if=/dev/zero of=$DEV bs=4096 seek=$blocks count=1 oflag=direct 2>/dev/null; then
        fail "raw: a write past the last block ($blocks) succeeded"
    fi
    pass raw
}

step_mkfs() {
    out=$(mkfs.ext4 -q -F "$DEV" 2>&1) || fail "mkfs: mkfs.ext4 failed: $out"
    pass mkfs
}

do_mount() {
    mount -t ext4 "$DEV" "$MNT" || fail "$1: mount failed"
}

# Files of random data (sizes from 1 byte to 2 MiB) in two directories,
# their sha256 kept in /tmp (guest memory, outside the filesystem).
step_files() {
    do_mount files
    mkdir -p $MNT/a/b || fail "files: mkdir"
    : >/tmp/sums
    i=0
    for kib in 1 4 7 64 100 513 1024 2048; do
        for dir in a a/b; do
            i=$((i + 1))
            dd if=/dev/urandom of=$MNT/$dir/f$i bs=1024 count=$kib 2>/dev/null || fail "files: writing $dir/f$i"
        done
    done
    printf x >$MNT/one-byte
    (cd $MNT && find . -type f | sort | xargs sha256sum) >/tmp/sums || fail "files: sha256sum"
    [ "$(wc -l </tmp/sums)" -eq 17 ] || fail "files: expected 17 files, listed $(wc -l </tmp/sums)"
    sync
    umount $MNT || fail "files: umount"
    pass files
}

step_fsck() {
    drop_caches
    out=$(e2fsck -fn "$DEV" 2>&1) || fail "fsck$1: e2fsck -fn exited with $?: $(echo "$out" | tail -5)"
    pass "fsck$1"
}

step_verify() {
    drop_caches
    do_mount "verify$1"
    (cd $MNT && sha256sum -c -s /tmp/sums) || fail "verify$1: a file's checksum differs after remount"
    umount $MNT || fail "verify$1: umount"
    pass "verify$1"
}

step_disconnect() {
    # $1: a suffix naming which disconnect this is.
    nbd-client -d "$DEV" || fail "disconnect$1: nbd-client -d exited with $?"
    # Bounded wait for the kernel to drop the device.
    n=0
    while [ "$(dev_blocks)" -gt 0 ]; do
        n=$((n + 1))
        [ $n -le 50 ] || fail "disconnect$1: /dev/nbd0 still has a size 5 s after nbd-client -d"
        sleep 0.1
    done
    pass "disconnect$1"
}

step_reconnect() {
    connect || fail "reconnect: nbd-client exited with $?"
    wait_size || fail "reconnect: /dev/nbd0 has size 0 5 s after nbd-client"
    pass reconnect
}

# The standard workload: everything a user does with the device.
workload_standard() {
    step_connect
    step_raw
    step_mkfs
    step_files
    step_fsck ""
    step_verify ""
    step_disconnect ""
    step_reconnect
    step_fsck "-after-reconnect"
    step_verify "-after-reconnect"
    step_disconnect "-final"
    pass standard
}

# The first steps only: cheap proof that the harness notices a server that
# drops writes or is not there at all.
workload_raw() {
    step_connect
    step_raw
    step_disconnect "-final"
    pass raw-workload
}

# ---------------------------------------------------------------------------
# mirrorblk attach: a device that follows the primary.

# Arguments for mirrorblk attach (from mb.attach= on the kernel command
# line, commas for spaces): the --server list and timeouts the host chose.
attach_args() {
    for arg in $(cat /proc/cmdline); do
        case "$arg" in
        mb.attach=*) echo "${arg#mb.attach=}" | tr ',' ' ' ;;
        esac
    done
}

# Milliseconds since boot (10 ms resolution): /proc/uptime without its dot.
now_ms() {
    read -r up _ </proc/uptime
    echo $(((${up%.*}${up#*.}) * 10))
}

# Starts `mirrorblk attach` in the background (its JSON events in
# /tmp/attach.out, its log in /tmp/attach.log) and waits up to 30 s for its
# "attached" event.
start_attach() {
    # shellcheck disable=SC2046 # word splitting of the arguments is wanted
    mirrorblk attach $(attach_args) --export vol0 --json "$DEV" >/tmp/attach.out 2>/tmp/attach.log &
    ATTACH_PID=$!
    n=0
    until grep -q '"event":"attached"' /tmp/attach.out 2>/dev/null; do
        n=$((n + 1))
        if [ $n -gt 300 ] || ! kill -0 $ATTACH_PID 2>/dev/null; then
            fail "attach: mirrorblk attach did not attach within 30 s: $(tail -5 /tmp/attach.log)"
        fi
        sleep 0.1
    done
    [ "$(cat /sys/block/nbd0/queue/logical_block_size)" = 4096 ] ||
        fail "attach: logical block size $(cat /sys/block/nbd0/queue/logical_block_size), want 4096"
    [ "$(dev_blocks)" -gt 0 ] || fail "attach: /dev/nbd0 has no size after the attached event"
    pass attach
}

# How many files the loop writes when the host said (mb.files=N): the live
# restart keeps the connection, so there is no reconnect to wait for.
files_wanted() {
    for arg in $(cat /proc/cmdline); do
        case "$arg" in
        mb.files=*) echo "${arg#mb.files=}" ;;
        esac
    done
}

# Writes 64 KiB files f1, f2, ... with dd conv=fsync until the attach
# process has reported a reconnect and 10 more files were fsynced after
# it (at most 120 files), or, with mb.files=N, exactly N files (no
# reconnect needed). Every file whose fsync returned is reported as
# `FSYNCED name sha256 ms` (ms: how long its write and fsync took) and
# listed in /tmp/fsynced. Any write error fails the run: the device must
# hide the server's death.
write_through_reconnect() {
    : >/tmp/fsynced
    max=0
    after=0
    i=0
    want=$(files_wanted)
    limit=${want:-120}
    while [ $i -lt "$limit" ]; do
        i=$((i + 1))
        dd if=/dev/urandom of=/tmp/data bs=4096 count=16 2>/dev/null
        t0=$(now_ms)
        if ! dd if=/tmp/data of=$MNT/f$i bs=4096 conv=fsync 2>/tmp/dd.err; then
            fail "loop: writing f$i failed: $(tail -1 /tmp/dd.err); kernel: $(dmesg | grep -iE 'error|nbd' | tail -3 | tr '\n' ' ')"
        fi
        ms=$(($(now_ms) - t0))
        [ $ms -gt $max ] && max=$ms
        sum=$(sha256sum </tmp/data | cut -d' ' -f1)
        echo "$sum  f$i" >>/tmp/fsynced
        report "FSYNCED f$i $sum $ms"
        if [ -z "$want" ] && grep -q '"event":"reconnected"' /tmp/attach.out; then
            after=$((after + 1))
            [ $after -ge 10 ] && break
        fi
    done
    [ -n "$want" ] || [ $after -ge 10 ] || fail "loop: no reconnect reported within $i files; attach log: $(tail -3 /tmp/attach.log | tr '\n' ' ')"
    report "STALL $max"
    pass "loop: $i files, longest write+fsync $max ms"
}

# No I/O error reached the block layer or ext4.
check_kernel_log() {
    dmesg >/tmp/dmesg
    grep nbd0 /tmp/dmesg | tail -8 >/dev/console
    if grep -E 'I/O error|EXT4-fs error|Aborting journal|Remounting filesystem read-only|Buffer I/O' /tmp/dmesg >/tmp/bad; then
        fail "no-io-errors: $(head -3 /tmp/bad | tr '\n' ' ')"
    fi
    pass no-io-errors
}

# The attach workload: attach, mkfs, mount, write and fsync files while the
# host kills or restarts the server (after FSYNCED f10), then check that no
# write failed, the kernel logged no I/O error, e2fsck is clean and every
# fsynced file is intact; detach ends the attach process with status 0.
workload_attach() {
    start_attach
    step_mkfs
    do_mount mount
    pass mount
    write_through_reconnect
    check_kernel_log
    umount $MNT || fail "umount: $(dmesg | tail -3)"
    step_fsck "-after-reconnect"
    drop_caches
    do_mount verify
    n=$(wc -l </tmp/fsynced)
    (cd $MNT && sha256sum -c -s /tmp/fsynced) || fail "verify: a file whose fsync returned is missing or differs"
    umount $MNT || fail "verify: umount"
    pass "verify: $n fsynced files"
    grep '"event":"reconnected"' /tmp/attach.out | while read -r l; do report "RECONNECTED $l"; done
    cat /tmp/attach.log >/dev/console
    mirrorblk detach "$DEV" >/tmp/detach.out 2>&1 || fail "detach: $(cat /tmp/detach.out)"
    wait $ATTACH_PID
    rc=$?
    [ $rc -eq 0 ] || fail "detach: mirrorblk attach exited with $rc: $(tail -3 /tmp/attach.log)"
    n=0
    while [ "$(dev_blocks)" -gt 0 ]; do
        n=$((n + 1))
        [ $n -le 50 ] || fail "detach: /dev/nbd0 still has a size 5 s after mirrorblk detach"
        sleep 0.1
    done
    pass detach
    pass attach-workload
}

# ---------------------------------------------------------------------------
# Online resize under mirrorblk attach.

# Writes N 64 KiB files named PREFIX1..PREFIXN with fsync, their checksums
# appended to /tmp/fsynced.
write_files() {
    n=0
    while [ $n -lt "$1" ]; do
        n=$((n + 1))
        dd if=/dev/urandom of=/tmp/data bs=4096 count=16 2>/dev/null
        dd if=/tmp/data of=$MNT/"$2$n" bs=4096 conv=fsync 2>/tmp/dd.err ||
            fail "files: writing $2$n failed: $(tail -1 /tmp/dd.err)"
        echo "$(sha256sum </tmp/data | cut -d' ' -f1)  $2$n" >>/tmp/fsynced
    done
}

# ext4 on the attached device with files in it; the host grows the volume
# (`mirrorblk resize`) once it reads RESIZE-READY. attach must give the
# kernel the new size without a reconnect, resize2fs grows the mounted
# file system, files written after it and before it all check out after
# e2fsck, and no I/O error is logged.
workload_attach_resize() {
    start_attach
    step_mkfs
    do_mount mount
    pass mount
    : >/tmp/fsynced
    write_files 8 before
    before=$(dev_blocks)
    fs_before=$(df -k $MNT | awk 'NR==2 {print $2}')
    report "RESIZE-READY $before"
    n=0
    while [ "$(dev_blocks)" -le "$before" ]; do
        n=$((n + 1))
        [ $n -le 600 ] || fail "grown: /dev/nbd0 still has $before blocks 60 s after RESIZE-READY; attach log: $(tail -3 /tmp/attach.log | tr '\n' ' ')"
        sleep 0.1
    done
    after=$(dev_blocks)
    grep -q '"event":"resized"' /tmp/attach.out || fail "grown: attach printed no resized event"
    grep -q '"event":"reconnected"' /tmp/attach.out && fail "grown: attach reconnected to resize"
    pass "grown: $before -> $after blocks"
    resize2fs $DEV >/tmp/resize2fs.log 2>&1 || fail "resize2fs: $(tail -2 /tmp/resize2fs.log | tr '\n' ' ')"
    fs_after=$(df -k $MNT | awk 'NR==2 {print $2}')
    [ "$fs_after" -gt "$fs_before" ] || fail "resize2fs: ext4 still has $fs_after KiB (was $fs_before)"
    pass "resize2fs: $fs_before -> $fs_after KiB"
    write_files 8 after
    check_kernel_log
    umount $MNT || fail "umount: $(dmesg | tail -3)"
    step_fsck "-after-resize"
    drop_caches
    do_mount verify
    (cd $MNT && sha256sum -c -s /tmp/fsynced) || fail "verify: a file written before or after the resize is missing or differs"
    umount $MNT || fail "verify: umount"
    pass "verify: $(wc -l </tmp/fsynced) files"
    cat /tmp/attach.log >/dev/console
    mirrorblk detach "$DEV" >/tmp/detach.out 2>&1 || fail "detach: $(cat /tmp/detach.out)"
    wait $ATTACH_PID
    pass detach
    pass attach-resize-workload
}

# ---------------------------------------------------------------------------
# Power cuts: mirrorblkd runs in this guest, its data and journal files on
# ext4 on /dev/vda, a disk with a volatile write cache served by the host
# (tests/src/volatile_disk.rs). The host's NBD client reaches the daemon
# through qemu's host forward to 10.0.2.15:10809, writes, and cuts the
# power (the disk drops what was not flushed, and qemu is killed). The next
# boot mounts what the disk kept and starts the daemon, whose journal
# recovery must give back every write acknowledged with FUA or before a
# FLUSH (and, in per-write mode, every acknowledged write).
#
# Kernel parameters: mb.fresh=1 on the first boot (mkfs), mb.daemon= the
# daemon's extra arguments (commas for spaces).
param() {
    for arg in $(cat /proc/cmdline); do
        case "$arg" in
        "mb.$1="*) echo "${arg#mb.$1=}" | tr ',' ' ' ;;
        esac
    done
}

# With mb.snapshots=1: the host takes snapshots in the guest at the moments
# it chooses, through qemu's host forward to 10.0.2.15:10810. Each
# connection runs `mirrorblk snapshot create vol0 NAME --json` (NAME is the
# line the host sends) against the daemon's admin socket and answers with
# its output and a last line `rc=N`.
snapshot_server() {
    cat >/tmp/snapshot-create <<'SCRIPT'
#!/bin/sh
read -r name
/usr/sbin/mirrorblk --admin-socket /tmp/admin.sock snapshot create vol0 "$name" --json 2>&1
echo "rc=$?"
SCRIPT
    chmod +x /tmp/snapshot-create
    nc -ll -p 10810 -e /tmp/snapshot-create >/dev/console 2>&1 &
}

workload_powercut() {
    [ -b /dev/vda ] || fail "disk: no /dev/vda (virtio_blk)"
    mkdir -p /pc
    if [ "$(param fresh)" = 1 ]; then
        mkfs.ext4 -q -F /dev/vda >/tmp/mkfs.out 2>&1 || fail "mkfs: $(cat /tmp/mkfs.out)"
    fi
    mount -t ext4 /dev/vda /pc 2>/tmp/mount.err || fail "mount: the file system the disk kept does not mount: $(cat /tmp/mount.err; dmesg | tail -5)"
    pass mount
    admin=""
    if [ "$(param snapshots)" = 1 ]; then
        admin="--admin-socket /tmp/admin.sock"
        snapshot_server
    fi
    # shellcheck disable=SC2046,SC2086 # the host's arguments are words on purpose
    /usr/sbin/mirrorblkd --export vol0 --data /pc/vol0.data --journal /pc/vol0.journal \
        --size 16M --journal-size 16M --listen 0.0.0.0:10809 $admin $(param daemon) \
        >/dev/console 2>&1 &
    pass daemon-started
    # The host cuts the power; this only bounds a run the host forgot.
    sleep 170
    fail "power: still on 170 s after boot"
}
