#!/usr/bin/env bash
# vhost-net-compare with real frontends: the same traffic through the passthrough backend (one
# QEMU guest) and through the COLO compare path (two QEMU guests), as a markdown table with the
# COLO/passthrough ratio on stdout; progress goes to stderr. Release build; runs as root (network
# namespaces, taps). The guests run under QEMU TCG, so the ratio is the figure that matters.
#
# Usage: scripts/bench-vhost.sh [vhost-bench options]   e.g. --repeat 5 --out bench-vhost.md
#        (see `target/release/vhost-bench --help`)
# Needs: QEMU 7.2 (scripts/install-qemu.sh) and the guest image (scripts/install-guest-image.sh);
#        COLO_QEMU / COLO_GUEST_DIR point elsewhere.
set -euo pipefail

cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "bench-vhost: run as root (network namespaces and taps)" >&2
    exit 1
fi
# The backend and the driver, both in target/release (the driver finds the backend next to itself).
cargo build --release -p vhost-net-compare --bin vhost-net-compare >&2
cargo build --release -p colo-tests --bin vhost-bench >&2
exec target/release/vhost-bench "$@"
