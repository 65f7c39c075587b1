#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs all test suites: `unit` (seconds, synthetic
# data) and `e2e` (the pathkernel binary on real Fashion-MNIST). Extra arguments go to ctest,
# e.g. `bash scripts/test.sh -L unit`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ctest --test-dir build --output-on-failure -j 2 "$@"
