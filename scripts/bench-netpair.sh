#!/usr/bin/env bash
# scripts/bench-netpair.sh — the netpair benchmark, with Linux bonding measured as the peer.
#
#   scripts/bench-netpair.sh [--trials N] [--iperf-seconds S] [--host-only | --in-guest]
#                            [--hogs N] [--flap-trials N] [--flap-seconds S]
#                            [--daemon-config LINE]   (e.g. "realtime_priority = 10")
#   scripts/bench-netpair.sh --summarize SAVED-OUTPUT     (the summary of an earlier run)
#
# 1. host kernel: target/release/bench-netpair (netpair only: this kernel has no bonding):
#    N trials each of carrier loss and silent loss on host a's path, one-way loss each way,
#    AL1 silently dead then silent loss, AL1 + a's app0 down at once (UDP gap, TCP gap, TCP
#    survival, resets, time to the steering decision), flapping (silent loss 1 s on / 1 s
#    off, path changes per minute), iperf3 throughput with/without the programs; then the
#    same fault series again with --hogs N busy-loop processes beside the daemons (default
#    2; 0 skips that pass). A table of min/median/max per fault closes the host part.
# 2. Debian's 6.12 kernel in a QEMU/TCG guest (scripts/lab/run-vm.sh): the same binary with
#    --bond, so netpair and bonding run side by side in one environment.
# Then a summary: netpair vs bonding per fault (same environment), ratio, throughput, and
# the issue's targets (silent ≤ 100 ms, carrier ≤ 50 ms, TCP gap ≤ 300 ms, throughput loss
# ≤ 5 %) marked met / not met, judged on the worst trial.
#
# TCG inflates everything in the guest (ip/nft commands take 0.25-0.9 s, scheduling noise
# of 10-40 ms): compare numbers only within one environment. Everything the benchmark
# creates (namespaces, daemons, pinned maps, the guest) is gone when it ends.
# Needs root. Runs scripts/setup.sh first when a needed tool is missing.
set -euo pipefail

REPO=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
cd "$REPO"

trials=5 secs=5 host=1 guest=1 summary_only="" hogs=2 flap_trials="" flap_secs=60 daemon_config=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --trials) trials=$2; shift 2 ;;
        --iperf-seconds) secs=$2; shift 2 ;;
        --host-only) guest=0; shift ;;
        --hogs) hogs=$2; shift 2 ;;
        --flap-trials) flap_trials=$2; shift 2 ;;
        --flap-seconds) flap_secs=$2; shift 2 ;;
        --daemon-config) daemon_config=$2; shift 2 ;;
        --in-guest) host=0; shift ;;
        --summarize) summary_only=$2; shift 2 ;;   # re-summarize a saved output (RESULT lines)
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "bench-netpair.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[[ $trials =~ ^[1-9][0-9]*$ ]] || { echo "bench-netpair.sh: --trials needs a positive number" >&2; exit 2; }
[[ $secs =~ ^[1-9][0-9]*$ ]] || { echo "bench-netpair.sh: --iperf-seconds needs a positive number" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "bench-netpair.sh: must run as root (namespaces, BPF, QEMU)" >&2; exit 1; }

log() { printf '[bench-netpair] %s\n' "$*"; }

