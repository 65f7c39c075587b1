#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs all test suites: `unit` (seconds, synthetic
# data) and `e2e` (the pathkernel binary on real Fashion-MNIST). Extra arguments go to ctest,
# e.g. `bash scripts/test.sh -L unit`.
#
# With CI set (as CI runs it) or with --sanitize first, the unit tests also run in a build
# with AddressSanitizer and UndefinedBehaviorSanitizer (build-asan/, about 7 more minutes from
# scratch on 2 cores); any report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
sanitize="${CI:-}"
if [ "${1:-}" = "--sanitize" ]; then
  sanitize=1
  shift
fi
bash scripts/setup.sh
if [ -n "$sanitize" ]; then
  echo "test: unit tests under ASan + UBSan (build-asan/)" >&2
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Release -DPATHKERNEL_SANITIZE=ON \
    -DPATHKERNEL_BUILD_BENCH=OFF >&2
  cmake --build build-asan -j 2 --target pathkernel_unit_tests >&2
  # LibTorch is not instrumented: its own allocations are not leak-checked, and it frees some
  # memory with another operator than it allocated it with.
  ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ./build-asan/tests/pathkernel_unit_tests --gtest_brief=1
fi
ctest --test-dir build --output-on-failure -j 2 "$@"
