#!/bin/busybox sh
# /init of the kernel-test guest (PID 1, busybox sh).
#
# Loads the modules prepare.sh listed (dependencies first), brings up the
# qemu user-mode network (10.0.2.15; the host's NBD server is reachable
# only as 10.0.2.100:10809 through the harness's relay), then runs the
# workload named on the kernel command line (mb.workload=NAME) from
# /workloads.sh, which the harness adds at each boot.
#
# Results go to the second serial port (/dev/ttyS1, which carries nothing
# else) as `PASS step` / `FAIL step: why` lines, and to the console. The
# guest powers off when the workload ends, whatever happened; the host
# fails the test on any FAIL, on a missing PASS, or when the guest does
# not finish in time.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp

report() {
    echo "$*" >/dev/ttyS1
    echo "$*" >/dev/console
}
# A workload calls these; fail() ends the run (later steps would only add
# noise after the first broken promise).
pass() { report "PASS $*"; }
fail() {
    report "FAIL $*"
    finish
}
finish() {
    sync
    report "END"
    poweroff -f
    sleep 60
}

for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m" || fail "boot: insmod $m"
done
ip link set lo up
ip link set eth0 up || fail "boot: no eth0"
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

workload=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    mb.workload=*) workload="${arg#mb.workload=}" ;;
    esac
done
[ -n "$workload" ] || fail "boot: no mb.workload= on the kernel command line"
[ -f /workloads.sh ] || fail "boot: /workloads.sh is missing from the initramfs"
. /workloads.sh
pass boot
"workload_$workload"
finish
