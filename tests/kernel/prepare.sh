#!/usr/bin/env bash
# Builds what the kernel tests boot: Debian's own kernel and an initramfs
# with busybox, the kernel's nbd driver (and the ext4 and network modules
# it needs), nbd-client and e2fsprogs with their shared libraries.
#
#   tests/kernel/prepare.sh CACHE_DIR
#
# Prints two lines on success: `kernel PATH` and `initramfs PATH`.
#
# Packages are fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` into CACHE_DIR (never installed on this host: installing a
# kernel package would pull udev and systemd upgrades). Everything is
# cached: a second run with the same package versions only checks them.
# Concurrent runs (tests in parallel processes) serialise on a lock file.
#
# The guest's /init is tests/kernel/init.sh; the workloads are added by the
# harness as a second cpio archive at each boot, so editing a workload does
# not rebuild this image.
set -euo pipefail

cache="${1:?usage: prepare.sh CACHE_DIR}"
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"

exec 9>"$cache/.lock"
# Bounded: a stuck holder (a download that hangs) fails this run instead of stalling CI.
flock -w 600 9 || { echo "prepare.sh: could not lock $cache/.lock within 600 s" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb cpio gzip ldd busybox; do
    command -v "$tool" >/dev/null || {
        echo "prepare.sh: $tool is missing (busybox: apt-get install busybox-static; cpio: apt-get install cpio)" >&2
        exit 2
    }
done
busybox_bin="$(command -v busybox)"
# The initramfs has no shared libraries for busybox itself: it must be the static one.
if ldd "$busybox_bin" >/dev/null 2>&1; then
    echo "prepare.sh: $busybox_bin is dynamically linked; install busybox-static" >&2
    exit 2
fi

# The kernel package the metapackage points at right now (e.g. linux-image-6.1.0-56-amd64).
kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1
}
kpkg="$(kernel_package)"
if [ -z "$kpkg" ] && [ "$(id -u)" -eq 0 ]; then
    # A fresh machine may have no package lists yet.
    timeout 300 apt-get update -qq >&2 || true
    kpkg="$(kernel_package)"
fi
if [ -z "$kpkg" ]; then
    echo "prepare.sh: apt-cache does not know linux-image-amd64 (run apt-get update)" >&2
    exit 2
fi
kver="${kpkg#linux-image-}"

# Guest userland: nbd-client and e2fsprogs, and the libraries they link
# that are not part of libc (the host's copies serve for the rest, checked below).
pkgs=("$kpkg" nbd-client e2fsprogs libnl-3-200 libnl-genl-3-200 libgnutls30 libext2fs2 libcom-err2 libss2 libblkid1 libuuid1)

# The image is keyed on the exact package versions and on this script and
# the init script: anything else that changes rebuilds it.
versions="$(apt-cache policy "${pkgs[@]}" | awk '/^[^ ]/{p=$1} /Candidate:/{print p, $2}')"
key="$( { echo "$versions"; cat "$0" "$here/init.sh"; } | sha256sum | cut -c1-16)"
image="$cache/initramfs-$key.cpio.gz"
kernel="$cache/vmlinuz-$kver"
if [ -s "$image" ] && [ -s "$kernel" ]; then
    echo "kernel $kernel"
    echo "initramfs $image"
    exit 0
fi

debs="$cache/debs"
mkdir -p "$debs"
missing=()
while read -r pkg ver; do
    [ -n "$pkg" ] || continue
    pkg="${pkg%:}"
    # apt-get download names files PKG_VERSION_ARCH.deb, with ':' escaped as %3a.
    ls "$debs/${pkg}_${ver//:/%3a}_"*.deb >/dev/null 2>&1 || missing+=("$pkg")
done <<<"$versions"
if [ "${#missing[@]}" -gt 0 ]; then
    echo "prepare.sh: downloading ${missing[*]}" >&2
    # Runs as root in CI: the sandbox user _apt could not write here.
    (cd "$debs" && timeout 600 apt-get download -q -o APT::Sandbox::User=root "${missing[@]}" >&2)
fi

