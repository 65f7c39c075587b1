#!/usr/bin/env bash
# The default job: set everything up, train mlp:128:tanh for one epoch on the real Fashion-MNIST
# into a new run directory under runs/, then analyze every step at 64 test probes (all 10
# logits, with the exact second-order term), print the note's Eq. 9 with numbers, and write the
# report (PNG plots and report.html).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
run="runs/fashion-mlp-$(date +%Y%m%d-%H%M%S)"
mkdir -p runs
./build/apps/pathkernel train --model mlp:128:tanh --epochs 1 --lr 0.1 --batch 64 --eval-every 200 --out "$run"
echo
workers=$(nproc); [ "$workers" -gt 8 ] && workers=8   # one process per core: the same analysis, sooner
./build/apps/pathkernel analyze "$run" --probes 64 --second-order --workers "$workers" --out "$run/analysis"
./build/apps/pathkernel report "$run/analysis" --out "$run/report"
echo "run directory: $run; open $run/report/report.html (formats: docs/run-format.md, docs/analysis-format.md)"
