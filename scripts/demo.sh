#!/usr/bin/env bash
# scripts/demo.sh — the main job: set up this machine (scripts/setup.sh), build, then bring up
# a two-host lab (a libvirtd and an eac-controller per host, shared storage), boot a guest on
# host a, protect it with `eac vm protect demo-vm --level 1`, kill host a, and show the guest
# running on host b with the timeline of events.
#   scripts/demo.sh --all   also shows netpair (a TCP stream through NIC faults) and the ublk
#                           driver in Debian's 6.12 kernel.
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
RUST_LOG=${RUST_LOG:-warn} exec target/debug/lab-demo "$@"
