#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs all test suites: `unit` (seconds, synthetic
# data) and `e2e` (the pathkernel binary on real Fashion-MNIST). Extra arguments go to ctest,
# e.g. `bash scripts/test.sh -L unit`. Without arguments, ctest runs the e2e tests and the unit
# binary runs whole under this CPU's OpenBLAS kernel set and two or three others
# (scripts/blas_cores.sh), each differently rounded.
#
# With CI set (as CI runs it) or with --sanitize first, a second build with clang,
# AddressSanitizer and UndefinedBehaviorSanitizer (build-sanitize/, about 6 more minutes from
# scratch on 2 cores) runs the unit tests, then every libFuzzer harness of tests/fuzz for 20 s
# (scripts/fuzz.sh); any report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
sanitize="${CI:-}"
if [ "${1:-}" = "--sanitize" ]; then
  sanitize=1
  shift
fi
# chromium: the report is opened in a real headless browser (ReportBrowserTest); slurm-wlm and
# munge: a real single-node Slurm runs the sharded analysis (SlurmTest).
if [ -n "$sanitize" ]; then
  bash scripts/setup.sh chromium slurm-wlm munge clang libclang-rt-14-dev  # + libFuzzer and the sanitizer runtimes
else
  bash scripts/setup.sh chromium slurm-wlm munge
fi
echo "test: set up and built in ${SECONDS} s" >&2
if [ -n "$sanitize" ]; then
  echo "test: unit tests under ASan + UBSan, and the fuzzers (build-sanitize/)" >&2
  CC=clang CXX=clang++ cmake -S . -B build-sanitize -G Ninja -DCMAKE_BUILD_TYPE=Release -DPATHKERNEL_SANITIZE=ON \
    -DPATHKERNEL_FUZZ=ON -DPATHKERNEL_BUILD_BENCH=OFF >&2
  cmake --build build-sanitize -j 2 --target pathkernel_unit_tests pathkernel_fuzzers >&2
  # LibTorch is not instrumented: its own allocations are not leak-checked, and it frees some
  # memory with another operator than it allocated it with.
  # In two halves at once (gtest's sharding), one per core.
  asan_st=0
  asan_pids=()
  for shard in 0 1; do
    ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 GTEST_TOTAL_SHARDS=2 GTEST_SHARD_INDEX=$shard \
      ./build-sanitize/tests/pathkernel_unit_tests --gtest_brief=1 &
    asan_pids+=($!)
  done
  for p in "${asan_pids[@]}"; do wait "$p" || asan_st=1; done
  [ "$asan_st" -eq 0 ]
  bash scripts/fuzz.sh --time 20
  echo "test: sanitizers and fuzzers done at ${SECONDS} s" >&2
fi
if [ $# -gt 0 ]; then
  ctest --test-dir build --output-on-failure -j 2 "$@"
else
  # Everything: the e2e tests (and the layer checks) by ctest, a process each; the unit binary
  # whole, in one process per OpenBLAS kernel set (each test in a process of its own costs
  # LibTorch's start-up 200 times over): this CPU's own, then others than this CPU's
  # (scripts/blas_cores.sh; PATHKERNEL_CORES=none skips them), where a tolerance tuned to one
  # kernel set's rounding fails here, not on a user's machine. Four at a time on the 2 cores
  # (each is one thread; the CI run must stay under 30 minutes).
  ctest --test-dir build --output-on-failure -j 2 -LE unit
  echo "test: ctest done at ${SECONDS} s" >&2
  cores=(own)
  if [ "${PATHKERNEL_CORES:-}" != none ]; then
    mapfile -t more < <(bash scripts/blas_cores.sh)
    cores+=("${more[@]}")
  fi
  unit_run() {  # $1: an OpenBLAS kernel set, or "own"
    local log="build/unit-tests-$1.log" st=0
    if [ "$1" = own ]; then
      timeout 1200 ./build/tests/pathkernel_unit_tests --gtest_brief=1 > "$log" 2>&1 || st=$?
    else
      OPENBLAS_CORETYPE="$1" timeout 1200 ./build/tests/pathkernel_unit_tests --gtest_brief=1 > "$log" 2>&1 || st=$?
    fi
    if [ "$st" -ne 0 ]; then
      echo "test: the unit tests under kernel set $1 FAILED (status $st):" >&2
      cat "$log" >&2
    else
      echo "test: the unit tests under kernel set $1: $(grep 'PASSED' "$log" | tail -1)" >&2
    fi
    return "$st"
  }
  failed=0
  pids=()
  for core in "${cores[@]}"; do
    echo "test: the unit tests, whole, under kernel set $core" >&2
    unit_run "$core" &
    pids+=($!)
    if [ ${#pids[@]} -eq 4 ]; then
      for p in "${pids[@]}"; do wait "$p" || failed=1; done
      pids=()
    fi
  done
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  [ "$failed" -eq 0 ]
  echo "test: all passed in ${SECONDS} s" >&2
fi
# The largest functions and files of lib/ (issue 24: informational, gates nothing).
python3 scripts/code_size.py --top 5 >&2 || true
