#!/usr/bin/env bash
# Builds the throwaway QEMU guest the NBD guest test boots: Debian's own
# kernel (linux-image-amd64; only vmlinuz and the virtio modules are used) and
# a busybox-static initramfs whose /init, below, exercises the guest's virtio
# disk and reports on the serial console. Everything comes from Debian
# packages through `apt-get download`; nothing is fetched from elsewhere.
#
#   scripts/guest-image.sh [DIR]     (default: ~/.cache/basalt-guest)
#
# Prints DIR. Rebuilds only when the /init below or this script changed.
#
# The guest's /init reads its job from the kernel command line:
#   basalt.offset_mib=N  where on /dev/vda to write   (MiB)
#   basalt.mib=M         how much to write            (MiB)
#   basalt.trim_mib=T    MiB to discard right after the written range
# and prints lines starting "BASALT-GUEST ": the sha256 of what it wrote,
# of what it read back with O_DIRECT after dropping its caches, and finally
# "RESULT PASS" or "RESULT FAIL reason".
set -euo pipefail

DIR=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/basalt-guest}

IFS= read -r -d '' INIT <<'EOF' || true
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t tmpfs -o size=192m tmpfs /tmp
say() { echo "BASALT-GUEST $*"; }
fail() { say "RESULT FAIL $*"; sync; poweroff -f; sleep 5; exit 1; }
OFFSET=0; MIB=8; TRIM=1
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    basalt.offset_mib=*) OFFSET=${arg#*=};;
    basalt.mib=*) MIB=${arg#*=};;
    basalt.trim_mib=*) TRIM=${arg#*=};;
  esac
done
for module in $(cat /lib/modules/load-order); do insmod /lib/modules/$module.ko 2>/dev/null; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || fail "no /dev/vda"
say "DISK bytes=$(blockdev --getsize64 /dev/vda)"
dd if=/dev/urandom of=/tmp/data bs=1M count=$MIB 2>/dev/null
WROTE=$(sha256sum /tmp/data | cut -d' ' -f1)
# Half through the page cache and sync, half with O_DIRECT and fsync.
HALF=$((MIB / 2))
dd if=/tmp/data of=/dev/vda bs=1M count=$HALF seek=$OFFSET conv=notrunc 2>/dev/null || fail "buffered write"
sync
dd if=/tmp/data of=/dev/vda bs=1M skip=$HALF count=$((MIB - HALF)) seek=$((OFFSET + HALF)) oflag=direct conv=notrunc,fsync 2>/dev/null || fail "direct write"
blockdev --flushbufs /dev/vda
echo 3 > /proc/sys/vm/drop_caches
READ=$(dd if=/dev/vda bs=1M skip=$OFFSET count=$MIB iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
say "WRITE offset_mib=$OFFSET mib=$MIB sha256=$WROTE readback=$READ"
[ "$WROTE" = "$READ" ] || fail "readback differs"
if [ "$TRIM" -gt 0 ]; then
  blkdiscard -o $(((OFFSET + MIB) * 1048576)) -l $((TRIM * 1048576)) /dev/vda || fail "discard"
  say "TRIM offset_mib=$((OFFSET + MIB)) mib=$TRIM"
fi
sync
say "RESULT PASS"
poweroff -f
EOF

STAMP=$(printf '%s\n%s' "$INIT" "$(sha256sum "$0" | cut -d' ' -f1)" | sha256sum | cut -c1-16)
if [ -s "$DIR/vmlinuz" ] && [ -s "$DIR/initrd.img" ] && [ "$(cat "$DIR/stamp" 2>/dev/null)" = "$STAMP" ]; then
    echo "$DIR"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb gzip xz; do
    command -v "$tool" >/dev/null || { echo "guest-image: $tool is missing" >&2; exit 2; }
done
work=$(mktemp -d "${TMPDIR:-/tmp}/basalt-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT
kernel=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$kernel" ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    kernel=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
[ -n "$kernel" ] || { echo "guest-image: cannot resolve linux-image-amd64" >&2; exit 2; }
echo "guest-image: building from $kernel and busybox-static into $DIR" >&2
(cd "$work" && apt-get download -o APT::Sandbox::User=root "$kernel" busybox-static >/dev/null 2>&1) || {
    apt-get update -qq >/dev/null 2>&1 || true
    (cd "$work" && apt-get download -o APT::Sandbox::User=root "$kernel" busybox-static >/dev/null)
}
dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"
version=$(ls "$work/kernel/lib/modules" | head -1)
modules="$work/kernel/lib/modules/$version"
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
# virtio_pci and virtio_blk with their dependencies, decompressed (busybox's
# insmod reads plain .ko only), dependencies first.
order=""
add_module() {
    local name=$1 file deps dep
    case " $order " in *" $name "*) return;; esac
    file=$(find "$modules" -name "$name.ko*" | head -1)
    if [ -z "$file" ]; then
        file=$(find "$modules" -name "$(echo "$name" | tr _ -).ko*" | head -1)
    fi
    [ -n "$file" ] || return 0  # built in
    case "$file" in
        *.xz) xz -dc "$file";;
        *.zst) zstd -qdc "$file";;
        *.gz) gzip -dc "$file";;
        *) cat "$file";;
    esac > "$root/lib/modules/$name.ko"
    deps=$(grep -a -o 'depends=[a-z0-9_,-]*' "$root/lib/modules/$name.ko" | head -1 | cut -d= -f2 | tr ',' ' ')
    for dep in $deps; do add_module "$(echo "$dep" | tr - _)"; done
    order="$order $name"
}
add_module virtio_pci
add_module virtio_blk
echo $order > "$root/lib/modules/load-order"
printf '%s\n' "$INIT" > "$root/init"
chmod 755 "$root/init"
mkdir -p "$DIR"
(cd "$root" && find . | sort | "$root/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -6) > "$DIR/initrd.img.new"
cp "$work/kernel/boot/vmlinuz-$version" "$DIR/vmlinuz.new"
mv "$DIR/initrd.img.new" "$DIR/initrd.img"
mv "$DIR/vmlinuz.new" "$DIR/vmlinuz"
echo "$STAMP" > "$DIR/stamp"
echo "guest-image: kernel $version, modules:$order" >&2
echo "$DIR"
