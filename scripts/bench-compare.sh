#!/usr/bin/env bash
# Side-by-side benchmark of QEMU 7.2's colo-compare and `colo-proxy compare` (same driver, same
# UDP frame streams over Unix sockets, both implementations in one run). Builds in release mode
# and prints a markdown table on stdout; progress goes to stderr.
#
# Usage: scripts/bench-compare.sh [compare-bench options]   e.g. --pairs 50000 --out bench.md
#        (see `target/release/compare-bench --help`)
# Env:   COLO_QEMU  QEMU binary (default /opt/colo-qemu/bin/qemu-system-x86_64; installed with
#                   scripts/install-qemu.sh if missing — that needs root or sudo)
set -euo pipefail

cd "$(dirname "$0")/.."
QEMU="${COLO_QEMU:-/opt/colo-qemu/bin/qemu-system-x86_64}"

if [ ! -x "$QEMU" ]; then
    if [ -n "${COLO_QEMU:-}" ]; then
        echo "bench-compare: COLO_QEMU=$QEMU is not executable" >&2
        exit 1
    fi
    echo "bench-compare: QEMU missing, installing it with scripts/install-qemu.sh" >&2
    if [ "$(id -u)" = 0 ]; then
        scripts/install-qemu.sh >&2
    else
        sudo scripts/install-qemu.sh >&2
    fi
fi

# Our binary and the driver, both in target/release (the driver finds colo-proxy next to itself).
cargo build --release -p colo-proxy --bin colo-proxy >&2
cargo build --release -p colo-tests --bin compare-bench >&2
exec target/release/compare-bench --qemu "$QEMU" "$@"
