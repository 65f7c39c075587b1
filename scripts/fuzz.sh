#!/usr/bin/env bash
# Runs every libFuzzer harness of tests/fuzz (built by scripts/test.sh --sanitize, or by
#   CC=clang CXX=clang++ cmake -S . -B build-sanitize -G Ninja -DPATHKERNEL_SANITIZE=ON -DPATHKERNEL_FUZZ=ON
#   cmake --build build-sanitize --target pathkernel_fuzzers)
# two at a time, each from its seeds (tests/fuzz/corpus/NAME) and past crashes
# (tests/fuzz/regressions/NAME), in a scratch corpus so the repository is not changed.
#
#   bash scripts/fuzz.sh [--time SECONDS | --runs N] [NAME...]     (default: --time 30, all)
#
# Prints the executions of each harness. A crash, a sanitizer report, a leak of an exception
# other than bad input, a timeout (10 s) or more than 4 GB of memory fails the run and leaves
# the input in build-sanitize/fuzz-findings/ (copy it to tests/fuzz/regressions/NAME/ once fixed).
set -euo pipefail
cd "$(dirname "$0")/.."
limit=(-max_total_time=30)
if [ "${1:-}" = "--time" ]; then limit=(-max_total_time="$2"); shift 2; fi
if [ "${1:-}" = "--runs" ]; then limit=(-runs="$2"); shift 2; fi
names=("$@")
if ((${#names[@]} == 0)); then names=(checkpoint idx npy manifest step_log csv lr_schedule); fi
bin=build-sanitize/tests/fuzz
findings=build-sanitize/fuzz-findings
# Scratch files on tmpfs when there is one: each input is written to a file for the readers.
scratch=$(mktemp -d -p "$( [ -d /dev/shm ] && [ -w /dev/shm ] && echo /dev/shm || echo /tmp)")
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$findings"
export ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export TMPDIR="$scratch"

one() {
  local name=$1 seeds=(tests/fuzz/corpus/"$1")
  [ -d tests/fuzz/regressions/"$name" ] && seeds+=(tests/fuzz/regressions/"$name")
  mkdir -p "$scratch/$name"
  if "$bin/fuzz_$name" "${limit[@]}" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
      -artifact_prefix="$findings/$name-" "$scratch/$name" "${seeds[@]}" >"$scratch/$name.log" 2>&1; then
    echo "fuzz $name: $(grep -o 'stat::number_of_executed_units: *[0-9]*' "$scratch/$name.log" | grep -o '[0-9]*$') executions, no finding"
  else
    echo "fuzz $name: FAILED; the last lines of its log:"
    grep -v '^#[0-9]' "$scratch/$name.log" | tail -40
    return 1
  fi
}

status=0
pids=()
for name in "${names[@]}"; do
  one "$name" & pids+=($!)
  if ((${#pids[@]} == 2)); then
    wait "${pids[0]}" || status=1
    pids=("${pids[1]}")
  fi
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
