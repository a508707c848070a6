#!/usr/bin/env bash
# scripts/soak-mirror-race.sh [RUNS] [HOGS] — the mirror's reconnect race test, RUNS times
# (default 1000) in a loop beside HOGS busy-looping CPU hogs (default: one per CPU), the way
# the full suite loads the machine. Every run injects seeded delays at the replica's racing
# point (its seed is printed); a failing run's log is kept and its seed can be replayed with
# EAC_RACE_SEED=<seed>. Prints "N runs, F failed" and exits non-zero on any failure.
# A campaign script, not a test: CI runs the test once per suite.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-1000}
hogs=${2:-$(nproc)}
test=engine::tests::writes_racing_repeated_reconnects_are_never_lost
bin=$(cargo test -p ublk-mirror --lib --no-run --message-format=json 2>/dev/null \
  | jq -r 'select(.profile.test == true and .target.name == "ublk_mirror") | .executable' | tail -n1)
[ -x "$bin" ] || { echo "soak-mirror-race: cannot build the test binary" >&2; exit 1; }
logs=$(mktemp -d /tmp/eac-race-soak.XXXXXX)
# A copy: a rebuild during the campaign must not change what is being tested.
cp "$bin" "$logs/test-bin" && bin="$logs/test-bin"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT
for _ in $(seq 1 "$hogs"); do ( while :; do :; done ) & pids+=($!); done
echo "soak-mirror-race: $runs runs of $test beside $hogs CPU hogs; logs of failures in $logs"
failed=0 t0=$(date +%s)
for i in $(seq 1 "$runs"); do
  if ! "$bin" --exact "$test" >"$logs/run-$i.log" 2>&1; then
    failed=$((failed + 1))
    echo "run $i FAILED: $(grep -m1 -E 'race seed' "$logs/run-$i.log") $(grep -m1 -A1 panicked "$logs/run-$i.log" | tail -n1)"
  else
    rm -f "$logs/run-$i.log"
  fi
  [ $((i % 100)) -ne 0 ] || echo "  $i runs, $failed failed ($(( $(date +%s) - t0 )) s; load $(cut -d' ' -f1 /proc/loadavg))"
done
echo "$runs runs, $failed failed ($(( $(date +%s) - t0 )) s)"
[ "$failed" -eq 0 ] && rm -rf "$logs"
[ "$failed" -eq 0 ]
