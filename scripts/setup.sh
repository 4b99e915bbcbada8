#!/usr/bin/env bash
# One-time set-up of a development machine: the bare-metal target the test guests are built for,
# and a real Linux kernel for the Linux boot-protocol tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx x86_64-unknown-none; then
  rustup target add x86_64-unknown-none
fi
if [ ! -e /dev/kvm ]; then
  echo "warning: /dev/kvm is missing: cowvm needs KVM to run guests" >&2
fi
./scripts/fetch-linux-kernel.sh target/linux-kernel
