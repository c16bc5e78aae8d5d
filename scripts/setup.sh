#!/usr/bin/env bash
# Installs what colo's tests and demos need on a fresh Debian 12 machine (run as root):
# packet tools for the namespace tests, etcd and promtool (Debian's prometheus package) for the arbiter
# and metrics tests, and QEMU 7.2 for the interop tests and benchmarks.
# Safe to run again: installed pieces are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iproute2 iputils-ping ethtool socat tcpdump tshark busybox-static iperf3 nftables etcd-server resource-agents libxml2-utils systemd prometheus)
missing=()
for p in "${packages[@]}"; do
  [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == "install ok installed" ]] || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: packet tools already installed"
fi

scripts/install-qemu.sh
scripts/install-guest-image.sh
