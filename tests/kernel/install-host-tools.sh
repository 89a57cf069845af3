#!/usr/bin/env bash
# Installs what the kernel tests run on this host (./run-tests calls it):
# qemu-system-x86, busybox-static, cpio and binutils (strip: the mirrorblk
# CLI goes into the guest stripped). Nothing for the guest is
# installed here: tests/kernel/prepare.sh downloads those packages.
#
# qemu-system-x86 must be the version of the installed qemu-utils (they
# share qemu-system-common, and a newer qemu-utils "Breaks" an older
# qemu-system-common): apt would otherwise remove or downgrade the
# qemu-utils the interop tests use. Both are named in one apt-get command,
# at that version; when it comes from a backports suite that is not in
# this host's apt sources (the image's qemu-utils 10.0 is bookworm-backports),
# that suite is added for this command only (-o Dir::Etc::sourcelist).
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
if ! command -v busybox >/dev/null 2>&1 || ldd "$(command -v busybox)" >/dev/null 2>&1; then
    need+=(busybox-static)
fi
command -v cpio >/dev/null 2>&1 || need+=(cpio)
command -v strip >/dev/null 2>&1 || need+=(binutils)
[ "${#need[@]}" -gt 0 ] || exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "kernel tests: missing ${need[*]}; run as root or install them (apt-get install -y qemu-system-x86 qemu-utils busybox-static cpio binutils)" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive
echo "== installing kernel-test tools: ${need[*]}"
apt_opts=()
pkgs=("${need[@]}")
if [[ " ${need[*]} " == *" qemu-system-x86 "* ]]; then
    qver="$(dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null || true)"
    if [ -n "$qver" ]; then
        pkgs+=(qemu-utils)
        if [[ "$qver" == *bpo* ]] && ! apt-cache madison qemu-system-x86 | grep -qF "$qver"; then
            codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
            list="$(mktemp)"
            trap 'rm -f "$list"' EXIT
            echo "deb http://deb.debian.org/debian ${codename}-backports main" >"$list"
            apt_opts=(-o "Dir::Etc::sourcelist=$list" -t "${codename}-backports")
        fi
    else
        pkgs+=(qemu-utils)
    fi
fi
apt-get "${apt_opts[@]}" update -qq
apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
