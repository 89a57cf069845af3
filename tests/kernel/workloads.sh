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

# nbd-client ignores the block size the server advertises and would use
# 512-byte blocks: -b 4096 is what mirrorblk's README tells users to pass.
# Extra arguments (the failover workload's -nonetlink) are passed through.
connect() {
    nbd-client "$SERVER" "$PORT" "$DEV" -N vol0 -b 4096 "$@"
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

# Arguments for nbd-client in the failover workload (from mb.connect= on
# the kernel command line, commas for spaces), so the reconnect mechanism
# can be chosen by the harness.
connect_args() {
    for arg in $(cat /proc/cmdline); do
        case "$arg" in
        mb.connect=*) echo "${arg#mb.connect=}" | tr ',' ' ' ;;
        esac
    done
}

# Writes files $1$2..$1$3 (64 KiB of random data each) with dd conv=fsync;
# every file whose fsync returned is reported as `FSYNCED name sha256` on the
# result port (how the host knows when to kill the primary) and listed in
# /tmp/fsynced (what must survive). Stops at the first write error and
# reports it as `WRITE-ERROR name: why`; returns 1 then.
write_files() {
    i=$2
    while [ "$i" -le "$3" ]; do
        dd if=/dev/urandom of=/tmp/data bs=4096 count=16 2>/dev/null
        if ! dd if=/tmp/data of=$MNT/$1$i bs=4096 conv=fsync 2>/tmp/dd.err; then
            report "WRITE-ERROR $1$i: $(tail -1 /tmp/dd.err)"
            return 1
        fi
        sum=$(sha256sum </tmp/data | cut -d' ' -f1)
        echo "$sum  $1$i" >>/tmp/fsynced
        report "FSYNCED $1$i $sum"
        i=$((i + 1))
    done
    return 0
}

# The failover workload. The host kills the primary once f10 is reported
# and points the relay at the promoted replica. nbd-client 3.24 cannot
# carry the mounted filesystem across that (the kernel fails the requests
# in flight with EIO and ext4 aborts its journal; see tests/kernel/README.md),
# so the next best is checked: the first write error ends the first loop,
# the filesystem is unmounted, nbd-client attaches again (through the relay,
# to the new primary), the mount replays the journal, and more files are
# written. In the end the filesystem must be clean and every file whose
# fsync returned, before or after the failover, must have its checksum.
workload_failover() {
    connect $(connect_args) || fail "connect: nbd-client exited with $?"
    wait_size || fail "connect: /dev/nbd0 has size 0 5 s after nbd-client"
    pass connect
    step_mkfs
    do_mount mount
    pass mount
    : >/tmp/fsynced
    # Bounded: 40 files take ~20 s under TCG; the host kills the primary
    # after the 10th, so a run without a write error fails (no PASS
    # umount-after-error).
    if write_files f 1 40; then
        report "NO-WRITE-ERROR: 40 files written, the failover was not seen"
    else
        umount $MNT || fail "umount-after-error: $(dmesg | tail -3)"
        pass umount-after-error
        # Drop what is left of the dead connection, then attach again; the
        # relay holds the new connection until the promoted replica accepts.
        nbd-client -d "$DEV" >/dev/null 2>&1
        connect $(connect_args) || fail "reconnect: nbd-client exited with $?"
        wait_size || fail "reconnect: /dev/nbd0 has size 0 5 s after nbd-client"
        pass reconnect
        do_mount remount
        pass remount
        write_files g 1 10 || fail "write-after-failover: a write to the promoted replica failed"
        pass write-after-failover
    fi
    umount $MNT || fail "umount"
    step_fsck "-after-failover"
    do_mount verify
    n=$(wc -l </tmp/fsynced)
    (cd $MNT && sha256sum -c -s /tmp/fsynced) || fail "verify: a file whose fsync returned is missing or differs"
    umount $MNT || fail "verify: umount"
    pass "verify: $n fsynced files"
    nbd-client -d "$DEV" >/dev/null 2>&1
    pass failover
}
