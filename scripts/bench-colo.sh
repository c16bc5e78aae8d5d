#!/usr/bin/env bash
# COLO end-to-end benchmarks (colo-bench): checkpoint pause against dirty pages next to the
# memory-copy budget; COLO-only vs passive-only vs hybrid vs unprotected on echo and top; failover
# gap against the heartbeat timeout; checkpoint pause against vCPUs and against dirty disk
# blocks; the guest's disk throughput with and without COLO. Builds everything in release mode
# (the benchmark runs the release colo-vmm and vhost-net-compare next to it) and prints a
# markdown report on stdout; progress goes to stderr. Needs root and /dev/kvm. About 12 minutes
# with the defaults.
#
# Usage: scripts/bench-colo.sh [colo-bench options]   e.g. --secs 5 --out colo-bench.md
#        scripts/bench-colo.sh --only cpus,blocks,disk   (the vCPU and disk parts only)
#        (see `target/release/colo-bench --help`)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "bench-colo: run as root (network namespaces, taps)" >&2
    exit 1
fi
cargo build --release --workspace --bins >&2
exec target/release/colo-bench "$@"