root="$cache/unpacked"
rm -rf "$root"
mkdir -p "$root"
while read -r pkg ver; do
    [ -n "$pkg" ] || continue
    pkg="${pkg%:}"
    dpkg-deb -x "$(ls "$debs/${pkg}_${ver//:/%3a}_"*.deb | head -1)" "$root"
done <<<"$versions"

stage="$cache/stage"
rm -rf "$stage"
mkdir -p "$stage"/{bin,sbin,usr/sbin,lib/modules,proc,sys,dev,tmp,mnt,etc,run,workloads}
cp "$busybox_bin" "$stage/bin/busybox"
cp "$here/init.sh" "$stage/init"
chmod 755 "$stage/init"

# Kernel modules, loaded by /init in this order (dependencies first). The
# list is what the guest needs that this kernel builds as modules; each
# module's own `depends=` (from its .modinfo) is followed too.
mods="$root/lib/modules/$kver/kernel"
# crc32c_generic: ext4 and jbd2 ask the crypto API for "crc32c", which
# cannot load modules here (no modprobe, no modules.alias) and the
# accelerated crc32c-intel needs SSE4.2, which the emulated CPU may lack.
wanted=(nbd crc32c_generic ext4 virtio_pci virtio_net virtio_blk)
order=()
add_module() {
    local m="$1" f dep
    for done_m in "${order[@]:-}"; do [ "$done_m" = "$m" ] && return 0; done
    f="$(find "$mods" -name "$m.ko" -o -name "${m//_/-}.ko" | head -1)"
    if [ -z "$f" ]; then
        # Built in (listed in modules.builtin) is fine; missing is not.
        if grep -qE "/(${m}|${m//_/-})\.ko$" "$root/lib/modules/$kver/modules.builtin"; then return 0; fi
        echo "prepare.sh: kernel $kver has no module $m" >&2
        exit 1
    fi
    for dep in $(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | head -1 | tr ',' ' '); do
        add_module "$dep"
    done
    order+=("$m")
    cp "$f" "$stage/lib/modules/"
    basename "$f" >>"$stage/lib/modules/order"
}
for m in "${wanted[@]}"; do add_module "$m"; done

# nbd-client and e2fsprogs (resize2fs for the online-resize test), with every library they load. The unpacked
# packages come first on the search path, then the host's (same Debian
# release); a library found in neither fails the build.
bins=(sbin/nbd-client sbin/mke2fs sbin/e2fsck sbin/resize2fs)
libpath="$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu"
for b in "${bins[@]}"; do
    cp "$root/$b" "$stage/usr/sbin/"
    out="$(LD_LIBRARY_PATH="$libpath" ldd "$root/$b")"
    if grep -q "not found" <<<"$out"; then
        echo "prepare.sh: libraries of $b not found:" >&2
        grep "not found" <<<"$out" >&2
        exit 1
    fi
    # "libx.so => /path (addr)" and the loader "/lib64/ld-linux-x86-64.so.2 (addr)".
    for lib in $(awk '/=>/{print $3} !/=>/ && $1 ~ /^\//{print $1}' <<<"$out"); do
        dest="$stage/lib/x86_64-linux-gnu/$(basename "$lib")"
        mkdir -p "$(dirname "$dest")"
        [ -e "$dest" ] || cp -L "$lib" "$dest"
    done
done
mkdir -p "$stage/lib64"
cp -L /lib64/ld-linux-x86-64.so.2 "$stage/lib64/"
ln -s mke2fs "$stage/usr/sbin/mkfs.ext4"
# mke2fs reads its defaults from here; without it ext4 gets ext2 defaults.
cp "$root/etc/mke2fs.conf" "$stage/etc/"

cp "$root/boot/vmlinuz-$kver" "$kernel.tmp" && mv "$kernel.tmp" "$kernel"
(cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >"$image.tmp"
mv "$image.tmp" "$image"
# Images of older package versions are not needed any more.
find "$cache" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -name "$(basename "$image")" -delete
rm -rf "$stage" "$root"
echo "kernel $kernel"
echo "initramfs $image"
