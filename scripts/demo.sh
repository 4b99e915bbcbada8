#!/usr/bin/env bash
# The demo: set up a fresh machine, build cowvm and its test guest, boot a VM that keeps its
# memory and a disk busy, take a live checkpoint of it while it runs, restore the checkpoint in
# a new VM, and show that both end with the same disk checksum.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo build --release -p cowvm -p guests
cowvm=./target/release/cowvm
guest=$(./target/release/cowvm-test-guest)
work=$(mktemp -d /tmp/cowvm-demo.XXXXXX)
echo "demo files in $work"

echo "== boot: a guest writing, flushing and verifying a disk and mixing 64 MiB of memory"
truncate -s 64M "$work/disk.raw"
"$cowvm" run --kernel "$guest" --mem 256M --disk "$work/disk.raw,delay_ms=1" \
  --cmdline "disk blocks=1024 rounds=8 qd=16 mem=64M seed=7" \
  --console "$work/original.log" --api-sock "$work/vm.sock" &
vm=$!
for _ in $(seq 100); do [ -S "$work/vm.sock" ] && break; sleep 0.05; done
# Checkpoint inside the run: once the guest has finished its first round.
for _ in $(seq 600); do grep -q "disk round=1" "$work/original.log" 2>/dev/null && break; sleep 0.05; done

echo "== live checkpoint while it runs"
"$cowvm" checkpoint --api-sock "$work/vm.sock" --out "$work/ckpt" --strategy uffd --io live
wait "$vm"
"$cowvm" inspect "$work/ckpt"

echo "== restore the checkpoint into a new VM and run it to the end"
"$cowvm" restore "$work/ckpt" --console "$work/restored.log" --disk-dir "$work"

echo "== the original ran on after the checkpoint; the restored VM continued from it:"
echo "original: $(grep '^disk checksum=' "$work/original.log")"
echo "restored: $(grep '^disk checksum=' "$work/restored.log")"
if [ "$(grep '^disk checksum=' "$work/original.log")" = "$(grep '^disk checksum=' "$work/restored.log")" ]; then
  echo "identical: the restored VM computed exactly what the original did"
else
  echo "DIFFERENT" >&2
  exit 1
fi
echo "== pause/resume latency of a running guest (the floor of every checkpoint pause)"
"$cowvm" bench pause --kernel "$guest" --count 100
