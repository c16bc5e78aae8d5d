#!/usr/bin/env bash
# The test command: the workspace's lints and tests, then the reference guest's host tests and
# lints (the guest is its own no_std workspace, so `cargo test --workspace` does not reach it),
# then every fuzz target for a few seconds (fuzz/ is its own workspace too; scripts/fuzz.sh).
# COLO_REQUIRE_ALL=1 turns every skipped prerequisite into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export COLO_REQUIRE_ALL="${COLO_REQUIRE_ALL:-1}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests start the workspace's binaries from target/debug. `cargo test` builds a
# member's binaries only when that member has integration tests of its own (colo-vmm has none),
# so build them all first.
cargo build --workspace --bins
cargo test --workspace
cargo test --manifest-path colo-vmm/guest/Cargo.toml
cargo clippy --manifest-path colo-vmm/guest/Cargo.toml --all-targets -- -D warnings
scripts/fuzz.sh --smoke 3