# The summary, from the RESULT lines of bench-netpair runs (file $1).
summarize() {
echo
echo "=================================================================================="
echo " netpair benchmark summary  ($(date -u +%Y-%m-%dT%H:%MZ), $trials trials per fault, iperf3 ${secs} s)"
echo "=================================================================================="
awk -v trials="$trials" '
function kv(line,   i, n, f, p) {
    delete R; n = split(line, f, " ")
    for (i = 2; i <= n; i++) { p = index(f[i], "="); if (p) R[substr(f[i], 1, p - 1)] = substr(f[i], p + 1) }
}
{
    kv($0)
    env = R["env"]
    if ("kernel" in R) { kernel[env] = R["kernel"]; envs[env] = 1; next }
    if (R["unavailable"] == 1) { unavail[env] = 1; next }
    if (R["failed"] == 1) { failed[env R["impl"]] = R["why"]; next }
    key = env SUBSEP R["impl"] SUBSEP R["fault"] SUBSEP R["metric"]
    if (R["metric"] ~ /^throughput_/) { gbps[env, R["metric"]] = R["gbps"]; ratio[env, R["metric"]] = R["ratio"]; next }
    if (R["metric"] == "tcp_survived") { surv[env, R["impl"], R["fault"]] = R["value"] "/" R["n"]; fo[env, R["impl"], R["fault"]] = R["failovers"]; next }
    mean[key] = R["mean"]; min[key] = R["min"]; max[key] = R["max"]; open[key] = R["open"]; have[key] = 1
}
function cell(env, imp, fault, metric,   k, p) {
    k = env SUBSEP imp SUBSEP fault SUBSEP metric
    if (!(k in have)) return "-"
    p = (open[k] + 0) ? "≥" : ""
    return sprintf("%s%.0f / %s%.0f / %s%.0f", p, mean[k], p, min[k], p, max[k])
}
function row(env, imp, fault, label,   s) {
    s = surv[env, imp, fault]; if (s == "") s = "-"
    printf "  %-44s %-24s %-24s %-24s %s\n", label, cell(env, imp, fault, "udp_gap_ms"), cell(env, imp, fault, "tcp_gap_ms"), cell(env, imp, fault, "decide_ms"), s
}
function verdict(env, imp, fault, metric, target, what,   k) {
    k = env SUBSEP imp SUBSEP fault SUBSEP metric
    if (!(k in have)) { printf "  %-6s %-46s %-26s %s\n", env, what, "no data", "NOT MET (not measured)"; return }
    printf "  %-6s %-46s %-26s %s\n", env, what, sprintf("worst %s%.0f ms (mean %.0f)", ((open[k] + 0) ? "≥" : ""), max[k], mean[k]),
        ((max[k] + 0 <= target) && !(open[k] + 0)) ? "met" : "NOT MET"
}
END {
    split("host guest", order, " ")
    for (oi = 1; oi <= 2; oi++) {
        env = order[oi]; if (!(env in envs)) continue
        printf "\n[%s] kernel %s%s\n", env, kernel[env], (env == "guest" ? " under QEMU TCG (inflated; compare only within this block)" : "")
        printf "  %-44s %-24s %-24s %-24s %s\n", "gaps in ms: mean / min / max", "UDP gap", "TCP gap", "path died→decided", "TCP survived"
        if ((env "netpair") in failed) printf "  netpair FAILED here: %s\n", failed[env "netpair"]
        row(env, "netpair", "carrier", "netpair, carrier loss (a app0 down)")
        row(env, "bonding", "carrier", "bonding miimon 100, carrier loss")
        row(env, "netpair", "silent", "netpair, silent loss")
        row(env, "bonding", "silent", "bonding arp_interval 100, silent loss")
        row(env, "bonding-miimon", "silent", "bonding miimon 100, silent loss (3 s bound)")
        if ((env SUBSEP "bonding-miimon" SUBSEP "silent") in fo && fo[env, "bonding-miimon", "silent"] == 0)
            printf "  %-44s no failover within 3 s in any trial\n", ""
        if (env in unavail) printf "  bonding: not available in this kernel (measured in the guest block instead)\n"
        for (fi = 1; fi <= 2; fi++) {
            fault = fi == 1 ? "carrier" : "silent"
            kn = env SUBSEP "netpair" SUBSEP fault SUBSEP "udp_gap_ms"
            kb = env SUBSEP "bonding" SUBSEP fault SUBSEP "udp_gap_ms"
            if ((kn in have) && (kb in have) && mean[kn] + 0 > 0)
                printf "  ratio %s: bonding / netpair mean UDP gap = %.1f x (TCP gap %.1f x)\n", fault, mean[kb] / mean[kn],
                    mean[env SUBSEP "bonding" SUBSEP fault SUBSEP "tcp_gap_ms"] / (mean[env SUBSEP "netpair" SUBSEP fault SUBSEP "tcp_gap_ms"] + 0 > 0 ? mean[env SUBSEP "netpair" SUBSEP fault SUBSEP "tcp_gap_ms"] : 1)
        }
        if ((env, "throughput_i") in gbps) {
            printf "  throughput (iperf3 client → guest, 1 TCP stream):\n"
            printf "    (i)   no netpair (mean of before/after)    %8.3f Gbit/s\n", gbps[env, "throughput_i"]
            if ((env, "throughput_i_g") in gbps)
                printf "    (i-g) no netpair, GSO off on a switch port %8.3f Gbit/s  %5.1f %% of (i)\n", gbps[env, "throughput_i_g"], 100 * ratio[env, "throughput_i_g"]
            if ((env, "throughput_ii") in gbps)
                printf "    (ii)  programs attached, not steering   %8.3f Gbit/s  %5.1f %% of (i)\n", gbps[env, "throughput_ii"], 100 * ratio[env, "throughput_ii"]
            if ((env, "throughput_iii") in gbps)
                printf "    (iii) steering through b                %8.3f Gbit/s  %5.1f %% of (i)\n", gbps[env, "throughput_iii"], 100 * ratio[env, "throughput_iii"]
            if ((env, "throughput_ii_tc") in gbps)
                printf "    (ii-tc) attached, app_xdp = false       %8.3f Gbit/s  %5.1f %% of (i)\n", gbps[env, "throughput_ii_tc"], 100 * ratio[env, "throughput_ii_tc"]
            if ((env, "throughput_iii_tc") in gbps)
                printf "    (iii-tc) steering, app_xdp = false      %8.3f Gbit/s  %5.1f %% of (i)\n", gbps[env, "throughput_iii_tc"], 100 * ratio[env, "throughput_iii_tc"]
        }
    }
    printf "\nTargets (issue 5), netpair, judged on the worst of %d trials:\n", trials
    for (oi = 1; oi <= 2; oi++) {
        env = order[oi]; if (!(env in envs)) continue
        if ((env "netpair") in failed) { printf "  %-6s netpair failed in this environment: not measured\n", env; continue }
        verdict(env, "netpair", "silent", "udp_gap_ms", 100, "silent loss gap ≤ 100 ms")
        verdict(env, "netpair", "carrier", "udp_gap_ms", 50, "carrier loss gap ≤ 50 ms")
        verdict(env, "netpair", "silent", "tcp_gap_ms", 300, "TCP gap ≤ 300 ms (silent loss)")
        verdict(env, "netpair", "carrier", "tcp_gap_ms", 300, "TCP gap ≤ 300 ms (carrier loss)")
        for (fi = 1; fi <= 2; fi++) {
            fault = fi == 1 ? "carrier" : "silent"
            s = surv[env, "netpair", fault]
            if (s != "") { split(s, sv, "/"); printf "  %-6s %-46s %-26s %s\n", env, "TCP survives (" fault ")", s, (sv[1] == sv[2] ? "met" : "NOT MET") }
        }
        if ((env, "throughput_ii_tc") in gbps)
            printf "  %-6s %-46s %-26s %s\n", env, "throughput loss ≤ 5 % (ii-tc vs i, app_xdp=false)", sprintf("loss %.1f %%", 100 * (1 - ratio[env, "throughput_ii_tc"])),
                (ratio[env, "throughput_ii_tc"] + 0 >= 0.95 ? "met" : "NOT MET")
        if ((env, "throughput_ii") in gbps)
            printf "  %-6s %-46s %-26s %s\n", env, "throughput loss ≤ 5 % (ii vs i)", sprintf("loss %.1f %%", 100 * (1 - ratio[env, "throughput_ii"])),
                (ratio[env, "throughput_ii"] + 0 >= 0.95 ? "met" : "NOT MET")
        else
            printf "  %-6s %-46s %-26s %s\n", env, "throughput loss ≤ 5 % (ii vs i)", "no data", "NOT MET (not measured)"
    }
}' "$1"
}

