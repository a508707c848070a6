#!/usr/bin/env bash
# scripts/bench-mirror.sh — the ublk-mirror benchmark, with the raw disk and DRBD measured
# side by side in the same boot, on the same backing and the same link.
#
#   scripts/bench-mirror.sh [--runs N] [--quick] [--guest-only | --host-only] [--runtime S]
#   scripts/bench-mirror.sh --summarize RESULTS.txt     (the summary of an earlier run)
#
# 1. guest: two QEMU/TCG guests booting Debian's 6.12 kernel (scripts/lab/run-vm.sh), on a
#    tap bridge in a network namespace this script creates (eac-mbench-<pid>) and deletes.
#    Each guest has a brd RAM disk (/dev/ram0) as backing. Guest a runs fio (libaio,
#    direct=1): 4k randwrite QD1, 4k randwrite QD32, 1M sequential write QD8 on
#      (a) the raw /dev/ram0, (b) ublk-mirror: /dev/ublkbN in a, replica daemon in b over
#      the guest link, (c) the kernel's DRBD 8.4 (drbd.ko), protocol C, default settings,
#    plus the link's ping RTT and iperf3 throughput, all in one boot of both guests.
# 2. host (no guest): NBD (fio's nbd engine) to `ublk-mirror nbd-local` (local) and to a
#    mirrored primary whose replica runs in a second network namespace linked by veth;
#    iperf3 over that veth; resync efficiency: the link is cut, N MiB of scattered distinct
#    4k blocks are written, the link comes back, and the bytes the resync sent are compared
#    with the dirty bytes.
# Then a summary: IOPS, latency p50/p99/p99.9 (fio's total latency), MiB/s, ratios
# b/a and b/c, and the issue's targets as met / not met:
#   QD32 IOPS ≥ DRBD's; QD1 p50 ≤ 1.1 × DRBD's; sequential ≥ 0.95 × min(local, link);
#   resync bytes ≤ 1.05 × dirty bytes.
# With --runs N > 1 every cell is "median (min–max)" over N fresh boots (run-to-run variance
# under TCG is large: recipes/drbd-bench saw 2× on DRBD QD32); ratios use the medians.
#
# Options:
#   --runs N       fresh boots / host repetitions (default 1)
#   --quick        smoke run: 4 s per fio job after 1 s ramp, 256 MiB disks, 3 s iperf3
#   --runtime S    measured seconds per fio job (default 10, after a 2 s ramp)
#   --guest-only / --host-only   one part only
# Environment: UBLK_MIRROR_BIN=PATH benchmarks that binary instead of building this tree's
#   (release) ublk-mirror; it must be visible in the guest (not under /tmp).
# Results (fio JSON, logs, consoles, RESULT lines) stay in target/bench-mirror/<stamp>/.
# Everything else it creates (namespaces, QEMU guests, daemons, tmpfs files) is removed on
# exit, on error and on Ctrl-C. Needs root; runs scripts/setup.sh when a tool is missing.
# TCG makes absolute numbers meaningless: compare only columns of one run.
set -euo pipefail

REPO=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
cd "$REPO"

runs=1 quick=0 guest=1 host=1 rt="" summary_only=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --runs) runs=${2:-}; shift 2 ;;
        --quick) quick=1; shift ;;
        --runtime) rt=${2:-}; shift 2 ;;
        --guest-only) host=0; shift ;;
        --host-only) guest=0; shift ;;
        --summarize) summary_only=${2:-}; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "bench-mirror.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "bench-mirror.sh: --runs needs a positive number" >&2; exit 2; }
[[ -z $rt || $rt =~ ^[1-9][0-9]*$ ]] || { echo "bench-mirror.sh: --runtime needs a positive number" >&2; exit 2; }

if [[ $quick = 1 ]]; then
    RT=${rt:-4} RAMP=1 RD_MB=256 FIO_SIZE=240 IPERF_S=3 MEM=2G HOST_MB=256 RESYNC_MB=16
else
    RT=${rt:-10} RAMP=2 RD_MB=1024 FIO_SIZE=1000 IPERF_S=10 MEM=3G HOST_MB=1024 RESYNC_MB=64
fi
GUEST_KVER=6.12.107+deb12-amd64

export NO_COLOR=1
plain() { sed 's/\x1b\[[0-9;]*m//g' | tr '\n' ' ' | head -c 400; }   # log tail -> one plain line
log() { printf '[bench-mirror %s] %s\n' "$(date +%T)" "$*" >&2; }

