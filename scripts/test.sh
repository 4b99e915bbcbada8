#!/usr/bin/env bash
# The test command: set up what is missing, then run every test of the workspace on real KVM.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo fmt --all -- --check
(cd guests/pvh && cargo fmt -- --check && cargo clippy --release -- -D warnings)
cargo clippy --workspace --all-targets --release -- -D warnings
cargo test --workspace --release