if [[ -n $summary_only ]]; then
    tr -d '\r' < "$summary_only" | grep '^RESULT ' > /tmp/bench-netpair-summary.$$ || true
    summarize /tmp/bench-netpair-summary.$$; rm -f /tmp/bench-netpair-summary.$$; exit 0
fi

GUEST_KVER=6.12.107+deb12-amd64
need_setup=0
for t in iperf3 nft ethtool ip nsenter bpf-linker qemu-system-x86_64; do
    command -v "$t" >/dev/null 2>&1 || { log "missing $t"; need_setup=1; }
done
[[ -r /boot/vmlinuz-$GUEST_KVER ]] || { log "missing the guest kernel $GUEST_KVER"; need_setup=1; }
if [[ $need_setup = 1 ]]; then
    log "running scripts/setup.sh"
    scripts/setup.sh
fi
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

log "cargo build --release"
cargo build --release -p netpair -p eac-lab --bin netpair --bin bench-netpair 2>&1 | tail -n 3

out=$(mktemp -d /tmp/bench-netpair.XXXXXX)
trap 'rm -rf "$out"' EXIT
BIN_ARGS=(--trials "$trials" --iperf-seconds "$secs" --flap-seconds "$flap_secs")
[[ -z $flap_trials ]] || BIN_ARGS+=(--flap-trials "$flap_trials")
[[ -z $daemon_config ]] || BIN_ARGS+=(--daemon-config "$daemon_config")

