#!/usr/bin/env bash
# COLO across two hosts (hosts-bench): the replication network's raw TCP throughput (iperf3),
# the checkpoint pause against dirty pages with and without --link-key, the round trip through
# COLO on one host and across two, and the failover gap when a host dies or freezes. Builds in
# release mode and prints a markdown report on stdout; progress goes to stderr. Needs root,
# /dev/kvm and iperf3 (scripts/setup.sh installs it). About 6 minutes with the defaults.
#
# Usage: scripts/bench-hosts.sh [hosts-bench options]   e.g. --only pause,latency --out hosts.md
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "bench-hosts: run as root (network namespaces, taps)" >&2
    exit 1
fi
command -v iperf3 >/dev/null || { echo "bench-hosts: iperf3 is missing (scripts/setup.sh installs it)" >&2; exit 1; }
cargo build --release --workspace --bins >&2
exec target/release/hosts-bench "$@"
