#!/usr/bin/env bash
# scripts/fuzz.sh — coverage-guided fuzzing (cargo-fuzz / libFuzzer) of every decoder that
# takes input from outside the host (fuzz/, docs/testing.md "Fuzzing").
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#   SECONDS_PER_TARGET  time per target (default 60); targets run one after another, each a
#                       single libFuzzer process (the machine is shared: no -jobs/-workers)
#   TARGET...           a subset (default: every target in fuzz/fuzz_targets)
# Environment:
#   FUZZ_RUNS=N         also stop a target after N executions (whichever comes first)
#   FUZZ_SANITIZER=S    cargo-fuzz sanitizer (default none: the decoders are safe Rust, and
#                       without ASan a target runs 2-3x more executions; `address` for ASan)
#
# Builds every target once (nightly, release + debug assertions, so an integer overflow on
# outside input panics as it would in a debug build), then runs each on its corpus
# fuzz/corpus/<target> (committed seeds + what earlier runs added; new inputs are added there).
# A crash leaves its input in fuzz/artifacts/<target>/. Prints one line per target from
# libFuzzer's final statistics and exits 1 if any target crashed.
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
san=${FUZZ_SANITIZER:-none}
NIGHTLY=nightly

command -v cargo-fuzz >/dev/null 2>&1 \
  || { echo "fuzz.sh: cargo-fuzz is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
[[ "$secs" =~ ^[0-9]+$ ]] || { echo "fuzz.sh: SECONDS_PER_TARGET must be a number, got $secs" >&2; exit 64; }

all=$(cd fuzz/fuzz_targets && ls *.rs | sed 's/\.rs$//')
targets=("$@")
[ ${#targets[@]} -eq 0 ] && read -r -d '' -a targets <<<"$all"
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$all" || { echo "fuzz.sh: no target $t (have: $(echo $all))" >&2; exit 64; }
done

# The longest input each target makes use of (datagrams up to 8192 bytes + 1 to be too large;
# a 4096-byte slot + the mode byte; lines over the 512-byte test limit; ...).
max_len() {
  case $1 in
    heartbeat_*|pairing_*) echo 8300 ;;
    statefile_slot) echo 4200 ;;
    api_handshake) echo 1024 ;;
    *) echo 4096 ;;
  esac
}

echo "== build (cargo +$NIGHTLY fuzz build -s $san -a)"
t0=$(date +%s)
cargo +"$NIGHTLY" fuzz build -s "$san" -a 2>&1 | grep -vE '^warning: netpair@' | tail -n 5
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "fuzz.sh: build failed" >&2; exit 1; }
echo "built in $(( $(date +%s) - t0 ))s"
bindir=fuzz/target/x86_64-unknown-linux-gnu/release

runs_arg=()
[ -n "${FUZZ_RUNS:-}" ] && runs_arg=(-runs="$FUZZ_RUNS")
logdir=$(mktemp -d /tmp/eac-fuzz.XXXXXX)
summary=()
crashed=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  echo "== $t (${secs}s${FUZZ_RUNS:+ or $FUZZ_RUNS runs})"
  log="$logdir/$t.log"
  "$bindir/$t" -max_total_time="$secs" "${runs_arg[@]}" -print_final_stats=1 \
    -max_len="$(max_len "$t")" -artifact_prefix="fuzz/artifacts/$t/" \
    "fuzz/corpus/$t" >"$log" 2>&1
  rc=$?
  grep -E '^#[0-9]+' "$log" | tail -n 1 | sed 's/^/   /'
  execs=$(awk '/^stat::number_of_executed_units:/ {print $2}' "$log")
  eps=$(awk '/^stat::average_exec_per_sec:/ {print $2}' "$log")
  last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9A-Za-z]*\).*/\1/p' <<<"$last")
  crash=0
  if [ $rc -ne 0 ]; then
    crash=1; crashed=1
    art=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    grep -m1 -E 'panicked at|ERROR: libFuzzer' "$log" | sed 's/^/   /'
    echo "   input: ${art:-see $log}"
  fi
  summary+=("$(printf '%-20s %12s %9s %7s %8s %12s %7s' "$t" "${execs:-?}" "${eps:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$crash")")
done

echo
printf '%-20s %12s %9s %7s %8s %12s %7s\n' target executions exec/s cov ft corpus crashes
printf '%s\n' "${summary[@]}"
echo "logs: $logdir"
[ $crashed -eq 0 ]
