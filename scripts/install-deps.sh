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

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

echo "install-deps: installing ${missing[*]}" >&2
sudo=""
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
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
