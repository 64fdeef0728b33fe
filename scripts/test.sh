#!/usr/bin/env bash
# The whole test suite: installs what is missing, then formatting, lints and
# every test of the workspace (unit, property, multi-process). One profile
# (dev, with optimised dependencies) so RocksDB is compiled once.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

scripts/install-deps.sh

echo "==> cargo fmt --check"
cargo fmt --all --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo build (every binary)"
# The multi-process tests run the workspace's binaries (`basalt`,
# `fio-bench`, ...) from the target directory. Test builds only build the
# executables of a package with integration tests, so without this a test
# can run a stale binary, or find none on a cold build.
cargo build --workspace --bins --locked

echo "==> tests"
if cargo nextest --version >/dev/null 2>&1; then
    # Doc comments hold no doctests (examples are `text` blocks), so nextest
    # runs everything there is.
    cargo nextest run --workspace --all-targets --locked --no-fail-fast
else
    cargo test --workspace --all-targets --locked --no-fail-fast
fi
