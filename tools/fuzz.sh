#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (policy, token, path, cel) for SECONDS each (default 60)
# and prints one line per target: executions, corpus size, and any crash or hang it found.
#
#   tools/fuzz.sh                # every target, 60 s each
#   tools/fuzz.sh 300            # every target, 5 minutes each
#   tools/fuzz.sh 120 path cel   # some targets
#
# Needs the nightly toolchain (rustup toolchain install nightly) and cargo-fuzz (installed here
# if missing). Builds with cargo-fuzz's defaults: optimised, debug assertions and overflow checks
# on, AddressSanitizer. The committed seeds in fuzz/corpus/<target>/ are read, never written: new
# inputs go to fuzz/work/<target>/ and crashes to fuzz/artifacts/<target>/ (both git-ignored).
# A crash is turned into a test in core/tests/regressions.rs. Exit status 1 if any target crashed.
#
# libFuzzer stops at the first crash; FUZZ_KEEP_GOING=1 runs it in fork mode instead, carrying on
# past crashes and hangs (each saved), to see what else a known bug hides.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_PER_TARGET="${1:-60}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(policy token path cel)

case "$SECONDS_PER_TARGET" in
  '' | *[!0-9]*) echo "usage: tools/fuzz.sh [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac

# Inputs past these lengths are refused before any work (MAX_TOKEN_BYTES 8192,
# MAX_EXPRESSION_LEN 2048); a little beyond, so the refusal itself is fuzzed.
max_len() {
  case "$1" in
    policy) echo 16384 ;;
    token) echo 9000 ;;
    path) echo 4096 ;;
    cel) echo 2100 ;;
    *) echo 4096 ;;
  esac
}

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz.sh: the nightly toolchain is needed: rustup toolchain install nightly" >&2
  exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

cd "$ROOT"
status=0
summary=()
for target in "${TARGETS[@]}"; do
  if [ ! -f "fuzz/fuzz_targets/$target.rs" ]; then
    echo "fuzz.sh: no target \`$target\` (fuzz/fuzz_targets/*.rs)" >&2
    exit 2
  fi
  work="fuzz/work/$target"
  artifacts="fuzz/artifacts/$target"
  mkdir -p "$work" "$artifacts" "fuzz/corpus/$target"
  log="fuzz/work/$target.log"
  keep_going=()
  [ "${FUZZ_KEEP_GOING:-0}" = 1 ] && keep_going=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
  before=$(find "$artifacts" -type f | sort)
  # Build first, so the time limit is all fuzzing.
  cargo +nightly fuzz build "$target" >"$log" 2>&1 || { cat "$log" >&2; exit 2; }
  echo "== $target: ${SECONDS_PER_TARGET}s (log: $log)"
  set +e
  cargo +nightly fuzz run "$target" "$work" "fuzz/corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=4096 -max_len="$(max_len "$target")" \
    -artifact_prefix="$artifacts/" -print_final_stats=1 "${keep_going[@]}" >>"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  execs=${execs:-$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#' || true)}
  corpus=$(find "$work" -type f | wc -l)
  found=$(comm -13 <(echo "$before") <(find "$artifacts" -type f | sort) | xargs -r -n1 basename | tr '\n' ' ')
  if [ "$rc" -ne 0 ] || [ -n "$found" ]; then
    status=1
    line="$target: ${execs:-?} executions, corpus $corpus, FOUND ${found:-a failure (exit $rc)} -> $artifacts/"
    grep -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" | head -5 || true
  else
    line="$target: ${execs:-?} executions in ${SECONDS_PER_TARGET}s, corpus $corpus, no crash"
  fi
  echo "   $line"
  summary+=("$line")
done

echo
echo "fuzz summary"
printf '  %s\n' "${summary[@]}"
exit "$status"
