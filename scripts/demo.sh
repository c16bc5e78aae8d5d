#!/usr/bin/env bash
# The main job (run as root on a machine with /dev/kvm): builds the workspace and runs the COLO
# demo, `colo-demo`: a primary and a secondary colo-vmm with the embedded reference guest behind
# vhost-net-compare, a counter client all along, then the phases deterministic (COLO, periodic
# checkpoints), top (divergent output: hybrid mode goes passive and back), top stopped (COLO
# stays) and failover (SIGKILL of the primary; the client's session carries on with the
# secondary). Summary on stdout; timeline, JSON summary and the processes' logs in ./demo-out.
# Takes about 40 s; the exit status says whether every phase behaved.
#
#   scripts/demo.sh [colo-demo options]     the COLO demo (see: scripts/demo.sh --help)
#   scripts/demo.sh --hosts 2               the same on two hosts (network namespaces), ending
#                                           with host a's death
#   scripts/demo.sh --hosts 3               continuous protection on three hosts with an etcd
#                                           arbiter (arbiter-demo: a dies, b re-protects with
#                                           c, a b-c partition, b dies, c serves; one session)
#   scripts/demo.sh proxy                   the earlier colo-proxy packet-capture demo
#
# Safe to run again: the build is incremental, every run cleans up its namespaces and processes,
# and the files in ./demo-out are overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "demo.sh: the demo needs root (network namespaces, taps, KVM): run 'sudo $0${*:+ $*}'" >&2
    exit 2
  fi
}

if [ "${1:-}" = "proxy" ]; then
  shift
  need_root proxy "$@"
  scripts/setup.sh
  cargo build --release --workspace
  exec target/release/proxy-demo --out demo-out "$@"
fi

case "${1:-}" in
  -h|--help) ;;
  *)
    need_root "$@"
    if [ ! -e /dev/kvm ]; then
      echo "demo.sh: /dev/kvm is missing: the COLO demo runs two KVM virtual machines" >&2
      exit 2
    fi
    if ! command -v ip >/dev/null; then
      echo "demo.sh: installing iproute2 (for network namespaces)"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2
    fi
    ;;
esac
cargo build --workspace --bins
mkdir -p demo-out
if [ "${1:-}" = "--hosts" ] && [ "${2:-}" = "3" ]; then
  shift 2
  if ! command -v etcd >/dev/null; then
    echo "demo.sh: installing what the three-host demo needs (etcd-server, nftables, tcpdump)"
    scripts/setup.sh
  fi
  exec target/debug/arbiter-demo --svg demo-out/arbiter-demo.svg --json demo-out/arbiter-demo.json \
    --logs demo-out/arbiter-demo-logs.txt "$@"
fi
exec target/debug/colo-demo --svg demo-out/colo-demo.svg --json demo-out/colo-demo.json \
  --logs demo-out/colo-demo-logs.txt "$@"
