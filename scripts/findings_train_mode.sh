#!/usr/bin/env bash
# docs/findings.md, "BatchNorm and attention" (issue 26): the note's question on the networks
# people train. One lr grid of plain SGD (batch 64, 300 steps on the first 10 000 Fashion-MNIST
# training images) for an MLP (784-128-10, tanh), a CNN with BatchNorm in training mode (two
# conv-BatchNorm-ReLU-pool blocks, a linear head) and a small ViT (7x7 patches, self-attention,
# LayerNorm, GELU), recorded from PyTorch (examples/record_custom.py), each analyzed at 32 test
# probes x 10 logits; then the table (scripts/findings_train_mode_table.py) and a report of the
# BatchNorm CNN at lr 0.1. Resumable: finished runs and analyses are kept. About 15 minutes on two cores.
#
# usage: scripts/findings_train_mode.sh [OUT]        (default: findings/train-mode)
set -euo pipefail
cd "$(dirname "$0")/.."
pk=./build/apps/pathkernel
py=/usr/bin/python3
out=${1:-findings/train-mode}
steps=${STEPS:-300}
mkdir -p "$out"

one() {
  local name=$1 model=$2 lr=$3
  local dir="$out/$name"
  if [ ! -f "$dir/run/COMPLETE" ]; then
    rm -rf "$dir/run"
    mkdir -p "$dir"
    $py examples/record_custom.py "$dir/run" --model "$model" --sgd "$lr" --steps "$steps" --batch 64 --train-limit 10000
    echo "$model" > "$dir/model.txt"
  fi
  [ -f "$dir/analysis/summary.json" ] || $pk analyze "$dir/run" --probes 32 --workers 2 --out "$dir/analysis" --force
}

names=()
for lr in 0.01 0.1 0.5; do
  for model in mlp bncnn vit; do
    one "$model-$lr" "$model" "$lr"
    names+=("$model-$lr")
  done
done
[ -f "$out/bncnn-0.1/report/report.html" ] || $pk report "$out/bncnn-0.1/analysis" --out "$out/bncnn-0.1/report" --force
$py scripts/findings_train_mode_table.py "$out" "${names[@]}"
