#!/usr/bin/env bash
# scripts/demo.sh — the main job: set up this machine (scripts/setup.sh), build, then bring up
# a two-host lab and show each part of the stack alive (netpair keeping a TCP stream through
# NIC faults, a libvirtd per host booting guests, the ublk driver in Debian's 6.12 kernel).
# Everything it creates is removed at the end. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "demo.sh: run as root (it creates namespaces, BPF programs and VMs)" >&2; exit 1; }
scripts/setup.sh
echo "[demo] cargo build"
cargo build --quiet 2>&1 | grep -vE '^warning: netpair@' || true
[ -x target/debug/lab-demo ] || { echo "demo.sh: build failed" >&2; exit 1; }
echo "[demo] eac host check (this machine)"
target/debug/eac host check || true
RUST_LOG=${RUST_LOG:-warn} exec target/debug/lab-demo
