#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs all test suites: `unit` (seconds, synthetic
# data) and `e2e` (the pathkernel binary on real Fashion-MNIST). Extra arguments go to ctest,
# e.g. `bash scripts/test.sh -L unit`. Without arguments, the unit tests then run again under
# two or three other OpenBLAS kernel sets (scripts/blas_cores.sh), each differently rounded.
#
# With CI set (as CI runs it) or with --sanitize first, a second build with clang,
# AddressSanitizer and UndefinedBehaviorSanitizer (build-sanitize/, about 6 more minutes from
# scratch on 2 cores) runs the unit tests, then every libFuzzer harness of tests/fuzz for 30 s
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
if [ -n "$sanitize" ]; then
  echo "test: unit tests under ASan + UBSan, and the fuzzers (build-sanitize/)" >&2
  CC=clang CXX=clang++ cmake -S . -B build-sanitize -G Ninja -DCMAKE_BUILD_TYPE=Release -DPATHKERNEL_SANITIZE=ON \
    -DPATHKERNEL_FUZZ=ON -DPATHKERNEL_BUILD_BENCH=OFF >&2
  cmake --build build-sanitize -j 2 --target pathkernel_unit_tests pathkernel_fuzzers >&2
  # LibTorch is not instrumented: its own allocations are not leak-checked, and it frees some
  # memory with another operator than it allocated it with.
  ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ./build-sanitize/tests/pathkernel_unit_tests --gtest_brief=1
  bash scripts/fuzz.sh --time 30
fi
ctest --test-dir build --output-on-failure -j 2 "$@"
# The unit tests again under other OpenBLAS kernel sets than this CPU's (scripts/blas_cores.sh):
# a tolerance tuned to one kernel set's rounding fails here, not on a user's machine. Only for
# the whole run (extra arguments select tests to run once). PATHKERNEL_CORES=none skips this.
# The unit binary runs whole, in one process per kernel set (as under the sanitizers above): half
# the time of a process per test, which the first pass already gave every test.
if [ $# -eq 0 ] && [ "${PATHKERNEL_CORES:-}" != none ]; then
  for core in $(bash scripts/blas_cores.sh); do
    echo "test: the unit tests under OPENBLAS_CORETYPE=$core" >&2
    OPENBLAS_CORETYPE=$core timeout 1200 ./build/tests/pathkernel_unit_tests --gtest_brief=1
  done
fi
# The largest functions and files of lib/ (issue 24: informational, gates nothing).
python3 scripts/code_size.py --top 5 >&2 || true