host_rc=0 guest_rc=0
if [[ $host = 1 ]]; then
    log "(1) host kernel $(uname -r): netpair"
    set +e
    target/release/bench-netpair "${BIN_ARGS[@]}" 2>"$out/host.err" | tee "$out/host.txt"
    host_rc=${PIPESTATUS[0]}
    if [[ $hogs -gt 0 ]]; then
        log "(1b) host kernel, the fault series again with $hogs CPU hogs beside the daemons"
        target/release/bench-netpair "${BIN_ARGS[@]}" --faults-only --hogs "$hogs" 2>"$out/hogs.err" | tee "$out/hogs.txt"
        [[ ${PIPESTATUS[0]} = 0 ]] || { host_rc=1; log "hogs run failed; its stderr:"; tail -n 40 "$out/hogs.err"; }
    fi
    set -e
    [[ $host_rc = 0 ]] || { log "host run exited with $host_rc; its stderr:"; tail -n 40 "$out/host.err"; }
fi
if [[ $guest = 1 ]]; then
    log "(2) Debian $GUEST_KVER in QEMU (TCG): netpair and Linux bonding side by side"
    # bpffs is not mounted in the guest; the guest sees the repo read-write at this path.
    # The timeout covers boot, 3 bonding + 2 netpair fault series and 5 iperf3 runs under TCG.
    gtimeout=$(( 600 + trials * 5 * 45 + secs * 5 * 3 ))
    set +e
    scripts/lab/run-vm.sh --modules "bonding veth bridge nf_tables sch_ingress" --mem 2G \
        --timeout "$gtimeout" -- bash -c \
        'mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; exec target/release/bench-netpair --bond "$@"' \
        bench "${BIN_ARGS[@]}" 2>"$out/guest.err" | tr -d '\r' | tee "$out/guest.txt"
    guest_rc=${PIPESTATUS[0]}
    set -e
    grep -h '^run-vm.sh:' "$out/guest.err" || true
    [[ $guest_rc = 0 ]] || { log "guest run exited with $guest_rc"; tail -n 20 "$out/guest.err"; }
fi

# ------------------------------------------------------------------------------------------
# Summary from the RESULT lines of both runs
# ------------------------------------------------------------------------------------------
cat "$out"/host.txt "$out"/guest.txt 2>/dev/null | grep '^RESULT ' > "$out/results" || true
summarize "$out/results"
if cat "$out"/host.txt "$out"/hogs.txt 2>/dev/null | grep -q '^TABLE '; then
    echo
    echo "Host kernel, netpair, per fault: min/median/max over the trials (ms; flapping: path changes per minute)"
    cat "$out"/host.txt "$out"/hogs.txt 2>/dev/null | grep '^TABLE ' | sed 's/^TABLE //' |
        awk '{ printf "  "; for (i = 1; i <= NF; i++) if ($i !~ /^impl=/) printf "%s  ", $i; print "" }' | column -t
fi
echo
[[ $host = 0 ]] || echo "host run exit status $host_rc; guest run exit status $guest_rc" | sed "s/; guest run exit status 0//"
[[ $host_rc = 0 && $guest_rc = 0 ]]
