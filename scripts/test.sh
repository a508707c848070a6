#!/usr/bin/env bash
# scripts/test.sh — set up this machine (scripts/setup.sh), build everything, run every test.
#
# Tiers (docs/testing.md):
#   1. unit       — `cargo test`: no root, no kernel features; privileged tests show as ignored.
#   2. lab        — privileged tests against the real kernel (network namespaces, XDP, nftables,
#                   FUSE) and a real libvirtd per lab host: `cargo test -p eac-lab -- --ignored`.
#   3. vm         — tests that boot Debian's 6.12 kernel in QEMU for the real ublk_drv.
# Tiers 2–3 need root; without it they are reported as skipped, with the reason, never passed.
#
# Usage: scripts/test.sh [--quick]      --quick: skip clippy and the VM tier (for iteration)
# Ends with one line "N passed, N failed, N skipped" and the total wall time.
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
quick=0
[ "${1:-}" = --quick ] && quick=1

if [ "$(id -u)" -eq 0 ]; then
  scripts/setup.sh || { echo "test.sh: setup failed" >&2; exit 1; }
else
  echo "test.sh: not root: skipping scripts/setup.sh (assuming the machine is set up)"
fi

log=$(mktemp /tmp/eac-test.XXXXXX)
trap 'rm -f "$log"' EXIT
passed=0 failed=0 skipped=0 broken=0
# Adds up cargo's "test result:" lines of the last tier: sets t_pass t_fail t_ign.
tally() {
  read -r t_pass t_fail t_ign < <(awk '/^test result:/ {
      for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i }
    } END { print p+0, f+0, g+0 }' "$log")
  passed=$((passed + t_pass)); failed=$((failed + t_fail))
}
step() { printf '\n== %s (%ss)\n' "$1" $(( $(date +%s) - t0 )); }

step "build"
cargo build 2>&1 | grep -vE '^warning: netpair@'
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "test.sh: build failed"; broken=1; }

if [ $quick -eq 0 ] && [ $broken -eq 0 ]; then
  step "clippy (warnings are errors)"
  cargo clippy --all-targets -- -D warnings 2>&1 | grep -vE '^warning: netpair@' | tail -n 40
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "test.sh: clippy failed"; broken=1; }
fi

step "tier 1: unit tests"
cargo test --no-fail-fast 2>&1 | grep -vE '^warning: netpair@' | tee "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || broken=1
tally
privileged=$t_ign   # privileged/VM tests, run by tiers 2-3 below

run_ignored() { # TIER-NAME ARGS... : run ignored (privileged/VM) tests of eac-lab
  local name=$1; shift
  step "$name"
  cargo test --no-fail-fast -p eac-lab "$@" -- --ignored --nocapture 2>&1 | grep -vE '^warning: netpair@' | tee "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || broken=1
  tally
  privileged=$((privileged - t_pass - t_fail))
}

if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: SKIPPED tiers 2-3 ($privileged privileged/VM tests): they need root"
  skipped=$privileged
else
  lab_tests=$(cd tests/tests && ls *.rs | sed 's/\.rs$//' | grep -v '^vm_')
  args=(); for t in $lab_tests; do args+=(--test "$t"); done
  run_ignored "tier 2: lab (real kernel, real libvirtd)" "${args[@]}"
  vm_tests=$(cd tests/tests && ls vm_*.rs 2>/dev/null | sed 's/\.rs$//')
  if [ $quick -eq 1 ]; then
    echo "test.sh: --quick: VM tier not run"
  elif [ -n "$vm_tests" ]; then
    args=(); for t in $vm_tests; do args+=(--test "$t"); done
    run_ignored "tier 3: vm (Debian 6.12 guest, ublk_drv)" "${args[@]}"
  fi
  skipped=$privileged
fi

leftover=$(ip netns list 2>/dev/null | grep -c '^eac-' || true)
if [ "$leftover" -ne 0 ]; then
  echo "test.sh: $leftover lab namespaces left behind:"; ip netns list | grep '^eac-'; broken=1
fi

echo
echo "wall time: $(( $(date +%s) - t0 ))s"
[ $broken -eq 1 ] && [ $failed -eq 0 ] && failed=1 && echo "test.sh: a build, lint or cleanup step failed (counted as 1 failure)"
echo "$passed passed, $failed failed, $skipped skipped"
[ $failed -eq 0 ]
