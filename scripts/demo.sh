#!/usr/bin/env bash
# The demo: set up a fresh machine, build cowvm and its test guest, boot VMs on KVM and pause
# a running one.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo build --release -p cowvm -p guests
cowvm=./target/release/cowvm
guest=$(./target/release/cowvm-test-guest)

echo "== hello"
"$cowvm" run --kernel "$guest" --cmdline hello
echo "== compute (deterministic checksum)"
"$cowvm" run --kernel "$guest" --mem 128M --cmdline "compute mem=16M rounds=4"
echo "== dirty (writes every page of 64 MiB, 2000 passes)"
"$cowvm" run --kernel "$guest" --mem 256M --cmdline "dirty mem=64M passes=2000 every=500"
echo "== pause/resume latency of a running guest"
"$cowvm" bench pause --kernel "$guest" --count 200
