#!/usr/bin/env bash
# docs/findings.md, "The kernel-machine view under momentum and Adam" (issue 7): one epoch of
# mlp:128:tanh on Fashion-MNIST with plain SGD, SGD + momentum, Nesterov, Adam and AdamW; each
# run analyzed at 64 test probes x 10 logits and explained at 16 probes (first order and exact,
# 8 nodes), then a table. Resumable: finished steps are kept. About 20 minutes on one core.
#
# usage: scripts/findings_optimizers.sh [OUT]        (default: findings/optimizers)
set -euo pipefail
cd "$(dirname "$0")/.."
pk=./build/apps/pathkernel
out=${1:-findings/optimizers}
mkdir -p "$out"

one() {
  local name=$1
  shift
  local dir="$out/$name"
  if [ ! -f "$dir/run/COMPLETE" ]; then
    if [ -d "$dir/run" ]; then $pk train --resume "$dir/run"; else
      $pk train --model mlp:128:tanh --epochs 1 --batch 64 "$@" --out "$dir/run"; fi
  fi
  [ -f "$dir/analysis/summary.json" ] || $pk analyze "$dir/run" --probes 64 --out "$dir/analysis" --force
  [ -f "$dir/explain/summary.json" ] || $pk explain "$dir/run" --probes 16 --exact 8 --grids 4 --out "$dir/explain" --force
}

one sgd --lr 0.1
one momentum --lr 0.01 --momentum 0.9
one nesterov --lr 0.01 --momentum 0.9 --nesterov
one adam --optimizer adam --lr 1e-3
one adamw --optimizer adamw --lr 1e-3 --weight-decay 1e-2
python3 scripts/findings_table.py "$out" sgd momentum nesterov adam adamw