# ---------------------------------------------------------------------------------------
# The summary, from RESULT lines:
#   R run=N env=guest|host dev=raw|mirror|drbd|local job=qd1|qd32|seq iops= mibs= p50= p99= p999= (µs)
#   N run=N env=E key=ping56|ping4096|iperf value=   (ms, ms, Mbit/s)
#   Y run=N written= dirty= resync= wire=            (bytes; resync efficiency, host)
#   S env=E dev=D reason...                          (a phase that did not run, and why)
#   H runs= rt= ramp= fsz= hmb= rmb=                 (the parameters of the run, first line)
# ---------------------------------------------------------------------------------------
summarize() {
awk '
function kv(line,   i, n, f, p) {
    delete R; n = split(line, f, " ")
    for (i = 2; i <= n; i++) { p = index(f[i], "="); if (p) R[substr(f[i], 1, p - 1)] = substr(f[i], p + 1) }
}
function add(key, v) { if (v == "" || v == "null") return; cnt[key]++; val[key, cnt[key]] = v + 0 }
# median/min/max of the values of key (mawk has no asort: insertion sort)
function stats(key,   n, i, j, t, a) {
    n = cnt[key]; if (!n) { MED = ""; return 0 }
    for (i = 1; i <= n; i++) a[i] = val[key, i]
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    MIN = a[1]; MAX = a[n]; MED = (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    return n
}
function num(v, unit) {   # v in µs for unit "lat", else a plain number
    if (unit == "r") return sprintf("%.3f", v)
    if (unit == "b") return sprintf("%.0f", v)
    if (unit == "lat") return v >= 1000 ? sprintf("%.2f ms", v / 1000) : sprintf("%.0f us", v)
    if (v >= 100) return sprintf("%.0f", v)
    return sprintf("%.1f", v)
}
function cell(key, unit) {
    if (!stats(key)) return "-"
    if (cnt[key] == 1) return num(MED, unit)
    return num(MED, unit) " (" num(MIN, unit) ".." num(MAX, unit) ")"
}
function med(key) { stats(key); return MED }
function ratio(x, y) { return (x == "" || y == "" || y + 0 == 0) ? "-" : sprintf("%.3f", x / y) }
function row(env, job, metric, label, unit, devs, nd,   d, i, out) {
    out = sprintf("  %-9s %-10s", label, metric == "iops" ? "IOPS" : metric == "mibs" ? "MiB/s" : metric == "cpu" ? "host busy%" : metric == "srvcpu" ? "CPU us/IO" : metric == "pcpu" ? " primary" : metric == "rcpu" ? " replica" : "lat " (metric == "p999" ? "p99.9" : metric))
    for (i = 1; i <= nd; i++) out = out sprintf(" %-" W "s", cell(env SUBSEP devs[i] SUBSEP job SUBSEP metric, unit))
    return out
}
{
    if ($1 == "H") { kv($0); load = R["load"]; cpus = R["cpus"]; runs = R["runs"]; rt = R["rt"]; ramp = R["ramp"]; fsz = R["fsz"]; hmb = R["hmb"]; rmb = R["rmb"]; next }
    if ($1 == "R") { kv($0); for (m in R) if (m != "run" && m != "env" && m != "dev" && m != "job") add(R["env"] SUBSEP R["dev"] SUBSEP R["job"] SUBSEP m, R[m]); have[R["env"], R["dev"]] = 1; envs[R["env"]] = 1 }
    else if ($1 == "N") { kv($0); add(R["env"] SUBSEP "net" SUBSEP R["key"], R["value"]); envs[R["env"]] = 1 }
    else if ($1 == "Y") { kv($0); add("y" SUBSEP "written", R["written"]); add("y" SUBSEP "dirty", R["dirty"]); add("y" SUBSEP "resync", R["resync"]); add("y" SUBSEP "wire", R["wire"]); add("y" SUBSEP "ms", R["ms"]); add("y" SUBSEP "d0", R["dirty_before"]); if (R["written"] + 0 > 0) { add("y" SUBSEP "ratio", R["resync"] / R["written"]); add("y" SUBSEP "wratio", R["wire"] / R["written"]) }; if (R["dirty"] + 0 > 0) add("y" SUBSEP "bratio", R["resync"] / R["dirty"]); envs["host"] = 1 }
    else if ($1 == "C") { kv($0); ncmp++; if (R["identical"] == "yes") nsame++ }
    else if ($1 == "S") { kv($0); r = $0; sub(/^S +env=[^ ]+ +dev=[^ ]+ */, "", r); if (!((R["env"], R["dev"]) in skip)) skip[R["env"], R["dev"]] = r; envs[R["env"]] = 1 }
}
function status(env, dev, name) {
    if ((env, dev) in have) return ""
    if ((env, dev) in skip) return sprintf("  %s: not run: %s\n", name, skip[env, dev])
    return sprintf("  %s: not run (no results)\n", name)
}
function verdict(what, value, ok) { printf "  %-58s %-34s %s\n", what, value, ok == "" ? "NOT MET (not measured)" : ok ? "met" : "NOT MET" }
END {
    W = (runs > 1) ? 32 : 25   # cell width: "median (min..max)" needs more
    printf "\n====================================================================================================\n"
    printf " ublk-mirror benchmark  (%d run%s; fio: guest libaio direct=1, host nbd engine; %d s measured after %d s ramp per job)\n", runs, (runs > 1 ? "s, cells: median (min..max)" : ""), rt, ramp
    if (load != "") printf " machine: %s cores, load average %s at the start (other load competes with the guests and daemons)\n", cpus, load
    printf "====================================================================================================\n"
    split("qd1 qd32 seq", jobs, " "); split("4k-QD1 4k-QD32 1M-QD8", jl, " ")
    if ("guest" in envs) {
        printf "\n[guest] Debian 6.12 under QEMU TCG, two guests (2 vCPU each) on a tap bridge; backing: brd RAM disk,\n"
        printf "        fio over the first %d MiB; (a) raw /dev/ram0, (b) ublk-mirror /dev/ublkbN + replica in guest b,\n", fsz
        printf "        (c) DRBD 8.4 protocol C /dev/drbd0 + secondary in guest b, default settings\n"
        printf "  link: ping 56 B %s ms, 4096 B %s ms; iperf3 1 TCP stream %s Mbit/s\n", cell("guest" SUBSEP "net" SUBSEP "ping56"), cell("guest" SUBSEP "net" SUBSEP "ping4096"), cell("guest" SUBSEP "net" SUBSEP "iperf")
        printf "  host CPU busy while the guests ran: %s %%\n", cell("guest" SUBSEP "net" SUBSEP "hostcpu")
        printf "%s%s%s", status("guest", "raw", "(a) raw"), status("guest", "mirror", "(b) ublk-mirror"), status("guest", "drbd", "(c) DRBD")
        split("raw mirror drbd", gd, " ")
        printf "\n  %-9s %-10s %-" W "s %-" W "s %-" W "s %-8s %-8s\n", "job", "metric", "(a) raw", "(b) ublk-mirror", "(c) DRBD C", "b/a", "b/c"
        for (j = 1; j <= 3; j++) {
            nm = (jobs[j] == "seq") ? "mibs iops p50 p99 p999" : "iops p50 p99 p999"
            nmet = split(nm, ms, " ")
            for (k = 1; k <= nmet; k++) {
                m = ms[k]; u = (m ~ /^p/) ? "lat" : ""
                a = med("guest" SUBSEP "raw" SUBSEP jobs[j] SUBSEP m); b = med("guest" SUBSEP "mirror" SUBSEP jobs[j] SUBSEP m); c = med("guest" SUBSEP "drbd" SUBSEP jobs[j] SUBSEP m)
                printf "%s %-8s %-8s\n", row("guest", jobs[j], m, k == 1 ? jl[j] : "", u, gd, 3), ratio(b, a), ratio(b, c)
            }
        }
        printf "\n  where (b)'\''s time goes (same brd, same guest; IOPS, lat p50, lat p99, and IOPS relative to raw):\n"
        k = "guest" SUBSEP "mirror" SUBSEP
        if (cnt[k "qd1" SUBSEP "srvcpu"]) printf "   ublk-mirror connected: primary daemon CPU %s / %s / %s us/IO (QD1 / QD32 / 1M)\n", cell(k "qd1" SUBSEP "srvcpu"), cell(k "qd32" SUBSEP "srvcpu"), cell(k "seq" SUBSEP "srvcpu")
        split("ublk mirrordeg", dd, " "); split("ublk-local (the ublk frontend alone, no mirror)|ublk-mirror with the replica stopped (degraded: local path + bitmap)", dl, "|")
        for (q = 1; q <= 2; q++) {
            printf "   %s\n", dl[q]
            if (("guest", dd[q]) in have) {
                for (j = 1; j <= 3; j++) {
                    k = "guest" SUBSEP dd[q] SUBSEP jobs[j] SUBSEP
                    printf "    %-8s %s IOPS, p50 %s, p99 %s%s;  /raw %s;  daemon CPU %s us/IO\n", jl[j], cell(k "iops"), cell(k "p50", "lat"), cell(k "p99", "lat"),
                        (jobs[j] == "seq" ? sprintf(", %s MiB/s", cell(k "mibs")) : ""), ratio(med(k "iops"), med("guest" SUBSEP "raw" SUBSEP jobs[j] SUBSEP "iops")), cell(k "srvcpu")
                }
            } else printf "%s", status("guest", dd[q], "  " dd[q])
        }
    }
    if ("host" in envs) {
        printf "\n[host] this machine'\''s kernel, no guest: NBD (fio nbd engine) to files on tmpfs (%d MiB); two network\n", hmb
        printf "       namespaces linked by veth; local = ublk-mirror nbd-local, mirrored = primary + replica over the veth\n"
        printf "  link (veth): iperf3 1 TCP stream %s Mbit/s\n", cell("host" SUBSEP "net" SUBSEP "iperf")
        printf "%s%s", status("host", "local", "local"), status("host", "mirror", "mirrored")
        split("local mirror", hd, " ")
        printf "  CPU us/IO: CPU time of the servers per request (nbd-local; primary + replica daemon, then each);\n"
        printf "  host busy%%: the whole machine during the job (other users included)\n"
        printf "\n  %-9s %-10s %-" W "s %-" W "s %-8s\n", "job", "metric", "local (NBD)", "mirrored (NBD)", "m/l"
        for (j = 1; j <= 3; j++) {
            nm = (jobs[j] == "seq") ? "mibs p50 p99 srvcpu pcpu rcpu cpu" : "iops p50 p99 srvcpu pcpu rcpu cpu"
            nmet = split(nm, ms, " ")
            for (k = 1; k <= nmet; k++) {
                m = ms[k]; u = (m ~ /^p[0-9]/) ? "lat" : ""
                if ((m == "pcpu" || m == "rcpu") && !cnt["host" SUBSEP "mirror" SUBSEP jobs[j] SUBSEP m]) continue
                printf "%s %-8s\n", row("host", jobs[j], m, k == 1 ? jl[j] : "", u, hd, 2), ratio(med("host" SUBSEP "mirror" SUBSEP jobs[j] SUBSEP m), med("host" SUBSEP "local" SUBSEP jobs[j] SUBSEP m))
            }
        }
        printf "\n  resync efficiency (link cut, %d MiB of scattered distinct 4k blocks written, link back):\n", rmb
        if (cnt["y" SUBSEP "ratio"]) {
            printf "    dirty = written by the client %s B; the bitmap said %s B dirty (%s B right after the cut)\n", cell("y" SUBSEP "written", "b"), cell("y" SUBSEP "dirty", "b"), cell("y" SUBSEP "d0", "b")
            printf "    resynced (engine'\''s resync payload counter) %s B; both ALs carried %s B (rx+tx, headers included)\n", cell("y" SUBSEP "resync", "b"), cell("y" SUBSEP "wire", "b")
            printf "    resynced / dirty = %s   (resynced / bitmap = %s, wire / dirty = %s)\n", cell("y" SUBSEP "ratio", "r"), cell("y" SUBSEP "bratio", "r"), cell("y" SUBSEP "wratio", "r")
            printf "    the resync took %s ms after the reconnect\n", cell("y" SUBSEP "ms", "b")
            printf "    copies byte-identical after the resync (cmp of both backing files): %d of %d runs\n", nsame, ncmp
        } else if (("host", "resync") in skip) printf "    not run: %s\n", skip["host", "resync"]
        else printf "    not run (no results)\n"
    }
    printf "\nTargets (issue 3), judged on the medians:\n"
    if ("guest" in envs) {
        b = med("guest" SUBSEP "mirror" SUBSEP "qd32" SUBSEP "iops"); c = med("guest" SUBSEP "drbd" SUBSEP "qd32" SUBSEP "iops")
        verdict("guest: 4k QD32 IOPS ublk-mirror ≥ DRBD", (b == "" || c == "") ? "not measured" : sprintf("%.0f vs %.0f", b, c), (b == "" || c == "") ? "" : b >= c)
        b = med("guest" SUBSEP "mirror" SUBSEP "qd1" SUBSEP "p50"); c = med("guest" SUBSEP "drbd" SUBSEP "qd1" SUBSEP "p50")
        verdict("guest: 4k QD1 lat p50 ublk-mirror ≤ 1.1 × DRBD", (b == "" || c == "") ? "not measured" : sprintf("%s vs 1.1 × %s", num(b, "lat"), num(c, "lat")), (b == "" || c == "") ? "" : b <= 1.1 * c)
        b = med("guest" SUBSEP "mirror" SUBSEP "seq" SUBSEP "mibs"); a = med("guest" SUBSEP "raw" SUBSEP "seq" SUBSEP "mibs"); l = med("guest" SUBSEP "net" SUBSEP "iperf")
        lim = ""; if (a != "" && l != "") lim = (a < l / 8 * 1e6 / 1048576) ? a : l / 8 * 1e6 / 1048576
        verdict("guest: 1M seq ublk-mirror ≥ 0.95 × min(raw, link)", (b == "" || lim == "") ? "not measured" : sprintf("%.1f vs 0.95 × %.1f MiB/s", b, lim), (b == "" || lim == "") ? "" : b >= 0.95 * lim)
    }
    if ("host" in envs) {
        b = med("host" SUBSEP "mirror" SUBSEP "seq" SUBSEP "mibs"); a = med("host" SUBSEP "local" SUBSEP "seq" SUBSEP "mibs"); l = med("host" SUBSEP "net" SUBSEP "iperf")
        lim = ""; if (a != "" && l != "") lim = (a < l / 8 * 1e6 / 1048576) ? a : l / 8 * 1e6 / 1048576
        verdict("host:  1M seq mirrored ≥ 0.95 × min(local, link)", (b == "" || lim == "") ? "not measured" : sprintf("%.1f vs 0.95 × %.1f MiB/s", b, lim), (b == "" || lim == "") ? "" : b >= 0.95 * lim)
        y = med("y" SUBSEP "ratio")
        verdict("host:  resync bytes ≤ 1.05 × dirty bytes", y == "" ? "not measured" : sprintf("%.3f", y), y == "" ? "" : y <= 1.05)
    }
}' "$1"
}

if [[ -n $summary_only ]]; then
    summarize "$summary_only"
    exit 0
fi

# ---------------------------------------------------------------------------------------
# Preconditions
# ---------------------------------------------------------------------------------------
[[ $(id -u) -eq 0 ]] || { echo "bench-mirror.sh: must run as root (namespaces, taps, QEMU)" >&2; exit 1; }
need_setup=0
for t in qemu-system-x86_64 qemu-io fio iperf3 jq ping drbdadm ip cmp; do
    command -v "$t" >/dev/null 2>&1 || { log "missing $t"; need_setup=1; }
done
[[ -r /boot/vmlinuz-$GUEST_KVER ]] || { log "missing the guest kernel $GUEST_KVER"; need_setup=1; }
if [[ $need_setup = 1 ]]; then log "running scripts/setup.sh"; scripts/setup.sh; fi
fio --enghelp 2>/dev/null | grep -qw nbd || { [[ $host = 1 ]] && log "this fio has no nbd engine: the host part will not run"; }

if [[ -n ${UBLK_MIRROR_BIN:-} ]]; then
    BIN=$(readlink -f "$UBLK_MIRROR_BIN")
    log "using $BIN (UBLK_MIRROR_BIN)"
else
    log "cargo build --release -p ublk-mirror"
    cargo build --release -p ublk-mirror 2>&1 | tail -n 2 >&2
    BIN=$REPO/target/release/ublk-mirror
fi
[[ -x $BIN ]] || { echo "bench-mirror.sh: no $BIN after the build" >&2; exit 1; }

stamp=$(date +%Y%m%d-%H%M%S)
OUT=$REPO/target/bench-mirror/$stamp-$$
mkdir -p "$OUT"
RESULTS=$OUT/results.txt
echo "H load=$(cut -d' ' -f1 /proc/loadavg) cpus=$(nproc) runs=$runs rt=$RT ramp=$RAMP fsz=$FIO_SIZE hmb=$HOST_MB rmb=$RESYNC_MB quick=$quick" > "$RESULTS"

# ---------------------------------------------------------------------------------------
# Clean-up: everything created below is registered here.
# ---------------------------------------------------------------------------------------
NS=eac-mbench-$$            # guest bridge namespace
HNS_A=eac-mbench-$$-a HNS_B=eac-mbench-$$-b   # host part: the two "hosts"
SHM=/dev/shm/eac-mbench-$$
pids=()
namespaces=()
cleanup() {
    local rc=$? p i
    trap - EXIT INT TERM HUP
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for ((i = 0; i < 100; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    for n in "${namespaces[@]}"; do ip netns del "$n" 2>/dev/null || true; done
    rm -rf "$SHM"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
# forget a pid that has ended (so clean-up does not signal a recycled pid)
unreg() { local p keep=(); for p in "${pids[@]}"; do [[ $p = "$1" ]] || keep+=("$p"); done; pids=("${keep[@]}"); }
stop_pid() {   # TERM, wait up to 10 s, KILL
    local i
    kill -TERM "$1" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    unreg "$1"
}

# fio JSON → an R line (latencies in µs: fio's total latency "lat", percentiles from lat_percentiles=1)
fio_result() {  # fio_result RUN ENV DEV JOB FILE
    jq -r --arg pre "R run=$1 env=$2 dev=$3 job=$4" '.jobs[0].write as $w |
        "\($pre) iops=\($w.iops) mibs=\($w.bw / 1024) p50=\($w.lat_ns.percentile["50.000000"] / 1000) p99=\($w.lat_ns.percentile["99.000000"] / 1000) p999=\($w.lat_ns.percentile["99.900000"] / 1000) mean=\($w.lat_ns.mean / 1000)"' "$5"
}
# machine-wide CPU: "busy idle" jiffies so far; cpu_busy A B -> percent busy between two snapshots
cpu_snap() { local c u n sy i w q sq st; read -r c u n sy i w q sq st _ < /proc/stat; echo "$((u + n + sy + q + sq + st)) $((i + w))"; }
cpu_busy() { awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " "); t = (y[1] - x[1]) + (y[2] - x[2]); printf "%.0f", (t > 0 ? 100 * (y[1] - x[1]) / t : 0) }'; }
# CPU ticks (user + system) the given processes used so far
proc_ticks() { local p t=0 f; for p in "$@"; do f=$(cut -d')' -f2- "/proc/$p/stat" 2>/dev/null) || continue; set -- $f; t=$((t + ${12} + ${13})); done; echo "$t"; }
TCK=$(getconf CLK_TCK)
ping_avg() { sed -n 's|^rtt min/avg/max/mdev = [0-9.]*/\([0-9.]*\)/.*|\1|p' "$1"; }

# ---------------------------------------------------------------------------------------
# 1. The two guests
# ---------------------------------------------------------------------------------------
guest_netns() {
    ip netns add "$NS"; namespaces+=("$NS")
    ip -n "$NS" link set lo up
    ip -n "$NS" link add br0 type bridge
    ip -n "$NS" addr add 10.251.0.1/24 dev br0
    local t
    for t in tap0 tap1; do
        ip -n "$NS" tuntap add dev "$t" mode tap
        ip -n "$NS" link set "$t" master br0
        ip -n "$NS" link set "$t" up
    done
    ip -n "$NS" link set br0 up
}

guest_run() {  # guest_run RUN: boots both guests (retries a boot that crashed), collects results
    local r=$1 attempt R pa pb ra rb f j dev line
    for attempt in 1 2 3; do
        R=$OUT/guest-run$r; rm -rf "$R"; mkdir -p "$R"
        log "run $r/$runs guest: booting vma and vmb (attempt $attempt)"
        # the mirror's pool secret and (device id, data generation) shared by both guests
        head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$R/mirror.secret"
        echo "0x$(od -An -tx8 -N8 /dev/urandom | tr -d ' ') 0x1$(od -An -tx4 -N4 /dev/urandom | tr -d ' ')" > "$R/mirror.ids"
        local envs=(env "RT=$RT" "RAMP=$RAMP" "RD_MB=$RD_MB" "FIO_SIZE=$FIO_SIZE" "IPERF_S=$IPERF_S" "BIN=$BIN")
        ip netns exec "$NS" scripts/lab/run-vm.sh --hostname vmb --ip 10.251.0.12/24 --net-tap tap1 --mem "$MEM" \
            --share "$R" --console "$R/b.console" --timeout 900 -- "${envs[@]}" bash "$REPO/scripts/lab/bench-mirror-node.sh" b "$R" \
            2>>"$R/run-vm.log" & pb=$!; pids+=("$pb")
        ip netns exec "$NS" scripts/lab/run-vm.sh --hostname vma --ip 10.251.0.11/24 --net-tap tap0 --mem "$MEM" \
            --share "$R" --console "$R/a.console" --timeout 900 -- "${envs[@]}" bash "$REPO/scripts/lab/bench-mirror-node.sh" a "$R" \
            2>>"$R/run-vm.log" & pa=$!; pids+=("$pa")
        local c0; c0=$(cpu_snap)
        ra=0; wait "$pa" || ra=$?; unreg "$pa"
        [[ -e $R/a.done ]] || touch "$R/a.done"     # b stops when a is gone
        rb=0
        for ((j = 0; j < 300; j++)); do kill -0 "$pb" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pb" 2>/dev/null && stop_pid "$pb"
        wait "$pb" 2>/dev/null || rb=$?; unreg "$pb"
        echo "N run=$r env=guest key=hostcpu value=$(cpu_busy "$c0" "$(cpu_snap)")" >> "$RESULTS"
        log "run $r guest: rc a=$ra b=$rb ($(tail -n 2 "$R/run-vm.log" | grep -o 'wall=[0-9.]*s' | tr '\n' ' '))"
        # 125: the guest reported no status (boot crash under TCG, recipes pitfall 10) -> retry
        if [[ $ra = 125 || $rb = 125 ]] && [[ $attempt -lt 3 ]]; then
            grep -h -a -E 'Oops|panic|FATAL' "$R"/*.console "$R"/*.log 2>/dev/null | tr -d '\r' | head -n 5 >&2 || true
            continue
        fi
        break
    done
    if [[ -e $R/a.failed ]]; then echo "S env=guest dev=raw guest a failed: $(head -c 300 "$R/a.failed")" >> "$RESULTS"; fi
    if [[ $ra != 0 && ! -e $R/a.failed ]]; then echo "S env=guest dev=raw guest a exited with $ra (see $R/a.console)" >> "$RESULTS"; fi
    for dev in raw ublk mirror mirrordeg drbd; do
        [[ -e $R/$dev.skipped ]] && echo "S env=guest dev=$dev $(tr '\n' ' ' < "$R/$dev.skipped" | head -c 400)" >> "$RESULTS"
        for j in qd1 qd32 seq; do
            f=$R/$dev-$j.json
            [[ -s $f ]] || continue
            line=$(fio_result "$r" guest "$dev" "$j" "$f") || { log "unreadable $f"; continue; }
            # the server daemon's CPU per request in guest a (ublk-local, the primary)
            [[ -s ${f%.json}.cpu ]] && line+=" $(awk -v l="$line" '{ n = split(l, f, " "); for (i = 1; i <= n; i++) if (f[i] ~ /^iops=/) iops = substr(f[i], 6)
                printf "srvcpu=%.1f", (iops > 0 && $3 > 0) ? ($1 / $2) / (iops * $3) * 1e6 : 0 }' "${f%.json}.cpu")"
            echo "$line" >> "$RESULTS"
        done
    done
    local v
    [[ -s $R/ping-56.txt ]] && v=$(ping_avg "$R/ping-56.txt") && [[ -n $v ]] && echo "N run=$r env=guest key=ping56 value=$v" >> "$RESULTS"
    [[ -s $R/ping-4096.txt ]] && v=$(ping_avg "$R/ping-4096.txt") && [[ -n $v ]] && echo "N run=$r env=guest key=ping4096 value=$v" >> "$RESULTS"
    [[ -s $R/iperf3.json ]] && v=$(jq -r '.end.sum_received.bits_per_second / 1e6' "$R/iperf3.json" 2>/dev/null) &&
        [[ $v != null && -n $v ]] && echo "N run=$r env=guest key=iperf value=$v" >> "$RESULTS"
    return 0
}

# ---------------------------------------------------------------------------------------
# 2. The host part: two namespaces linked by veth (AL1 10.250.2.0/24, AL2 10.250.3.0/24)
# ---------------------------------------------------------------------------------------
host_netns() {
    local n
    for n in "$HNS_A" "$HNS_B"; do ip netns add "$n"; namespaces+=("$n"); ip -n "$n" link set lo up; done
    ip -n "$HNS_A" link add al1 type veth peer name al1 netns "$HNS_B"
    ip -n "$HNS_A" link add al2 type veth peer name al2 netns "$HNS_B"
    ip -n "$HNS_A" addr add 10.250.2.1/24 dev al1; ip -n "$HNS_B" addr add 10.250.2.2/24 dev al1
    ip -n "$HNS_A" addr add 10.250.3.1/24 dev al2; ip -n "$HNS_B" addr add 10.250.3.2/24 dev al2
    for n in "$HNS_A" "$HNS_B"; do ip -n "$n" link set al1 up; ip -n "$n" link set al2 up; done
}

wait_socket() {  # wait_socket PATH PID SECS
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        [[ -S $1 ]] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

SRV_PIDS=()
HOST_JOBS=("qd1 randwrite 4k 1" "qd32 randwrite 4k 32" "seq write 1M 8")
# per_io TICKS SECONDS RESULT-LINE: µs of CPU per I/O (ticks over the job's wall time, at its IOPS)
per_io() {
    awk -v t="$1" -v tck="$TCK" -v w="$2" -v l="$3" 'BEGIN {
        n = split(l, f, " "); for (i = 1; i <= n; i++) if (f[i] ~ /^iops=/) iops = substr(f[i], 6)
        printf "%.1f", (iops > 0 && w > 0) ? (t / tck) / (iops * w) * 1e6 : 0 }'
}
host_fio() {  # host_fio RUN DEV URI DIR
    local j name rw bs qd c0 p0 t0 line w pp0 rp0 split
    for j in "${HOST_JOBS[@]}"; do
        read -r name rw bs qd <<<"$j"
        pp0=$(proc_ticks "${SRV_PIDS[0]}") rp0=$(proc_ticks "${SRV_PIDS[@]:1}")
        c0=$(cpu_snap) p0=$(proc_ticks "${SRV_PIDS[@]}") t0=$(date +%s.%N)
        fio --name="$name" --ioengine=nbd --uri="$3" --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
            --size="${HOST_MB}M" --time_based --runtime="$RT" --ramp_time="$RAMP" --randrepeat=0 --norandommap \
            --lat_percentiles=1 --percentile_list=50:99:99.9 --output-format=json --output="$4/$2-$name.json" \
            >>"$4/host.log" 2>&1 || { log "fio $2 $name failed (see $4/host.log)"; continue; }
        # the servers' CPU (nbd-local, or both mirror daemons) per I/O: contention changes
        # latency and throughput, much less the CPU work each request costs
        line=$(fio_result "$1" host "$2" "$name" "$4/$2-$name.json")
        w=$(echo "$(date +%s.%N) $t0" | awk '{print $1 - $2}')
        split=""   # two daemons: the primary's and the replica's part apart
        [[ ${#SRV_PIDS[@]} -gt 1 ]] && split="pcpu=$(per_io "$(($(proc_ticks "${SRV_PIDS[0]}") - pp0))" "$w" "$line") rcpu=$(per_io "$(($(proc_ticks "${SRV_PIDS[@]:1}") - rp0))" "$w" "$line")"
        echo "$line cpu=$(cpu_busy "$c0" "$(cpu_snap)") srvcpu=$(per_io "$(($(proc_ticks "${SRV_PIDS[@]}") - p0))" "$w" "$line") $split" >> "$RESULTS"
    done
}

host_run() {  # host_run RUN
    local r=$1 H=$OUT/host-run$r p url v
    mkdir -p "$H" "$SHM"
    if ! fio --enghelp 2>/dev/null | grep -qw nbd; then
        echo "S env=host dev=local fio has no nbd engine" >> "$RESULTS"; echo "S env=host dev=mirror fio has no nbd engine" >> "$RESULTS"; return 0
    fi
    # the link: iperf3 over AL1
    ip netns exec "$HNS_B" iperf3 -s -1 -B 10.250.2.2 >/dev/null 2>&1 & p=$!; pids+=("$p")
    sleep 0.5
    if ip netns exec "$HNS_A" iperf3 -c 10.250.2.2 -t "$IPERF_S" -J > "$H/iperf3.json" 2>>"$H/host.log"; then
        v=$(jq -r '.end.sum_received.bits_per_second / 1e6' "$H/iperf3.json") && echo "N run=$r env=host key=iperf value=$v" >> "$RESULTS"
    else log "host iperf3 failed"; fi
    stop_pid "$p"

    # local: nbd-local over a file on tmpfs, filled first (no phase pays for page allocation)
    dd if=/dev/zero of="$SHM/local.img" bs=1M count="$HOST_MB" status=none
    ip netns exec "$HNS_A" "$BIN" nbd-local --backing "$SHM/local.img" --listen "$SHM/local.sock" --export bench \
        > "$H/local.url" 2>>"$H/nbd-local.log" & p=$!; pids+=("$p")
    if wait_socket "$SHM/local.sock" "$p" 20; then
        log "run $r/$runs host: local NBD"
        SRV_PIDS=("$p")
        host_fio "$r" local "nbd+unix:///bench?socket=$SHM/local.sock" "$H"
    else
        echo "S env=host dev=local nbd-local did not start: $(tail -n 3 "$H/nbd-local.log" | plain)" >> "$RESULTS"
    fi
    stop_pid "$p"
    rm -f "$SHM/local.img"

    host_mirror "$r" "$H"
    rm -rf "${SHM:?}"/*
}

# mirrored NBD + resync efficiency (needs the mirror engine)
mirror_cli_check() {
    "$BIN" --help 2>&1 | grep -qE '^ +run ' || { echo "this ublk-mirror has no 'run' subcommand (mirror engine not merged yet)"; return 1; }
    "$BIN" run --help 2>&1 | grep -q -- '--config' || { echo "'ublk-mirror run' takes no --config"; return 1; }
    "$BIN" --help 2>&1 | grep -qE '^ +create-meta ' || { echo "this ublk-mirror has no 'create-meta' subcommand"; return 1; }
}
mstatus() { "$BIN" status --json --socket "$1" 2>/dev/null; }   # mstatus CONTROL-SOCKET
# wait_status SOCK SECS JQ-CONDITION: poll the daemon's status until the condition holds
wait_status() {
    local i out
    for ((i = 0; i < $2 * 5; i++)); do
        out=$(mstatus "$1") && [[ -n $out ]] && jq -e "$3" <<<"$out" >/dev/null 2>&1 && return 0   # (jq 1.6 -e is 0 on no input)
        sleep 0.2
    done
    return 1
}
# mirror_conf FILE EXTRA-TOML HOST ROLE BACKING META SECRET CTL LISTEN=PEER... : a daemon config
mirror_conf() {
    local f=$1 extra=$2 host=$3 role=$4 backing=$5 meta=$6 secret=$7 ctl=$8 l; shift 8
    {
        printf 'resource = "bench"\nhost = "%s"\nrole = "%s"\nbacking = "%s"\nmeta = "%s"\n' "$host" "$role" "$backing" "$meta"
        printf 'pool_secret_file = "%s"\ncontrol_socket = "%s"\n' "$secret" "$ctl"
        [[ -n $extra ]] && printf '%s\n' "$extra"
        for l in "$@"; do printf '\n[[link]]\nlisten = "%s"\npeer = "%s"\n' "${l%=*}" "${l#*=}"; done
    } > "$f"
}
host_mirror() {
    local r=$1 H=$2 why pa pb id gen s wire0 wire1 dirty resync
    if ! why=$(mirror_cli_check); then
        echo "S env=host dev=mirror $why" >> "$RESULTS"
        echo "S env=host dev=resync $why" >> "$RESULTS"
        return 0
    fi
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$SHM/secret"
    dd if=/dev/zero of="$SHM/a.img" bs=1M count="$HOST_MB" status=none
    dd if=/dev/zero of="$SHM/b.img" bs=1M count="$HOST_MB" status=none
    # both copies are zeroed: the same data generation on both skips the first full sync
    id=0x$(od -An -tx8 -N8 /dev/urandom | tr -d ' ') gen=0x1$(od -An -tx4 -N4 /dev/urandom | tr -d ' ')
    for s in a b; do
        "$BIN" create-meta --meta "$SHM/$s.meta" --backing "$SHM/$s.img" --device-id "$id" --consistent \
            --generation "$gen" >> "$H/host.log" 2>&1 || {
            echo "S env=host dev=mirror create-meta failed: $(tail -n 2 "$H/host.log" | plain)" >> "$RESULTS"; return 0; }
    done
    mirror_conf "$SHM/b.toml" "" b secondary "$SHM/b.img" "$SHM/b.meta" "$SHM/secret" "$SHM/b.ctl" \
        10.250.2.2:7789=10.250.2.1:7789 10.250.3.2:7789=10.250.3.1:7789
    mirror_conf "$SHM/a.toml" "nbd = \"$SHM/a.sock\"" a primary "$SHM/a.img" "$SHM/a.meta" "$SHM/secret" "$SHM/a.ctl" \
        10.250.2.1:7789=10.250.2.2:7789 10.250.3.1:7789=10.250.3.2:7789
    cp "$SHM/a.toml" "$SHM/b.toml" "$H/"
    ip netns exec "$HNS_B" "$BIN" run --config "$SHM/b.toml" >>"$H/mirror-b.log" 2>&1 & pb=$!; pids+=("$pb")
    ip netns exec "$HNS_A" "$BIN" run --config "$SHM/a.toml" >>"$H/mirror-a.log" 2>&1 & pa=$!; pids+=("$pa")
    if ! wait_socket "$SHM/a.sock" "$pa" 30 || ! wait_status "$SHM/a.ctl" 30 '.connection == "connected" and .sync == "in-sync"'; then
        why="the mirror did not come up connected and in sync: $(mstatus "$SHM/a.ctl" | jq -c '{connection, sync, refused}' 2>/dev/null) $(tail -n 3 "$H/mirror-a.log" | plain)"
        echo "S env=host dev=mirror $why" >> "$RESULTS"; echo "S env=host dev=resync $why" >> "$RESULTS"
        stop_pid "$pa"; stop_pid "$pb"; return 0
    fi
    log "run $r/$runs host: mirrored NBD"
    SRV_PIDS=("$pa" "$pb")
    host_fio "$r" mirror "nbd+unix:///?socket=$SHM/a.sock" "$H"
    mstatus "$SHM/a.ctl" > "$H/status-after-fio.json"

    # resync efficiency: cut both links, write scattered distinct 4k blocks, reconnect
    log "run $r/$runs host: resync efficiency ($RESYNC_MB MiB of scattered 4k blocks while degraded)"
    # Start clean: a flush through the export makes every earlier write durable on both sides
    # (the engine marks ranges the peer acknowledged but had not flushed yet as dirty when the
    # link is lost, like DRBD's transfer log, so without it the last job's writes would count).
    qemu-io -f raw -c flush "nbd+unix:///?socket=$SHM/a.sock" >>"$H/host.log" 2>&1 || log "flush through NBD failed"
    wait_status "$SHM/a.ctl" 60 '.sync == "in-sync" and .in_flight == 0 and .dirty_bytes == 0' || log "mirror not idle/in sync before the resync test"
    ip -n "$HNS_A" link set al1 down; ip -n "$HNS_A" link set al2 down
    wait_status "$SHM/a.ctl" 30 '.sync == "degraded"' || log "the idle primary did not notice the cut links within 30 s"
    local before_dirty; before_dirty=$(mstatus "$SHM/a.ctl" | jq -r '.dirty_bytes')
    # randommap (fio's default): every 4k block is written once -> exactly RESYNC_MB distinct MiB
    fio --name=scatter --ioengine=nbd --uri="nbd+unix:///?socket=$SHM/a.sock" --rw=randwrite --bs=4k \
        --iodepth=16 --size="${HOST_MB}M" --io_size="${RESYNC_MB}M" --randrepeat=0 \
        --output-format=json --output="$H/scatter.json" >>"$H/host.log" 2>&1 || log "scatter write failed"
    mstatus "$SHM/a.ctl" > "$H/status-degraded.json"
    dirty=$(jq -r '.dirty_bytes' "$H/status-degraded.json")
    wire0=$(ip netns exec "$HNS_A" cat /sys/class/net/al1/statistics/tx_bytes /sys/class/net/al1/statistics/rx_bytes \
        /sys/class/net/al2/statistics/tx_bytes /sys/class/net/al2/statistics/rx_bytes | awk '{s += $1} END {printf "%.0f\n", s}')
    local runs0; runs0=$(jq -r '.resync.runs' "$H/status-degraded.json")
    ip -n "$HNS_A" link set al1 up; ip -n "$HNS_A" link set al2 up
    ip -n "$HNS_B" link set al1 up; ip -n "$HNS_B" link set al2 up
    if wait_status "$SHM/a.ctl" 180 ".connection == \"connected\" and .sync == \"in-sync\" and .resync.runs > $runs0"; then
        wire1=$(ip netns exec "$HNS_A" cat /sys/class/net/al1/statistics/tx_bytes /sys/class/net/al1/statistics/rx_bytes \
            /sys/class/net/al2/statistics/tx_bytes /sys/class/net/al2/statistics/rx_bytes | awk '{s += $1} END {printf "%.0f\n", s}')
        mstatus "$SHM/a.ctl" > "$H/status-resynced.json"
        resync=$(jq -r '.resync.last_transferred_bytes' "$H/status-resynced.json")
        echo "Y run=$r written=$((RESYNC_MB * 1048576)) dirty=$dirty resync=$resync wire=$((wire1 - wire0)) dirty_before=$before_dirty ms=$(jq -r '.resync.last_duration_ms' "$H/status-resynced.json")" >> "$RESULTS"
        # the copies must be identical after the resync (I/O is stopped: the primary is idle)
        if cmp -s "$SHM/a.img" "$SHM/b.img"; then echo "C run=$r identical=yes" >> "$RESULTS"
        else echo "C run=$r identical=no" >> "$RESULTS"; log "the copies differ after the resync"; fi
    else
        echo "S env=host dev=resync no in-sync after reconnecting: $(mstatus "$SHM/a.ctl" | jq -c '{connection, sync, resync}' 2>/dev/null)" >> "$RESULTS"
    fi
    stop_pid "$pa"; stop_pid "$pb"
}

# ---------------------------------------------------------------------------------------
t0=$(date +%s)
log "results in $OUT; fio $RT s + $RAMP s ramp per job; $runs run(s)$([[ $quick = 1 ]] && echo ', --quick')"
[[ $guest = 1 ]] && guest_netns
[[ $host = 1 ]] && host_netns
for ((r = 1; r <= runs; r++)); do
    [[ $guest = 1 ]] && guest_run "$r"
    [[ $host = 1 ]] && host_run "$r"
done
summarize "$RESULTS" | tee "$OUT/summary.txt"
echo
log "done in $(( $(date +%s) - t0 )) s; raw results: $OUT"
