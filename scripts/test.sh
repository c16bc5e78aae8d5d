#!/usr/bin/env bash
# The test command: the workspace's tests, then the reference guest's host tests and lints (the
# guest is its own no_std workspace, so `cargo test --workspace` does not reach it).
# COLO_REQUIRE_ALL=1 turns every skipped prerequisite into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export COLO_REQUIRE_ALL="${COLO_REQUIRE_ALL:-1}"
cargo test --workspace
cargo test --manifest-path colo-vmm/guest/Cargo.toml
cargo clippy --manifest-path colo-vmm/guest/Cargo.toml --all-targets -- -D warnings
