#!/usr/bin/env bash
# scripts/bench-failover.sh — the controller's failover benchmark (Level 1).
#
#   scripts/bench-failover.sh [--trials N] [--soak M] [--ready] [--hogs H]
#
# 1. Host death, N trials (default 5), each in a fresh two-host lab (a libvirtd and an
#    eac-controller per host, shared storage, a protected TCG guest on host a): every process
#    of host a is killed; printed per trial and as min / median / max:
#      detection  — kill → host b declares a dead (peer_dead event)
#      restart    — detection → b has started the guest (guest_restarted event)
#      total      — kill → guest started on b (target ≤ 10 s)
#    --ready also waits for GUEST-READY on b's serial console (adds the TCG boot, ~5-10 s).
#    The summary also gives when b's libvirtd first reported the guest running (median
#    target ≤ 4 s, issue 13 §6).
# --hogs H runs H busy-loop processes beside everything for the whole run (a loaded host).
# 2. Flapping-link soak, M short outages (default 200) on one channel at a time (mgmt, al1,
#    al2 link down; host a's state-file failing with EIO), 0.2-1.5 s each: zero false
#    failovers required (no peer_dead, no restart, no fencing; the guest stays on a).
# Exit status 0 only when every trial restarted within 10 s and the soak had no false
# failover. Everything it creates is removed. Needs root; builds first.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
[[ $(id -u) -eq 0 ]] || { echo "bench-failover.sh: must run as root (namespaces, libvirtd, QEMU, FUSE)" >&2; exit 1; }
for a in "$@"; do
    case $a in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;; esac
done
command -v libvirtd >/dev/null || scripts/setup.sh
echo "[bench-failover] cargo build"
cargo build --quiet -p eac-controller -p eac-cli -p eac-lab --bins 2>&1 | grep -vE '^warning: netpair@' || true
[[ -x target/debug/bench-failover && -x target/debug/eac-controller && -x target/debug/eac ]] \
    || { echo "bench-failover.sh: build failed" >&2; exit 1; }
echo "[bench-failover] $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r)"
RUST_LOG=${RUST_LOG:-warn} exec target/debug/bench-failover "$@"
