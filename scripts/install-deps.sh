#!/usr/bin/env bash
# Installs the Debian packages Basalt's build and tests need, only when they
# are missing. Safe to run again; needs root (or sudo) to install anything.
set -euo pipefail

missing=()
need_cmd() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed" || missing+=("$1"); }

need_pkg libclang-dev        # bindgen, for RocksDB's bindings
need_cmd g++ g++             # RocksDB's C++ build
need_cmd fio fio             # benchmarks and NBD tests
need_cmd nbdinfo libnbd-bin  # nbdinfo, nbdcopy, nbdsh
need_cmd qemu-img qemu-utils # qemu-img, qemu-io, qemu-nbd
need_cmd nbdkit nbdkit       # reference NBD server for baselines
need_pkg python3-libnbd      # nbdsh
need_cmd xz xz-utils         # the test guest's kernel modules (scripts/guest-image.sh)

# The QEMU guest test boots qemu-system-x86_64. It must match qemu-utils:
# a Debian 12 machine whose qemu-utils comes from bookworm-backports cannot
# take bookworm's qemu-system-x86 7.2, so that case installs it from
# backports through a private apt source list (/etc/apt is left alone).
install_qemu_system() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 && return 0
    local installed
    installed=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [[ "$installed" != *bpo* ]]; then
        $sudo apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null
        return
    fi
    echo "install-deps: qemu-utils $installed is from backports; taking qemu-system-x86 from there too" >&2
    local dir="${XDG_CACHE_HOME:-$HOME/.cache}/basalt-apt"
    local mirror
    mirror=$(awk '/^URIs:/{u=$2} /^Suites:/{ if ($0 ~ /bookworm( |$)/) { print u; exit } }' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
    mkdir -p "$dir/lists/partial" "$dir/archives/partial"
    local key=/usr/share/keyrings/debian-archive-keyring.gpg
    {
        echo "deb [signed-by=$key] $mirror bookworm main"
        echo "deb [signed-by=$key] $mirror bookworm-updates main"
        echo "deb [signed-by=$key] $mirror bookworm-backports main"
    } > "$dir/sources.list"
    local apt_opts=(-o Dir::Etc::sourcelist="$dir/sources.list" -o Dir::Etc::sourceparts=-
        -o Dir::State::lists="$dir/lists" -o Dir::Cache::archives="$dir/archives"
        -o APT::Sandbox::User=root)
    $sudo apt-get "${apt_opts[@]}" update -qq >/dev/null
    $sudo apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends \
        -t bookworm-backports qemu-system-x86 >/dev/null
}

sudo=""
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    missing+=(qemu-system-x86)
fi

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

echo "install-deps: installing ${missing[*]}" >&2
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo="sudo"
    else
        echo "install-deps: missing ${missing[*]} and not root; install them and rerun" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
packages=()
for package in "${missing[@]}"; do
    [ "$package" = qemu-system-x86 ] || packages+=("$package")
done
if [ ${#packages[@]} -gt 0 ]; then
    $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
install_qemu_system
