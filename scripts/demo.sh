#!/usr/bin/env bash
# The main job on a fresh machine (run as root): installs what is needed, builds, and runs the
# demo. Until COLO runs end to end this is the compare proxy's packet-capture demo: a client and
# two "VMs" in network namespaces, `colo-proxy run` between them, real traffic, a divergent
# service, and the captures in ./demo-out.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --workspace
exec target/release/proxy-demo --out demo-out "$@"
