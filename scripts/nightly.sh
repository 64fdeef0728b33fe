#!/usr/bin/env bash
# The long-running checks that do not fit the CI suite: the seeded recovery
# simulation over many seeds (CI runs 300). A failure prints its seed and the
# command that replays it.
#
#   scripts/nightly.sh [SEEDS]      (default 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}"
seeds=${1:-20000}
echo "==> recovery simulation, $seeds seeds"
BASALT_SIM_SEEDS=$seeds cargo test -p basalt-osd --test recovery_simulation --locked -- --nocapture
