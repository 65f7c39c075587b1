#!/usr/bin/env bash
# The default job: set everything up, then train mlp:128:tanh for one epoch on the real
# Fashion-MNIST into a new run directory under runs/, and print the run's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
run="runs/fashion-mlp-$(date +%Y%m%d-%H%M%S)"
mkdir -p runs
./build/apps/pathkernel train --model mlp:128:tanh --epochs 1 --lr 0.1 --batch 64 --eval-every 200 --out "$run"
echo "run directory: $run (format: docs/run-format.md)"
