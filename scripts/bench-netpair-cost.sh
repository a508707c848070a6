#!/usr/bin/env bash
# scripts/bench-netpair-cost.sh — netpair's cost on the data path, measured interleaved.
#
#   scripts/bench-netpair-cost.sh [--rounds N] [--iperf-seconds S]
#
# In one lab (guest namespace on host a, a client on the switch), N rounds (default 5) of:
# iperf3 client → guest without netpair; with both daemons running, attach mode chosen
# automatically (what `netpair status` calls app.attach); with `app_xdp = true` (reference).
# Then one closing baseline. Each loss is taken against the same round's baseline, so a
# shared machine's drift cancels out; min / median / max over the rounds are printed.
# Release build. Needs root. Everything created is removed at the end.
set -euo pipefail
REPO=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
cd "$REPO"
rounds=5 secs=5
while [[ $# -gt 0 ]]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --iperf-seconds) secs=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "bench-netpair-cost.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[[ $rounds =~ ^[1-9][0-9]*$ && $secs =~ ^[1-9][0-9]*$ ]] || { echo "bench-netpair-cost.sh: numbers needed" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "bench-netpair-cost.sh: must run as root" >&2; exit 1; }
command -v iperf3 >/dev/null && command -v bpf-linker >/dev/null || scripts/setup.sh
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
echo "[bench-netpair-cost] cargo build --release"
cargo build --release -p netpair -p eac-lab --bin netpair --bin bench-netpair 2>&1 | tail -n 2
exec target/release/bench-netpair --cost-rounds "$rounds" --iperf-seconds "$secs"
